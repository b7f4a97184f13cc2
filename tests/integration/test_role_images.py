"""What the images install runs the code: each role's process, started from a fresh venv holding only
that role's extra of pyproject.toml (what `deploy/docker/Dockerfile` with ROLE=…, `Dockerfile.gpu`
and `deploy/ec2/install.sh` install).

The project is built into a wheel once and installed with `pip install '<wheel>[role]'` (pip's cache
makes repeated runs cheap); every process runs from a scratch folder, so the checkout is not on
`sys.path`. The workers use their own Redis DB, so they never take work from the integration stack.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from tests.conftest import REFERENCE, ROOT

from .conftest import ROLE_REDIS_URL, _unavailable

pytestmark = pytest.mark.integration

REDIS_URL = ROLE_REDIS_URL
ROLES = ("api", "cpu", "gpu", "flower")
# Modules each role's venv must not even have installed.
FORBIDDEN = {
    "api": ("torch", "dlib", "numba", "cv2", "av", "scipy", "sentencepiece", "flower"),
    "cpu": ("torch", "sentencepiece", "flask", "gunicorn"),
    "gpu": ("dlib", "numba", "cv2", "av", "scipy", "flask", "gunicorn"),
    "flower": ("torch", "dlib", "numba", "cv2", "av", "scipy", "flask"),
}


def _pip(venv: Path, *args: str) -> None:
    # --no-compile: byte-compiling every installed module (torch's thousands) is most of pip's time;
    # the processes compile what they import
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
                             "--disable-pip-version-check", *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"pip install {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                             "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return next(out.glob("avsr_pipeline-*.whl"))


@pytest.fixture(scope="module")
def venvs(wheel, tmp_path_factory) -> dict[str, Path]:
    """One fresh venv per role: the role's extra alone (the GPU role gets torch first, as its image)."""
    root = tmp_path_factory.mktemp("venvs")

    def build(role: str) -> Path:
        venv = root / role
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        if role == "gpu":
            _pip(venv, f"torch=={_torch_pin()}")
        _pip(venv, f"{wheel}[{role}]")
        return venv

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(ROLES, pool.map(build, ROLES), strict=True))


def _torch_pin() -> str:
    import tomllib

    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    return next(d.split("==")[1] for d in gpu if d.startswith("torch=="))


@pytest.fixture(scope="module")
def role_redis() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {REDIS_URL}: {exc}")
    yield client
    client.flushdb()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVSR_", "AVHUBERT_", "PYTHON"))}
    env.update(AVSR_REDIS_URL=REDIS_URL, AVSR_HEARTBEAT_INTERVAL_S="1", AVSR_LOG_JSON="0", PYTHONUNBUFFERED="1",
               **extra)
    return env


class _Process:
    """A process started from a venv in a scratch folder; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]):
        self.log = cwd / "process.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def __enter__(self) -> _Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()

    def wait_for(self, predicate, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{what}: exited {self.proc.returncode}\n{self.log.read_text()[-3000:]}"
            try:
                if predicate():
                    return
            except (requests.RequestException, redis.RedisError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"{what} not ready in {timeout:.0f}s\n{self.log.read_text()[-3000:]}")


@pytest.mark.parametrize("role", ROLES)
def test_role_venv_holds_only_its_dependencies(venvs, role, tmp_path):
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))")
    out = subprocess.run([str(venvs[role] / "bin" / "python"), "-c", probe, *FORBIDDEN[role]], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [], f"the {role} venv installs what its process must not need: {out}"


def test_api_answers_health_through_gunicorn(venvs, role_redis, tmp_path):
    port = _free_port()
    argv = [str(venvs["api"] / "bin" / "gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--config", "python:api.gunicorn_conf", "api:create_app()"]
    with _Process(argv, tmp_path, _env()) as api:
        api.wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200,
                     "API /health", 60)
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        assert health["broker"]["ok"] is True
        probe = ("import sys, api; api.create_app(); "
                 "print(sorted(m for m in ('torch', 'dlib', 'cv2', 'av', 'scipy') if m in sys.modules))")
        loaded = subprocess.run([str(venvs["api"] / "bin" / "python"), "-c", probe], cwd=tmp_path, env=_env(),
                                capture_output=True, text=True, check=True).stdout.strip()
        assert loaded == "[]"


def _beat(r: redis.Redis, hostname: str) -> dict | None:
    raw = r.get(f"avsr:worker:{hostname}")
    return json.loads(raw) if raw else None


def test_cpu_worker_reaches_ready_on_its_queue(venvs, role_redis, tmp_path):
    hostname = f"cpu-image-{os.getpid()}@{socket.gethostname()}"
    argv = [str(venvs["cpu"] / "bin" / "celery"), "--app", "cpu_worker.worker", "worker", "--queues", "cpu",
            "--pool", "prefork", "--concurrency", "1", "--hostname", hostname, "--loglevel", "INFO"]
    with _Process(argv, tmp_path, _env()) as worker:
        worker.wait_for(lambda: _beat(role_redis, hostname) is not None, "CPU worker heartbeat", 90)
        banner = worker.log.read_text()
        assert "avsr.preprocess_chunk" in banner and "avsr.infer" not in banner, banner[-2000:]
        # the dlib model files are in the image, loaded before the pool forks (not by the first task)
        assert 0 <= banner.find("dlib models loaded") < banner.find(" ready."), banner[-2000:]
        assert _beat(role_redis, hostname)["role"] == "cpu"


def test_gpu_worker_loads_the_model_and_reaches_ready(venvs, role_redis, tmp_path):
    hostname = f"gpu-image-{os.getpid()}@{socket.gethostname()}"
    checkpoint = tmp_path / "model.pt"
    shutil.copy(REFERENCE / "checkpoints" / "finetune_s2s.pt", checkpoint)
    argv = [str(venvs["gpu"] / "bin" / "celery"), "--app", "gpu_worker.worker", "worker", "--queues", "gpu",
            "--pool", "threads", "--hostname", hostname, "--loglevel", "INFO"]
    env = _env(AVHUBERT_MODEL_PATH=str(checkpoint), AVSR_DEVICE="cpu")
    with _Process(argv, tmp_path, env) as worker:
        worker.wait_for(lambda: (_beat(role_redis, hostname) or {}).get("model_loaded"), "GPU worker model", 180)
        banner = worker.log.read_text()
        assert "avsr.infer" in banner and "avsr.preprocess_chunk" not in banner, banner[-2000:]
        assert _beat(role_redis, hostname)["device"] == "cpu"


def test_flower_starts(venvs, role_redis, tmp_path):
    port = _free_port()
    argv = [str(venvs["flower"] / "bin" / "celery"), "--app", "tasks.celery_app", "flower", f"--port={port}",
            "--address=127.0.0.1"]
    with _Process(argv, tmp_path, _env(FLOWER_BASIC_AUTH="u:p")) as flower:
        flower.wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).ok, "Flower", 60)


def test_lambda_handler_imports_with_the_standard_library_alone(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    shutil.copy(ROOT / "deploy" / "lambda" / "handler.py", tmp_path / "handler.py")
    result = subprocess.run([str(bare / "bin" / "python"), "-c", "import handler; print(handler.lambda_handler)"],
                            cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 0 and "function" in result.stdout, result.stderr
