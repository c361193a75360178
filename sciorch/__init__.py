"""sciorch's faces: what a person runs. The `sciorch` command (`sciorch.cli`), the Claude agent
runner (`sciorch.agent`) and the HTTP app with the per-entry proxy (`sciorch.web`), each
composing config -> store -> engine -> MCP server; nothing below imports them."""
