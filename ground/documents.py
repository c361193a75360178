"""Reading the documents people write (campaign and flow files): TOML or YAML by suffix, with
errors that name the file and what is wrong with it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from ground.errors import InvalidInput


def read_document(path: Path, what: str) -> Any:
    """The parsed content of a .toml, .yaml or .yml file; `what` names it in errors."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise InvalidInput(f"{what} file {path} must end in .toml, .yaml or .yml", field="file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot read {what} file {path}: {exc.strerror}", field="file") from exc
    try:
        return tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML: {exc}", field="file") from exc
    except yaml.YAMLError as exc:
        line = re.sub(r"\s+", " ", str(exc))
        raise InvalidInput(f"{path}: not valid YAML: {line}", field="file") from exc
