"""Prefect flows: each module wires tasks and runs as ``python -m flows.<name>``."""
