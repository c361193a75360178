"""Backends: where entries run (local processes, Slurm, Kubernetes), each on the shared
supervisor (`backends.supervisor`). The engine finds them by site kind through the entry points
in pyproject.toml (see orchestrator.registry); nothing here imports the engine."""
