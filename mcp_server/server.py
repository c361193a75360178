"""The MCP server: sciorch's typed operations as FastMCP tools, entry resources with update
notifications, prompts, auth and middleware. `create_server` builds it over an open engine."""

from __future__ import annotations

import getpass
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Literal

from fastmcp import FastMCP
from fastmcp.server.auth import AccessToken, AuthProvider
from fastmcp.server.dependencies import get_access_token
from fastmcp_tasks import TasksExtension

from ground.models import Principal
from mcp_server.flow_tools import register_flows
from mcp_server.middleware import ArgumentSizeLimit, AuditLog, ErrorResults, rate_limit
from mcp_server.prompts import register_prompts
from mcp_server.resources import attach_subscriptions, register_resources
from mcp_server.steering_tools import register_steering
from mcp_server.toolset import IMPLIED, TOOLS, register_tools
from orchestrator.engine import Engine

os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")

INSTRUCTIONS = """\
sciorch runs jobs and long-running services on scientific facilities (this machine, Slurm, \
Kubernetes). Start with list_services. Jobs: submit_job, then wait_entry, then read_results; \
read_artifact shows the files a job wrote (images as images). \
Services: launch_service, then wait_entry until ready, then give the user access_url. \
Entries live in events (allocations) you own or that are shared with you; without event_id \
your default event is used. Errors name the field that was wrong and what was expected."""


URGENT_SCOPE = "sciorch.urgent"  # may ask for priority=urgent (see Engine.check_priority)


def local_principal() -> Principal:
    """Who stdio and the CLI act as: $SCIORCH_PRINCIPAL, else the login name."""
    who = os.environ.get("SCIORCH_PRINCIPAL")
    if not who:
        try:
            who = getpass.getuser()
        except (OSError, KeyError):  # no login name and no passwd entry (some containers)
            who = "local"
    return Principal(id=who)


def token_principal(token: AccessToken) -> Principal:
    # subject: the claim the verifier names the caller by ([auth] principal_claim)
    sub = str(token.subject or token.claims.get("sub") or token.client_id)
    # the string claims: a site may map the caller to its account by one (ground.accounts)
    claims = tuple(sorted((k, v) for k, v in token.claims.items() if isinstance(v, str)))
    return Principal(
        id=sub, admin="admin" in token.scopes, urgent=URGENT_SCOPE in token.scopes, claims=claims
    )


def bearer_reader(
    mcp: FastMCP, scope: Literal["read", "submit"] = "read"
) -> Callable[[str], Awaitable[Principal | None]] | None:
    """Who a bearer token that /mcp accepts with `scope` names (for HTTP next to /mcp: artifact
    downloads, uploads of inputs); None when the server has no auth."""
    auth = mcp.auth
    if auth is None:
        return None

    async def reader(token: str) -> Principal | None:
        try:
            access = await auth.verify_token(token)
        except Exception:  # a refused token (TokenRefused) is no principal
            return None
        if access is None or not IMPLIED[scope] & set(access.scopes):
            return None
        return token_principal(access)

    return reader


def create_server(
    engine: Engine,
    *,
    auth: AuthProvider | None = None,
    principal: Principal | None = None,
    read_only: bool = False,
    disable_destructive: bool = False,
    rate_per_second: float = 50.0,
    rate_burst: int | None = 200,
    campaign_runner: bool = False,
) -> FastMCP:
    """Build the server.

    With `auth`, every request needs a bearer token: its `sub` is the principal and its scopes
    (read, submit, admin) gate the tools. Without it (stdio, in-process), every call acts as
    `principal` (default: the local user). `campaign_runner`: the server a campaign's runner
    calls through (tools and resources only: it does not resume or pause campaigns).
    """
    fallback = principal or local_principal()

    def principal_of() -> Principal:
        token = get_access_token()
        return fallback if token is None else token_principal(token)

    mcp: FastMCP = FastMCP(
        "sciorch",
        instructions=INSTRUCTIONS,
        auth=auth,
        mask_error_details=True,
    )
    # Task-run tools (wait_entry) go through a Docket queue. Servers in one process that share
    # a queue name also share the queue, and a task is then run by whichever server's worker
    # takes it, acting as that server's principal: give each server a queue of its own.
    mcp.add_extension(TasksExtension(url="memory://", name=f"sciorch-{secrets.token_hex(6)}"))

    registered = register_tools(
        mcp,
        TOOLS,
        engine,
        principal_of,
        auth=auth is not None,
        read_only=read_only,
        disable_destructive=disable_destructive,
    )
    register_resources(mcp, engine, principal_of)
    register_prompts(mcp)
    steering = register_steering(
        mcp,
        engine,
        principal_of,
        auth=auth is not None,
        read_only=read_only,
        disable_destructive=disable_destructive,
        internal=campaign_runner,
    )
    registered += steering.tools
    flows = None
    if not campaign_runner:
        flows = register_flows(
            mcp,
            engine,
            principal_of,
            auth=auth is not None,
            read_only=read_only,
            disable_destructive=disable_destructive,
        )
        registered += flows.tools

    async def visible(who: Principal, uri: str) -> bool | None:
        verdict = await steering.visible(who, uri)
        if verdict is None and flows is not None:
            verdict = await flows.visible(who, uri)
        return verdict

    sub_bus = attach_subscriptions(mcp, engine, principal_of, visible)
    steering.publish_to(sub_bus)
    if flows is not None:
        flows.publish_to(sub_bus)
        flows.follow_campaigns(steering.manager)

    mutating = [s.name for s in registered if not s.read_only]
    mcp.add_middleware(ErrorResults())
    mcp.add_middleware(ArgumentSizeLimit())
    mcp.add_middleware(rate_limit(principal_of, rate_per_second, rate_burst))
    cfg = engine.settings
    mcp.add_middleware(
        AuditLog(
            cfg.logs_dir / "audit.jsonl",
            mutating,
            principal_of,
            max_bytes=cfg.audit_max_bytes,
            backups=cfg.audit_backups,
            value_bytes=cfg.audit_value_bytes,
        )
    )
    return mcp
