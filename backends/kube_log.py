"""The kubernetes backend's local mirror of a pod's log, and following the log into it.

The job contract on Kubernetes goes through the pod log. The work dir is an emptyDir (or a
sub-path of the `results_pvc` claim) mounted at /sciorch, with the same layout as everywhere
else: params.json (a ConfigMap key mounted read-only; $SCIORCH_PARAMS), result.json
($SCIORCH_RESULT), stream.jsonl ($SCIORCH_STREAM), output/ ($SCIORCH_OUTPUT_DIR). The command
runs under a POSIX-sh wrapper (`kube_manifests.JOB_WRAPPER`) that writes to the pod log, besides
the command's own output:
    @@sciorch:stream <index> <json>   each stream record as it is written (and all of them
                                      once more at exit: the backend keeps the first copy)
    @@sciorch:result-begin / -end     the result file, between the two markers, at exit
    @@sciorch:artifact <path>         one line per file under output/ (names only: the files
                                      stay on the volume; use `results_pvc` to keep them)
    @@sciorch:exit <code>             the command's exit status
The backend follows the log of every running pod (streaming, with follow) and splits it into a
local mirror of the work dir (<entries_dir>/<entry id>/: log without the markers, stream.jsonl,
result.json), which `read_logs` and `read_results` serve, which outlives the pods and the
namespace, and from which stream records and log growth are reported as they arrive. A
restarted server re-reads the log from the byte it had reached (kube-log.json)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from backends.base import WorkDir
from backends.kube_api import KubeApi, KubeApiError, KubeUnreachable, retry
from backends.kube_manifests import CONTAINER, MARK

log = logging.getLogger("sciorch.backends.kubernetes")

Records = list[tuple[int, dict[str, Any]]]

# ----------------------------------------------------------------------------- the log mirror


class Mirror:
    """The local copy of an entry's pod logs, split along the job contract's markers into a
    WorkDir (log, stream.jsonl, result.json) plus artifact names and the exit status.

    `source` names the log being read (a pod, or pod#restart for services) and `raw_offset`
    how many bytes of it were consumed (whole lines only), so a reconnect or a restarted server
    resumes where it was. Stream records are numbered across sources."""

    STATE = "kube-log.json"

    def __init__(self, wd: WorkDir, markers: bool) -> None:
        self.wd = wd
        self.markers = markers
        self.source: str | None = None
        self.raw_offset = 0
        self.stream_base = 0
        self.artifacts: list[str] = []
        self.exit_code: int | None = None
        self._pending = b""
        self._result: list[str] | None = None
        self.stream_count = 0
        self._load()

    @property
    def state_file(self) -> Path:
        return self.wd.root / self.STATE

    def _load(self) -> None:
        self.wd.root.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            data = {}
        self.source = data.get("source")
        self.raw_offset = int(data.get("raw_offset") or 0)
        self.stream_base = int(data.get("stream_base") or 0)
        self.artifacts = [str(a) for a in data.get("artifacts") or []]
        code = data.get("exit_code")
        self.exit_code = int(code) if code is not None else None
        try:
            self.stream_count = self.wd.stream.read_bytes().count(b"\n")
        except OSError:
            self.stream_count = 0

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "source": self.source,
                    "raw_offset": self.raw_offset,
                    "stream_base": self.stream_base,
                    "artifacts": self.artifacts,
                    "exit_code": self.exit_code,
                }
            )
        )
        os.replace(tmp, self.state_file)

    def switch(self, source: str) -> None:
        """Start reading another log (a retry's pod, a restarted container)."""
        if source == self.source:
            return
        if self.source is not None and self.log_size() > 0:
            with self.wd.log.open("a") as f:
                f.write(f"----- sciorch: log of {source} -----\n")
        self.source = source
        self.raw_offset = 0
        self.stream_base = self.stream_count
        self.exit_code = None
        self._pending = b""
        self._result = None
        self.save()

    def reconnecting(self) -> int:
        """A new read of the same source starts: the bytes to skip."""
        self._pending = b""
        self._result = None
        return self.raw_offset

    def log_size(self) -> int:
        try:
            return self.wd.log.stat().st_size
        except OSError:
            return 0

    def feed(self, data: bytes) -> list[tuple[int, dict[str, Any]]]:
        self._pending += data
        end = self._pending.rfind(b"\n")
        if end < 0:
            return []
        complete, self._pending = self._pending[: end + 1], self._pending[end + 1 :]
        self.raw_offset += len(complete)
        records = self._lines(complete.decode("utf-8", errors="replace").split("\n")[:-1])
        self.save()
        return records

    def finish(self) -> list[tuple[int, dict[str, Any]]]:
        """The source has ended: its last, unterminated line counts too."""
        if not self._pending:
            return []
        rest, self._pending = self._pending, b""
        self.raw_offset += len(rest)
        records = self._lines([rest.decode("utf-8", errors="replace")])
        self.save()
        return records

    def _lines(self, lines: list[str]) -> list[tuple[int, dict[str, Any]]]:
        out_log: list[str] = []
        records: list[tuple[int, dict[str, Any]]] = []
        new_stream: list[str] = []
        for line in lines:
            if self._result is not None:
                if line.strip() == MARK + "result-end":
                    self._write_result("\n".join(self._result))
                    self._result = None
                else:
                    self._result.append(line)
                continue
            idx = line.find(MARK) if self.markers else -1
            if idx < 0:
                out_log.append(line)
                continue
            if idx > 0:
                out_log.append(line[:idx])
            for segment in line[idx:].split(MARK)[1:]:
                word, _, rest = segment.rstrip("\r").partition(" ")
                if word == "stream":
                    num, _, text = rest.partition(" ")
                    if not num.isdigit():
                        continue
                    index = self.stream_base + int(num)
                    if index != self.stream_count:
                        continue  # seen already, or a gap the replay at exit will fill
                    try:
                        rec = json.loads(text)
                    except ValueError:
                        rec = {"raw": text}
                    new_stream.append(text)
                    self.stream_count += 1
                    records.append((index, rec if isinstance(rec, dict) else {"value": rec}))
                elif word == "result-begin":
                    self._result = []
                elif word == "artifact" and rest and rest not in self.artifacts:
                    self.artifacts.append(rest)
                elif word == "exit":
                    with contextlib.suppress(ValueError):
                        self.exit_code = int(rest.strip())
        if out_log:
            with self.wd.log.open("a", encoding="utf-8") as f:
                f.write("\n".join(out_log) + "\n")
        if new_stream:
            with self.wd.stream.open("a", encoding="utf-8") as f:
                f.write("\n".join(new_stream) + "\n")
        return records

    def _write_result(self, text: str) -> None:
        tmp = self.wd.result.with_suffix(".tmp")
        tmp.write_text(text.strip() + "\n")
        os.replace(tmp, self.wd.result)


# ----------------------------------------------------------------------------- following


class LogFollower:
    """Follows one entry's pod logs into its Mirror, one log (`source`) at a time, and hands
    what each chunk adds to `publish`. `pod_done(pod)` says whether a pod's log is complete;
    `stopped()` whether to stop following at all."""

    def __init__(
        self,
        mirror: Mirror,
        entry_id: str,
        namespace: str,
        *,
        is_job: bool,
        publish: Callable[[Records], Awaitable[None]],
        pod_done: Callable[[str], bool],
        stopped: Callable[[], bool],
    ) -> None:
        self.mirror = mirror
        self.entry_id = entry_id
        self.namespace = namespace
        self.is_job = is_job
        self.task: asyncio.Task[None] | None = None
        self.source: str | None = None
        self.pod: str | None = None
        self.final = False
        self._lock = asyncio.Lock()
        self._publish = publish
        self._pod_done = pod_done
        self._stopped = stopped

    def follow(self, api: KubeApi, pod: str, source: str) -> None:
        """Follow this pod's log into the mirror (once per source)."""
        if self.source == source or self._stopped():
            return
        previous = self.pod if self.is_job else None
        if self.task is not None:
            self.task.cancel()
        self.source, self.pod = source, pod
        self.task = asyncio.get_running_loop().create_task(
            self._loop(api, pod, source, previous), name=f"sciorch-kube-log-{self.entry_id}"
        )

    async def stop(self) -> None:
        """Before the final report: no more following (the rest is read with read_rest)."""
        self.final = True
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self, api: KubeApi, pod: str, source: str, previous: str | None) -> None:
        mirror = self.mirror
        if previous is not None and previous != pod and mirror.source == previous:
            await self.read_rest(api, previous)  # the end of the last attempt's log
        backoff = 0.1
        while not self._stopped():
            async with self._lock:
                mirror.switch(source)
                skip = mirror.reconnecting()
            got = 0
            try:
                async for chunk in api.follow_log(self.namespace, pod, CONTAINER):
                    if got + len(chunk) <= skip:
                        got += len(chunk)
                        continue
                    if got < skip:
                        chunk = chunk[skip - got :]
                        got = skip
                    got += len(chunk)
                    async with self._lock:
                        if mirror.source != source:
                            return
                        records = mirror.feed(chunk)
                    await self._publish(records)
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except KubeApiError as exc:
                if exc.status == 404:
                    return  # the pod is gone
                log.debug("following %s/%s: %s", self.namespace, pod, exc)
            except KubeUnreachable as exc:
                log.debug("following %s/%s: %s", self.namespace, pod, exc)
            if self._pod_done(pod):
                async with self._lock:
                    records = mirror.finish() if mirror.source == source else []
                await self._publish(records)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def read_rest(self, api: KubeApi, pod: str) -> None:
        """Read a pod's whole log once and mirror what was not mirrored yet."""
        try:
            data = await retry(lambda: api.read_log(self.namespace, pod, CONTAINER))
        except (KubeApiError, KubeUnreachable) as exc:
            log.info("entry %s: last read of %s's log failed: %s", self.entry_id, pod, exc)
            return
        mirror = self.mirror
        async with self._lock:
            if mirror.source != pod and mirror.source is not None:
                if not (mirror.source or "").startswith(pod + "#"):
                    return
            if mirror.source is None:
                mirror.switch(pod)
            skip = mirror.reconnecting()
            records = mirror.feed(data[skip:]) + mirror.finish()
        await self._publish(records)


__all__ = ["LogFollower", "Mirror", "Records"]
