"""Backend kinds, found by name in the `sciorch.backends` entry point group: the engine never
imports a backend. sciorch registers `local`, `slurm` and `kubernetes` in its own pyproject.toml;
a facility adds a kind (PBS, Flux, a cloud) by publishing a package with an entry point

    [project.entry-points."sciorch.backends"]
    pbs = "mysite.pbs:PBSBackend"

whose target is a `ground.contract.BackendFactory` (a Backend class taking the site's name, its
options and the entries directory)."""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points

from ground.config import Settings, SiteConfig
from ground.contract import Backend, BackendFactory
from ground.errors import BackendError, InvalidInput

GROUP = "sciorch.backends"


@functools.cache
def _registered() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def backend_kinds() -> list[str]:
    """The kinds installed in this environment."""
    return sorted(_registered())


def create_backend(site: SiteConfig, settings: Settings) -> Backend:
    """The backend for one configured site."""
    ep = _registered().get(site.kind)
    if ep is None:
        raise InvalidInput(
            f"site {site.name!r}: unknown backend kind {site.kind!r}; known kinds: "
            f"{', '.join(backend_kinds())}",
            field=f"sites.{site.name}.kind",
        )
    try:
        factory: BackendFactory = ep.load()
    except Exception as exc:  # a broken plug-in must say which one
        raise BackendError(
            f"site {site.name!r}: backend kind {site.kind!r} ({ep.value}) failed to load: {exc}"
        ) from exc
    return factory(site.name, site.options(), settings.entries_dir)
