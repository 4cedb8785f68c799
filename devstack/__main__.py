"""``make up`` / ``make down``: the local Flywheel stack (``python -m devstack up|down|status``).

Not a Prefect flow: it starts the Prefect server the flows report to. The work is in
``devstack/stack.py``; this module parses the command line and prints where everything is.
"""

from __future__ import annotations

import argparse
import logging
import sys

from core.settings import get_settings
from devstack.stack import Ports, StackError, down, status, up

URLS = {"prefect-server": "Prefect UI", "mlflow-ui": "MLflow UI", "evidently-ui": "Evidently UI",
        "prometheus": "Prometheus", "pushgateway": "Pushgateway", "alertmanager": "Alertmanager"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dataset", default="flights", help="dataset whose champion `up` serves (default flights)")
    parser.add_argument("--no-serve", action="store_true", help="up: do not start the service")
    parser.add_argument("--free-ports", action="store_true",
                        help="up: pick free ports instead of the defaults (3000, 4200, 5000, 8000, 9090-9094)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = get_settings()
    try:
        if args.action == "up":
            stack = up(settings, Ports.free() if args.free_ports else Ports(), args.dataset, serve=not args.no_serve)
            print(f"\nFlywheel is up (state: {settings.home / 'stack' / 'stack.json'}; logs: "
                  f"{settings.home / 'stack' / 'logs'}):")
            for part in stack.parts:
                if part.url:
                    print(f"  {URLS.get(part.name, part.name):<14} {part.url}")
            print(f"  {'service':<14} http://127.0.0.1:{stack.ports.service}")
            for name, why in stack.skipped.items():
                print(f"  not started: {name}: {why}")
            print("\n`python -m flows.*` now reports to this Prefect server by itself (a PREFECT_API_URL "
                  f"you set wins; the stack's is {stack.prefect_api}).\nStop it with `make down`.")
        elif args.action == "down":
            stopped = down(settings)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            parts = status(settings)
            if not parts:
                print("no stack is up (`make up` starts one)")
            for name, info in parts.items():
                if "skipped" in info:
                    print(f"  {name:<16} {'not started':<10} {info['skipped']}")
                else:
                    print(f"  {name:<16} {info.get('state', 'RUNNING' if info['running'] else 'STOPPED'):<10} "
                          f"pid {info['pid']:<8} {info.get('url') or ''}")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
