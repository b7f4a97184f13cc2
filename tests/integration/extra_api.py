"""A second API process (gunicorn) on the test stack with its own environment, for fault and limit tests."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import requests

from deploy.local.stack import VENV_BIN
from tests.conftest import ROOT

from .conftest import API_KEY, Api


@contextlib.contextmanager
def extra_api(stack, port: int, env: dict[str, str], name: str, args: tuple[str, ...] = ()) -> Iterator[Api]:
    """Run `gunicorn api:create_app()` (the production config, `args` added) on 127.0.0.1:`port` with the
    stack's environment plus `env`."""
    log = open(stack.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen([str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1",
                             "--threads", "4", "--config", "python:api.gunicorn_conf", *args,
                             "api:create_app()"], cwd=ROOT, env=stack.config.env() | env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or still importing
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the {name} API did not start; see {log.name}")
            time.sleep(0.2)
        yield Api(base, API_KEY)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
