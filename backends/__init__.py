"""Backends: where entries run. `create_backend` turns a configured site into its backend."""

from __future__ import annotations

from backends.base import Backend
from ground.config import Settings, SiteConfig
from ground.errors import InvalidInput

KINDS = ("local", "kubernetes", "slurm")


def create_backend(site: SiteConfig, settings: Settings) -> Backend:
    """The backend for one configured site."""
    if site.kind == "local":
        from backends.local import LocalBackend

        return LocalBackend(site.name, site.options(), settings.entries_dir)
    if site.kind == "kubernetes":
        from backends.kubernetes import KubernetesBackend

        return KubernetesBackend(site.name, site.options(), settings.entries_dir)
    if site.kind == "slurm":
        from backends.slurm import SlurmBackend

        return SlurmBackend(site.name, site.options(), settings.entries_dir)
    raise InvalidInput(
        f"site {site.name!r}: unknown backend kind {site.kind!r}; known kinds: "
        f"{', '.join(KINDS)}",
        field=f"sites.{site.name}.kind",
    )


__all__ = ["KINDS", "Backend", "create_backend"]
