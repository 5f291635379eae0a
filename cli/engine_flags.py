"""The engine's flags, made from EngineConfig's fields (a new setting is a new field), and the
argv that gives a child process the same settings."""

from __future__ import annotations

import argparse
import dataclasses

from kairos.engine.config import EngineConfig

FIELDS = [f for f in dataclasses.fields(EngineConfig) if f.metadata.get("command_line")]


def flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _value_type(f: dataclasses.Field):
    # The annotations are strings (postponed evaluation): "int", "float | None", ...
    base = f.type.split("|")[0].strip()
    return {"int": int, "float": float}.get(base, str)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    for f in FIELDS:
        if f.type == "bool":  # the flag turns the default around
            p.add_argument(flag(f), dest=f.name, action="store_false" if f.default else "store_true",
                           help=("do not " if f.default else "") + f.metadata["help"])
        else:
            p.add_argument(flag(f), dest=f.name, type=_value_type(f), default=f.default,
                           choices=f.metadata["choices"], help=f.metadata["help"])
    p.add_argument("--cpu-threads", type=int, help="torch threads for CPU work (default: one per core); "
                                                   "processes sharing a machine should split its cores")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The EngineConfig settings the flags gave."""
    return {f.name: getattr(args, f.name) for f in FIELDS}


def engine_argv(**settings) -> list[str]:
    """The flags that give a child process these engine settings; those at their default (or
    None) are left out, so the child's own defaults hold for them."""
    unknown = set(settings) - {f.name for f in FIELDS}
    if unknown:
        raise TypeError(f"not engine settings: {sorted(unknown)}")
    argv = []
    for f in FIELDS:
        value = settings.get(f.name)
        if f.name not in settings or value is None or value == f.default:
            continue
        argv += [flag(f)] if f.type == "bool" else [flag(f), str(value)]
    return argv
