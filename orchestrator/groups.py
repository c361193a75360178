"""Groups: the entries a composed service's launch makes, started in order and ended together
(the rules are in ground.compose).

Launching records every member at once (so the caller sees the whole group), starting the
sidecars and holding the rest: a held member is pending in the store with `held` in its spec,
and no backend knows it. What moves a group on is its members' transitions: a listener on the
bus looks at the group again after each one of its members, and releases the main member once
its sidecars are up, the `after` members once the main one is ready, or ends the group. A
member is released with the addresses of the members up by then. Nothing here is remembered
that the store does not hold, so after a restart the same look at every active group carries
on where the last process left off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from ground.compose import EntryGroup, Member, env_prefix, fill_exports, group_of
from ground.contract import LaunchSpec
from ground.errors import InvalidParameters, SciorchError
from ground.models import (
    ACTIVE_STATES,
    Entry,
    EntryState,
    Message,
    Principal,
    ResourceRequest,
    Service,
)
from orchestrator.catalogue import resources_for, validate_parameters

if TYPE_CHECKING:
    from orchestrator.engine import Engine

log = logging.getLogger("sciorch.groups")

HELD = "held"
EXPORTS = "exports"


def is_up(entry: Entry) -> bool:
    """Far enough for the members after it: a service answering, a job running (or done)."""
    if entry.kind == "service":
        return entry.state == EntryState.READY
    return entry.state in (EntryState.RUNNING, EntryState.READY, EntryState.SUCCEEDED)


def address_values(entry: Entry) -> dict[str, str]:
    """The placeholders of exports for an entry that is up."""
    parts = urlsplit(entry.endpoint or "")
    return {
        "entry_id": entry.id,
        "endpoint": entry.endpoint or "",
        "url": entry.url or "",
        "host": parts.hostname or "",
        "port": str(parts.port or ""),
    }


class Groups:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._members: dict[str, tuple[str, str]] = {}  # entry id -> (group id, event id)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._remove_listener: Any = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._remove_listener = self.engine.bus.add_listener(self._heard)
        active = await self.engine.store.list_entries(states=ACTIVE_STATES, limit=1_000_000)
        groups: dict[str, str] = {}
        for entry in active:
            group = group_of(entry.handle)
            if group is not None:
                self._members[entry.id] = (group.id, entry.event_id)
                groups[group.id] = entry.event_id
        for group_id, event_id in groups.items():
            self._spawn(group_id, event_id)

    async def close(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _heard(self, msg: Message) -> None:
        if msg.kind != "transition" or msg.entry_id not in self._members:
            return
        group_id, event_id = self._members[msg.entry_id]
        if msg.state is not None and msg.state.terminal:
            self._members.pop(msg.entry_id, None)
        self._spawn(group_id, event_id)

    def _spawn(self, group_id: str, event_id: str) -> None:
        task = asyncio.create_task(self._look(group_id, event_id), name=f"sciorch-{group_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ launching

    async def launch(
        self,
        principal: Principal,
        svc: Service,
        params: dict[str, Any],
        *,
        event_id: str | None,
        site: str | None,
        resources: ResourceRequest | None,
        priority: Literal["normal", "urgent"],
    ) -> Entry:
        """Record the whole group; start its sidecars (or its main member if it has none)."""
        engine = self.engine
        event = await engine.event_to_submit_to(principal, event_id)
        # Every component checked before anything is recorded: a bad one launches nothing.
        planned: list[tuple[str, int, Literal["before", "after"], Service, dict[str, Any]]] = []
        for c in svc.components:
            comp_svc = engine.catalogue.get(c.service)
            try:
                count = c.count_for(params)
            except ValueError as exc:
                field = f"parameters.{str(c.count).strip('{}')}"
                raise InvalidParameters(f"{field}: {exc}", field=field) from exc
            try:
                comp_params = validate_parameters(comp_svc, c.parameters_for(params))
                resources_for(comp_svc, comp_params)
            except InvalidParameters as exc:
                raise _as_callers(exc, c.name, c.parameters) from exc
            planned += [(c.name, i, c.start, comp_svc, comp_params) for i in range(count)]
        group_id = f"grp-{secrets.token_hex(6)}"
        shared = {"SCIORCH_GROUP_ID": group_id, "SCIORCH_GROUP_SECRET": secrets.token_urlsafe(24)}
        on_exit = {c.name: c.on_exit for c in svc.components}
        sidecars = ", ".join(c.name for c in svc.components if c.start == "before")
        exports = {c.name: c.exports for c in svc.components}
        # The main member first (held): its id and its site are the others'. Its own id is its
        # main_entry_id, filled in by the engine.
        main_group = EntryGroup(
            id=group_id, component=svc.component_name, role="main", main_entry_id=""
        )
        main = await engine.launch(
            principal,
            svc.name,
            params,
            event_id=event.id,
            site=site,
            resources=resources,
            version=svc.version,
            priority=priority,
            member=Member(
                group=main_group,
                env=shared,
                exports=svc.exports,
                hold=True,
                reason=f"waiting for {sidecars} to be up" if sidecars else None,
            ),
        )
        self._members[main.id] = (group_id, event.id)
        made = [main]
        try:
            for name, index, start, comp_svc, comp_params in planned:
                group = EntryGroup(
                    id=group_id,
                    component=name,
                    index=index,
                    role=start,
                    main_entry_id=main.id,
                    on_exit=on_exit[name],
                )
                entry = await engine.launch(
                    principal,
                    comp_svc.name,
                    comp_params,
                    event_id=event.id,
                    site=main.site,
                    # They share the main member's lifetime, its time limit included.
                    resources=ResourceRequest(walltime_s=main.resources.walltime_s),
                    version=comp_svc.version,
                    priority=priority,
                    member=Member(
                        group=group,
                        env=shared,
                        exports=exports[name],
                        hold=start == "after",
                        reason=f"waiting for {svc.component_name} to be ready"
                        if start == "after"
                        else None,
                    ),
                )
                self._members[entry.id] = (group_id, event.id)
                made.append(entry)
        except BaseException as exc:
            why = exc.message if isinstance(exc, SciorchError) else str(exc)
            await engine.stop_entries(made, EntryState.FAILED, f"group launch failed: {why}")
            raise
        await self._look(group_id, event.id)
        return await engine.get_entry(principal, main.id)

    # ------------------------------------------------------------------ what members see

    async def members(self, entry: Entry) -> list[Entry]:
        """The entries of this entry's group (launch order), or [] outside a group."""
        group = group_of(entry.handle)
        if group is None:
            return []
        event_entries = await self.engine.store.list_entries(
            event_ids=[entry.event_id], limit=1_000_000
        )
        return [e for e in event_entries if (g := group_of(e.handle)) and g.id == group.id]

    async def event_env(self, event_id: str) -> dict[str, str]:
        """What every new entry of the event is told: the exports of the services up in it."""
        env: dict[str, str] = {}
        up = await self.engine.store.list_entries(
            event_ids=[event_id], states=[EntryState.READY], limit=1_000_000
        )
        for entry in up:
            exports = (await self.engine.store.get_spec(entry.id)).get(EXPORTS) or {}
            env.update(fill_exports(exports, address_values(entry)))
        return env

    async def _group_env(self, members: list[Entry]) -> dict[str, str]:
        env: dict[str, str] = {}
        counts: dict[str, int] = {}
        for m in members:
            g = group_of(m.handle)
            if g is not None:
                counts[g.component] = counts.get(g.component, 0) + 1
        for m in members:
            g = group_of(m.handle)
            if g is None or not is_up(m) or m.state.terminal:
                continue
            prefix = env_prefix(g.component, g.index if counts[g.component] > 1 else None)
            env[prefix + "ENTRY_ID"] = m.id
            if m.endpoint:
                env[prefix + "ENDPOINT"] = m.endpoint
            if m.url:
                env[prefix + "URL"] = m.url
            exports = (await self.engine.store.get_spec(m.id)).get(EXPORTS) or {}
            env.update(fill_exports(exports, address_values(m)))
        return env

    # ------------------------------------------------------------------ moving a group on

    async def _look(self, group_id: str, event_id: str) -> None:
        lock = self._locks.setdefault(group_id, asyncio.Lock())
        try:
            async with lock:
                await self._step(group_id, event_id)
        except Exception:
            log.exception("group %s: moving it on failed", group_id)

    async def _step(self, group_id: str, event_id: str) -> None:
        engine = self.engine
        everyone = await engine.store.list_entries(event_ids=[event_id], limit=1_000_000)
        members = [
            (e, g) for e in everyone if (g := group_of(e.handle)) is not None and g.id == group_id
        ]
        main = next((e for e, g in members if g.role == "main"), None)
        if main is None:
            return
        if engine.replicas is not None and not engine.replicas.owns(main.site):
            return  # the site's owner moves this group on
        entries = [e for e, _ in members]
        active = [e for e in entries if not e.state.terminal]
        if main.state.terminal:
            self._locks.pop(group_id, None)
            rest = [e for e in active if e.id != main.id]
            if rest:
                why = f"main component {main.id} ended ({main.state.value})"
                await engine.stop_entries(rest, EntryState.CANCELLED, why)
            return
        for e, g in members:
            gone = e.state.terminal and e.state != EntryState.SUCCEEDED
            if g.role != "main" and gone and g.on_exit == "fail":
                what = f"{g.component}[{g.index}]" if g.index else g.component
                why = f"component {what} ({e.id}) {e.state.value}: {e.reason or 'no reason'}"
                await engine.stop_entries([main], EntryState.FAILED, why)
                others = [o for o in active if o.id != main.id]
                await engine.stop_entries(others, EntryState.CANCELLED, f"group failed: {why}")
                return
        if main.state == EntryState.PENDING and all(
            is_up(e) for e, g in members if g.role == "before"
        ):
            await self._release(main, entries)
        if main.state == EntryState.READY or (main.kind == "job" and is_up(main)):
            for e, g in members:
                if g.role == "after" and e.state == EntryState.PENDING:
                    await self._release(e, entries)

    async def _release(self, entry: Entry, members: list[Entry]) -> None:
        """Start a held member, telling it the addresses of the members up now."""
        spec = await self.engine.store.get_spec(entry.id)
        if not spec.get(HELD):
            return
        spec.pop(HELD)
        spec["env"] = {**spec.get("env", {}), **await self._group_env(members)}
        await self.engine.store.update_entry_fields(
            entry.id, {"spec": json.dumps(spec), "reason": None}
        )
        try:
            await self.engine.submit_to_backend(entry.site, LaunchSpec.model_validate(spec))
        except Exception as exc:  # the entry has failed (submit_to_backend recorded why)
            log.warning("group member %s could not start: %s", entry.id, exc)


def _as_callers(
    exc: InvalidParameters, component: str, mapping: Mapping[str, Any]
) -> InvalidParameters:
    """A component's refusal, named by the caller's parameter that fed it (when one did)."""
    inner = (exc.field or "").removeprefix("parameters.").split(".")[0]
    source = mapping.get(inner)
    if isinstance(source, str) and source.startswith("{") and source.endswith("}"):
        field = f"parameters.{source[1:-1]}"
        return InvalidParameters(f"{field}: for component {component}: {exc.message}", field=field)
    where = f"template: components.{component}.parameters"
    return InvalidParameters(f"{where}: {exc.message}", field=f"components.{component}")


def held(spec: Mapping[str, Any]) -> bool:
    """A member recorded and waiting for its group to start it (no backend knows it)."""
    return bool(spec.get(HELD))
