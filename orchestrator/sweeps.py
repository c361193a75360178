"""Sweeps: one job template over a list (or a grid) of parameter sets, as first-class work.

A sweep is a row in `sweeps` and one ordinary entry per element (`sweep_elements` keeps the
order), so get_entry, read_results, wait_entry and cancel_entry work on each element as on any
entry. Every element is validated before anything is recorded (an error names the element's
index and field), the sweep is routed once (all elements run on one site) and then handed to
the site as one native array where the backend has one (`ArrayBackend`: a Slurm job array with a
`%throttle`); elsewhere each element is submitted on its own with the sweep's throttle in its
LaunchSpec (the local pool starts at most `throttle` elements of a sweep at once).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from ground.contract import ArrayBackend, LaunchSpec
from ground.errors import Conflict, InvalidInput, InvalidParameters, NotFound
from ground.models import ACTIVE_STATES, Entry, EntryState, Message, Principal, ResourceRequest
from orchestrator.accounts import sites_for
from orchestrator.catalogue import resources_for, validate_parameters
from orchestrator.database import IntegrityError, parse_ts
from orchestrator.engine import Engine, new_id
from orchestrator.routing import choose_site
from orchestrator.store import now

MAX_ELEMENTS = 1000  # Slurm's default MaxArraySize is 1001 (indices 0-1000)


@dataclass(frozen=True)
class Sweep:
    id: str
    event_id: str
    submitted_by: str
    service: str
    site: str
    throttle: int | None
    created_at: Any
    entries: list[Entry]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(e.state.value for e in self.entries))

    @property
    def done(self) -> bool:
        return all(e.state.terminal for e in self.entries)


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """{'a': [1, 2], 'b': ['x']} -> [{'a': 1, 'b': 'x'}, {'a': 2, 'b': 'x'}] (the last key
    varies fastest, as in nested loops written in the grid's order)."""
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InvalidInput(f"grid.{key}: a non-empty list of values", field=f"grid.{key}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def element_sets(
    parameter_sets: list[dict[str, Any]] | None, grid: dict[str, list[Any]] | None
) -> list[dict[str, Any]]:
    if (parameter_sets is None) == (grid is None):
        raise InvalidInput("give either parameter_sets or grid", field="parameter_sets")
    sets = parameter_sets if parameter_sets is not None else expand_grid(grid or {})
    if not 1 <= len(sets) <= MAX_ELEMENTS:
        raise InvalidInput(
            f"a sweep has 1 to {MAX_ELEMENTS} elements; this one has {len(sets)}",
            field="grid" if grid is not None else "parameter_sets",
        )
    return sets


async def submit_sweep(
    engine: Engine,
    principal: Principal,
    service: str,
    parameter_sets: list[dict[str, Any]] | None = None,
    grid: dict[str, list[Any]] | None = None,
    *,
    base: dict[str, Any] | None = None,
    event_id: str | None = None,
    site: str | None = None,
    resources: ResourceRequest | None = None,
    throttle: int | None = None,
    idempotency_key: str | None = None,
    version: str | None = None,
    priority: Literal["normal", "urgent"] = "normal",
) -> Sweep:
    engine.check_priority(principal, priority)
    if throttle is not None and throttle < 1:
        raise InvalidInput("throttle must be at least 1", field="throttle")
    svc = engine.catalogue.get(service, version)
    if svc.kind != "job":
        raise InvalidInput(f"{svc.name} is a service; a sweep runs jobs", field="service")
    where = "grid" if grid is not None else "parameter_sets"
    params_list: list[dict[str, Any]] = []
    for i, element in enumerate(element_sets(parameter_sets, grid)):
        if not isinstance(element, dict):
            raise InvalidInput(f"{where}[{i}]: a JSON object", field=f"{where}[{i}]")
        try:
            params_list.append(validate_parameters(svc, {**(base or {}), **element}))
        except InvalidParameters as exc:
            sub = (exc.field or "parameters").removeprefix("parameters").lstrip(".")
            field = f"{where}[{i}]" + (f".{sub}" if sub else "")
            raise InvalidParameters(f"element {i}: {exc.message}", field=field) from exc
    res_list = [
        (resources or ResourceRequest()).apply_to(resources_for(svc, p)) for p in params_list
    ]
    event = await engine.event_to_submit_to(principal, event_id)
    request_hash = hashlib.sha256(
        json.dumps(
            [
                svc.ref,
                params_list,
                event.id,
                site,
                throttle,
                priority,
                [r.model_dump() for r in res_list],
            ],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    db = engine.store.database
    if idempotency_key is not None:
        found = await _find_idempotent(engine, principal, idempotency_key, request_hash)
        if found is not None:
            return found
    maintenance = {s.name: s.maintenance for s in engine.settings.sites}
    requested = site or event.site
    routable = engine.backends if requested else sites_for(engine, principal)
    chosen = await choose_site(routable, maintenance, res_list[0], svc.kind, requested)
    sweep_id = new_id("swp")
    made: list[tuple[Entry, LaunchSpec]] = [
        await engine.new_entry(
            principal,
            svc,
            p,
            r,
            event,
            chosen,
            priority,
            sweep_id=sweep_id,
            sweep_index=i,
            sweep_throttle=throttle,
        )
        for i, (p, r) in enumerate(zip(params_list, res_list, strict=True))
    ]
    at = now()
    try:
        await db.execute(
            "INSERT INTO sweeps (id, event_id, submitted_by, service, site, size, throttle, "
            "created_at, idempotency_key, request_hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                sweep_id,
                event.id,
                principal.id,
                svc.name,
                chosen,
                len(made),
                throttle,
                db.ts(at),
                idempotency_key,
                request_hash,
            ),
        )
    except IntegrityError:
        if idempotency_key is None:
            raise
        found = await _find_idempotent(engine, principal, idempotency_key, request_hash)
        assert found is not None
        return found
    for i, (entry, spec) in enumerate(made):
        await engine.store.insert_entry(entry, spec.model_dump(mode="json"), None)
        await db.execute(
            "INSERT INTO sweep_elements (sweep_id, idx, entry_id) VALUES (?,?,?)",
            (sweep_id, i, entry.id),
        )
        engine.bus.publish(
            Message(
                kind="transition",
                entry_id=entry.id,
                event_id=event.id,
                state=EntryState.PENDING,
                at=entry.created_at,
            )
        )
    await _hand_to_site(engine, chosen, [spec for _, spec in made], throttle)
    return await get_sweep(engine, principal, sweep_id)


async def _hand_to_site(
    engine: Engine, site: str, specs: list[LaunchSpec], throttle: int | None
) -> None:
    backend = engine.backends[site]
    if engine.replicas is not None and not engine.replicas.owns(site):
        for spec in specs:  # the owner submits them one by one, throttled by their specs
            engine.replicas.hand_over(spec.entry_id)
        return
    same = len({s.resources.model_dump_json() for s in specs}) == 1
    if isinstance(backend, ArrayBackend) and same and len(specs) > 1:
        if engine.replicas is not None:
            specs = [s for s in specs if engine.replicas.claim(site, s.entry_id)]
        try:
            await backend.submit_array(specs, throttle)
        except Exception as exc:
            for spec in specs:
                await engine.transition(
                    spec.entry_id, EntryState.FAILED, reason=f"array submission failed: {exc}"
                )
            raise
        return
    for spec in specs:
        await engine.submit_to_backend(site, spec)


async def _find_idempotent(
    engine: Engine, principal: Principal, key: str, request_hash: str
) -> Sweep | None:
    rows = await engine.store.database.fetch(
        "SELECT id, request_hash FROM sweeps WHERE submitted_by = ? AND idempotency_key = ?",
        (principal.id, key),
    )
    if not rows:
        return None
    if rows[0]["request_hash"] != request_hash:
        raise Conflict(
            f"idempotency_key {key!r} was already used for a different sweep",
            field="idempotency_key",
        )
    return await get_sweep(engine, principal, str(rows[0]["id"]))


async def get_sweep(engine: Engine, principal: Principal, sweep_id: str) -> Sweep:
    db = engine.store.database
    rows = await db.fetch("SELECT * FROM sweeps WHERE id = ?", (sweep_id,))
    if not rows:
        raise NotFound(f"no sweep {sweep_id!r} visible to {principal.id}", field="sweep_id")
    row = rows[0]
    try:
        await engine.get_event(principal, row["event_id"])
    except NotFound:
        raise NotFound(
            f"no sweep {sweep_id!r} visible to {principal.id}", field="sweep_id"
        ) from None
    ids = await db.fetch(
        "SELECT entry_id FROM sweep_elements WHERE sweep_id = ? ORDER BY idx", (sweep_id,)
    )
    entries = []
    for r in ids:
        entry = await engine.store.get_entry(str(r["entry_id"]), transitions=False)
        if entry is not None:
            entries.append(entry)
    return Sweep(
        id=row["id"],
        event_id=row["event_id"],
        submitted_by=row["submitted_by"],
        service=row["service"],
        site=row["site"],
        throttle=row["throttle"],
        created_at=parse_ts(row["created_at"]),
        entries=entries,
    )


async def wait_sweep(
    engine: Engine, principal: Principal, sweep_id: str, timeout_s: float | None = None
) -> tuple[Sweep, bool]:
    """Wait until every element has finished; (sweep, timed_out)."""
    sweep = await get_sweep(engine, principal, sweep_id)
    ids = {e.id for e in sweep.entries}
    async with engine.bus.subscribe(lambda m: m.kind == "transition" and m.entry_id in ids) as sub:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            sweep = await get_sweep(engine, principal, sweep_id)  # after subscribing: no gap
            if sweep.done:
                return sweep, False
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return sweep, True
            recheck = engine.bus.recheck_s
            if recheck is not None and (remaining is None or remaining > recheck):
                remaining = recheck
            try:
                msg = await asyncio.wait_for(sub.get(), timeout=remaining)
            except TimeoutError:
                continue
            if msg.state is None or not msg.state.terminal:
                continue
            while not sub.queue.empty():  # a burst of endings: one look at the store
                sub.queue.get_nowait()


async def cancel_sweep(
    engine: Engine, principal: Principal, sweep_id: str, wait_s: float = 10.0
) -> Sweep:
    """Cancel every element still active. Idempotent."""
    sweep = await get_sweep(engine, principal, sweep_id)
    active = [e for e in sweep.entries if e.state in ACTIVE_STATES]
    if active:
        await engine.cancel_entries(principal, active, wait_s)
    return await get_sweep(engine, principal, sweep_id)


__all__ = [
    "MAX_ELEMENTS",
    "Sweep",
    "cancel_sweep",
    "element_sets",
    "expand_grid",
    "get_sweep",
    "submit_sweep",
    "wait_sweep",
]
