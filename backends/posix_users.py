"""Running an entry as the POSIX user its account names (local and Slurm sites).

When the server runs as root, an entry with an account runs as that user: its uid, its primary
group and every group `initgroups` would give it, its HOME; its work dir is owned by it and closed
to others (0700), so another user's job cannot read it. The server (root) still reads and
watches every work dir. Without root, only the server's own user can be run as; another account
is refused, never silently run as the server's user."""

from __future__ import annotations

import getpass
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ground.errors import NotAllowed

# What an entry run as another user inherits of the server's environment: nothing else (the
# server's may hold its secrets).
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SLURM_CONF")


@dataclass(frozen=True)
class PosixUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    def popen_args(self) -> dict[str, Any]:
        """subprocess.Popen's arguments that start the child as this user (setgroups to its
        initgroups list, then gid, then uid)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of this user: the kept part of `base` (default: the
        server's), and its own HOME, USER, LOGNAME and SHELL."""
        base = dict(os.environ) if base is None else base
        env = {k: base[k] for k in KEPT_ENV if k in base}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update(self.identity())
        return env

    def identity(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}


def server_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return str(os.geteuid())


def run_as(site: str, account: str | None) -> PosixUser | None:
    """The user an entry with this account runs as; None: the server's own user (no account,
    or the account is the server's). NotAllowed, naming the site and account, when the account
    is not a user here or the server cannot switch to it (not root)."""
    if account is None:
        return None
    try:
        pw = pwd.getpwnam(account)
    except KeyError:
        raise NotAllowed(
            f"site {site!r}: account {account!r} is not a user on this machine", field="site"
        ) from None
    if pw.pw_uid == os.geteuid():
        return None
    if os.geteuid() != 0:
        raise NotAllowed(
            f"site {site!r} runs this work as {account!r}, but sciorch runs as "
            f"{server_user()!r}, not root, and cannot start processes as another user: run the "
            f"server as root, or map the principal to {server_user()!r}",
            field="site",
            site=site,
            account=account,
        )
    groups = tuple(os.getgrouplist(account, pw.pw_gid))
    return PosixUser(account, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, pw.pw_shell or "/bin/sh")


def give_workdir(root: Path, user: PosixUser) -> None:
    """Make the work dir (and what is in it) the user's, closed to everybody else."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), user.uid, user.gid)
    os.chown(root, user.uid, user.gid)
    os.chmod(root, 0o700)


__all__ = ["KEPT_ENV", "PosixUser", "give_workdir", "run_as", "server_user"]
