"""Test doubles for what cannot run here, speaking the real wire protocol over real HTTP: a
Kubernetes API server (kube_emulator) and the Anthropic Messages API (messages_api)."""
