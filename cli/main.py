"""`kairos`: the parser of every command group, and the errors a user sees."""

from __future__ import annotations

import argparse
import logging
import sys

import zmq

from kairos.cli import evaluation, offline, serving
from kairos.transport.serve import StartupError, die_with_parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kairos", description="Kairos LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine set-up details")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (offline, evaluation, serving):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if getattr(args, "cpu_threads", None) is not None:
        if args.cpu_threads < 1:
            print("kairos: error: --cpu-threads must be at least 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.cpu_threads)
    try:
        return args.func(args)
    except (TimeoutError, ConnectionError, StartupError) as e:  # no server answers; a local worker would not start
        print(f"kairos: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, zmq.ZMQError) as e:
        print(f"kairos: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
