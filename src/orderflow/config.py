"""Settings for every orderflow component, from ``ORDERFLOW_*`` variables and flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """One place for configuration; validated when built, so a bad value fails at start."""

    model_config = SettingsConfigDict(env_prefix="ORDERFLOW_", extra="ignore", frozen=True)

    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis URL; unset means the embedded Redis in the data dir.",
    )
    database_url: SecretStr | None = Field(
        default=None, description="SQLAlchemy URL; unset means SQLite in the data dir."
    )
    smtp_url: SecretStr | None = Field(
        default=None, description="smtp:// or smtps:// URL; unset means the embedded sink."
    )
    data_dir: Path = Path(".orderflow")
    transport: Literal["streams", "pubsub"] = "streams"
    claim_idle_ms: int = Field(default=60_000, ge=100)
    max_deliveries: int = Field(default=5, ge=1)
    api_port: int = Field(default=8000, ge=0, le=65535)
    api_host: str = "127.0.0.1"

    stream: str = Field(default="orders", min_length=1)
    group: str = Field(default="email-service", min_length=1)
    email_events_stream: str = Field(default="email-events", min_length=1)
    orders_group: str = Field(default="order-service", min_length=1)
    channel: str = Field(default="orders", min_length=1)
    stream_maxlen: int = Field(default=100_000, ge=1, description="Approximate length cap.")
    dlq_maxlen: int = Field(default=100_000, ge=1)
    mail_from: str = "orderflow <orders@orderflow.localhost>"
    reconcile_after_s: float = Field(default=300.0, gt=0)
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"
    admin_token: SecretStr | None = Field(
        default=None,
        description="Token the web console asks for; required when the API is beyond loopback.",
    )
    console_channel: str = Field(
        default="orderflow:console", min_length=1, description="Pub/Sub channel of live ticks."
    )
    partitions: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Partitions of the orders stream; unset: as recorded, else 1 (6 on a cluster).",
    )
    ordered: bool = Field(
        default=False,
        description="Email workers lease whole partitions: strict per-order order.",
    )
    order_event_version: int = Field(
        default=2,
        description="order.created version the Order Service publishes: 2, or 1 while "
        "some consumer does not read version 2 yet.",
    )
    # With 5 deliveries, 1 s doubling to 60 s spans about 8–15 s before a dead letter;
    # a shorter base dead-letters orders during an SMTP outage of a few seconds.
    retry_base_ms: int = Field(default=1000, ge=1, description="First retry delay.")
    retry_max_ms: int = Field(default=60_000, ge=1, description="Longest retry delay.")

    smtp_concurrency: str = Field(
        default="adaptive",
        description="SMTP transactions an email worker keeps in flight at its server: "
        "adaptive (follows the server's replies, up to its pool of connections) or fixed "
        "(always the pool).",
    )

    @field_validator("stream", "group", "email_events_stream", "orders_group", "channel")
    @classmethod
    def _no_whitespace(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("must not contain whitespace")
        return value

    @field_validator("order_event_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value not in (1, 2):
            raise ValueError(
                f"ORDERFLOW_ORDER_EVENT_VERSION must be 1 or 2 (the order.created versions "
                f"the Order Service publishes), got {value}"
            )
        return value

    @field_validator("smtp_concurrency")
    @classmethod
    def _known_smtp_concurrency(cls, value: str) -> str:
        if value not in ("adaptive", "fixed"):
            raise ValueError(f"ORDERFLOW_SMTP_CONCURRENCY must be adaptive or fixed, got {value!r}")
        return value

    @property
    def database_url_value(self) -> str:
        """The database URL, with the SQLite default in the data dir filled in."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'orders.db').resolve()}"

    @property
    def mail_dir(self) -> Path:
        """The Maildir the embedded SMTP sink delivers into."""
        return self.data_dir / "mail"


class ConfigError(RuntimeError):
    """A configuration that cannot work, with what to do about it."""


#: File in the data dir where `orderflow up` records the URL of the embedded Redis it runs.
REDIS_URL_FILE = "redis.url"
#: File in the data dir where a running SMTP sink (`orderflow mail sink`) records its URL.
SMTP_URL_FILE = "smtp.url"
#: Where the SMTP sink listens unless told otherwise.
DEFAULT_SINK_PORT = 8025


def resolve_redis_url(settings: Settings) -> str:
    """The Redis URL to use: configured, else the embedded server's from the data dir."""
    if settings.redis_url is not None:
        return settings.redis_url.get_secret_value()
    recorded = settings.data_dir / REDIS_URL_FILE
    if recorded.is_file():
        return recorded.read_text().strip()
    raise ConfigError(
        f"no Redis: set ORDERFLOW_REDIS_URL (e.g. redis://localhost:6379/0) or run "
        f"`orderflow up` with the data dir {settings.data_dir} first"
    )


def resolve_smtp_url(settings: Settings) -> str:
    """The SMTP URL: configured, else the embedded sink's (recorded in the data dir,
    else its default address on loopback)."""
    if settings.smtp_url is not None:
        return settings.smtp_url.get_secret_value()
    recorded = settings.data_dir / SMTP_URL_FILE
    if recorded.is_file():
        return recorded.read_text().strip()
    return f"smtp://127.0.0.1:{DEFAULT_SINK_PORT}"
