"""A user's association on a Slurm cluster, for list_sites: the limits `sacctmgr show assoc`
reports as set (jobs, submissions, TRES, wall time, QoS) and the usage and fairshare `sshare`
reports, for the account the user's jobs are charged to (the site's `account`, else the user's
default account). Read with the Slurm commands, wherever the site's transport is; a cluster
without accounting (or without the commands here) reports nothing."""

from __future__ import annotations

from collections.abc import Mapping

from backends.slurm_transport import run_command
from ground.models import AccountUsage

# sacctmgr columns shown when set, under the names list_sites gives them.
_LIMITS = {
    "GrpTRES": "grp_tres",
    "GrpJobs": "grp_jobs",
    "GrpSubmit": "grp_submit_jobs",
    "GrpWall": "grp_wall",
    "MaxJobs": "max_jobs",
    "MaxSubmit": "max_submit_jobs",
    "MaxWall": "max_wall",
    "MaxTRES": "max_tres_per_job",
    "QOS": "qos",
    "DefaultQOS": "default_qos",
}
_USAGE = {
    "RawShares": "raw_shares",
    "NormShares": "norm_shares",
    "RawUsage": "raw_usage",
    "EffectvUsage": "effective_usage",
    "FairShare": "fairshare",
}


def _rows(out: str, columns: list[str]) -> list[dict[str, str]]:
    return [
        dict(zip(columns, line.split("|"), strict=False))
        for line in out.splitlines()
        if line.strip()
    ]


async def association(
    user: str, account: str | None, env: Mapping[str, str], timeout_s: float = 10.0
) -> AccountUsage | None:
    """The user's association (None: accounting knows no such user here)."""
    if account is None:
        rc, out, _ = await run_command(
            ["sacctmgr", "-n", "-P", "show", "user", user, "format=DefaultAccount"],
            env=env,
            timeout=timeout_s,
        )
        account = out.strip().splitlines()[0] if rc == 0 and out.strip() else None
    columns = ["Account", "User", *_LIMITS]
    argv = ["sacctmgr", "-n", "-P", "show", "assoc", f"user={user}"]
    if account:
        argv.append(f"account={account}")
    rc, out, _ = await run_command(
        [*argv, "format=" + ",".join(columns)], env=env, timeout=timeout_s
    )
    rows = _rows(out, columns) if rc == 0 else []
    if not rows:
        return None
    row = rows[0]
    limits = {name: row[col] for col, name in _LIMITS.items() if row.get(col)}
    columns = ["Account", "User", *_USAGE]
    rc, out, _ = await run_command(
        ["sshare", "-n", "-P", "-U", "-u", user, "-A", row["Account"], "-o", ",".join(columns)],
        env=env,
        timeout=timeout_s,
    )
    shares = [r for r in _rows(out, columns) if r.get("User") == user] if rc == 0 else []
    usage = {name: shares[0][col] for col, name in _USAGE.items() if shares and shares[0].get(col)}
    return AccountUsage(user=user, account=row["Account"] or account, limits=limits, usage=usage)


__all__ = ["association"]
