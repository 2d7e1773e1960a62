"""Settings every service shares (DESIGN §10); each service subclasses with its own env prefix."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Env = Literal["dev", "test", "production"]

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "dev", "development", "placeholder"})
"""Values ``FLOWMESH_ENV=production`` refuses for any secret."""

JWT_SECRET_FILE = "jwt-secret"
"""Where, inside the data dir, the dev stack keeps the generated HS256 secret."""


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
    health_host: str = "0.0.0.0"
    health_port: int = Field(default=9090, ge=0, le=65535)
    db_pool_size: int = Field(default=10, ge=1, le=200)
    rpc_timeout_s: float = Field(
        default=5.0, gt=0, le=120, validation_alias=AliasChoices("FLOWMESH_RPC_TIMEOUT_S", "rpc_timeout_s")
    )

    @property
    def db_url(self) -> str:
        """The PostgreSQL URL this service uses."""
        return self.database_url or self.shared_database_url

    @property
    def is_dev(self) -> bool:
        """Whether dev relaxations (generated secrets, private addresses) apply."""
        return self.env != "production"
