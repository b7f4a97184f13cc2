"""Every setting of the service, read from the environment in one place.

Each field names its environment variable. Defaults are the embedded local stack's
(`make demo`): Redis on 127.0.0.1:6379, SeaweedFS S3 on 127.0.0.1:8333.
`README.md` has the same table; `tests/unit/test_settings_docs.py` keeps them in step.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property, lru_cache
from typing import Any
from urllib.parse import unquote, urlparse


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_list(name: str, default: str = "") -> tuple[str, ...]:
    return tuple(item.strip() for item in os.environ.get(name, default).split(",") if item.strip())


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def setting(env: str, default, kind=str, doc: str = ""):
    """A dataclass field read from environment variable `env` (see `Settings.from_env`)."""
    return field(default=default, metadata={"env": env, "kind": kind, "doc": doc})


@dataclass(frozen=True)
class Settings:
    # Broker, result backend and job records.
    redis_url: str = setting("AVSR_REDIS_URL", "redis://127.0.0.1:6379/0",
                             doc="Redis for the Celery broker, results and job records; "
                                 "`sentinel://h1:26379/0;sentinel://h2:26379/0` for Redis Sentinel")
    redis_sentinel_master: str = setting("AVSR_REDIS_SENTINEL_MASTER", "",
                                         doc="master name the Sentinels monitor; required with a sentinel:// URL")
    # S3: inputs, the work prefix for intermediate arrays, results.
    s3_endpoint_url: str = setting("AVSR_S3_ENDPOINT_URL", "http://127.0.0.1:8333",
                                   doc="S3 endpoint; empty string means AWS S3")
    s3_region: str = setting("AWS_DEFAULT_REGION", "us-east-1", doc="S3 region")
    s3_access_key_id: str = setting("AWS_ACCESS_KEY_ID", "avsr", doc="S3 access key (AWS default chain if empty)")
    s3_secret_access_key: str = setting("AWS_SECRET_ACCESS_KEY", "avsr-secret",
                                        doc="S3 secret key (AWS default chain if empty)")
    work_bucket: str = setting("AVSR_WORK_BUCKET", "avsr-work",
                               doc="bucket for intermediate arrays and results")
    work_prefix: str = setting("AVSR_WORK_PREFIX", "jobs/", doc="key prefix inside the work bucket")
    allowed_buckets: tuple = setting("AVSR_ALLOWED_BUCKETS", (), kind=tuple,
                                     doc="comma list of input buckets jobs may read; empty allows any")
    s3_max_concurrency: int = setting("AVSR_S3_MAX_CONCURRENCY", 16, kind=int,
                                      doc="parallel S3 GETs when downloading frames")
    # API.
    api_keys: tuple = setting("AVSR_API_KEYS", (), kind=tuple,
                              doc="comma list of accepted API keys; empty disables auth (local use only)")
    max_request_bytes: int = setting("AVSR_MAX_REQUEST_BYTES", 64 * 1024, kind=int,
                                     doc="largest accepted request body")
    request_read_timeout_s: float = setting("AVSR_REQUEST_READ_TIMEOUT_S", 20.0, kind=float,
                                            doc="seconds a client has to send a whole request; it gets "
                                                "an API thread only once it has (408 `request_timeout`)")
    max_frames: int = setting("AVSR_MAX_FRAMES", 30000, kind=int, doc="longest accepted input, in frames")
    max_input_bytes: int = setting("AVSR_MAX_INPUT_BYTES", 2 * 1024**3, kind=int,
                                   doc="largest accepted input (sum of S3 objects)")
    max_frame_pixels: int = setting("AVSR_MAX_FRAME_PIXELS", 4096 * 2304, kind=int,
                                    doc="largest frame (width × height, read from the header before decoding); "
                                        "larger fails the job with input_too_large")
    min_frame_side: int = setting("AVSR_MIN_FRAME_SIDE", 32, kind=int,
                                  doc="frames narrower or lower than this cannot hold a face: skipped and "
                                      "counted with the corrupt ones")
    worker_max_memory_mb: int = setting("AVSR_WORKER_MAX_MEMORY_MB", 4096, kind=int,
                                        doc="a CPU pool child above this resident memory is replaced after its "
                                            "task (Celery worker_max_memory_per_child)")
    predict_timeout_s: float = setting("AVSR_PREDICT_TIMEOUT_S", 300.0, kind=float,
                                       doc="how long POST /predict waits for its job")
    predict_max_waiters: int = setting("AVSR_PREDICT_MAX_WAITERS", 16, kind=int,
                                       doc="POST /predict callers one API process lets wait (keep below "
                                           "gunicorn --threads), one tenant at most half of them when there are "
                                           "several; more get 503 predict_busy")
    rate_limit: str = setting("AVSR_RATE_LIMIT", "600/minute",
                              doc="requests per API key (or client address without one) on /v1 and /predict")
    auth_fail_limit: str = setting("AVSR_AUTH_FAIL_LIMIT", "30/minute",
                                   doc="failed authentications per client address before 429 rate_limited")
    callback_secret: str = setting("AVSR_CALLBACK_SECRET", "", doc="HMAC-SHA256 key for webhook signatures")
    callback_allow_private: bool = setting("AVSR_CALLBACK_ALLOW_PRIVATE", False, kind=bool,
                                           doc="allow webhooks to loopback/private/link-local addresses")
    job_ttl_s: int = setting("AVSR_JOB_TTL_S", 7 * 24 * 3600, kind=int, doc="how long job records live")
    # Model.
    model_path: str = setting("AVHUBERT_MODEL_PATH", "", doc="AV-HuBERT fairseq checkpoint (.pt)")
    spm_path: str = setting("AVHUBERT_SPM_PATH", "", doc="sentencepiece model; overrides the checkpoint's")
    dict_path: str = setting("AVHUBERT_DICT_PATH", "", doc="fairseq dict.wrd.txt; overrides the checkpoint's")
    device: str = setting("AVSR_DEVICE", "auto", doc="auto, cpu, cuda or cuda:N")
    precision: str = setting("AVSR_PRECISION", "fp32",
                             doc="fp32 (default); bf16 (CUDA autocast, or bf16 weights on CPU); "
                             "fp16 (CUDA only); int8 (CPU: int8 Linears)")
    beam_size: int = setting("AVSR_BEAM_SIZE", 5, kind=int, doc="default beam size")
    max_segment_s: float = setting("AVSR_MAX_SEGMENT_S", 15.0, kind=float,
                                   doc="longest segment decoded at once, seconds")
    max_batch_frames: int = setting("AVSR_MAX_BATCH_FRAMES", 3000, kind=int,
                                    doc="inference memory budget: segments per batch × longest segment, in frames "
                                        "(on CPU, which computes no padding: the segments' frames)")
    gpu_concurrent_jobs: int = setting("AVSR_GPU_CONCURRENT_JOBS", 8, kind=int,
                                       doc="jobs one GPU worker has in inference at once (its Celery threads); "
                                           "their segments share batches; 1 decodes one job at a time")
    batch_linger_ms: float = setting("AVSR_BATCH_LINGER_MS", 25.0, kind=float,
                                     doc="how long the GPU worker waits for other jobs' segments to fill a batch "
                                         "(not when the frame budget is already full); 0 never waits")
    early_inference: bool = setting("AVSR_EARLY_INFERENCE", True, kind=bool,
                                    doc="decode a long clip's settled segments while the rest is preprocessed "
                                        "(results unchanged)")
    early_wait_s: float = setting("AVSR_EARLY_WAIT_S", 30.0, kind=float,
                                  doc="how long a job's inference waits for its early decodes still running "
                                      "(with no progress, and none of them in its own worker's batches) before "
                                      "decoding those segments itself")
    max_faces: int = setting("AVSR_MAX_FACES", 4, kind=int,
                             doc="faces followed as face tracks (speaker: center, a hint, speaking, all)")
    chunk_frames: int = setting("AVSR_CHUNK_FRAMES", 750, kind=int,
                                doc="frames per preprocessing task; longer clips fan out over CPU workers")
    cache_dir: str = setting("AVSR_CACHE_DIR", "", doc="where a worker keeps input videos its tasks share; "
                             "empty means the system temp dir")
    cache_max_bytes: int = setting("AVSR_CACHE_MAX_BYTES", 8 * 1024**3, kind=int,
                                   doc="input videos a worker keeps there at most; the least recently used "
                                       "go first (a task that needs one again fetches it again)")
    # Workers.
    task_soft_time_limit_s: int = setting("AVSR_TASK_SOFT_TIME_LIMIT_S", 1800, kind=int,
                                          doc="soft time limit of one task")
    task_time_limit_s: int = setting("AVSR_TASK_TIME_LIMIT_S", 2100, kind=int,
                                     doc="hard time limit of one task")
    heartbeat_interval_s: float = setting("AVSR_HEARTBEAT_INTERVAL_S", 10.0, kind=float,
                                          doc="worker heartbeat period (health, metrics)")
    cpu_threads: int = setting("AVSR_CPU_THREADS", 0, kind=int,
                               doc="threads for preprocessing in one CPU worker; 0 means all cores")
    max_deliveries: int = setting("AVSR_MAX_DELIVERIES", 3, kind=int,
                                  doc="deliveries of one task whose worker died before its job fails `worker_lost`")
    lease_ttl_s: int = setting("AVSR_LEASE_TTL_S", 20, kind=int,
                               doc="a running task's lease; renewed every third of it, re-published once it lapses")
    reaper_interval_s: float = setting("AVSR_REAPER_INTERVAL_S", 5.0, kind=float,
                                       doc="how often a worker looks for lapsed leases")
    # Logging.
    log_level: str = setting("AVSR_LOG_LEVEL", "INFO", doc="log level")
    log_json: bool = setting("AVSR_LOG_JSON", True, kind=bool, doc="JSON log lines")
    # Tenants, output buckets, webhook delivery.
    tenants_json: str = setting("AVSR_TENANTS", "", doc="JSON: tenant id → `{\"keys\", \"read_buckets\", "
                                "\"write_buckets\", \"callback_secret\"}` (keys plain or `sha256:<hex>`); "
                                "adds to AVSR_API_KEYS, whose keys are one tenant each")
    output_buckets: tuple = setting("AVSR_OUTPUT_BUCKETS", (), kind=tuple,
                                    doc="comma list of buckets a request's `output` may name; "
                                        "empty: results go to the work bucket only")
    webhook_max_attempts: int = setting("AVSR_WEBHOOK_MAX_ATTEMPTS", 10, kind=int,
                                        doc="webhook delivery attempts before it is marked failed")
    webhook_backoff_s: float = setting("AVSR_WEBHOOK_BACKOFF_S", 30.0, kind=float,
                                       doc="first webhook retry delay; doubles each attempt, ±50% jitter")
    # Ways in: uploads and URL inputs.
    s3_public_url: str = setting("AVSR_S3_PUBLIC_URL", "",
                                 doc="S3 endpoint that clients reach, for presigned upload URLs; empty means "
                                     "AVSR_S3_ENDPOINT_URL")
    upload_expiry_s: int = setting("AVSR_UPLOAD_EXPIRY_S", 3600, kind=int,
                                   doc="how long a presigned upload URL stays valid")
    url_allow_private: bool = setting("AVSR_URL_ALLOW_PRIVATE", False, kind=bool,
                                      doc="allow URL inputs on loopback/private/link-local addresses")
    url_timeout_s: float = setting("AVSR_URL_TIMEOUT_S", 300.0, kind=float,
                                   doc="longest a URL input may take to download (30 s without a byte)")

    def __post_init__(self) -> None:
        redis_sentinel(self.redis_url, self.redis_sentinel_master)  # fail at start-up, not at first use
        _ = self.tenants  # a malformed AVSR_TENANTS fails at start-up too

    @cached_property
    def tenants(self) -> tuple[Tenant, ...]:
        """Every configured tenant: AVSR_TENANTS, then one per AVSR_API_KEYS key (empty: auth is off)."""
        return parse_tenants(self.tenants_json, self)

    def default_tenant(self) -> Tenant:
        """The tenant of requests when no keys are configured (auth off): the global allow-lists."""
        return Tenant("default", (), self.allowed_buckets, self.output_buckets, self.callback_secret)

    def claimed_buckets(self, tenant_id: str) -> frozenset[str]:
        """The buckets that tenants other than `tenant_id` list (to read or write): closed to a tenant that
        lists no read buckets of its own, which may otherwise read any bucket but the work bucket."""
        return frozenset(b for t in self.tenants if t.id != tenant_id for b in (*t.read_buckets, *t.write_buckets))

    def tenant(self, tenant_id: str) -> Tenant:
        """The tenant of that id (a job's `tenant`); the default tenant for an unknown id."""
        return next((t for t in self.tenants if t.id == tenant_id), self.default_tenant())

    @classmethod
    def from_env(cls) -> Settings:
        """Read every field from its environment variable, falling back to the default."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            env, kind, default = f.metadata["env"], f.metadata["kind"], f.default
            assert default is not MISSING, f.name
            if kind is tuple:
                values[f.name] = _env_list(env) if env in os.environ else f.default
            elif kind is int:
                values[f.name] = _env_int(env, default)
            elif kind is float:
                values[f.name] = _env_float(env, default)
            elif kind is bool:
                values[f.name] = _env_bool(env, default)
            else:
                values[f.name] = _env(env, default)
        return cls(**values)

    @staticmethod
    def environment_variables() -> dict[str, str]:
        """Environment variable → description, for docs and drift tests."""
        return {f.metadata["env"]: f.metadata["doc"] for f in fields(Settings)}


@dataclass(frozen=True)
class Tenant:
    """A customer: its API keys (SHA-256 hex digests), the buckets it may read and write, its webhook secret."""

    id: str
    key_hashes: tuple[str, ...] = field(repr=False)
    read_buckets: tuple[str, ...] = ()  # empty: any bucket but the work bucket and other tenants' buckets
    write_buckets: tuple[str, ...] = ()  # empty: results only to the work bucket
    callback_secret: str = field(default="", repr=False)


def key_hash(key: str) -> str:
    """The SHA-256 hex digest an API key is known by (surrogates kept, so any header string hashes)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_tenants(raw: str, settings: Settings) -> tuple[Tenant, ...]:
    """AVSR_TENANTS (`{"id": {"keys": [...], "read_buckets": [...], "write_buckets": [...],
    "callback_secret": "..."}}`) plus one tenant `key-<hash prefix>` per AVSR_API_KEYS key; lists a
    tenant leaves out default to AVSR_ALLOWED_BUCKETS / AVSR_OUTPUT_BUCKETS / AVSR_CALLBACK_SECRET."""
    tenants: list[Tenant] = []
    config = json.loads(raw) if raw.strip() else {}
    if not isinstance(config, dict):
        raise ValueError("AVSR_TENANTS must be a JSON object: tenant id → {\"keys\": [...], ...}")
    for tenant_id, spec in config.items():
        if not isinstance(spec, dict) or set(spec) - {"keys", "read_buckets", "write_buckets", "callback_secret"}:
            raise ValueError(f"AVSR_TENANTS[{tenant_id!r}]: keys, read_buckets, write_buckets, callback_secret")
        keys = spec.get("keys") or []
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"AVSR_TENANTS[{tenant_id!r}] needs a non-empty list of keys")
        hashes = tuple(k[7:].lower() if k.startswith("sha256:") else key_hash(k) for k in keys)
        tenants.append(Tenant(
            str(tenant_id), hashes, tuple(spec.get("read_buckets", settings.allowed_buckets)),
            tuple(spec.get("write_buckets", settings.output_buckets)),
            str(spec.get("callback_secret", settings.callback_secret))))
    for key in settings.api_keys:
        digest = key_hash(key)
        tenants.append(Tenant(f"key-{digest[:12]}", (digest,), settings.allowed_buckets, settings.output_buckets,
                              settings.callback_secret))
    ids = [t.id for t in tenants]
    if len(set(ids)) != len(ids):
        raise ValueError("AVSR_TENANTS: tenant ids must be unique")
    return tuple(tenants)


@dataclass(frozen=True)
class RedisSentinel:
    """Where a `sentinel://` AVSR_REDIS_URL points: the Sentinels, the master's name, its DB and credentials."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def redis_sentinel(url: str, master_name: str) -> RedisSentinel | None:
    """Parse kombu's sentinel syntax, `sentinel://[[user]:pw@]host:port/db;sentinel://host2:port2/db...`.

    None for any other URL (`redis://`, `rediss://`, `unix://`). DB and credentials come from the
    first address, as kombu and Celery read them; the credentials are the Redis master's.
    """
    chunks = [chunk.strip() for chunk in url.split(";") if chunk.strip()]
    if not chunks or urlparse(chunks[0]).scheme != "sentinel":
        return None
    if not master_name:
        raise ValueError(
            "AVSR_REDIS_URL is a sentinel:// URL but AVSR_REDIS_SENTINEL_MASTER is empty: set it to the master "
            "name the Sentinels monitor (the <name> of `sentinel monitor <name> <host> <port> <quorum>`)")
    sentinels = []
    for number, chunk in enumerate(chunks, 1):
        parsed = urlparse(chunk)
        if parsed.scheme != "sentinel" or not parsed.hostname:  # (the chunk may hold a password: not shown)
            raise ValueError(f"AVSR_REDIS_URL: address {number} of the sentinel URL is not sentinel://host:port")
        sentinels.append((parsed.hostname, parsed.port or 26379))
    first = urlparse(chunks[0])
    db = first.path.strip("/")
    return RedisSentinel(
        sentinels=tuple(sentinels), master_name=master_name, db=int(db) if db else 0,
        username=unquote(first.username) if first.username else None,
        password=unquote(first.password) if first.password else None)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests call `get_settings.cache_clear()`)."""
    return Settings.from_env()
