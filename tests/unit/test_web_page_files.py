"""The web page and /docs: static files only, no inline script or handler, every asset they name
is served (no CDN), strict Content-Security-Policy."""

from __future__ import annotations

import re

import pytest

from api import create_app
from tasks.settings import Settings


@pytest.fixture(scope="module")
def client():
    return create_app(Settings(api_keys=("k",))).test_client()


@pytest.mark.parametrize("page", ["/", "/docs"])
def test_page_names_only_served_assets(client, page):
    response = client.get(page)  # no API key needed: the page holds no data
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    assert "http://" not in html and "https://" not in html, "an asset from elsewhere"
    csp = response.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'self';") and "script-src" not in csp  # scripts: 'self' only
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
    assert assets
    for asset in assets:
        if asset != "/docs":
            assert client.get(asset).status_code == 200, asset


def test_upload_endpoint_is_allowed_by_the_page_policy(client):
    csp = client.get("/").headers["Content-Security-Policy"]
    assert "connect-src 'self' http://127.0.0.1:8333" in csp  # where presigned PUTs go
    assert "media-src 'self' blob:" in csp  # the local file and the fetched captions


def test_docs_assets_stay_in_the_package(client):
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/assets/..%2F__init__.py").status_code == 404
