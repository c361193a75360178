"""`python -m sciorch.cli` runs the `sciorch` command."""

from sciorch.cli import main

main()
