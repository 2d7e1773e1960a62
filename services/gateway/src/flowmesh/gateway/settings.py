"""Settings of the gateway: authentication, limits, CORS, where the services answer."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from flowmesh.contracts.models.usage import PlanName
from flowmesh.runtime.settings import PLACEHOLDER_SECRETS, BaseServiceSettings, load_or_create_dev_secret

MIN_SECRET_LENGTH = 32

Placement = Literal["public", "health", "off"]
"""Where an operational page is served: the public port, the health port only, or nowhere."""


def _env(name: str, field: str) -> AliasChoices:
    return AliasChoices(name, field)


class GatewaySettings(BaseServiceSettings):
    """The public door's configuration; ``FLOWMESH_ENV=production`` refuses weak or missing secrets."""

    model_config = SettingsConfigDict(env_prefix="FLOWMESH_GATEWAY_")
    service_name: ClassVar[str] = "gateway"

    http_host: str = Field(default="0.0.0.0", validation_alias=_env("FLOWMESH_HTTP_HOST", "http_host"))
    http_port: int = Field(default=8080, ge=0, le=65535, validation_alias=_env("FLOWMESH_HTTP_PORT", "http_port"))
    jwt_secret: str | None = Field(default=None, validation_alias=_env("FLOWMESH_JWT_SECRET", "jwt_secret"))
    jwks_url: str | None = Field(default=None, validation_alias=_env("FLOWMESH_JWKS_URL", "jwks_url"))
    jwt_issuer: str = Field(default="flowmesh", validation_alias=_env("FLOWMESH_JWT_ISSUER", "jwt_issuer"))
    jwt_audience: str = Field(default="flowmesh", validation_alias=_env("FLOWMESH_JWT_AUDIENCE", "jwt_audience"))
    jwt_leeway_s: float = Field(default=30.0, ge=0, le=300)
    jwks_cache_s: float = Field(default=300.0, ge=1)
    # a token with an unknown kid refetches the JWKS at most this often (spares the identity provider)
    jwks_cooldown_s: float = Field(default=30.0, ge=0)
    cors_origins: str = Field(
        default="http://localhost:5173", validation_alias=_env("FLOWMESH_CORS_ORIGINS", "cors_origins")
    )
    public_url: str | None = Field(
        default=None,
        validation_alias=_env("FLOWMESH_PUBLIC_URL", "public_url"),
        description="base of webhook URLs handed out (default: the origin of the request)",
    )
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    ready_timeout_s: float = Field(default=1.0, gt=0)
    request_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="a request still unanswered after this is a 504 (WebSockets exempt)"
    )
    default_plan: PlanName = Field(
        default="free",
        validation_alias=_env("FLOWMESH_DEFAULT_PLAN", "default_plan"),
        description="plan of a tenant the usage service has no other answer for",
    )
    plan_cache_s: float = Field(default=60.0, ge=0, description="how long a tenant's plan is remembered")
    webhook_unknown_per_s: float = Field(
        default=10.0,
        ge=0,
        description="lookups of unknown webhook URLs per second per client address, one second's worth at once "
        "(over it: 429; 0: no limit)",
    )
    drain_s: float = Field(
        default=0.0,
        ge=0,
        le=300,
        description="on SIGTERM, keep serving this long while /readyz answers 503 and connections close after "
        "each answer, so a load balancer moves clients to other replicas before this one stops",
    )
    access_log: bool = Field(default=True, description="one log line per request, with its X-Request-Id")
    metrics: Placement | None = Field(
        default=None,
        description="where /metrics is served: `public` (the HTTP port), `health` (only on the health port, "
        "FLOWMESH_GATEWAY_HEALTH_PORT) or `off`; default `health` in production, else `public`",
    )
    docs: Placement = Field(
        default="public", description="where /docs and /openapi.json are served: `public`, `health` or `off`"
    )

    @property
    def metrics_placement(self) -> Placement:
        """Where ``/metrics`` is served, the default applied."""
        if self.metrics is not None:
            return self.metrics
        return "health" if self.env == "production" else "public"

    @property
    def health_listener(self) -> bool:
        """Whether the gateway also listens on the health port (something is placed there)."""
        return "health" in (self.metrics_placement, self.docs)

    @model_validator(mode="after")
    def _secrets(self) -> GatewaySettings:
        if self.jwt_secret is not None and self.jwt_secret.strip() == "":
            self.jwt_secret = None
        if self.env == "production":
            if self.jwt_secret is None and self.jwks_url is None:
                raise ValueError("set FLOWMESH_JWT_SECRET (HS256) or FLOWMESH_JWKS_URL (RS256/ES256) in production")
            if self.jwt_secret is not None and (
                self.jwt_secret.lower() in PLACEHOLDER_SECRETS or len(self.jwt_secret) < MIN_SECRET_LENGTH
            ):
                raise ValueError(
                    f"FLOWMESH_JWT_SECRET is a placeholder or shorter than {MIN_SECRET_LENGTH} characters; "
                    "generate one with `openssl rand -base64 48`"
                )
        elif self.jwt_secret is None and self.jwks_url is None:
            self.jwt_secret = load_or_create_dev_secret(self.data_dir)
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        """Allowed CORS origins."""
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
