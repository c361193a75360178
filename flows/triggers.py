"""What starts flow runs without a person: new files in a directory, a schedule, a signed webhook,
the end of another flow's run. Each fires `FlowManager.fire` with a key that names what fired
it (the file and its modification time, the tick, the delivery), and the run's idempotency key
is made of it: a file seen again after a restart, or a webhook delivered twice, starts no second
run.

Directories are scanned (every `poll_s`) rather than watched with inotify: the directories
instruments write to at facilities are often network filesystems, where a write made on another
host raises no local event. A file counts once its size and modification time have not changed
for `debounce_s` (an instrument still writing it keeps changing them).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from croniter import croniter

from flows.models import CreateTriggerInput, RunRecord, TriggerKind, TriggerRecord
from ground.errors import InvalidInput, NotAllowed, NotFound

if TYPE_CHECKING:
    from flows.manager import FlowManager

log = logging.getLogger("sciorch.flows")

POLL_S = 0.5
SIGNATURE_HEADER = "X-Sciorch-Signature"
DELIVERY_HEADER = "X-Sciorch-Delivery"


def check_trigger(req: CreateTriggerInput) -> dict[str, Any]:
    """The trigger's own settings, checked (errors name the field)."""
    if req.kind == TriggerKind.DIRECTORY:
        if not req.path:
            raise InvalidInput("a directory trigger needs path", field="path")
        path = Path(req.path).expanduser()
        if not path.is_absolute():
            raise InvalidInput(f"path {req.path!r} must be absolute", field="path")
        if not path.is_dir():
            raise InvalidInput(f"path {req.path!r} is not a directory", field="path")
        return {"path": str(path), "pattern": req.pattern, "debounce_s": req.debounce_s}
    if req.kind == TriggerKind.SCHEDULE:
        if not req.cron or not croniter.is_valid(req.cron):
            raise InvalidInput(
                f"cron {req.cron!r} is not a cron expression (five fields: minute hour day "
                "month weekday, e.g. '*/5 * * * *')",
                field="cron",
            )
        return {"cron": req.cron}
    if req.kind == TriggerKind.FLOW_END:
        if not req.source_flow:
            raise InvalidInput("a flow_end trigger needs source_flow", field="source_flow")
        return {"source_flow": req.source_flow, "on_states": list(req.on_states)}
    if req.kind == TriggerKind.CAMPAIGN:
        return {"campaign_id": req.campaign_id, "every": req.every}
    return {}


def sign(secret: str, body: bytes) -> str:
    """The signature header's value a webhook sender computes: sha256=<hex HMAC of the body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class TriggerWatch:
    """The running triggers of one manager, while it serves."""

    def __init__(self, manager: FlowManager) -> None:
        self.manager = manager
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.flow_end: dict[str, TriggerRecord] = {}
        self._after_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        store = await self.manager.store()
        for rec in await store.list_triggers():
            self.add(rec)
            await self.manager.start_queued(rec)

    def add(self, rec: TriggerRecord) -> None:
        if rec.id in self.tasks or rec.id in self.flow_end:
            return
        if rec.kind == TriggerKind.DIRECTORY:
            self._spawn(rec, self._directory(rec))
        elif rec.kind == TriggerKind.SCHEDULE:
            self._spawn(rec, self._schedule(rec))
        elif rec.kind in (TriggerKind.FLOW_END, TriggerKind.CAMPAIGN):
            self.flow_end[rec.id] = rec

    def _spawn(self, rec: TriggerRecord, work: Any) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("trigger %s stopped", rec.id)

        self.tasks[rec.id] = asyncio.create_task(guarded(), name=f"trigger {rec.id}")

    def remove(self, trigger_id: str) -> None:
        self.flow_end.pop(trigger_id, None)
        task = self.tasks.pop(trigger_id, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = [*self.tasks.values(), *self._after_tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    def run_ended(self, run: RunRecord) -> None:
        """A run's task ended: start the next queued run of its trigger, and fire flow_end
        triggers that listen to its flow."""
        self.spawn(self._after(run))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background until it ends or the watch stops."""
        task = asyncio.get_running_loop().create_task(work)
        self._after_tasks.add(task)
        task.add_done_callback(self._after_tasks.discard)

    async def _after(self, run: RunRecord) -> None:
        store = await self.manager.store()
        fresh = await store.get_run(run.id)
        if fresh is None:
            return
        if fresh.trigger_id is not None:
            trigger = await store.get_trigger(fresh.trigger_id)
            if trigger is not None:
                await self.manager.start_queued(trigger)
        if not fresh.state.terminal:
            return
        for rec in list(self.flow_end.values()):
            cfg = rec.config
            if (
                rec.kind == TriggerKind.FLOW_END
                and cfg["source_flow"] == fresh.flow
                and fresh.state.value in cfg["on_states"]
            ):
                info = {
                    "kind": "flow_end",
                    "run_id": fresh.id,
                    "flow": fresh.flow,
                    "state": fresh.state.value,
                    "outputs": fresh.outputs,
                }
                await self.manager.fire(rec, info, fresh.id)

    async def campaign_progress(
        self, campaign_id: str, owner: str, state: str, evaluations: int
    ) -> None:
        """A campaign changed: fire the campaign triggers of its owner, once per milestone
        (its end; with `every`, each multiple of that many finished evaluations)."""
        for rec in list(self.flow_end.values()):
            cfg = rec.config
            if rec.kind != TriggerKind.CAMPAIGN or rec.owner != owner:
                continue
            if cfg.get("campaign_id") not in (None, campaign_id):
                continue
            info = {
                "kind": "campaign",
                "campaign_id": campaign_id,
                "state": state,
                "evaluations": evaluations,
            }
            every = cfg.get("every")
            if every and evaluations and evaluations % every == 0:
                await self.manager.fire(
                    rec, {**info, "milestone": f"{evaluations}"}, f"{campaign_id}:n{evaluations}"
                )
            if state != "running":
                await self.manager.fire(rec, {**info, "milestone": "end"}, f"{campaign_id}:end")

    # ------------------------------------------------------------------ kinds

    async def _directory(self, rec: TriggerRecord) -> None:
        cfg = rec.config
        folder = Path(cfg["path"])
        since = float((rec.cursor or {}).get("since", 0.0))
        debounce = float(cfg["debounce_s"])
        seen: dict[str, tuple[int, int, float]] = {}  # name -> (size, mtime_ns, stable since)
        fired: set[tuple[str, int]] = set()
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            try:
                entries = await asyncio.to_thread(_scan, folder, cfg["pattern"])
            except OSError as exc:
                log.warning("trigger %s: cannot scan %s: %s", rec.id, folder, exc)
                entries = []
            present = set()
            for name, size, mtime_ns in entries:
                present.add(name)
                if mtime_ns / 1e9 < since or (name, mtime_ns) in fired:
                    continue
                was = seen.get(name)
                if was is None or was[:2] != (size, mtime_ns):
                    seen[name] = (size, mtime_ns, t)
                    continue
                if t - was[2] < debounce:
                    continue
                path = folder / name
                info = {
                    "kind": "directory",
                    "path": str(path),
                    "name": name,
                    "stem": path.stem,
                    "size": size,
                    "modified": datetime.fromtimestamp(mtime_ns / 1e9, UTC).isoformat(),
                }
                await self.manager.fire(rec, info, f"{name}:{mtime_ns}")
                fired.add((name, mtime_ns))
            for name in set(seen) - present:
                del seen[name]
            await asyncio.sleep(min(POLL_S, debounce / 2))

    async def _schedule(self, rec: TriggerRecord) -> None:
        cron = croniter(rec.config["cron"], datetime.now(UTC))
        while True:
            tick: datetime = cron.get_next(datetime)
            delay = (tick - datetime.now(UTC)).total_seconds()
            if delay > 0:
                await asyncio.sleep(delay)
            info = {"kind": "schedule", "at": tick.isoformat()}
            await self.manager.fire(rec, info, tick.isoformat())


def _scan(folder: Path, pattern: str) -> list[tuple[str, int, int]]:
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if fnmatch.fnmatch(e.name, pattern) and e.is_file(follow_symlinks=False):
                st = e.stat(follow_symlinks=False)
                out.append((e.name, st.st_size, st.st_mtime_ns))
    return out


async def deliver_webhook(
    manager: FlowManager, trigger_id: str, body: bytes, signature: str | None, delivery: str | None
) -> RunRecord:
    """A webhook delivery: the body must be signed with the trigger's secret; its JSON object
    (if any) becomes the run's trigger info. The same delivery id starts one run."""
    store = await manager.store()
    rec = await store.get_trigger(trigger_id)
    if rec is None or not rec.active or rec.kind != TriggerKind.WEBHOOK or rec.secret is None:
        raise NotFound(f"no webhook trigger {trigger_id!r}", field="trigger_id")
    if signature is None or not hmac.compare_digest(sign(rec.secret, body), signature):
        raise NotAllowed(
            f"the {SIGNATURE_HEADER} header must be sha256=<hex HMAC-SHA256 of the body with "
            "the trigger's secret>",
            field=SIGNATURE_HEADER,
        )
    try:
        payload = json.loads(body) if body.strip() else {}
    except ValueError:
        raise InvalidInput("the body must be JSON", field="body") from None
    if not isinstance(payload, dict):
        raise InvalidInput("the body must be a JSON object", field="body")
    key = delivery or hashlib.sha256(body).hexdigest()
    with contextlib.suppress(KeyError):
        del payload["kind"]
    return await manager.fire(rec, {"kind": "webhook", **payload}, key)
