"""Sweeps, urgent work, event reservations and time extensions on the real Slurm (the cluster
of tests/test_slurm.py, both transports)."""

from __future__ import annotations

import os
import uuid

import pytest

from ground.errors import NotAllowed, NotFound, NotSupported
from ground.models import EntryState
from orchestrator import deadlines, sweeps
from tests import test_slurm
from tests.conftest import ALICE, BOB
from tests.test_slurm import Cluster, job_field, need_root, slurm_cmd, wait_done

# The Slurm cluster fixtures of test_slurm (both transports).
slurm, transport, cluster = test_slurm.slurm, test_slurm.transport, test_slurm.cluster


async def test_a_sweep_of_20_runs_as_one_array_with_per_element_results(
    cluster: Cluster,
) -> None:
    eng = await cluster.open()
    sweep = await sweeps.submit_sweep(
        eng, ALICE, "sleeper", [{"seconds": i / 100} for i in range(20)], throttle=4
    )
    assert len(sweep.entries) == 20
    job_ids = [e.handle["job_id"] for e in sweep.entries]
    array_id = job_ids[0].split("_")[0]
    assert job_ids == [f"{array_id}_{i}" for i in range(20)]
    # Slurm sees one array job: every element carries the same array job id.
    out = slurm_cmd("squeue", "-h", "-t", "all", "-r", "-j", array_id, "-o", "%F|%K|%i")
    seen = {line.split("|")[0] for line in out.split()}
    assert seen == {array_id}, out
    done, timed_out = await sweeps.wait_sweep(eng, ALICE, sweep.id, timeout_s=120)
    assert not timed_out, done.counts
    assert done.counts == {"succeeded": 20}, [e.reason for e in done.entries if e.reason]
    for i, entry in enumerate(done.entries):
        assert entry.parameters == {"seconds": i / 100}
        _, data = await eng.read_results(ALICE, entry.id)
        assert data.result == {"slept": i / 100}
    # The throttle reached Slurm.
    assert "ArrayTaskThrottle=4" in slurm_cmd("scontrol", "-o", "show", "job", f"{array_id}_0")
    # Another principal sees nothing of it.
    with pytest.raises(Exception, match="no sweep"):
        await sweeps.get_sweep(eng, BOB, sweep.id)


async def test_one_element_and_then_the_whole_sweep_are_cancelled(cluster: Cluster) -> None:
    eng = await cluster.open()
    sweep = await sweeps.submit_sweep(eng, ALICE, "sleeper", grid={"seconds": [30, 31, 32]})
    first = sweep.entries[0]
    with pytest.raises(NotFound):
        await eng.cancel(BOB, first.id)
    one = await eng.cancel(ALICE, first.id)
    assert one.state == EntryState.CANCELLED
    rest = await sweeps.get_sweep(eng, ALICE, sweep.id)
    assert [e.state.terminal for e in rest.entries] == [True, False, False]
    gone = await sweeps.cancel_sweep(eng, ALICE, sweep.id)
    assert gone.counts == {"cancelled": 3}


async def test_urgent_work_runs_with_the_urgent_qos_in_the_events_reservation(
    cluster: Cluster,
) -> None:
    need_root()  # creating a reservation is for Slurm administrators
    resv = f"sciorch-{uuid.uuid4().hex[:6]}"
    slurm_cmd(
        "scontrol",
        "create",
        "reservation",
        f"reservationname={resv}",
        f"users=root,{os.environ['SCIORCH_SLURM_USER']}",
        f"nodes={os.environ['SCIORCH_SLURM_NODE']}",
        "starttime=now",
        "duration=10",
        "flags=ignore_jobs",
    )
    try:
        eng = await cluster.open(qos="normal", qos_urgent="urgent")
        eng.settings.urgent_principals = ["alice"]
        event = await eng.create_event(ALICE, "beamtime", reservation=resv)
        urgent = await eng.launch(
            ALICE, "sleeper", {"seconds": 0.1}, event_id=event.id, priority="urgent"
        )
        assert (await wait_done(eng, urgent.id)).state == EntryState.SUCCEEDED
        assert job_field(urgent.handle["job_id"], "%q|%v") == f"urgent|{resv}"
        with pytest.raises(NotAllowed, match=r"sciorch\.urgent") as refused:
            await eng.launch(BOB, "sleeper", {"seconds": 0.1}, priority="urgent")
        assert refused.value.field == "priority"
    finally:
        slurm_cmd("scontrol", "delete", f"reservationname={resv}", check=False)


async def test_a_running_jobs_time_limit_is_extended(cluster: Cluster, transport: str) -> None:
    eng = await cluster.open()
    entry = await eng.launch(ALICE, "sleeper", {"seconds": 20})
    running = await eng.wait_entry(ALICE, entry.id, timeout_s=30, until="started")
    assert running[0].state == EntryState.RUNNING
    if transport == "rest":
        # slurmrestd acts as the job's user, who may lower a limit but not raise it.
        with pytest.raises(NotSupported, match="refused the new time limit"):
            await deadlines.extend_entry(eng, ALICE, entry.id, 600)
        return
    with pytest.raises(NotFound):
        await deadlines.extend_entry(eng, BOB, entry.id, 600)
    longer = await deadlines.extend_entry(eng, ALICE, entry.id, 600)
    assert longer.resources.walltime_s == 600
    assert job_field(entry.handle["job_id"], "%l") == "10:00"
