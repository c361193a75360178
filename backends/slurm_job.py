"""One entry's Slurm job: the site's options, the batch script (backends/scripts/slurm-batch.sh
with its @NAME@ placeholders filled) and the job request (script, environment, resources)."""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.base import LaunchSpec, WorkDir
from backends.slurm_transport import JobRequest
from backends.supervisor import render_script


class SlurmOptions(BaseModel):
    """The `[[sites]]` keys a Slurm site understands."""

    model_config = ConfigDict(extra="forbid")

    transport: Literal["rest", "cli"] = Field(
        "rest", description="rest: slurmrestd over HTTP (JWT); cli: sbatch, squeue, scontrol"
    )
    rest_url: str = Field("http://127.0.0.1:6820", description="slurmrestd base URL")
    user: str | None = Field(
        None,
        description="slurmrestd: the Slurm user requests act as and jobs run as (default: this "
        "process's user; slurmrestd refuses root). The Slurm commands run as this process's user",
    )
    token: str | None = Field(
        None, description="slurmrestd JWT; unset: sciorch gets its own with `scontrol token`"
    )
    token_lifespan_s: int = Field(3600, ge=10, description="lifespan of tokens sciorch gets")
    partition: str | None = Field(None, description="partition (default: the cluster's)")
    account: str | None = None
    qos: str | None = Field(None, description="QoS for normal work")
    qos_urgent: str | None = Field(None, description="QoS for time-sensitive (urgent) work")
    reservation: str | None = None
    shared_dir: Path | None = Field(
        None,
        description="job files, on a filesystem the compute nodes share (default: the "
        "server's entries dir)",
    )
    poll_interval_s: float = Field(0.5, gt=0, le=300, description="fallback polling interval")
    watch: bool = Field(True, description="watch the job dirs for the wrapper's files")
    callback_listen: str | None = Field(
        None, description="'host:port' for the wrappers' HTTP pokes (port 0: any free one)"
    )
    callback_url: str | None = Field(
        None, description="URL jobs use to reach the listener (default: http://<fqdn>:<port>)"
    )
    max_job_queries_per_s: float = Field(
        50.0,
        gt=0,
        description="slurmrestd: fallback polling asks about at most this many "
        "jobs a second (the interval grows with the number of active jobs)",
    )
    status_ttl_s: float = Field(2.0, ge=0, description="cache site facts this long")
    queue_ttl_s: float = Field(
        10.0, ge=0, description="refresh the queue snapshot for wait estimates at most this often"
    )
    request_timeout_s: float = Field(10.0, gt=0)
    env: dict[str, str] = Field(
        default_factory=dict, description="environment added for every job (PATH, modules)"
    )
    slurm_conf: str | None = Field(None, description="SLURM_CONF for the Slurm commands")


def _shell_word(arg: str) -> str:
    """One argv word for bash, with {port} becoming the wrapper's $port."""
    pieces = arg.split("{port}")
    return '"$port"'.join(shlex.quote(p) if p else "" for p in pieces) or "''"


def build_script(spec: LaunchSpec, wd: WorkDir) -> str:
    """The batch script for one entry (the same for every transport)."""
    argv = []
    for arg in spec.argv:
        for key, value in (
            ("workdir", str(wd.root)),
            ("params_file", str(wd.params)),
            ("result_file", str(wd.result)),
            ("stream_file", str(wd.stream)),
            ("output_dir", str(wd.output)),
        ):
            arg = arg.replace("{" + key + "}", value)
        argv.append(_shell_word(arg))
    return render_script(
        "slurm-batch.sh",
        {
            "entry_id": spec.entry_id,
            "service": spec.service,
            "wd": str(wd.root),
            "wd_q": shlex.quote(str(wd.root)),
            "walltime": str(int(spec.resources.walltime_s)),
            "service_flag": "1" if spec.kind == "service" else "0",
            "command": " ".join(argv),
        },
    )


def job_request(
    spec: LaunchSpec, wd: WorkDir, o: SlurmOptions, callback_env: Mapping[str, str]
) -> JobRequest:
    """The Slurm job for one entry: its script, environment and resources."""
    res = spec.resources
    env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
    for key in ("LANG", "LC_ALL", "TZ"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(o.env)
    env.update(spec.env)
    env.update(wd.contract_env())
    env.update(
        SCIORCH_ENTRY_ID=spec.entry_id,
        SCIORCH_EVENT_ID=spec.event_id,
        SCIORCH_BASE_PATH=spec.base_path,
    )
    if callback_env:
        env.update(callback_env)
        env["SCIORCH_CALLBACK_PATH"] = f"{callback_env['SCIORCH_CALLBACK_PATH']}/{spec.entry_id}"
    qos = o.qos
    if spec.priority == "urgent" and o.qos_urgent:
        qos = o.qos_urgent
    return JobRequest(
        name=f"sciorch-{spec.service}-{spec.entry_id}"[:200],
        script=build_script(spec, wd),
        cwd=str(wd.root),
        output=str(wd.log),
        env=env,
        cpus_per_task=max(1, math.ceil(res.cpus)),
        memory_mb=res.memory_mb,
        gpus=res.gpus,
        gpu_type=res.gpu_type,
        time_limit_min=max(1, math.ceil(res.walltime_s / 60)),
        partition=o.partition,
        account=o.account,
        qos=qos,
        reservation=spec.reservation or o.reservation,
        comment=f"sciorch entry {spec.entry_id}",
    )


def env_file(env: Mapping[str, str]) -> str:
    """An element's environment as env.sh, which the array script sources."""
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(env.items()) if k.isidentifier())


def array_request(
    elements: list[JobRequest], sweep_id: str, sweep_dir: Path, throttle: int | None
) -> JobRequest:
    """One job array for a sweep's elements (each already has its job.sh and env.sh): the
    resources and placement of the first element (a sweep's elements share them), element i
    running the entry on line i+1 of <sweep_dir>/elements."""
    first = elements[0]
    last = len(elements) - 1
    script = render_script(
        "slurm-array.sh",
        {"sweep_id": sweep_id, "dir": str(sweep_dir), "dir_q": shlex.quote(str(sweep_dir))},
    )
    return replace(
        first,
        name=f"sciorch-sweep-{sweep_id}"[:200],
        script=script,
        cwd=str(sweep_dir),
        output=str(sweep_dir / "slurm-%a.out"),
        array=f"0-{last}" + (f"%{throttle}" if throttle else ""),
        comment=f"sciorch sweep {sweep_id}",
    )


__all__ = ["SlurmOptions", "array_request", "build_script", "env_file", "job_request"]
