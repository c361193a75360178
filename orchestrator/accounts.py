"""Accounts per site, as the engine and list_sites use them (the mapping itself:
ground.accounts): which sites a principal may be routed to, and what each site would run the
principal's work as, with the scheduler's limits and usage for that account where it reports
them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ground.contract import Backend, ReportsAccounts
from ground.errors import AccountNotMapped
from ground.models import Principal, Site

if TYPE_CHECKING:
    from orchestrator.engine import Engine

log = logging.getLogger("sciorch.engine")

# A scheduler's accounting (sacctmgr, sshare) that does not answer within this is left out of
# list_sites rather than holding it up.
USAGE_TIMEOUT_S = 10.0


def sites_for(engine: Engine, principal: Principal) -> Mapping[str, Backend]:
    """The sites the router may choose for `principal`: those that would not refuse it. When
    every site refuses, the first refusal is raised (it names the site and the principal)."""
    usable: dict[str, Backend] = {}
    refused: AccountNotMapped | None = None
    for name, backend in engine.backends.items():
        try:
            engine.account_for(name, principal)
        except AccountNotMapped as exc:
            refused = refused or exc
            continue
        usable[name] = backend
    if not usable and refused is not None:
        raise refused
    return usable


async def with_accounts(engine: Engine, principal: Principal, sites: list[Site]) -> list[Site]:
    """The sites as `principal` sees them: the account it would run as on each (or why it
    has none there), and that account's limits and usage where the site reports them."""
    out = []
    for site in sites:
        try:
            account = engine.account_for(site.name, principal)
        except AccountNotMapped as exc:
            out.append(site.model_copy(update={"account_note": exc.message}))
            continue
        if account is None:
            out.append(site.model_copy(update={"account_note": "runs as the server's own user"}))
            continue
        backend = engine.backends.get(site.name)
        usage = None
        if isinstance(backend, ReportsAccounts):
            try:
                usage = await asyncio.wait_for(backend.account_usage(account), USAGE_TIMEOUT_S)
            except Exception as exc:  # accounting down: the rest of the answer still stands
                log.warning("site %s: usage of %s unknown: %s", site.name, account, exc)
        out.append(site.model_copy(update={"account": account, "association": usage}))
    return out


__all__ = ["sites_for", "with_accounts"]
