"""Redis Sentinel end to end: a private redis-server and one Sentinel monitoring it.

Job records (`tasks.jobs`) and Celery (broker and result backend, `celery_config`) reach the
master only through the Sentinel, whose address is all `AVSR_REDIS_URL` names. No worker runs.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import closing

import pytest
import redis
from celery import Celery

from tasks import jobs
from tasks.celery_app import CPU_QUEUE, celery_config
from tasks.settings import Settings, get_settings

from .conftest import _unavailable

pytestmark = pytest.mark.integration

MASTER_NAME = "avsr-master"


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(check, what: str, procs: list[subprocess.Popen], timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except redis.RedisError:
            pass
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {'exited: ' + ', '.join(dead) if dead else 'timed out'}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sentinel_redis(tmp_path_factory):
    """(master port, sentinel port) of a running master and a Sentinel that knows it."""
    server = shutil.which("redis-server")
    if server is None:
        _unavailable("redis-server is not installed")
    tmp = tmp_path_factory.mktemp("sentinel")
    master_port, sentinel_port = _free_port(), _free_port()
    conf = tmp / "sentinel.conf"  # Sentinel rewrites its config file: it must be writable
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp}\n"
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} 5000\n")
    logs = [(tmp / "master.log").open("w"), (tmp / "sentinel.log").open("w")]
    procs = [subprocess.Popen([server, "--port", str(master_port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp)], stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        procs.append(subprocess.Popen([server, str(conf), "--sentinel"], stdout=logs[1], stderr=subprocess.STDOUT))
        master = redis.Redis(port=master_port, socket_timeout=2)
        sentinel = redis.Redis(port=sentinel_port, socket_timeout=2)
        _wait_for(master.ping, "redis-server", procs)
        _wait_for(lambda: sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME),
                  "sentinel", procs)
    except (OSError, RuntimeError) as exc:
        for proc in reversed(procs):
            _stop(proc)
        _unavailable(f"could not start redis-server and a sentinel: {exc}")
    yield master_port, sentinel_port
    for proc in reversed(procs):
        _stop(proc)
    for log in logs:
        log.close()


@pytest.fixture
def sentinel_env(sentinel_redis, monkeypatch):
    master_port, sentinel_port = sentinel_redis
    master = redis.Redis(port=master_port, decode_responses=True)
    master.flushall()
    monkeypatch.setenv("AVSR_REDIS_URL", f"sentinel://127.0.0.1:{sentinel_port}/0")
    monkeypatch.setenv("AVSR_REDIS_SENTINEL_MASTER", MASTER_NAME)
    get_settings.cache_clear()
    jobs._redis.cache_clear()
    yield master
    get_settings.cache_clear()
    jobs._redis.cache_clear()
    master.close()


def test_job_records_go_to_the_master_through_the_sentinel(sentinel_env):
    master = sentinel_env
    job = jobs.create({"input": {"type": "frames"}})
    jobs.update(job["job_id"], status=jobs.RUNNING, stage="preprocessing")
    stored = jobs.get(job["job_id"])
    assert (stored["status"], stored["stage"]) == (jobs.RUNNING, "preprocessing")
    assert isinstance(jobs.connection().connection_pool, redis.sentinel.SentinelConnectionPool)
    # The record is on the master (which AVSR_REDIS_URL never names), in DB 0 of the URL.
    on_master = master.get(f"avsr:job:{job['job_id']}")
    assert on_master is not None and '"status": "running"' in on_master
    assert master.hget(jobs.STATS_KEY, "jobs_running") == "1"


def test_celery_broker_and_result_backend_use_the_master(sentinel_env):
    master = sentinel_env
    settings = get_settings()
    config = celery_config(settings)
    assert config["broker_transport_options"]["master_name"] == MASTER_NAME
    assert config["result_backend_transport_options"]["master_name"] == MASTER_NAME
    visibility = settings.task_time_limit_s + 600
    assert config["broker_transport_options"]["visibility_timeout"] == visibility
    app = Celery("avsr-sentinel-test", set_as_current=False)
    app.conf.update(config)
    try:
        result = app.send_task("avsr.preprocess", args=["job-1"])
        assert master.llen(CPU_QUEUE) == 1
        assert result.id in master.lindex(CPU_QUEUE, 0)
        # The result backend stores and reads results on the master too.
        app.backend.store_result(result.id, {"text": "hello"}, "SUCCESS")
        assert master.exists(f"celery-task-meta-{result.id}")
        assert result.get(timeout=5) == {"text": "hello"}
    finally:
        app.close()


def test_sentinel_url_without_master_name_fails_at_start_up(sentinel_redis, monkeypatch):
    _, sentinel_port = sentinel_redis
    monkeypatch.setenv("AVSR_REDIS_URL", f"sentinel://127.0.0.1:{sentinel_port}/0")
    monkeypatch.delenv("AVSR_REDIS_SENTINEL_MASTER", raising=False)
    with pytest.raises(ValueError, match="AVSR_REDIS_SENTINEL_MASTER is empty"):
        Settings.from_env()
    with pytest.raises(ValueError, match="AVSR_REDIS_SENTINEL_MASTER"):
        Settings(redis_url=f"sentinel://127.0.0.1:{sentinel_port}/0;sentinel://127.0.0.1:1/0")
    # A plain URL needs no master name.
    assert Settings(redis_url="redis://127.0.0.1:6379/0").redis_sentinel_master == ""
