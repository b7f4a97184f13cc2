"""`/openapi.json` is a valid OpenAPI 3.1 document that describes every route the app serves."""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from api import create_app
from api.openapi import openapi_spec
from tasks.settings import Settings


def test_spec_is_valid_openapi():
    validate(openapi_spec())


def test_every_route_is_documented_with_its_methods():
    app = create_app(Settings())
    served = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        served.setdefault(path, set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: set(ops) for path, ops in openapi_spec()["paths"].items()}
    assert {p: served[p] for p in served if p != "/openapi.json"} == documented
