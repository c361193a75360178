"""The Job controller for Indexed Jobs, played on the emulator (tests/fakes/kube_emulator.py) the
way kube-controller-manager 1.33 does it, for what sciorch's sweeps use:

- `completionMode: Indexed`, `completions`, `parallelism`: at most `parallelism` pods at once,
  the lowest pending index first; pod i is named `<job>-<i>-<suffix>`, carries the label and the
  annotation `batch.kubernetes.io/job-completion-index: "<i>"`, and every container gets the
  environment variable JOB_COMPLETION_INDEX from that annotation (the downward API).
- pods carry the `batch.kubernetes.io/job-tracking` finalizer: a pod deleted through the API is
  terminated gracefully (SIGTERM to its container), its end is counted, then it is removed.
- `backoffLimitPerIndex` and `podFailurePolicy` (actions Ignore, FailIndex, Count, FailJob on
  exit codes and pod conditions): a failed pod is retried for its index until the index has
  failed more than `backoffLimitPerIndex` times.
- status: `active`, `succeeded`, `failed`, `completedIndexes` and `failedIndexes` in the
  compressed form ("0-2,4"), `ready`; at the end `SuccessCriteriaMet`+`Complete`, or
  `FailureTarget`+`Failed` with reason `FailedIndexes` (or `PodFailurePolicy` for FailJob).

Not played: activeDeadlineSeconds, maxFailedIndexes, successPolicy, suspend, podReplacementPolicy
other than its default (a replacement starts once the old pod has ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.kube_emulator import KubeEmulator

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
TRACKING = "batch.kubernetes.io/job-tracking"


def compress(indexes: Iterable[int]) -> str:
    """{0, 1, 2, 4} -> '0-2,4' (the API's form of completedIndexes and failedIndexes)."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(indexes)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _rule_matches(rule: Mapping[str, Any], pod: Mapping[str, Any]) -> bool:
    codes = rule.get("onExitCodes")
    if codes:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if codes.get("containerName") not in (None, cs.get("name")):
                continue
            code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
            if code is None or code == 0:
                continue
            inside: bool = code in (codes.get("values") or [])
            if inside == (codes.get("operator") == "In"):
                return True
        return False
    status = pod.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    patterns = rule.get("onPodConditions") or []
    return any(conds.get(p.get("type")) == p.get("status", "True") for p in patterns)


def failure_action(job: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    """What the pod failure policy says about a failed pod (Count when no rule matches)."""
    for rule in ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []:
        if _rule_matches(rule, pod):
            return str(rule["action"])
    return "Count"


class IndexedJobController:
    """Runs every Indexed Job that appears on the emulator (`start()`; stopped with it)."""

    def __init__(self, emu: KubeEmulator) -> None:
        self.emu = emu
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.most_active: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self.emu.on_close(self.stop)

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self.running.values()] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            for job in self.emu.items("jobs"):
                meta = job["metadata"]
                key = (meta["namespace"], meta["name"])
                indexed = (job.get("spec") or {}).get("completionMode") == "Indexed"
                if indexed and key not in self.running:
                    self.running[key] = asyncio.get_running_loop().create_task(self._run(*key))
            await self.emu.changed()

    async def _run(self, ns: str, name: str) -> None:
        emu = self.emu
        job = emu.get("jobs", ns, name)
        assert job is not None
        spec = job["spec"]
        completions = int(spec["completions"])
        parallelism = int(spec.get("parallelism") or 1)
        limit = int(spec.get("backoffLimitPerIndex") or 0)
        pending = list(range(completions))
        active: dict[asyncio.Task[int], tuple[int, str]] = {}
        done: set[int] = set()
        failed: set[int] = set()
        tries: dict[int, int] = {}
        counts = {"succeeded": 0, "failed": 0}
        fail_job: str | None = None
        key = (ns, name)
        try:
            while (pending or active) and fail_job is None:
                while pending and len(active) < parallelism:
                    index = pending.pop(0)
                    pod = self._create_pod(ns, job, index)
                    active[emu.start_kubelet(ns, pod, finish_job=False)] = (index, pod)
                self.most_active[key] = max(self.most_active.get(key, 0), len(active))
                self._status(ns, name, counts, done, failed, len(active))
                ended, _ = await asyncio.wait(active, return_when=asyncio.FIRST_COMPLETED)
                if emu.get("jobs", ns, name) is None:
                    return  # deleted: its pods went with it
                for task in ended:
                    index, pod = active.pop(task)
                    obj = emu.get("pods", ns, pod) or {}
                    phase = (obj.get("status") or {}).get("phase")
                    if phase == "Succeeded":
                        counts["succeeded"] += 1
                        done.add(index)
                    else:
                        action = failure_action(job, obj)
                        if action != "Ignore":
                            counts["failed"] += 1
                        tries[index] = tries.get(index, 0) + (action == "Count")
                        if action == "FailJob":
                            fail_job = "PodFailurePolicy"
                        elif action == "FailIndex" or tries[index] > limit:
                            failed.add(index)
                        else:
                            pending.insert(0, index)
                    if (obj.get("metadata") or {}).get("deletionTimestamp"):
                        emu.remove("pods", ns, pod, force=True)  # the finalizer is done
            self._finish(ns, name, counts, done, failed, fail_job)
        finally:
            for task in active:
                task.cancel()

    def _create_pod(self, ns: str, job: dict[str, Any], index: int) -> str:
        def mark(pod: dict[str, Any]) -> None:
            meta = pod["metadata"]
            meta.setdefault("labels", {})[INDEX_KEY] = str(index)
            meta.setdefault("annotations", {})[INDEX_KEY] = str(index)
            meta["finalizers"] = [TRACKING]
            for c in pod["spec"].get("containers") or []:
                c.setdefault("env", []).append(
                    {
                        "name": "JOB_COMPLETION_INDEX",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}
                        },
                    }
                )

        name = job["metadata"]["name"]
        suffix = f"{index}-{uuid.uuid4().hex[:5]}"
        return self.emu.create_pod(ns, "jobs", name, suffix=suffix, mutate=mark)

    def _status(
        self,
        ns: str,
        name: str,
        counts: Mapping[str, int],
        done: set[int],
        failed: set[int],
        active: int,
        conditions: list[dict[str, Any]] | None = None,
    ) -> None:
        status: dict[str, Any] = {
            "active": active,
            "succeeded": counts["succeeded"],
            "failed": counts["failed"],
            "ready": active,
            "completedIndexes": compress(done),
            "failedIndexes": compress(failed),
            "terminating": 0,
        }
        if conditions is not None:
            status["conditions"] = conditions
        with contextlib.suppress(KeyError):  # deleted meanwhile
            current = self.emu.get("jobs", ns, name)
            if current is not None and (old := current.get("status") or {}) == {**old, **status}:
                return
            self.emu.patch("jobs", ns, name, {"status": status})

    def _finish(
        self,
        ns: str,
        name: str,
        counts: Mapping[str, int],
        done: set[int],
        failed: set[int],
        fail_job: str | None,
    ) -> None:
        if fail_job is None and not failed:
            conds = [
                {"type": "SuccessCriteriaMet", "status": "True"},
                {"type": "Complete", "status": "True"},
            ]
        else:
            reason = fail_job or "FailedIndexes"
            message = "Job has failed indexes" if fail_job is None else "Pod failure policy"
            conds = [
                {"type": t, "status": "True", "reason": reason, "message": message}
                for t in ("FailureTarget", "Failed")
            ]
        self._status(ns, name, counts, done, failed, 0, conds)


__all__ = ["INDEX_KEY", "IndexedJobController", "compress", "failure_action"]
