"""Command-line entry point.

Each subcommand lives in its own module under ``tlslab.cli.commands`` and exposes
``register(subparsers)``; modules are discovered, so adding a command never edits
this file. A command handler returns an exit status. ``UsageError`` (bad input)
becomes a one-line message and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from tlslab import __version__


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlslab",
        description="x86 segment/TLS emulation lab: run real i386 glibc code under a "
        "Xen-style truncated-segment hypervisor model and compare fault strategies.",
    )
    parser.add_argument("--version", action="version", version=f"tlslab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import tlslab.cli.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"tlslab.cli.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after `--` belongs to the guest, whatever options follow the guest name
    passthrough: list[str] | None = None
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    if passthrough is not None:
        if not hasattr(args, "args"):
            parser.error(f"{args.command} takes no arguments after --")
        args.args = [*(args.args or []), *passthrough]
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UsageError as exc:
        print(f"tlslab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlslab {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
