"""Which account a principal's work runs as on a site (`[sites.accounts]`).

A site without an `accounts` table runs everything as the server's own user (the embedded
default: nothing to configure). A site with one maps each principal to an account by, in this
order, the `table` (principal -> account), the `function` ("module:function", called with the
principal and the site's name, returning an account or None) and the `claim` of the caller's
access token (e.g. `preferred_username`). When none of them names an account, a site that
`required` one (the default) refuses the principal with `AccountNotMapped`, naming the site and
the principal; only a site configured with `required = false` runs such a principal's work as
the server's user. Nothing falls back to a shared account on its own.

The account found travels to the backend in `LaunchSpec.account` and is stored with the entry's
spec, so a restarted server (or another replica) keeps running the entry as that account.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ground.errors import AccountNotMapped, InvalidInput
from ground.models import Principal

# What an account may look like: a POSIX user name, or a Kubernetes user such as
# "oidc:alice@lab.example.org". Never a blank, quote or shell metacharacter; a POSIX site also
# checks that the user exists.
ACCOUNT_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.@:+-]{0,127}$"
_ACCOUNT = re.compile(ACCOUNT_PATTERN)


class AccountMap(BaseModel):
    """`[sites.accounts]`: how a site maps principals to its accounts."""

    model_config = ConfigDict(extra="forbid")

    claim: str | None = Field(
        None,
        description="the access-token claim naming the account (e.g. preferred_username)",
        examples=["preferred_username"],
    )
    table: dict[str, str] = Field(
        default_factory=dict, description="principal -> account; wins over function and claim"
    )
    function: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="'module:function' called as f(principal, site) -> account or None",
    )
    required: bool = Field(
        True,
        description="refuse a principal with no account here (false: it runs as the server's user)",
    )


AccountFunction = Callable[[Principal, str], "str | None"]


@cache
def _load(ref: str) -> AccountFunction:
    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(
            f"accounts.function {ref!r} cannot be loaded: {exc}", field="accounts.function"
        ) from exc
    if not callable(fn):
        raise InvalidInput(f"accounts.function {ref!r} is not callable", field="accounts.function")
    return fn  # type: ignore[no-any-return]


def account_for(mapping: AccountMap | None, site: str, principal: Principal) -> str | None:
    """The account `principal`'s work runs as on `site`; None: the server's own user.
    Raises AccountNotMapped when the site requires an account and none is found."""
    if mapping is None:
        return None
    account: Any = mapping.table.get(principal.id)
    how = "the site's table"
    if account is None and mapping.function:
        account = _load(mapping.function)(principal, site)
        how = f"function {mapping.function}"
    if account is None and mapping.claim:
        account = principal.claim(mapping.claim)
        how = f"claim {mapping.claim!r} of the access token"
    if account is None:
        if not mapping.required:
            return None
        tried = ", ".join(
            t
            for t, on in (
                ("the site's table", bool(mapping.table)),
                (f"function {mapping.function}", bool(mapping.function)),
                (f"token claim {mapping.claim!r}", bool(mapping.claim)),
            )
            if on
        )
        raise AccountNotMapped(
            f"principal {principal.id!r} has no account on site {site!r} (looked in {tried}); "
            "the site runs work only as its users' own accounts: ask its administrators to map "
            "you, or choose another site",
            field="site",
            site=site,
            principal=principal.id,
        )
    if not isinstance(account, str) or not _ACCOUNT.match(account):
        raise AccountNotMapped(
            f"principal {principal.id!r} maps to {account!r} on site {site!r} (by {how}), "
            "which is not an account name (letters, digits and _ . @ : + -)",
            field="site",
            site=site,
            principal=principal.id,
        )
    return account


__all__ = ["ACCOUNT_PATTERN", "AccountMap", "account_for"]
