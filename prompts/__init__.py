"""Prompt templates (Markdown with YAML front matter) served as MCP prompts."""
