"""The `mixq` command line: one module per command group, assembled here.

- compress.py: `mixq compress` (the engine, in this process)
- service.py: `mixq serve|worker|beat|db|keys` (running the service)
- client.py: `mixq submit|status|wait` (talking to a running service)
"""

from __future__ import annotations

import argparse
import sys

from app.core.logs import quiet_library_noise

from . import client, compress, service

GROUPS = (compress, service, client)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixq", description="Fastest mixed-precision model within an accuracy budget")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own warnings and progress bars")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet_library_noise()
    if args.command == "compress" or service.runs_engine(args):
        from worker.engine import allocator  # torch-free: the allocator setting must be there from the start

        allocator.reexec(["-m", "app.cli", *argv])
    return args.handler(args)
