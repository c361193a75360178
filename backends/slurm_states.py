"""What Slurm's job states and pending reasons mean for an entry: which states are pending,
active or final, the words for a pending reason, and the verdict for a job that ended."""

from __future__ import annotations

from backends.slurm_transport import JobInfo
from backends.supervisor import EntryRecord, walltime_exceeded, with_tail
from ground.models import EntryState, format_duration

PENDING_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
ACTIVE_STATES = {
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "STOPPED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
}

# What the common pending reasons mean, for the entry's `reason`.
PENDING_REASONS = {
    "Resources": "waiting for CPUs, memory or GPUs to become free",
    "Priority": "jobs with a higher priority are ahead of it in the queue",
    "Dependency": "waiting for a job it depends on",
    "BeginTime": "its start time has not been reached",
    "JobHeldUser": "held by its user",
    "JobHeldAdmin": "held by an administrator",
    "ReqNodeNotAvail": "a node it needs is not available (down, drained or reserved)",
    "Reservation": "waiting for its reservation to start",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "PartitionTimeLimit": "its time limit exceeds the partition's limit",
    "PartitionNodeLimit": "it needs more nodes than the partition allows",
    "Nodes_required_for_job_are_DOWN,_DRAINED_or_reserved_for_jobs_in_higher_priority_partitions": (
        "the nodes it needs are down, drained or reserved"
    ),
    "QOSMaxJobsPerUserLimit": "QoS limit: the user already runs the most jobs the QoS allows",
    "QOSMaxCpuPerUserLimit": "QoS limit: the user already uses the most CPUs the QoS allows",
    "QOSMaxGRESPerUser": "QoS limit: the user already uses the most GPUs the QoS allows",
    "QOSGrpJobsLimit": "QoS limit: the QoS already runs the most jobs it allows",
    "QOSGrpCpuLimit": "QoS limit: the QoS already uses the most CPUs it allows",
    "AssocMaxJobsLimit": "account limit: the association already runs the most jobs it allows",
    "AssocGrpCpuLimit": "account limit: the account already uses the most CPUs it allows",
    "None": "queued; the scheduler has not looked at it yet",
}


def describe_pending(reason: str | None) -> str:
    """'Resources' -> 'Slurm: Resources (waiting for CPUs, memory or GPUs to become free)'."""
    key = reason or "None"
    text = PENDING_REASONS.get(key)
    if text is None and key.startswith("QOS"):
        text = "a QoS limit holds it"
    elif text is None and key.startswith("Assoc"):
        text = "an account (association) limit holds it"
    return f"Slurm: {key} ({text})" if text else f"Slurm: {key}"


def job_verdict(
    j: EntryRecord,
    node: str | None,
    info: JobInfo,
    code: int | None,
    sig: int | None,
    expired: bool,
) -> tuple[EntryState, str | None]:
    """The final state of an entry whose Slurm job ended in `info.state`, with how its command
    ended (the wrapper's exit.json, else Slurm's record) and whether the wrapper's own walltime
    timer stopped it."""
    st = info.state
    walltime = format_duration(j.spec.resources.walltime_s)
    if j.fail_reason:
        return EntryState.FAILED, j.fail_reason
    if st == "CANCELLED" or (j.cancel_requested and st != "COMPLETED"):
        asked = j.intent_verdict()
        if asked is not None:
            return asked
        who = f" ({info.reason})" if info.reason and " by " in info.reason else ""
        return EntryState.CANCELLED, f"cancelled outside sciorch (scancel){who}"
    if expired:
        return EntryState.EXPIRED, walltime_exceeded(j.spec)
    if st in ("TIMEOUT", "DEADLINE"):
        return EntryState.EXPIRED, f"Slurm time limit reached (walltime {walltime})"
    if st == "OUT_OF_MEMORY":
        return EntryState.FAILED, with_tail(
            f"out of memory: it used more than its {j.spec.resources.memory_mb} MiB "
            "(Slurm OUT_OF_MEMORY)",
            j.workdir,
        )
    if st in ("NODE_FAIL", "BOOT_FAIL"):
        return EntryState.FAILED, f"node failure ({st} on {node or info.node or '?'})"
    if st == "PREEMPTED":
        return EntryState.FAILED, "preempted by Slurm (and not requeued)"
    return j.exit_verdict(code, sig, f"Slurm ended the job in state {st}")


__all__ = [
    "ACTIVE_STATES",
    "PENDING_REASONS",
    "PENDING_STATES",
    "TERMINAL_STATES",
    "describe_pending",
    "job_verdict",
]
