"""The real browser for the hub's tests and its bench: Debian's chromium and chromedriver
(scripts/test.d/25-chromium.sh installs them), driven headless by Selenium, and a `sciorch
serve` child whose output goes to a file (the one-time sign-in links are read from it).
Selenium only: nothing here imports pytest, so bench/hub.py can use it too."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

from tests.mcp_helpers import free_socket
from tests.processes import cli_env, serving

ROOT = Path(__file__).resolve().parent.parent
MISSING = (
    "no chromium/chromedriver: run the tests through scripts/test.sh "
    "(scripts/test.d/25-chromium.sh installs Debian's chromium and chromium-driver)"
)
_LINK = re.compile(r"(http://\S+/login/once\?code=\S+)")


def browser_paths() -> tuple[str, str] | None:
    binary = os.environ.get("SCIORCH_CHROMIUM") or shutil.which("chromium")
    driver = os.environ.get("SCIORCH_CHROMEDRIVER") or shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def chrome(width: int = 1280, height: int = 900) -> webdriver.Chrome:
    paths = browser_paths()
    if paths is None:
        raise RuntimeError(MISSING)
    options = Options()
    options.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespace for the sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    # An explicit chromedriver: Selenium Manager downloads nothing.
    return webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))


def output_dir() -> Path:
    """Where screenshots go (git-ignored): $SCIORCH_TEST_OUTPUT or test-output/, under hub/."""
    out = Path(os.environ.get("SCIORCH_TEST_OUTPUT") or ROOT / "test-output") / "hub"
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Served:
    base: str
    home: Path
    log: Path
    cli: list[str]

    def login_link(self, after: int = 0) -> str:
        """The newest one-time sign-in link `sciorch serve` printed (waits for the
        after-th+1 one: each use prints the next)."""
        deadline = time.monotonic() + 30
        while True:
            links = _LINK.findall(self.log.read_text(errors="replace"))
            if len(links) > after:
                return str(links[-1])
            if time.monotonic() > deadline:
                raise AssertionError(f"no sign-in link in {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def links_printed(self) -> int:
        return len(_LINK.findall(self.log.read_text(errors="replace")))

    def token(self, sub: str, scopes: str = "read,submit") -> str:
        made = subprocess.run(
            [*self.cli, "token", "create", "--sub", sub, "--scopes", scopes],
            env=cli_env(self.home),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return made.stdout.strip()


@contextlib.contextmanager
def sciorch_serve(home: Path, principal: str = "alice") -> Iterator[Served]:
    """`sciorch serve` on a free port as `principal` (the local user), output to a file."""
    cli = [sys.executable, "-m", "sciorch.cli", "--home", str(home)]
    with free_socket() as sock:  # a free port; closed so that the server can bind it
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    log = home / "serve.log"
    with (
        log.open("w") as out,
        serving(
            [*cli, "serve", "--port", str(port)],
            base,
            what="sciorch serve",
            env=cli_env(home, principal),
            stdout=out,
            stderr=subprocess.STDOUT,
        ),
    ):
        yield Served(base=base, home=home, log=log, cli=cli)
