"""Configuration: one TOML file ($SCIORCH_HOME/config.toml or $SCIORCH_CONFIG) plus environment
variables. With no file at all the defaults give a working local setup."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import InvalidInput


class SiteConfig(BaseModel):
    """One site. Keys beyond the common ones are the backend's own settings."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,62}$")
    kind: str = Field(description="backend kind: local, slurm, kubernetes")
    maintenance: bool = False

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path
    database_url: str | None = Field(None, description="default: sqlite in home")
    catalogue_dirs: list[Path] = Field(default_factory=list)
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

    @property
    def db_path(self) -> Path:
        if self.database_url and self.database_url.startswith("sqlite:///"):
            return Path(self.database_url.removeprefix("sqlite:///"))
        return self.home / "sciorch.db"

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
    data.update(overrides)
    data["home"] = home
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(f"configuration {path}: {loc}: {err['msg']}", field=loc) from exc
    for d in (settings.home, settings.entries_dir, settings.keys_dir, settings.logs_dir):
        d.mkdir(parents=True, exist_ok=True)
    return settings
