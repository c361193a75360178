"""The kubernetes backend's local mirror of a pod's log: the job wrapper's `@@sciorch:` markers
split back into the job contract's files (see backends.kubernetes for the whole story)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from backends.base import WorkDir
from backends.kube_manifests import MARK

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


__all__ = ["Mirror"]
