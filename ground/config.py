"""Configuration: one TOML file ($SCIORCH_HOME/config.toml or $SCIORCH_CONFIG) plus environment
variables. With no file at all the defaults give a working local setup."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from ground.accounts import AccountMap
from ground.errors import InvalidInput, invalid_input

# A job's result is kept in the store and sent whole by get_entry and read_results; a bigger
# one fails the entry and stays a file (see backends.base.OVERSIZE_RESULT). An answer carries
# it twice (text and structured content), and the mcp SDK's SSE client refuses events over
# 1 MiB: the default leaves room for both.
DEFAULT_MAX_RESULT_BYTES = 256 * 1024
MAX_RESULT_BYTES_LIMIT = 64 << 20


class SiteConfig(BaseModel):
    """One site. Keys beyond the common ones are the backend's own settings."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    kind: str = Field(description="backend kind: local, slurm, kubernetes")
    maintenance: bool = False
    accounts: AccountMap | None = Field(
        None, description="run each principal's work as its own account here (ground.accounts)"
    )

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


Role = Literal["read", "submit", "admin"]


def _default_scope_map() -> dict[Role, str]:
    # admin only when configured: many IdPs let any user ask for any scope of a client.
    return {"read": "sciorch.read", "submit": "sciorch.submit"}


class AuthConfig(BaseModel):
    """[auth]: the facility identity provider(s) whose access tokens the HTTP endpoint accepts.
    With no issuer, only tokens from `sciorch token create` are (the embedded default)."""

    model_config = ConfigDict(extra="forbid")

    issuers: list[str] = Field(
        default_factory=list, description="OIDC issuer URLs (keys found by OIDC discovery)"
    )
    audience: str | None = Field(
        None, description="the `aud` tokens must carry; default: public_url + /mcp (RFC 8707)"
    )
    principal_claim: str = Field("sub", description="the claim that names the caller")
    scopes: dict[Role, str] = Field(
        default_factory=_default_scope_map,
        description="sciorch scope -> the IdP scope that grants it",
    )
    groups: dict[Role, list[str]] = Field(
        default_factory=dict, description="sciorch scope -> IdP groups that grant it"
    )
    groups_claim: str = "groups"
    jwks_cache_s: int = Field(3600, gt=0, description="how long fetched signing keys are kept")
    self_minted: bool = Field(True, description="also accept `sciorch token create` tokens")
    hub_client_id: str | None = Field(
        None,
        description="the OAuth client (public, PKCE) the web hub signs people in with at the "
        "first issuer; its redirect URI is public_url + /login/oidc/callback",
    )


class StorageConfig(BaseModel):
    """[storage]: where artifacts and inputs are kept once a job has finished. `local` (the
    default) is a directory under home; `s3` is any S3-compatible store (the `s3` extra)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "s3"] = "local"
    path: Path | None = Field(None, description="local: the directory (default: home/storage)")
    endpoint: str | None = Field(None, description="s3: endpoint URL; default: AWS")
    bucket: str | None = Field(None, description="s3: the bucket (must exist)")
    prefix: str = Field("sciorch/", description="s3: keys of sciorch's objects start with this")
    region: str = "us-east-1"
    access_key_id: str | None = Field(None, description="s3: or $AWS_ACCESS_KEY_ID")
    secret_access_key: str | None = Field(None, description="s3: or $AWS_SECRET_ACCESS_KEY")
    retention_days: float | None = Field(
        None, gt=0, description="default for events that set none: artifacts kept this long"
    )
    max_upload_bytes: int = Field(
        10 << 30, ge=1, description="the largest input one HTTP upload may carry"
    )


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path
    store: str | None = Field(
        None,
        pattern=r"^(sqlite:///|postgresql://|postgres://)",
        # database_url: this setting's first name, still read.
        validation_alias=AliasChoices("store", "database_url"),
        description="sqlite:///<path> or postgresql://...; default: SQLite in home",
    )
    catalogue_dirs: list[Path] = Field(default_factory=list)
    flow_dirs: list[Path] = Field(
        default_factory=list, description="where start_flow finds flows by name (and home/flows)"
    )
    sites: list[SiteConfig] = Field(
        default_factory=lambda: [SiteConfig(name="local", kind="local")]
    )
    public_url: str = Field("http://127.0.0.1:8765", description="base URL of the HTTP app")
    host: str = "127.0.0.1"
    port: int = 8765
    # DNS rebinding: /mcp answers only these Host names and browser Origins (fnmatch patterns),
    # besides the loopback ones, the listen address and public_url's, which are always allowed.
    # Requests without an Origin (non-browser clients) are not refused for it.
    allowed_hosts: list[str] = Field(default_factory=list, examples=[["*.lab.example.org"]])
    allowed_origins: list[str] = Field(
        default_factory=list, examples=[["https://notebooks.lab.example.org"]]
    )
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="a connection that has not sent a whole request head is closed"
    )
    http_idle_timeout_s: int = Field(
        5, gt=0, description="an idle keep-alive connection is closed after this"
    )
    event_ttl_s: int | None = Field(None, description="default lifetime of a new event")
    entry_token_ttl_s: int = 12 * 3600
    allow_root_services: bool = Field(
        False,
        description="let services that refuse root (JupyterLab) run as root when sciorch does "
        "(tests and throwaway containers only): entries get SCIORCH_ALLOW_ROOT=1",
    )
    max_result_bytes: int = Field(
        DEFAULT_MAX_RESULT_BYTES,
        ge=1024,
        le=MAX_RESULT_BYTES_LIMIT,
        description="largest result.json kept; a job's bigger result fails it, kept as a file",
    )
    audit_max_bytes: int = Field(
        10 << 20, ge=4096, description="the audit log rotates when it reaches this size"
    )
    audit_backups: int = Field(5, ge=1, le=100, description="rotated audit logs kept")
    audit_value_bytes: int = Field(
        4096, ge=64, description="an audited argument value over this is logged as its digest"
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    lease_ttl_s: float = Field(
        6.0,
        ge=1.0,
        le=300.0,
        description="replicas on PostgreSQL: a dead replica's work is taken over after this",
    )
    data_plane: str | None = Field(
        None,
        pattern=r"^rediss?://",
        description="Redis Streams for high-rate stream records (redis://admin:pw@host:port); "
        "jobs append there, clients read with stream_access credentials",
    )
    data_plane_host: str | None = Field(
        None, description="the Redis address clients are given; default: data_plane's host"
    )
    urgent_principals: list[str] = Field(
        default_factory=list,
        description="who may ask for priority=urgent besides admins and holders of the "
        "sciorch.urgent scope ('*': everyone)",
    )
    warning_lead_s: float = Field(
        300.0, ge=0, description="warn this long before an entry's walltime or an event's TTL ends"
    )

    @property
    def db_path(self) -> Path:
        if self.store and self.store.startswith("sqlite:///"):
            return Path(self.store.removeprefix("sqlite:///"))
        return self.home / "sciorch.db"

    @property
    def store_url(self) -> str | None:
        """The PostgreSQL URL when the store is PostgreSQL (None: SQLite at db_path)."""
        return self.store if self.store and self.store.startswith("postgres") else None

    @property
    def entries_dir(self) -> Path:
        return self.home / "entries"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def site(self, name: str) -> SiteConfig | None:
        return next((s for s in self.sites if s.name == name), None)


def default_home() -> Path:
    return Path(os.environ.get("SCIORCH_HOME") or Path.home() / ".sciorch").expanduser()


def load_settings(home: Path | None = None, **overrides: Any) -> Settings:
    """Read $SCIORCH_CONFIG or <home>/config.toml if present, then apply overrides."""
    home = (home or default_home()).expanduser().resolve()
    data: dict[str, Any] = {}
    path = Path(os.environ.get("SCIORCH_CONFIG") or home / "config.toml")
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"configuration {path}: {exc}", field=str(path)) from exc
    if url := os.environ.get("SCIORCH_PUBLIC_URL"):
        data["public_url"] = url
    if store := os.environ.get("SCIORCH_STORE"):
        data["store"] = store
    data.update(overrides)
    data["home"] = home
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise invalid_input(exc, where=f"configuration {path}") from exc
    for d in (settings.home, settings.entries_dir, settings.keys_dir, settings.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    return settings
