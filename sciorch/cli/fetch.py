"""`sciorch fetch`: copy an entry's artifacts to a local directory, a chunk at a time."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

import tools
from ground.contract import MAX_ARTIFACT_READ
from ground.errors import InvalidInput
from sciorch.cli.app import act, app, build, err, out
from sciorch.cli.link import Ops
from tools.models import ArtifactView, ReadResultsInput

# Files at least this big get a progress bar.
PROGRESS_BYTES = 8 * MAX_ARTIFACT_READ


async def _copy(ops: Ops, entry_id: str, art: ArtifactView, dest: Path, bar: Progress) -> str:
    """Write the artifact to dest (through a temporary name); its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    task = bar.add_task(art.path, total=art.size, visible=(art.size or 0) >= PROGRESS_BYTES)
    with tmp.open("wb") as f:
        async for data in ops.artifact_bytes(entry_id, art.path):
            f.write(data)
            digest.update(data)
            bar.advance(task, len(data))
    tmp.replace(dest)
    bar.remove_task(task)
    return digest.hexdigest()


@app.command()
def fetch(
    ctx: typer.Context,
    entry_id: Annotated[str, typer.Argument(help="entry id")],
    path: Annotated[
        str | None, typer.Argument(help="one artifact (as `results` lists it); default: all")
    ] = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="directory to write into")
    ] = Path("."),
) -> None:
    """Download an entry's artifacts (all, or PATH) into a directory, keeping their paths."""
    req = build(ReadResultsInput, entry_id=entry_id, limit=1)

    async def go(ops: Ops) -> list[tuple[str, int, str, bool]]:
        listed = (await ops.call(tools.read_results, req)).artifacts
        wanted = [a for a in listed if path is None or a.path == path]
        if path is not None and not wanted:
            raise InvalidInput(f"entry {entry_id} has no artifact {path!r}", field="path")
        done = []
        with Progress(
            "{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=err, transient=True,
        ) as bar:  # fmt: skip
            for art in wanted:
                if art.size is None:
                    err.print(f"{art.path}: kept on the site, not readable here")
                    continue
                dest = output / PurePosixPath(art.path)
                sha = await _copy(ops, entry_id, art, dest, bar)
                done.append((str(dest), art.size, sha, art.sha256 in (None, sha)))
        return done

    for dest, size, sha, same in act(ctx, go):
        note = "" if same else "  (changed while it was read)"
        out.print(f"{dest}  {size} bytes  sha256 {sha}{note}")
