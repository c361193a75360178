"""A sweep on Kubernetes as one Indexed Job (`completionMode: Indexed`, `completions: N`,
`parallelism: throttle`).

What the pods share and what each element has
    Every element's pod spec is built as for a single job (`kube_manifests.pod_spec`); what
    differs between elements (its parameters, its environment such as SCIORCH_ENTRY_ID, its
    argv) goes into one ConfigMap `<job>-sweep` with a key per index: `params-<i>.json` and
    `element-<i>.sh` (exports and the wrapped command; the job wrapper is the key `wrapper.sh`,
    once). The ConfigMap is mounted at /sciorch/.sciorch-sweep, and the container's command
    picks its element by JOB_COMPLETION_INDEX, which the Job controller sets from the pod's
    `batch.kubernetes.io/job-completion-index` annotation. When the elements' pods differ in
    anything else (a per-entry PVC subPath, different inputs, resources), the sweep is not one
    Job: `indexed_manifests` returns None and each element is submitted on its own.

Cancelling one element (Kubernetes has no per-index cancel)
    The backend adds the key `cancelled-<i>` to the ConfigMap and deletes the index's pods. A
    deleted pod's container gets SIGTERM, on which the launcher ends its element and exits
    199; a pod that starts for a cancelled index exits 199 at once. The Job's podFailurePolicy
    turns exit code 199 into FailIndex, so the index is not retried (evictions and preemptions,
    pod condition DisruptionTarget, are ignored: retried, not counted). The cluster must
    support `backoffLimitPerIndex` and the FailIndex action: Kubernetes 1.29+ (beta, on by
    default), GA in 1.33. The Job ends Failed (reason FailedIndexes) when an element was
    cancelled or failed; each element's own state is what sciorch reports.

Walltime
    The Job's activeDeadlineSeconds bounds the whole sweep (an element's walltime times the
    number of waves, ceil(N / parallelism)); each element's own walltime is the backend's timer
    from when its pod runs.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from typing import Any

from backends.base import LaunchSpec
from backends.kube_manifests import (
    ENTRY_LABEL,
    JOB_WRAPPER,
    PARAMS_KEY,
    WORK_ROOT,
    KubernetesOptions,
    labels,
    namespace_name,
    object_name,
    pod_spec,
)

INDEX_KEY = "batch.kubernetes.io/job-completion-index"
SWEEP_LABEL = "sciorch.io/sweep"
CANCEL_CODE = 199
SWEEP_DIR = f"{WORK_ROOT}/.sciorch-sweep"
# A ConfigMap holds at most 1 MiB; keep room for the object's metadata.
MAX_CONFIGMAP_BYTES = 900 * 1024

LAUNCHER = f"""i="$JOB_COMPLETION_INDEX"; d={SWEEP_DIR}
if [ -e "$d/cancelled-$i" ]; then echo "sciorch: element $i cancelled" >&2; exit {CANCEL_CODE}; fi
cp "$d/params-$i.json" {WORK_ROOT}/{PARAMS_KEY} || exit 1
trap 'kill -TERM "$c" 2>/dev/null; wait "$c"; exit {CANCEL_CODE}' TERM
/bin/sh "$d/element-$i.sh" &
c=$!
wait "$c"
"""


def sweep_job_name(sweep_id: str) -> str:
    return object_name(sweep_id)


def sweep_configmap_name(sweep_id: str) -> str:
    return object_name(sweep_id) + "-sweep"


def _shared_part(pod: dict[str, Any]) -> str:
    """The pod spec without what an element may have of its own."""
    pod = json.loads(json.dumps(pod))
    pod["volumes"] = [v for v in pod.get("volumes") or [] if v.get("name") != "params"]
    for c in pod.get("containers") or []:
        c.pop("command", None)
        c.pop("env", None)
        c["volumeMounts"] = [m for m in c.get("volumeMounts") or [] if m.get("name") != "params"]
    return json.dumps(pod, sort_keys=True)


def indexed_manifests(
    specs: Sequence[LaunchSpec], throttle: int | None, opts: KubernetesOptions, site: str
) -> list[dict[str, Any]] | None:
    """[ConfigMap, Job] for the sweep, or None when its elements cannot share one pod
    template (or their keys do not fit a ConfigMap)."""
    first = specs[0]
    sweep_id = first.sweep_id or first.entry_id
    pods = [pod_spec(s, opts, "Never") for s in specs]
    shared = _shared_part(pods[0])
    if any(_shared_part(p) != shared for p in pods[1:]):
        return None
    if len({s.event_id for s in specs}) != 1:
        return None
    envs = [{e["name"]: e.get("value", "") for e in p["containers"][0]["env"]} for p in pods]
    common = {k: v for k, v in envs[0].items() if all(e.get(k) == v for e in envs[1:])}
    data: dict[str, str] = {"wrapper.sh": JOB_WRAPPER}
    for i, (s, pod, env) in enumerate(zip(specs, pods, envs, strict=True)):
        argv = pod["containers"][0]["command"][4:]  # after /bin/sh -c WRAPPER sciorch-job
        lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items() if k not in common]
        lines.append("exec /bin/sh " + shlex.join([f"{SWEEP_DIR}/wrapper.sh", *argv]))
        data[f"element-{i}.sh"] = "\n".join(lines) + "\n"
        data[f"params-{i}.json"] = json.dumps(s.parameters, sort_keys=True)
    if sum(len(k) + len(v.encode()) for k, v in data.items()) > MAX_CONFIGMAP_BYTES:
        return None
    ns = namespace_name(opts.namespace_prefix, first.event_id)
    name = sweep_job_name(sweep_id)
    meta_labels = {k: v for k, v in labels(first, site).items() if k != ENTRY_LABEL}
    meta_labels["app.kubernetes.io/instance"] = name
    meta_labels[SWEEP_LABEL] = name
    meta = {
        "namespace": ns,
        "labels": meta_labels,
        "annotations": {"sciorch.io/service": first.service},
    }
    template = pods[0]
    template["volumes"] = [v for v in template["volumes"] if v.get("name") != "params"] + [
        {"name": "sweep", "configMap": {"name": sweep_configmap_name(sweep_id)}}
    ]
    main = template["containers"][0]
    main["command"] = ["/bin/sh", "-c", LAUNCHER, "sciorch-sweep"]
    main["env"] = [{"name": k, "value": v} for k, v in common.items()]
    main["volumeMounts"] = [m for m in main["volumeMounts"] if m.get("name") != "params"] + [
        {"name": "sweep", "mountPath": SWEEP_DIR, "readOnly": True}
    ]
    walltime = first.resources.walltime_s
    if opts.max_walltime_s is not None:
        walltime = min(walltime, opts.max_walltime_s)
    parallelism = min(throttle or len(specs), len(specs))
    waves = math.ceil(len(specs) / parallelism)
    retries = first.max_restarts if first.restart_policy == "on-failure" else 0
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": sweep_configmap_name(sweep_id), **meta},
        "data": data,
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, **meta},
        "spec": {
            "completionMode": "Indexed",
            "completions": len(specs),
            "parallelism": parallelism,
            "backoffLimitPerIndex": int(retries),
            "activeDeadlineSeconds": int(walltime * waves),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailIndex",
                        "onExitCodes": {
                            "containerName": main["name"],
                            "operator": "In",
                            "values": [CANCEL_CODE],
                        },
                    },
                ]
            },
            "template": {"metadata": {"labels": meta_labels}, "spec": template},
        },
    }
    return [configmap, job]


def parse_indexes(text: str | None) -> set[int]:
    """'0-2,4' -> {0, 1, 2, 4} (completedIndexes, failedIndexes)."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


__all__ = [
    "CANCEL_CODE",
    "INDEX_KEY",
    "LAUNCHER",
    "SWEEP_LABEL",
    "indexed_manifests",
    "parse_indexes",
    "sweep_configmap_name",
    "sweep_job_name",
]
