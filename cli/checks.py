"""Argument types that refuse values no run could use, as argparse errors (exit status 2)
before any work starts."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def positive_floats(text: str) -> list[float]:
    """Comma-separated positive numbers, at least one."""
    return [positive_float(part) for part in text.split(",")]


def fraction(text: str) -> float:
    """A share strictly between 0 and 1."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, not {text!r}") \
            from None


def port_is_free(host: str, port: int, flag: str) -> None:
    """ValueError naming the flag if nothing can listen on host:port now (another server holds
    it): better said before a cluster starts than found by a child that keeps failing to bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        # As ZeroMQ and uvicorn bind: a port that only closed connections linger on is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror}); "
                             "is another server using it?") from None


def writable_file(path: str, flag: str) -> None:
    """ValueError naming the flag if a file cannot be written at path, before the work whose
    result would go there."""
    folder = Path(path).resolve().parent
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder: give the file's path")
    if not folder.is_dir() or not os.access(folder, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: cannot write there")


def writable_folder(path: str, flag: str) -> None:
    """Creates the folder if need be; ValueError naming the flag if it cannot be written."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write there")


def model_folder(model: str) -> None:
    """ConfigError naming what is wrong with a model folder (not `tiny`), before child processes
    are started to load it: each would report it, and the parent only that one exited."""
    from kairos.engine.config import ModelConfig

    if model != "tiny":
        ModelConfig.from_pretrained(model)
