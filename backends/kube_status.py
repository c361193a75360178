"""Reading Kubernetes objects as the kubernetes backend sees them: fields, conditions, the main
container's status, quantities, and which waiting reasons and Warning events mean a pod is stuck
(on its image, its configuration, or the scheduler)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backends.kube_manifests import CONTAINER

# The main container's waiting reasons: pulling its image failed (and for these, never will
# succeed), or its configuration is wrong.
IMAGE_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
FATAL_REASONS = {"InvalidImageName", "ErrImageNeverPull"}
CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
EVENT_KINDS = {
    "FailedScheduling": "unschedulable",
    "ErrImagePull": "image",
    "ImagePullBackOff": "image",
    "ErrImageNeverPull": "image",
    "InspectFailed": "image",
    "FailedMount": "config",
    "FailedAttachVolume": "config",
    "FailedCreatePodSandBox": "config",
    "FailedCreate": "config",
}


def dig(obj: Mapping[str, Any] | None, *keys: str) -> Any:
    cur: Any = obj
    for key in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def condition(obj: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in dig(obj, "status", "conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == kind:
            return cond
    return None


def is_true(obj: Mapping[str, Any] | None, kind: str) -> bool:
    cond = condition(obj, kind)
    return cond is not None and cond.get("status") == "True"


def main_status(pod: Mapping[str, Any]) -> dict[str, Any]:
    statuses = [s for s in dig(pod, "status", "containerStatuses") or [] if isinstance(s, dict)]
    for s in statuses:
        if s.get("name") == CONTAINER:
            return s
    return statuses[0] if statuses else {}


def name_of(obj: Mapping[str, Any]) -> str:
    return str(dig(obj, "metadata", "name") or "")


def current_pod(pods: Mapping[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The newest of an entry's pods, preferring those not being deleted."""
    if not pods:
        return None
    live = [p for p in pods.values() if not dig(p, "metadata", "deletionTimestamp")]
    return max(
        live or pods.values(),
        key=lambda p: (str(dig(p, "metadata", "creationTimestamp")), name_of(p)),
    )


def exit_code(pod: Mapping[str, Any] | None) -> int | None:
    """The main container's exit code, once it has terminated."""
    term = dig(main_status(pod), "state", "terminated") if pod is not None else None
    if isinstance(term, dict) and term.get("exitCode") is not None:
        return int(term["exitCode"])
    return None


def pod_done(pod: Mapping[str, Any] | None, is_job: bool) -> bool:
    """Whether a pod will write no more log (gone, ended, or a job's container terminated)."""
    if pod is None or dig(pod, "status", "phase") in ("Succeeded", "Failed"):
        return True
    return is_job and bool(dig(main_status(pod), "state", "terminated"))


_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 1024.0,
    "Mi": 1024.0**2,
    "Gi": 1024.0**3,
    "Ti": 1024.0**4,
    "Pi": 1024.0**5,
    "Ei": 1024.0**6,
}


def parse_quantity(value: Any) -> float:
    """A Kubernetes quantity ('15900m', '64Gi', '4') as a number (0 when unreadable)."""
    m = _QUANTITY.match(str(value or "0").strip())
    if not m or m.group(2) not in _SUFFIX:
        return 0.0
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def event_problem(ev: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, text) when a core/v1 Event warns that a pod is stuck (kind: 'unschedulable',
    'image' or 'config'), else None."""
    reason = str(ev.get("reason") or "")
    message = str(ev.get("message") or "").strip()
    kind = EVENT_KINDS.get(reason)
    if kind is None and reason in ("Failed", "BackOff") and "image" in message.lower():
        kind = "image"
    if kind is None or ev.get("type") not in (None, "Warning"):
        return None
    return kind, f"{reason}: {message}" if message else reason


@dataclass(frozen=True)
class PendingPod:
    """What a pending pod's status says: stuck (why: `stuck` is the kind, `text` the words,
    `fatal` when waiting cannot help), or on its way (`scheduled` or not, `text` the reason)."""

    text: str
    stuck: str | None = None
    fatal: bool = False
    scheduled: bool = False


def pending_pod(pod: Mapping[str, Any], event: tuple[str, str] | None) -> PendingPod:
    """Read a pending pod; `event`: the latest warning event about it (see event_problem)."""
    name = name_of(pod)
    sched = condition(pod, "PodScheduled")
    waiting = dig(main_status(pod), "state", "waiting") or {}
    wreason = str(waiting.get("reason") or "")
    wmessage = str(waiting.get("message") or "").strip()
    if sched is not None and sched.get("status") == "False":
        text = str(sched.get("message") or "").strip()
        if not text and event is not None:
            text = event[1]
        return PendingPod(f"Unschedulable: {text}" if text else "Unschedulable", "unschedulable")
    if wreason in IMAGE_REASONS or wreason in CONFIG_REASONS:
        kind = "image" if wreason in IMAGE_REASONS else "config"
        text = f"{wreason}: {wmessage}" if wmessage else wreason
        if event is not None and event[0] == kind and event[1] not in text:
            text += f" ({event[1]})"
        return PendingPod(text, kind, fatal=wreason in FATAL_REASONS)
    scheduled = sched is not None and sched.get("status") == "True"
    if event is not None and not (scheduled and event[0] == "unschedulable"):
        return PendingPod(event[1], event[0])
    if scheduled:
        node = dig(pod, "spec", "nodeName")
        where = f" on {node}" if node else ""
        doing = f" ({wreason})" if wreason else ""
        return PendingPod(
            f"pod {name} scheduled{where}; starting its container{doing}", scheduled=True
        )
    return PendingPod(f"pod {name} is waiting for the scheduler")


__all__ = [
    "CONFIG_REASONS",
    "EVENT_KINDS",
    "FATAL_REASONS",
    "IMAGE_REASONS",
    "PendingPod",
    "condition",
    "dig",
    "event_problem",
    "is_true",
    "main_status",
    "name_of",
    "parse_quantity",
    "pending_pod",
]
