"""Prompts are Markdown files in `prompts/` with a YAML front matter (name, description,
arguments); the body is a template whose {argument} placeholders are filled on request."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Annotated, Any

import mcp_types as mt
import yaml
from fastmcp import FastMCP
from fastmcp.exceptions import PromptError
from fastmcp.prompts import PromptResult
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from pydantic import Field

from ground.errors import InvalidInput
from mcp_server.toolset import refused


@dataclass(frozen=True)
class PromptFile:
    name: str
    description: str
    arguments: list[dict[str, Any]]
    body: str
    path: Path


class _Keep(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def load_prompt(path: Path) -> PromptFile:
    text = path.read_text()
    if not text.startswith("---\n"):
        raise InvalidInput(f"prompt {path}: needs a YAML front matter", field=str(path))
    _, head, body = text.split("---\n", 2)
    meta = yaml.safe_load(head) or {}
    if not isinstance(meta, dict) or "name" not in meta or "description" not in meta:
        raise InvalidInput(
            f"prompt {path}: front matter needs name and description", field=str(path)
        )
    return PromptFile(
        name=str(meta["name"]),
        description=str(meta["description"]).strip(),
        arguments=list(meta.get("arguments") or []),
        body=body.strip() + "\n",
        path=path,
    )


def load_prompts() -> list[PromptFile]:
    folder = importlib_resources.files("prompts")
    return sorted(
        (load_prompt(Path(str(p))) for p in folder.iterdir() if p.name.endswith(".md")),
        key=lambda p: p.name,
    )


def render(prompt: PromptFile, values: dict[str, Any]) -> str:
    filled = {k: "(not given)" if v in (None, "") else str(v) for k, v in values.items()}
    return prompt.body.format_map(_Keep(filled))


def _renderer(prompt: PromptFile) -> Any:
    def fn(**kwargs: Any) -> str:
        return render(prompt, kwargs)

    return fn


class PromptArguments(Middleware):
    """Check a prompt's arguments against its front matter before it renders: fastmcp would
    answer a missing one with a masked 'Error rendering prompt' and take unknown ones silently."""

    def __init__(self, prompts: list[PromptFile]) -> None:
        self.prompts = {p.name: p for p in prompts}

    async def on_get_prompt(
        self,
        context: MiddlewareContext[mt.GetPromptRequestParams],
        call_next: CallNext[mt.GetPromptRequestParams, PromptResult],
    ) -> PromptResult:
        prompt = self.prompts.get(context.message.name)
        if prompt is not None:
            given = context.message.arguments or {}
            declared = {str(a["name"]): bool(a.get("required", False)) for a in prompt.arguments}
            takes = ", ".join(f"{n} (required)" if r else n for n, r in declared.items())
            takes = takes or "no arguments"
            for name in given:
                if name not in declared:
                    raise refused(
                        PromptError,
                        f"invalid_input: {name}: not an argument of {prompt.name}; it takes "
                        f"{takes}",
                    )
            for name, required in declared.items():
                if required and not given.get(name):
                    raise refused(
                        PromptError,
                        f"invalid_input: {name}: required by {prompt.name} and missing; it "
                        f"takes {takes}",
                    )
        return await call_next(context)


def register_prompts(mcp: FastMCP) -> list[str]:
    names = []
    prompts = load_prompts()
    mcp.add_middleware(PromptArguments(prompts))
    for prompt in prompts:
        params = []
        for arg in prompt.arguments:
            required = bool(arg.get("required", False))
            params.append(
                inspect.Parameter(
                    str(arg["name"]),
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if required else arg.get("default"),
                    annotation=Annotated[
                        str if required else str | None,
                        Field(description=str(arg.get("description", ""))),
                    ],
                )
            )

        fn = _renderer(prompt)
        fn.__name__ = prompt.name
        fn.__signature__ = inspect.Signature(params, return_annotation=str)
        fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": str}
        mcp.prompt(name=prompt.name, description=prompt.description)(fn)
        names.append(prompt.name)
    return names
