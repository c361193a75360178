"""The file a running `sciorch serve` leaves in its home, `<home>/server.json`, so that the
`sciorch` command on that home talks to it instead of opening a second engine there.

It says where the server listens (its own address, as a client on this machine reaches it),
which process it is and which home it serves. Written atomically (a temporary name, then a
rename) once the server listens, removed when it stops cleanly. A kill -9 leaves it behind:
readers decide whether it is current (`Discovery.alive`: that process still exists) and, when
they connect, whether the endpoint accepts a token signed by this home's key, so a stale file
whose port another server took is never trusted."""

from __future__ import annotations

import contextlib
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ValidationError

DISCOVERY_FILE = "server.json"


class Discovery(BaseModel):
    pid: int
    home: str
    base_url: str
    mcp_url: str
    started_at: datetime

    def alive(self) -> bool:
        """Whether the process that wrote this still exists (signal 0 checks, sends nothing)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, another user's
            return True
        return True

    def serves(self, home: Path) -> bool:
        return Path(self.home) == home.resolve()


def discovery_path(home: Path) -> Path:
    return home / DISCOVERY_FILE


def client_base(host: str, port: int) -> str:
    """How a client on this machine reaches a server listening on host:port (the wildcard
    addresses are reached on loopback, which /mcp always accepts)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def write_discovery(home: Path, base_url: str, mcp_path: str = "/mcp") -> Discovery:
    found = Discovery(
        pid=os.getpid(),
        home=str(home.resolve()),
        base_url=base_url,
        mcp_url=base_url + mcp_path,
        started_at=datetime.now(UTC),
    )
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{DISCOVERY_FILE}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(found.model_dump_json())
    os.replace(tmp, discovery_path(home))
    return found


def read_discovery(home: Path) -> Discovery | None:
    """The file's contents, or None when there is none (or it is not one of ours)."""
    try:
        return Discovery.model_validate_json(discovery_path(home).read_bytes())
    except (OSError, ValidationError):
        return None


def remove_discovery(home: Path, pid: int | None = None) -> None:
    """Remove the file if it names `pid` (default: this process): a server that stops must not
    remove the file of another that has started on the same home since."""
    found = read_discovery(home)
    if found is not None and found.pid == (os.getpid() if pid is None else pid):
        with contextlib.suppress(FileNotFoundError):
            discovery_path(home).unlink()
