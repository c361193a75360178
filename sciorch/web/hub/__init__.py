"""The web control hub: pages for people at `/` of `sciorch serve` (catalogue, launch forms,
events and entries with live state, campaigns with a live chart, sites), in the same process as
/mcp and behind the same auth. `Hub(engine, auth).routes()` is what the HTTP app mounts."""

from sciorch.web.hub.pages import Hub

__all__ = ["Hub"]
