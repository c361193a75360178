"""The ground layer: the vocabulary every other layer shares and that imports none of them.

- `models`: the domain nouns (Service, Event, Entry, Site, Resources, the entry state machine).
- `errors`: the typed errors and the one formatter of validation errors.
- `config`: settings from one TOML file and the environment.
- `contract`: what the engine and the backends agree on (LaunchSpec, Reporter, Backend, ...).

The engine (`orchestrator/`) and the backends (`backends/`) both stand on it and never on each
other; the import-linter contracts in pyproject.toml hold that."""
