"""Start JupyterLab for the `jupyterlab` template: `python -m orchestrator.payloads.jupyter
<jupyter lab options>` runs `python -m jupyterlab <options>` in this process (exec).

It makes one decision the template cannot: JupyterLab refuses to run as root unless given
`--allow-root`, and a root notebook on a shared host is a root shell for whoever holds its URL.
So as uid 0 it starts only where the site allows root services (sciorch's `allow_root_services`
setting, passed as SCIORCH_ALLOW_ROOT=1; off by default, on in the test configuration, where
everything runs as root); elsewhere it exits with code 2 and says why. As any other account
the options go through unchanged.
"""

from __future__ import annotations

import os
import sys

ALLOW_ROOT_ENV = "SCIORCH_ALLOW_ROOT"


def jupyter_argv(args: list[str], *, euid: int, allow_root: bool) -> list[str] | None:
    """The command to exec, or None when it must not run (root without the site's consent)."""
    if euid == 0:
        if not allow_root:
            return None
        args = [*args, "--allow-root"]
    return [sys.executable, "-m", "jupyterlab", *args]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = jupyter_argv(
        args, euid=os.geteuid(), allow_root=os.environ.get(ALLOW_ROOT_ENV) == "1"
    )
    if cmd is None:
        print(
            "sciorch: refusing to start JupyterLab as root: this site does not allow root "
            "services (allow_root_services = false); run sciorch as an unprivileged account",
            file=sys.stderr,
        )
        return 2
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
