"""Developer tooling, not flows: ``make up``/``down`` (``python -m devstack up|down|status``),
the demo (``python -m devstack.demo``). It may import every layer; nothing imports it."""
