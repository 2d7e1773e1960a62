"""Settings every service shares (``FLOWMESH_*``); each service subclasses with its own env prefix."""

from __future__ import annotations

import contextlib
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowmesh.contracts.permissions import inbox_prefix
from flowmesh.runtime.loop import EventLoopKind

Env = Literal["dev", "test", "production"]

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "dev", "development", "placeholder"})
"""Values ``FLOWMESH_ENV=production`` refuses for any secret."""

JWT_SECRET_FILE = "jwt-secret"
"""Where, inside the data dir, the dev stack keeps the generated HS256 secret."""


def _env(name: str, field: str) -> AliasChoices:
    return AliasChoices(name, field)


def load_or_create_dev_secret(data_dir: Path, name: str = JWT_SECRET_FILE) -> str:
    """The dev secret kept in ``data_dir/name``, created once (0600) if missing or empty.

    Created exclusively, so processes racing to create it agree on one secret.
    """
    path = data_dir / name
    with contextlib.suppress(FileNotFoundError):
        if existing := path.read_text().strip():
            return existing
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if existing := path.read_text().strip():
            return existing  # another process won the race
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


@dataclass(frozen=True, slots=True)
class NatsLogin:
    """A NATS connection's identity: user/password or credentials file, TLS, and its own reply inboxes."""

    user: str | None = None
    password: str | None = None
    creds: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    inbox_user: str = "anonymous"

    @property
    def inbox_prefix(self) -> str:
        """``_INBOX.<user>``: the only inboxes this user may subscribe to (``deploy/nats/``)."""
        return inbox_prefix(self.inbox_user)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the connection, None for plain TCP (or TLS from a ``tls://`` URL)."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None and self.tls_key is not None:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of ``nats.connect`` for this identity."""
        options: dict[str, Any] = {"inbox_prefix": self.inbox_prefix}
        if self.user is not None:
            options.update(user=self.user, password=self.password)
        if self.creds is not None:
            options["user_credentials"] = str(self.creds)
        if (context := self.ssl_context()) is not None:
            options["tls"] = context
        return options


class BaseServiceSettings(BaseSettings):
    """Configuration shared by every service; shared variables have fixed names, the rest a prefix."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_", extra="ignore", validate_by_name=True)

    service_name: ClassVar[str] = "service"

    env: Env = Field(default="production", validation_alias=AliasChoices("FLOWMESH_ENV", "env"))
    nats_url: str = Field(default="nats://127.0.0.1:4222", validation_alias=AliasChoices("NATS_URL", "nats_url"))
    shared_database_url: str = Field(
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        validation_alias=AliasChoices("DATABASE_URL", "shared_database_url"),
    )
    database_url: str | None = Field(default=None, description="per-service override of DATABASE_URL")
    data_dir: Path = Field(default=Path(".flowmesh"), validation_alias=AliasChoices("FLOWMESH_DATA_DIR", "data_dir"))
    log_level: str = Field(default="INFO", validation_alias=AliasChoices("FLOWMESH_LOG_LEVEL", "log_level"))
    log_format: Literal["json", "text"] = Field(
        default="json", validation_alias=AliasChoices("FLOWMESH_LOG_FORMAT", "log_format")
    )
    event_loop: EventLoopKind = Field(
        default="uvloop",
        validation_alias=AliasChoices("FLOWMESH_EVENT_LOOP", "event_loop"),
        description="the process's event loop: uvloop (faster socket I/O), or asyncio's own",
    )
    health_host: str = "0.0.0.0"
    health_port: int = Field(default=9090, ge=0, le=65535)
    db_pool_size: int = Field(default=10, ge=1, le=200)
    metrics_interval_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        validation_alias=_env("FLOWMESH_METRICS_INTERVAL_S", "metrics_interval_s"),
        description="how often gauges read from NATS or PostgreSQL (consumer lag, runs in flight) are refreshed",
    )
    rpc_timeout_s: float = Field(
        default=5.0, gt=0, le=120, validation_alias=AliasChoices("FLOWMESH_RPC_TIMEOUT_S", "rpc_timeout_s")
    )
    # NATS credentials: a user/password, or a credentials file (JWT + nkey); each service is a user of its own
    nats_user: str | None = Field(default=None, validation_alias=_env("FLOWMESH_NATS_USER", "nats_user"))
    nats_password: str | None = Field(default=None, validation_alias=_env("FLOWMESH_NATS_PASSWORD", "nats_password"))
    nats_creds: Path | None = Field(default=None, validation_alias=_env("FLOWMESH_NATS_CREDS", "nats_creds"))
    nats_tls_ca: Path | None = Field(default=None, validation_alias=_env("FLOWMESH_NATS_TLS_CA", "nats_tls_ca"))
    nats_tls_cert: Path | None = Field(default=None, validation_alias=_env("FLOWMESH_NATS_TLS_CERT", "nats_tls_cert"))
    nats_tls_key: Path | None = Field(default=None, validation_alias=_env("FLOWMESH_NATS_TLS_KEY", "nats_tls_key"))
    nats_allow_anonymous: bool = Field(
        default=False,
        validation_alias=_env("FLOWMESH_NATS_ALLOW_ANONYMOUS", "nats_allow_anonymous"),
        description="in production, accept a NATS server that does not authenticate its clients (not advised)",
    )
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        validation_alias=_env("FLOWMESH_STREAM_REPLICAS", "stream_replicas"),
        description="replicas of every JetStream stream and KV bucket (3 on a production NATS cluster)",
    )

    @model_validator(mode="after")
    def _nats_credentials(self) -> BaseServiceSettings:
        for name in ("nats_user", "nats_password"):
            if (getattr(self, name) or "").strip() == "":
                setattr(self, name, None)
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("set both FLOWMESH_NATS_USER and FLOWMESH_NATS_PASSWORD, or neither")
        if self.nats_user is not None and self.nats_creds is not None:
            raise ValueError("set FLOWMESH_NATS_CREDS or FLOWMESH_NATS_USER/FLOWMESH_NATS_PASSWORD, not both")
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError(
                "set both FLOWMESH_NATS_TLS_CERT and FLOWMESH_NATS_TLS_KEY (client certificate), or neither"
            )
        for name in ("nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"FLOWMESH_{name.upper()} names {str(path)!r}, which is not a readable file")
        if not self.is_dev and not self.nats_allow_anonymous:
            if self.nats_user is None and self.nats_creds is None:
                raise ValueError(
                    "set FLOWMESH_NATS_USER and FLOWMESH_NATS_PASSWORD (or FLOWMESH_NATS_CREDS) in production: "
                    "each service connects to NATS as its own user (deploy/nats/)"
                )
            if self.nats_password is not None and self.nats_password.lower() in PLACEHOLDER_SECRETS:
                raise ValueError("FLOWMESH_NATS_PASSWORD is a placeholder; generate one with `openssl rand -base64 32`")
        return self

    @property
    def db_url(self) -> str:
        """The PostgreSQL URL this service uses."""
        return self.database_url or self.shared_database_url

    @property
    def nats_login(self) -> NatsLogin:
        """How this service identifies itself to NATS."""
        return NatsLogin(
            user=self.nats_user,
            password=self.nats_password,
            creds=self.nats_creds,
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
            inbox_user=self.nats_user or self.service_name,
        )

    @property
    def is_dev(self) -> bool:
        """Whether dev relaxations (generated secrets, private addresses) apply."""
        return self.env != "production"
