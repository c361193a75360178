"""The catalogue: service templates loaded from YAML/TOML files and validated.

Built-in templates ship in `orchestrator/templates/`; extra directories come from configuration.
Several versions of one name may coexist (a stable and a dev one side by side). Versions order
as semver: a pre-release (`1.1.0-dev`, `2.0.0-rc.1`) is a dev version, before its release and never
the default; the default is the newest stable version (the newest dev one if there is no stable).
`name@version` names any one of them.
"""

from __future__ import annotations

import copy
import sys
import tomllib
from collections.abc import Iterable
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ground.errors import InvalidInput, InvalidParameters, UnknownService, invalid_input
from ground.models import Resources, Service, ServiceSummary

# jsonschema imports rfc3987_syntax when it is installed (the jupyter extra brings it) only for
# the `iri` formats, and that builds a Lark grammar: over 1 s at the start of every process
# (each CLI command, each server). The catalogue validates parameters without a format checker,
# so those checkers are never used; a None entry makes that import fail, as if not installed.
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]

import jsonschema  # noqa: E402


def _pieces(text: str) -> tuple[tuple[int, int | str], ...]:
    # Numeric pieces sort after text ones, as semver's pre-release identifiers do.
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in text.split(".") if p)


def version_key(version: str) -> tuple[object, ...]:
    """Semver order: '1.10.0' after '1.9.2', '1.1.0-dev' after '1.0.0' and before '1.1.0';
    build metadata ('+...') only breaks ties."""
    core, _, build = version.partition("+")
    release, dash, pre = core.partition("-")
    return (_pieces(release), 0 if dash else 1, _pieces(pre), _pieces(build))


def is_prerelease(version: str) -> bool:
    return "-" in version.partition("+")[0]


def default_version(versions: Iterable[str]) -> str:
    """The newest stable version; the newest pre-release only when there is no stable one."""
    known = list(versions)
    stable = [v for v in known if not is_prerelease(v)]
    return max(stable or known, key=version_key)


def load_template(path: Path) -> Service:
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"template {path}: cannot be read: {exc}", field=str(path)) from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"template {path}: expected a mapping at top level", field=str(path))
    try:
        service = Service.model_validate({**data, "source": str(path)})
        jsonschema.Draft202012Validator.check_schema(service.parameters)
    except ValidationError as exc:
        raise invalid_input(exc, where=f"template {path}", default_field="template") from exc
    except jsonschema.SchemaError as exc:
        raise InvalidInput(
            f"template {path}: parameters is not a valid JSON schema: {exc.message}",
            field="parameters",
        ) from exc
    return service


def _template_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix in (".yaml", ".yml", ".toml") and p.is_file()
    )


class Catalogue:
    def __init__(self, services: Iterable[Service]) -> None:
        self._by_name: dict[str, dict[str, Service]] = {}
        for svc in services:
            # A later directory overrides an earlier one for the same name and version.
            self._by_name.setdefault(svc.name, {})[svc.version] = svc

    @classmethod
    def load(cls, extra_dirs: Iterable[Path] = ()) -> Catalogue:
        builtin = importlib_resources.files("orchestrator") / "templates"
        services = [load_template(Path(str(p))) for p in _template_files(Path(str(builtin)))]
        for folder in extra_dirs:
            folder = Path(folder).expanduser()
            if not folder.is_dir():
                raise InvalidInput(
                    f"catalogue directory {folder} does not exist", field="catalogue_dirs"
                )
            services += [load_template(p) for p in _template_files(folder)]
        catalogue = cls(services)
        catalogue.check_components()
        return catalogue

    def check_components(self) -> None:
        """A composed service's components are catalogue services that compose nothing
        themselves (a group is one level deep)."""
        for versions in self._by_name.values():
            for svc in versions.values():
                for c in svc.components:
                    where = f"template {svc.source or svc.ref}: components.{c.name}.service"
                    try:
                        part = self.get(c.service)
                    except UnknownService as exc:
                        raise InvalidInput(f"{where}: {exc.message}", field="components") from exc
                    if part.components:
                        raise InvalidInput(
                            f"{where}: {part.ref} is itself composed; groups are one level deep",
                            field="components",
                        )

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str, version: str | None = None) -> Service:
        if "@" in name and version is None:
            name, version = name.split("@", 1)
        versions = self._by_name.get(name)
        if not versions:
            raise UnknownService(
                f"unknown service {name!r}; known services: {', '.join(self.names())}",
                field="service",
                known=self.names(),
            )
        if version is None:
            return versions[default_version(versions)]
        if version not in versions:
            known = sorted(versions, key=version_key)
            raise UnknownService(
                f"service {name!r} has no version {version!r}; versions: {', '.join(known)}",
                field="version",
                known=known,
            )
        return versions[version]

    def summaries(self) -> list[ServiceSummary]:
        out = []
        for name in self.names():
            latest = self.get(name)
            versions = sorted(self._by_name[name], key=version_key)
            out.append(
                ServiceSummary(
                    name=name,
                    version=latest.version,
                    kind=latest.kind,
                    description=latest.description,
                    versions=versions,
                    dev_versions=[v for v in versions if is_prerelease(v)],
                    resources=latest.resources,
                    parameters=latest.parameters,
                    inputs=latest.inputs,
                )
            )
        return out


def resources_for(service: Service, params: dict[str, Any]) -> Resources:
    """The template's resources with those its resource_parameters take from `params`."""
    resources = service.resources
    for field, name in service.resource_parameters.items():
        if params.get(name) is None:
            continue
        try:
            resources = Resources.model_validate({**resources.model_dump(), field: params[name]})
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            raise InvalidParameters(
                f"parameters.{name}: not a valid {field}: {why}", field=f"parameters.{name}"
            ) from exc
    return resources


def validate_parameters(service: Service, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Check parameters against the service's schema and fill in top-level defaults.

    Raises InvalidParameters naming the failing field (as `parameters.<path>`)."""
    params = copy.deepcopy(parameters or {})
    if not isinstance(params, dict):
        raise InvalidParameters("parameters must be a JSON object", field="parameters")
    for key, prop in (service.parameters.get("properties") or {}).items():
        if key not in params and isinstance(prop, dict) and "default" in prop:
            params[key] = copy.deepcopy(prop["default"])
    validator = jsonschema.Draft202012Validator(service.parameters)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        path = ".".join(str(p) for p in err.absolute_path)
        if err.validator == "additionalProperties":
            known = sorted((service.parameters.get("properties") or {}).keys())
            extra = sorted(set(err.instance) - set(known)) if isinstance(err.instance, dict) else []
            field = f"parameters.{path + '.' if path else ''}{extra[0] if extra else ''}"
            msg = (
                f"{field}: not a parameter of {service.name}; known: {', '.join(known) or '(none)'}"
            )
        elif err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else ""
            field = f"parameters.{path + '.' if path else ''}{missing}"
            msg = f"{field}: required by {service.name}"
        else:
            field = f"parameters.{path}" if path else "parameters"
            msg = f"{field}: {err.message}"
        raise InvalidParameters(msg, field=field.rstrip(".").rstrip("."))
    return params
