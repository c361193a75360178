"""The Slurm transport over the Slurm commands (sbatch, squeue, scontrol, sinfo, sacct, scancel),
for sites without slurmrestd (the interface: backends.slurm_transport)."""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from backends.slurm_transport import (
    JobInfo,
    JobRequest,
    NodeInfo,
    PartitionInfo,
    SlurmError,
    SlurmRejected,
    as_int,
    base_state,
    classify,
    epoch,
    expand_array_id,
    expand_nodes,
    json_node,
    parse_gres,
    parse_memory,
    parse_slurm_duration,
    run_command,
)

log = logging.getLogger("sciorch.backends.slurm")


def _parse_exit_pair(text: str | None) -> tuple[int | None, int | None]:
    """'3:0' -> (3, None); '0:15' -> (143, 15)."""
    if not text or ":" not in text:
        return None, None
    code_s, _, sig_s = text.partition(":")
    try:
        code, sig = int(code_s), int(sig_s)
    except ValueError:
        return None, None
    if sig:
        return 128 + sig, sig
    return code, None


_SQUEUE_FORMAT = "%i|%T|%r|%S|%e|%B|%P|%q|%u|%C|%m|%b|%l"


class CliTransport:
    """The Slurm commands, run as the user sciorch runs as (off the event loop). Plain
    formatted output where the --json modes have quirks (squeue --json ignores -j)."""

    name = "cli"
    batch_queries = True

    def __init__(self, *, env: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
        base = dict(env) if env is not None else dict(os.environ)
        base["SLURM_TIME_FORMAT"] = "%s"  # epoch seconds in every time column
        self._env = base
        self._timeout = timeout_s
        self._sbatch_uid: bool | None = None  # whether sbatch takes --uid (probed once)

    async def _run(self, *argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        return await run_command(argv, env=self._env, stdin=stdin, timeout=self._timeout)

    async def ping(self) -> None:
        rc, out, err = await self._run("scontrol", "ping")
        if rc != 0 or "UP" not in out:
            raise classify(f"scontrol ping: {(err or out).strip() or f'exit status {rc}'}")

    async def submit(self, req: JobRequest) -> str:
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name={req.name}",
            f"--chdir={req.cwd}",
            f"--output={req.output}",
            f"--error={req.output}",
            "--open-mode=append",
            f"--cpus-per-task={req.cpus_per_task}",
            f"--time={req.time_limit_min}",
            "--no-requeue",
            "--export=ALL",
        ]
        if req.array:
            argv.append(f"--array={req.array}")
        if req.memory_mb:
            argv.append(f"--mem={req.memory_mb}M")
        if req.gres:
            argv.append(f"--gres={req.gres}")
        for key in ("partition", "account", "qos", "reservation", "comment"):
            value = getattr(req, key)
            if value:
                argv.append(f"--{key}={value}")
        if req.user is not None:
            argv = await self._as_user(req.user, argv)
        # The job sees exactly this environment (sbatch --export=ALL of the submitting process).
        env = {k: v for k, v in self._env.items() if k.startswith("SLURM_")}
        env.update(req.env)
        rc, out, err = await run_command(
            argv, env=env, stdin=req.script.encode(), timeout=self._timeout
        )
        if rc != 0:
            message = "; ".join(
                line.removeprefix("sbatch: error: ").strip()
                for line in err.strip().splitlines()
                if line.strip()
            )
            raise classify(message or f"sbatch failed with status {rc}", submitting=True)
        job_id = out.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id: {out.strip()!r}")
        return job_id

    async def _as_user(self, user: str, argv: list[str]) -> list[str]:
        """sbatch for another user (root only): --uid/--gid where this sbatch has them
        (Slurm 22.05 does), else through runuser, so the job is the user's in sacct either
        way."""
        if self._sbatch_uid is None:
            _rc, out, err = await self._run("sbatch", "--help")
            self._sbatch_uid = "--uid=" in out + err
        if self._sbatch_uid:
            return [*argv, f"--uid={user}", f"--gid={_primary_group(user)}"]
        return ["runuser", "-u", user, "--", *argv]

    async def jobs(self, ids: Sequence[str] | None = None) -> list[JobInfo]:
        if ids is not None and not ids:
            return []
        argv = ["squeue", "-h", "-o", _SQUEUE_FORMAT]
        if ids is None:  # the queue: what waits and what runs
            argv += ["-t", "PENDING,CONFIGURING,RUNNING,COMPLETING,SUSPENDED"]
        else:
            argv += ["-t", "all", "-j", ",".join(ids)]
        rc, out, err = await self._run(*argv)
        if rc != 0:
            if "invalid job id" in err.lower():
                return []  # the only job asked for is unknown
            raise classify(f"squeue: {err.strip() or f'exit status {rc}'}")
        found = [j for j in (_squeue_line(line) for line in out.splitlines()) if j is not None]
        # An array's pending elements come as one line; each element is asked for by its id.
        return [replace(j, job_id=i) for j in found for i in expand_array_id(j.job_id)]

    async def job_detail(self, job_id: str) -> JobInfo | None:
        rc, out, err = await self._run("scontrol", "-o", "show", "job", job_id)
        if rc == 0 and out.strip():
            return _scontrol_job(out.strip().splitlines()[0])
        # A pending array element cancelled before it split off: 'Job 12_0 not found'.
        gone = "invalid job id" in err.lower() or "not found" in (err + out).lower()
        if rc != 0 and not gone:
            raise classify(f"scontrol show job {job_id}: {err.strip() or f'status {rc}'}")
        # Gone from slurmctld: accounting, if the site has it.
        rc, out, err = await self._run(
            "sacct",
            "-n",
            "-P",
            "-X",
            "-j",
            job_id,
            "-o",
            "JobID,State,ExitCode,Start,End,Partition",
        )
        if rc != 0:
            return None
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 6 and parts[0] == job_id:
                code, sig = _parse_exit_pair(parts[2])
                return JobInfo(
                    job_id=job_id,
                    state=base_state(parts[1]),
                    reason=parts[1] if " by " in parts[1] else None,
                    start_time=epoch(parts[3]),
                    end_time=epoch(parts[4]),
                    exit_code=code,
                    signal=sig,
                    partition=parts[5] or None,
                )
        return None

    async def cancel(self, job_id: str, user: str | None = None) -> None:
        # as root (who submitted for another user), scancel may cancel any job
        rc, _out, err = await self._run("scancel", job_id)
        if rc != 0:
            low = err.lower()
            if "invalid job id" in low or "already completing" in low or "already completed" in low:
                return
            raise classify(f"scancel {job_id}: {err.strip() or f'exit status {rc}'}")

    async def set_time_limit(self, job_id: str, minutes: int) -> None:
        rc, out, err = await self._run(
            "scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"
        )
        if rc != 0:
            text = (err or out).strip().removeprefix("slurm_update error: ")
            raise classify(
                f"scontrol update {job_id}: {text or f'exit status {rc}'}", submitting=True
            )

    async def nodes(self) -> list[NodeInfo]:
        rc, out, err = await self._run("sinfo", "--json")
        if rc != 0:
            raise classify(f"sinfo: {err.strip() or f'exit status {rc}'}")
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise SlurmError(f"sinfo --json printed something that is not JSON: {exc}") from exc
        return [json_node(n) for n in data.get("nodes") or []]

    async def partitions(self) -> list[PartitionInfo]:
        rc, out, err = await self._run("scontrol", "-o", "show", "partition")
        if rc != 0:
            raise classify(f"scontrol show partition: {err.strip() or f'exit status {rc}'}")
        out_list = []
        for line in out.splitlines():
            fields = _kv(line)
            if "PartitionName" not in fields:
                continue
            out_list.append(
                PartitionInfo(
                    name=fields["PartitionName"],
                    default=fields.get("Default") == "YES",
                    max_time_s=parse_slurm_duration(fields.get("MaxTime")),
                    up=fields.get("State", "UP") == "UP",
                    nodes=tuple(expand_nodes(fields.get("Nodes", ""))),
                )
            )
        return out_list

    async def aclose(self) -> None:
        return None


def _primary_group(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        raise SlurmRejected(f"{user!r} is not a user on this host") from None


def _kv(line: str) -> dict[str, str]:
    """'A=1 B=two words C=3' -> {'A': '1', 'B': 'two words', 'C': '3'} (scontrol -o)."""
    out: dict[str, str] = {}
    key = r"[A-Za-z][A-Za-z0-9_:/]*"
    for m in re.finditer(rf"(?:^|\s)({key})=(.*?)(?=\s+{key}=|$)", line):
        out[m.group(1)] = m.group(2)
    return out


def _squeue_line(line: str) -> JobInfo | None:
    parts = line.split("|")
    if len(parts) < 13 or not parts[0].strip():
        return None
    job_id, state, reason, start, end, host, part, qos, user, cpus, mem, tres, limit = parts[:13]
    return JobInfo(
        job_id=job_id.strip(),
        state=base_state(state),
        reason=None if reason in ("None", "", "(null)") else reason,
        start_time=epoch(start),
        end_time=epoch(end),
        node=None if host in ("", "n/a", "N/A", "(null)") else host,
        partition=part or None,
        qos=qos or None,
        user=user or None,
        cpus=as_int(cpus) or 0,
        memory_mb=parse_memory(mem),
        gpus=sum(parse_gres(tres).values()) if tres not in ("N/A", "") else 0,
        time_limit_s=parse_slurm_duration(limit),
    )


def _scontrol_job(line: str) -> JobInfo:
    f = _kv(line)
    code, sig = _parse_exit_pair(f.get("ExitCode"))
    reason = f.get("Reason")
    return JobInfo(
        job_id=f.get("JobId", ""),
        state=base_state(f.get("JobState")),
        reason=None if reason in (None, "None") else reason,
        start_time=epoch(f.get("StartTime")),
        end_time=epoch(f.get("EndTime")),
        exit_code=code,
        signal=sig,
        node=f.get("BatchHost") or None,
        partition=f.get("Partition") or None,
        qos=f.get("QOS") or None,
        time_limit_s=parse_slurm_duration(f.get("TimeLimit")),
    )


__all__ = ["CliTransport"]
