"""Build a command line from a flow's pydantic parameter model.

The Prefect UI builds its form from the same model, so both show the same fields with the same
help. Besides the model's fields every entry point takes ``--profile`` and ``--home``.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def _unwrap_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser(model: type[BaseModel], prog: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description or (model.__doc__ or "").strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        flag = "--" + str(extra.get("cli", name)).replace("_", "-")
        annotation = _unwrap_optional(info.annotation)
        origin = typing.get_origin(annotation)
        help_text = (info.description or "").replace("%", "%%")  # argparse formats help with %
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif origin in (list, tuple):
            parser.add_argument(flag, dest=name, nargs="+", default=default, help=help_text,
                                metavar=name.upper())
        elif origin is dict:
            parser.add_argument(flag, dest=name, action="append", type=_key_value, default=None,
                                metavar="KEY=VALUE", help=f"{help_text} (repeatable)")
        elif origin is Literal:
            parser.add_argument(flag, dest=name, choices=list(typing.get_args(annotation)),
                                default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=default, help=help_text,
                                required=info.is_required())
    parser.add_argument("--profile", default=None, help="settings profile: config/<profile>.yaml")
    parser.add_argument("--home", default=None, help="FLYWHEEL_HOME: lake, tracking, reports")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks (by default a failure explained by its "
                             "message prints the message alone)")
    return parser


def parse(model: type[M], argv: list[str] | None, prog: str) -> tuple[M, dict[str, Any]]:
    """Parse argv into the parameter model and the settings overrides."""
    parser = build_parser(model, prog)
    namespace = vars(parser.parse_args(argv))
    overrides = {"profile": namespace.pop("profile"), "home": namespace.pop("home"),
                 "debug": namespace.pop("debug")}
    values = {}
    for key, value in namespace.items():
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            value = dict(value)
        values[key] = value
    try:
        return model.model_validate(values), overrides
    except Exception as exc:  # pydantic.ValidationError: show it as a usage error
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
