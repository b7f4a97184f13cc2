"""deploy/ec2/: systemd units, avsr.env.example and install.sh against the code and the process contract."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tasks.settings import Settings
from tests.unit.test_deploy_compose import (
    API_COMMAND,
    CPU_COMMAND,
    EXTRA_VARIABLES,
    FLOWER_COMMAND,
    GPU_COMMAND,
    parse_env_file,
)

ROOT = Path(__file__).resolve().parents[2]

EC2 = ROOT / "deploy" / "ec2"
VENV_BIN = "/opt/avsr/venv/bin/"
UNITS = ["avsr-api.service", "avsr-cpu-worker@.service", "avsr-gpu-worker@.service", "avsr-flower.service"]
WORKER_UNITS = ["avsr-cpu-worker@.service", "avsr-gpu-worker@.service"]
# Where the units must differ from the compose commands, and why.
EXPECTED_EXEC = {
    "avsr-api.service": API_COMMAND,
    # Several instances per host: each its own Celery node name (cpu1@host, cpu2@host, ...).
    "avsr-cpu-worker@.service": [a.replace("cpu@%h", "cpu%i@%%h") for a in CPU_COMMAND],
    "avsr-gpu-worker@.service": [a.replace("gpu@%h", "gpu%i@%%h") for a in GPU_COMMAND],
    # Flower listens on loopback only: reached through an SSH tunnel.
    "avsr-flower.service": [*FLOWER_COMMAND, "--address=127.0.0.1"],
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd unit → {section: {key: [values...]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(name: str) -> dict[str, list[str]]:
    return parse_unit(EC2 / name)["Service"]


def environment(name: str) -> dict[str, str]:
    pairs = [p for line in service(name).get("Environment", []) for p in shlex.split(line)]
    return dict(p.split("=", 1) for p in pairs)


def test_every_unit_file_is_known_and_present():
    assert sorted(p.name for p in EC2.glob("*.service")) == sorted(UNITS)


@pytest.mark.parametrize("unit", UNITS)
def test_units_run_as_avsr_with_the_env_file_and_restart_on_failure(unit):
    sections = parse_unit(EC2 / unit)
    svc = sections["Service"]
    assert svc["User"] == ["avsr"] and svc["Group"] == ["avsr"]
    assert svc["EnvironmentFile"] == ["/etc/avsr/avsr.env"]
    assert svc["WorkingDirectory"] == ["/opt/avsr/app"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["KillSignal"] == ["SIGTERM"]
    # Only the main process gets SIGTERM: Celery's prefork children reset SIGTERM to its default and
    # would die with the task in hand under the default KillMode=control-group.
    assert svc["KillMode"] == ["mixed"]
    assert svc["NoNewPrivileges"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
    assert sections["Install"]["WantedBy"] == ["avsr.target"]
    assert sections["Unit"]["PartOf"] == ["avsr.target"]


@pytest.mark.parametrize("unit", UNITS)
def test_exec_start_is_the_process_contract(unit):
    (exec_start,) = service(unit)["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == VENV_BIN + EXPECTED_EXEC[unit][0]
    assert argv[1:] == EXPECTED_EXEC[unit][1:]


@pytest.mark.parametrize("unit", WORKER_UNITS)
def test_workers_may_finish_the_task_in_hand_before_sigkill(unit):
    assert int(service(unit)["TimeoutStopSec"][0]) >= Settings().task_time_limit_s
    assert "%i" in parse_unit(EC2 / unit)["Unit"]["Description"][0]


def test_gpu_worker_instance_is_the_gpu_index():
    assert environment("avsr-gpu-worker@.service")["CUDA_VISIBLE_DEVICES"] == "%i"
    argv = shlex.split(service("avsr-gpu-worker@.service")["ExecStart"][0])
    assert argv[argv.index("--pool") + 1] == "threads"
    assert "--concurrency" not in argv  # AVSR_GPU_CONCURRENT_JOBS


def test_env_example_covers_the_settings_and_parses(monkeypatch):
    values = parse_env_file(EC2 / "avsr.env.example")
    settings = set(Settings.environment_variables())
    assert not settings - set(values), f"missing from deploy/ec2/avsr.env.example: {settings - set(values)}"
    unknown = set(values) - settings - set(EXTRA_VARIABLES)
    assert not unknown, f"deploy/ec2/avsr.env.example sets variables nothing reads: {unknown}"
    # EnvironmentFile= overrides Environment=: the per-GPU setting must not be in the file.
    assert "CUDA_VISIBLE_DEVICES" not in values
    redis = urlparse(values["AVSR_REDIS_URL"])
    assert (redis.hostname, redis.port) == ("127.0.0.1", 6379)
    assert values["AVSR_S3_ENDPOINT_URL"] == "" and values["AWS_ACCESS_KEY_ID"] == "", "AWS S3, instance role"
    for name, value in values.items():
        monkeypatch.setenv(name, value.replace("__GENERATED__", "x"))
    parsed = Settings.from_env()  # every value parses
    for f in fields(Settings):
        if f.metadata["kind"] in (int, float, bool):
            assert getattr(parsed, f.name) == getattr(Settings(), f.name), f.metadata["env"]


def test_install_sh_syntax_shellcheck_and_what_it_does():
    script = EC2 / "install.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    assert "nvidia-smi" in text
    assert "python3.11 -m venv" in text
    assert "\"${REPO}/pyproject.toml\" | tr -d" in text, "torch version comes from pyproject.toml"
    assert text.index('"${TORCH_PIN}"') < text.index('install --quiet "${APP_DIR}[${EXTRAS}]"'), "torch first"
    assert "all) NEED_GPU=1; EXTRAS=api,cpu,gpu,flower ;;" in text and "cpu-worker) NEED_GPU=0; EXTRAS=cpu ;;" in text
    assert "set_conf appendonly yes" in text
    assert '"${HERE}"/*.service' in text, "every unit file is installed"
    assert '"${HERE}/avsr.env.example"' in text
    for package in ("api", "tasks", "cpu_worker", "gpu_worker"):
        assert package in text.split("for package in ")[1].split(";")[0]


def test_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` in a scratch root holding the units and stand-in binaries."""
    analyze = shutil.which("systemd-analyze")
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                         if (p / "sysinit.target").exists()), None)
    if analyze is None or system_units is None:
        pytest.skip("systemd-analyze or the system's units are not installed")
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in [*UNITS, "avsr.target"]:
        shutil.copy(EC2 / unit, root / "etc/systemd/system" / unit)
    (root / VENV_BIN.lstrip("/")).mkdir(parents=True)
    for binary in ("celery", "gunicorn"):
        stub = root / VENV_BIN.lstrip("/") / binary
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    names = ["avsr-api.service", "avsr-cpu-worker@1.service", "avsr-gpu-worker@0.service",
             "avsr-flower.service", "avsr.target"]
    result = subprocess.run([analyze, "verify", f"--root={root}", *names], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


STUBS = {
    "apt-get": "",
    "add-apt-repository": "",
    "systemctl": "",
    "redis-cli": "",
    "apt-cache": 'echo "  Candidate: 3.11.0-1"',
    "nvidia-smi": 'case "$*" in -L) echo "GPU 0: NVIDIA A10G (UUID: GPU-a)"; echo "GPU 1: NVIDIA A10G (UUID: GPU-b)";;'
                  ' *query*) echo "550.54.15";; esac',
}


def test_install_sh_runs_twice_in_a_scratch_mount_namespace(tmp_path):
    """install.sh for real, twice, with apt/systemd/GPU/pip stubbed and /etc, /opt private copies.

    Needs root and `unshare -m` (CI runs as root); /etc is a bind-mounted copy, so the user, the
    env file and the units it creates vanish with the namespace.
    """
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("needs root and unshare")
    if subprocess.run([unshare, "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("mount namespaces are not permitted here")
    log = tmp_path / "calls.log"
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{body}\n')
        (stubs / name).chmod(0o755)
    etc = tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    (etc / "redis").mkdir(exist_ok=True)
    (etc / "redis" / "redis.conf").write_text("bind 127.0.0.1 -::1\nappendonly no\n# appendfsync always\n")
    script = f"""
set -euo pipefail
mount --make-rprivate /
mount --bind {etc} /etc
mount -t tmpfs tmpfs /opt
[ -f /etc/redis/redis.conf ] && grep -q '^appendonly no' /etc/redis/redis.conf  # the copy is in place
mkdir -p /opt/avsr/venv/bin
for tool in pip python; do printf '#!/bin/sh\\necho "venv-%s $*" >> {log}\\n' $tool > /opt/avsr/venv/bin/$tool; done
chmod +x /opt/avsr/venv/bin/*
for run in 1 2; do
  PATH={stubs}:$PATH AVSR_WORK_BUCKET=my-work AVSR_CPU_WORKERS=3 bash {EC2 / 'install.sh'} >/dev/null
done
id -u avsr
stat -c '%U:%G %a' /etc/avsr/avsr.env
cat /etc/avsr/avsr.env
ls /etc/systemd/system /opt/avsr/app
grep -E '^append' /etc/redis/redis.conf
"""
    result = subprocess.run([unshare, "-m", "bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "root:avsr 640" in out
    env = dict(line.split("=", 1) for line in out.splitlines() if line.startswith(("AVSR_", "FLOWER_")))
    assert len(env["AVSR_API_KEYS"]) == 64 and not any("__GENERATED__" in v for v in env.values())
    assert env["AVSR_WORK_BUCKET"] == "my-work"
    for unit in [*UNITS, "avsr.target"]:
        assert unit in out.split()
    for package in ("api", "tasks", "cpu_worker", "gpu_worker", "pyproject.toml", "README.md"):
        assert package in out.split()
    assert "appendonly yes" in out and "appendfsync everysec" in out
    calls = log.read_text().splitlines()
    pips = [c for c in calls if c.startswith("venv-pip install")]
    assert "torch==" in pips[1] and "download.pytorch.org/whl/cu128" in pips[1]
    assert pips[2] == "venv-pip install --quiet /opt/avsr/app[api,cpu,gpu,flower]"
    enabled = [c for c in calls if c.startswith("systemctl enable")]
    assert enabled.count("systemctl enable --now avsr-api.service avsr-flower.service "
                         "avsr-cpu-worker@1.service avsr-cpu-worker@2.service avsr-cpu-worker@3.service") == 2
    # No checkpoint: both GPU workers are enabled, not started.
    assert "systemctl enable avsr-gpu-worker@0.service avsr-gpu-worker@1.service" in calls
    assert not Path("/etc/avsr").exists(), "the namespace leaked into the host"
