"""Process settings, read from the environment (``REDRIVE_*``, ``NATS_URL``, ``DATABASE_URL``).

One object, built once in each service's composition root and passed down; nothing reads
the environment anywhere else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import platformdirs
from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_data_dir() -> Path:
    # As root (containers, CI) a system path like other daemons use; the per-user data
    # dir otherwise. PostgreSQL refuses to run as root and cannot traverse /root.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/redrive")
    return Path(platformdirs.user_data_dir("redrive"))


_MINUTE, _HOUR, _DAY = 60, 3600, 86400
_WEEK = 7 * _DAY
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET")


class Settings(BaseSettings):
    # Every number has finite bounds (allow_inf_nan=False refuses inf and nan): each ends up
    # in an asyncio timer, a PostgreSQL make_interval or a NATS nanosecond duration, where
    # inf or 1e308 is a crash or a query that fails at every pass, long after the start.
    model_config = SettingsConfigDict(env_prefix="REDRIVE_", extra="ignore", populate_by_name=True,
                                      allow_inf_nan=False)

    nats_url: str | None = Field(default=None, validation_alias=AliasChoices("NATS_URL", "REDRIVE_NATS_URL"))
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "REDRIVE_DATABASE_URL")
    )
    data_dir: Path = Field(default_factory=default_data_dir)

    # Names: subjects start with "<prefix>.", streams with "<PREFIX>_". Tests give every
    # stack its own prefix so that many stacks can share one NATS server.
    prefix: str = "redrive"
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # JetStream dedupe window for job ids (messaging.md: at least 10 minutes).
    duplicate_window_s: int = Field(default=1200, ge=600, le=_DAY)

    # Executor consumer (created or updated at start; see shared/bus.py).
    # At most 12 h: every redelivery backoff value lies between the ack wait and a day.
    # At least 0.5 s: in-progress acks go every ack wait / 3, but no oftener than 0.2 s.
    executor_ack_wait_s: float = Field(default=30.0, ge=0.5, le=12 * _HOUR)
    executor_max_deliver: int = Field(default=20, ge=2, le=10_000)
    # Redelivery backoff of the executor consumer (JetStream BackOff): how long the Nth
    # unacknowledged delivery waits before it is sent again, e.g. [30, 60, 300] (as JSON in
    # REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S=30,60,300); the last value repeats. Empty: the
    # ack wait each time. Only crashes and lost acks wait it: retries and breaker deferrals
    # nak with their own delays.
    executor_redelivery_backoff_s: Annotated[list[float], NoDecode] = Field(default_factory=list, max_length=100)
    # The oldest a job may get in the jobs stream before JetStream drops it (its max age).
    # Below the run-stops bucket's TTL (8 days), so no job outlives the stop that covers
    # it; a RUNNING run whose job was dropped is re-published by recovery.
    # (Its bound is checked against that TTL in tests/unit/test_jobs_max_age.py, settings not
    # importing services. Declared after the consumer's settings: its validator reads them.)
    jobs_max_age_s: float = Field(default=_WEEK, ge=1, le=_WEEK)
    executor_concurrency: int = Field(default=256, ge=1, le=10_000)
    executor_fetch_batch: int = Field(default=256, ge=1, le=10_000)
    # In-progress acks for long steps; off only to reproduce late acks in chaos tests.
    executor_keepalive: bool = True
    handlers: str = ""  # REDRIVE_HANDLERS: comma-separated modules that register handlers
    # The built-in download and http_call handlers reach public addresses only (no 127.0.0.1,
    # 10.x, 169.254.169.254…, judged again at connect time and at each redirect) unless this
    # is set: a single-tenant install fetching from its own network.
    executor_allow_private_urls: bool = False
    # The most bytes one download may write: an endless or huge response must not fill the
    # executor's disk (every tenant's artifacts share it). Default 10 GiB.
    executor_max_download_bytes: int = Field(default=10 * 2**30, ge=1024, le=2**50)
    # Run directories under DATA_DIR/artifacts untouched this long are removed
    # (services/executor/artifacts.py); 0 keeps them forever. Default a week.
    executor_artifact_retention_hours: float = Field(default=168, ge=0, le=100 * 8766)
    # flaky's ``crash`` param exits the executor every tenant shares: only for fault tests,
    # never on a multi-tenant system (off: templates using it are refused, jobs error).
    executor_allow_crash: bool = False

    # Coordinator.
    results_fetch_batch: int = Field(default=1000, ge=1, le=10_000)
    # A results batch smaller than that waits this long for more before it is applied:
    # a batch costs one transaction whatever its size.
    results_gather_ms: int = Field(default=20, ge=0, le=1000)
    # How long file events handed to a coordinator may go unacknowledged before JetStream
    # hands them to another (a coordinator killed while applying a batch): the results it
    # held wait this long. Keep it below REDRIVE_RECOVERY_LEASE_S: the sweep re-publishes
    # the jobs of files whose results are only waiting for it, their events are dropped
    # as repeats, and it would give a run up for stuck that is not.
    results_ack_wait_s: float = Field(default=30.0, ge=1.0, le=_HOUR)
    outbox_batch: int = Field(default=2000, ge=1, le=100_000)
    # The most of one tenant's jobs out at once (queued or running), all its runs together:
    # every executor pulls from one FIFO consumer, and a run of 100,000 files published
    # whole would make every run after it, any tenant's, wait for all of them. A cap: each
    # tenant's window is 4 × the slots of the executors alive (REDRIVE_EXECUTOR_CONCURRENCY
    # each, as they announce them) shared among the tenants with files waiting, at least 16
    # (services/coordinator/jobs.py: Window), and this while no executor has announced its
    # slots. 0: no window (jobs are published as fast as they can be built).
    jobs_in_flight_per_tenant: int = Field(default=4096, ge=0, le=10_000_000)
    recovery_interval_s: float = Field(default=15.0, ge=0.1, le=_WEEK)
    # A PENDING file whose job showed no progress for this long is considered stuck.
    recovery_lease_s: float = Field(default=120.0, ge=0.5, le=_WEEK)
    recovery_max_failures: int = Field(default=3, ge=1, le=10_000)
    # A credit intent still pending after this long was abandoned by a crash: compensate it.
    credit_intent_timeout_s: float = Field(default=60.0, ge=0.5, le=_WEEK)
    max_files_per_run: int = Field(default=100_000, ge=1, le=1_000_000)
    # How long a finished run (with its files and timeline) is kept after it finished
    # (services/coordinator/run_retention.py); then it is deleted and its id is a 404.
    run_retention_days: float = Field(default=90, ge=0.01, le=36_500)
    # The most bytes a tenant's files sent ahead may hold while they are not yet a run
    # (commands/staged_files.py): counted as the files' fields plus what PostgreSQL spends on
    # each row. Every tenant's parts share the database's disk. A part past it is a 429
    # (413 when the request alone is larger); a refused run's parts are deleted at once.
    max_staged_bytes_per_tenant: int = Field(default=2**30, ge=64 * 1024, le=2**50)

    # Notifier.
    webhook_timeout_s: float = Field(default=10.0, ge=0.5, le=5 * _MINUTE)
    # Attempts up to 1 s apart, doubling up to 5 minutes, with full jitter: 15 of them span
    # about 17 minutes on average (34 at most), so a receiver down for a deploy loses nothing.
    webhook_max_attempts: int = Field(default=15, ge=1, le=1000)
    # Webhooks go to public addresses only (no 127.0.0.1, 10.x, 169.254.169.254…) unless
    # this is set: a single-tenant install posting inside its own network.
    webhook_allow_private: bool = False
    # How long a tenant's notifications, and its webhook deliveries once ended (delivered,
    # or failed for good), are kept (services/notifier/retention.py).
    notification_retention_days: float = Field(default=90, ge=0.01, le=36_500)
    webhook_delivery_retention_days: float = Field(default=30, ge=0.01, le=36_500)

    # Gateway.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    request_timeout_s: float = Field(default=15.0, ge=0.5, le=10 * _MINUTE)
    # The largest HTTP request body. A run body larger than a bus message is sent on in
    # parts (services/gateway/staging.py); any other request must fit in one message.
    max_request_bytes: int = Field(default=64 * 2**20, ge=64 * 1024, le=2**31 - 1)
    # Request bodies larger than one bus message (or of unknown or encoded size) this gateway
    # process reads and holds at once: aiohttp reads a body whole, and such a request holds a
    # few times its size until answered. One more waits a few seconds for a slot, then is a
    # 503 with Retry-After. Memory is about this × REDRIVE_MAX_REQUEST_BYTES × 3.
    max_concurrent_large_bodies: int = Field(default=4, ge=1, le=1000)
    # Live-event streams (GET /api/v1/events) open at once per API key and per tenant, in
    # this gateway process: one more is a 429. Each holds a connection and a queue, and
    # every event is fanned out to each on the gateway's loop.
    sse_max_per_key: int = Field(default=10, ge=1, le=10_000)
    sse_max_per_tenant: int = Field(default=100, ge=1, le=100_000)
    # GET /metrics is public unless this is set; then it needs Authorization: Bearer <token>.
    # (Its labels name tenants and their dependencies; each scrape asks the services.)
    metrics_token: str | None = Field(default=None, max_length=1000)

    log_level: str = "INFO"
    log_json: bool = False
    # `redrive up` writes each service's output to DATA_DIR/logs/<service>.log and rotates it
    # at this size (MiB) into <service>.log.1 … .N, the oldest dropped: a retry-heavy load
    # logs gigabytes a day. At least one backup: with none, the stdlib's rotation never rotates.
    log_max_mb: float = Field(default=50, ge=0.01, le=1_000_000)
    log_backups: int = Field(default=5, ge=1, le=1000)

    @field_validator("log_level")
    @classmethod
    def _log_level_is_a_level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)} (any case)")
        return level

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_is_a_secret(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # REDRIVE_METRICS_TOKEN= (empty): public, as unset
        if len(v) < 16 or not (v.isascii() and v.isprintable()) or " " in v:
            raise ValueError("expected at least 16 printable ASCII characters without spaces")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_is_a_token(cls, v: str) -> str:
        if not _is_a_token(v):
            raise ValueError("prefix must be letters, digits, '-' or '_'")
        return v

    @field_validator("executor_redelivery_backoff_s", mode="before")
    @classmethod
    def _backoff_from_a_list_of_seconds(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the environment: "30,60,300" (or JSON "[30, 60, 300]")
            items = [p.strip() for p in v.strip().strip("[]").split(",")]
            return [p for p in items if p]
        return v

    @field_validator("executor_redelivery_backoff_s")
    @classmethod
    def _backoff_fits_the_consumer(cls, v: list[float], info: ValidationInfo) -> list[float]:
        ack_wait, max_deliver = info.data.get("executor_ack_wait_s"), info.data.get("executor_max_deliver")
        # Every wait at least the ack wait: in-progress acks are sent every ack wait / 3, and
        # a live job must never be redelivered. JetStream wants max deliver > len(backoff).
        if ack_wait is not None and any(not ack_wait <= s <= 86400 for s in v):
            raise ValueError(f"every value must lie between the ack wait ({ack_wait:g} s) and 86400 s")
        if max_deliver is not None and len(v) >= max_deliver:
            raise ValueError(f"at most {max_deliver - 1} values (fewer than REDRIVE_EXECUTOR_MAX_DELIVER)")
        return v

    @field_validator("jobs_max_age_s")
    @classmethod
    def _jobs_outlive_their_waits(cls, v: float, info: ValidationInfo) -> float:
        # A job waiting out its ack wait or a redelivery backoff is alive: a max age no longer
        # than that would have JetStream drop it while it waits (and recovery re-publish it).
        ack_wait = info.data.get("executor_ack_wait_s")
        backoff = info.data.get("executor_redelivery_backoff_s") or []
        if ack_wait is not None and v <= ack_wait:
            raise ValueError(f"REDRIVE_JOBS_MAX_AGE_S ({v:g} s) must be longer than REDRIVE_EXECUTOR_ACK_WAIT_S "
                             f"({ack_wait:g} s): a job waiting for its redelivery would be dropped")
        if backoff and v <= max(backoff):
            raise ValueError(f"REDRIVE_JOBS_MAX_AGE_S ({v:g} s) must be longer than the largest "
                             f"REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S value ({max(backoff):g} s): a job waiting "
                             "for its redelivery would be dropped")
        return v

    @field_validator("nats_url")
    @classmethod
    def _nats_url_is_a_url(cls, v: str | None) -> str | None:
        # Several seed servers of a cluster, comma-separated (as the nats CLI takes them);
        # nats-py reads "HOST:PORT" as nats://HOST:PORT.
        for url in filter(None, (u.strip() for u in (v or "").split(","))):
            _checked_url(url if "://" in url else f"nats://{url}", ("nats", "tls", "ws", "wss"), "nats://HOST:4222")
        return v

    @property
    def nats_servers(self) -> list[str]:
        return [url.strip() for url in (self.nats_url or "").split(",") if url.strip()]

    @field_validator("database_url")
    @classmethod
    def _database_url_is_a_url(cls, v: str | None) -> str | None:
        if v:  # no host: postgresql:///db?host=/run/postgresql, a socket
            _checked_url(v, ("postgresql", "postgres", "postgresql+asyncpg"), "postgresql://USER@HOST:5432/DB",
                         host_required=False)
        return v

    @field_validator("data_dir")
    @classmethod
    def _data_dir_is_a_directory(cls, v: Path) -> Path:
        if v.exists() and not v.is_dir():
            raise ValueError("it exists and is not a directory")
        return v

    @property
    def sqlalchemy_url(self) -> str:
        if not self.database_url:
            raise RuntimeError("DATABASE_URL is not set and no embedded PostgreSQL is running")
        url = self.database_url
        for scheme in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
            if url.startswith(scheme):
                return "postgresql+asyncpg://" + url[len(scheme):]
        raise ValueError(f"DATABASE_URL must be a postgresql:// URL, got {url!r}")

    @property
    def runtime_file(self) -> Path:
        return self.data_dir / "runtime.json"


def _is_a_token(v: str) -> bool:
    return bool(v) and v.replace("_", "").replace("-", "").isalnum()


class ConfigurationError(Exception):
    """A setting that passed validation but that a server refuses once reached (e.g. more
    stream replicas than a single NATS server holds): the process cannot run as configured.
    The message names the setting, as a user would set it."""


def _checked_url(url: str, schemes: tuple[str, ...], example: str, *, host_required: bool = True) -> None:
    """A server URL of one of these schemes, with a numeric port if any. Messages leave the
    URL out: it may hold a password."""
    parts = urlsplit(url)
    try:
        parts.port  # raises on a port that is not a number in 0..65535
    except ValueError:
        raise ValueError("its port is not a number in 0..65535") from None
    if parts.scheme not in schemes or (host_required and not parts.hostname):
        raise ValueError(f"expected a URL like {example}")


def load_settings(*, runtime: bool = True, **overrides) -> Settings:
    """Settings from the environment, completed by ``DATA_DIR/runtime.json`` (unless not
    ``runtime``).

    ``redrive up`` writes the URLs of the servers it started, and its prefix, into
    runtime.json so that every other command (and each service process) finds the same
    system. What the environment (or an override) sets wins.
    """
    settings = Settings(**overrides)
    path = settings.runtime_file
    if not runtime or not path.exists():
        return settings
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return settings
    found = found if isinstance(found, dict) else {}
    updates = {}
    if settings.nats_url is None and found.get("nats_url"):
        updates["nats_url"] = found["nats_url"]
    if settings.database_url is None and found.get("database_url"):
        updates["database_url"] = found["database_url"]
    # Its prefix names its streams: taken when REDRIVE_PREFIX is unset and the NATS is the stack's.
    prefix = found.get("prefix")
    if ("prefix" not in settings.model_fields_set and isinstance(prefix, str) and _is_a_token(prefix)
            and updates.get("nats_url", settings.nats_url) == found.get("nats_url")):
        updates["prefix"] = prefix
    if updates:
        settings = settings.model_copy(update=updates)
    return settings
