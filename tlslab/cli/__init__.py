"""Command-line entry point.

Each subcommand lives in its own module under ``tlslab.cli.commands`` and exposes
``register(subparsers)``; modules are discovered, so adding a command never edits
this file. A command handler returns an exit status.

One rule for every command (docs/cli.md has the table):

====  =====================================================================
0     done
1     a run failed (the guest crashed or timed out, every bench cell failed,
      the hw backend could not run it)
2     bad input (arguments, files, specs): one line on stderr
70    a bug in tlslab (one line; ``--debug`` shows the traceback)
130   interrupted (Ctrl-C): one line saying what was kept
====  =====================================================================

No traceback reaches the user unless ``--debug`` (or ``TLSLAB_DEBUG=1``) is given.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from tlslab import __version__
from tlslab.record import SchemaError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

#: what an interrupted command leaves behind, for the one line it prints (bench says its own)
INTERRUPT_NOTES = {
    "bench": "finished cells are saved; finish with `tlslab bench --resume RUN`",
    "calibrate": "no profile was written; run `tlslab calibrate` again",
    "costs": "no profile was written",
    "export": "no CSV file was written (or it is incomplete)",
    "fetch": "verified downloads stay in the cache; `tlslab fetch` continues from them",
    "report": "the report directory may be incomplete; run `tlslab report RUN` again",
    "rootfs": "verified .deb files stay in the cache; `tlslab rootfs fetch` continues from them",
    "patch": "no patch set or binary was written",
}
DEFAULT_INTERRUPT_NOTE = "the guest was stopped; nothing was written"


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class RunFailed(Exception):
    """A run that could not be done (not the user's input): one line, exit status 1."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line saying what was kept (exit status 130)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``tlslab CMD: error: MSG (see tlslab CMD --help)``, exit 2."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tlslab",
        description="x86 segment/TLS emulation lab: run real i386 glibc code under a "
        "Xen-style truncated-segment hypervisor model and compare fault strategies.",
        epilog="exit status: 0 done, 1 a run failed, 2 bad input, 70 a bug in tlslab, 130 interrupted "
        "(docs/cli.md)",
    )
    parser.add_argument("--version", action="version", version=f"tlslab {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show Python tracebacks of errors (also TLSLAB_DEBUG=1); may be given anywhere "
                        "before --")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import tlslab.cli.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"tlslab.cli.commands.{info.name}")
        module.register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from tlslab.cli import interrupt

    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after `--` belongs to the guest, whatever options follow the guest name
    passthrough: list[str] | None = None
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    if any("\0" in a for a in argv + (passthrough or [])):   # not from a shell (execve cannot), but from callers
        print("tlslab: error: an argument contains a NUL character", file=sys.stderr)
        return EXIT_USAGE
    debug = "--debug" in argv or os.environ.get("TLSLAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = "tlslab"
    with interrupt.installed():
        try:
            parser = build_parser()
            try:
                args, extra = parser.parse_known_args(argv)
            except SystemExit as exc:           # --help, --version (0) or a bad argument (2, one line)
                return exc.code if isinstance(exc.code, int) else EXIT_USAGE
            command = f"tlslab {args.command}" if args.command else "tlslab"
            if extra:
                print(f"{command}: error: unrecognized arguments: {' '.join(extra)} (see `{command} --help`)",
                      file=sys.stderr)
                return EXIT_USAGE
            if passthrough is not None:
                if not hasattr(args, "args"):
                    print(f"{command}: error: {args.command} takes no arguments after --", file=sys.stderr)
                    return EXIT_USAGE
                args.args = [*(args.args or []), *passthrough]
            if not getattr(args, "handler", None):
                parser.print_help()
                return EXIT_USAGE
            return int(args.handler(args) or 0)
        except (UsageError, SchemaError) as exc:     # bad input, or a record/file of a schema we cannot read
            if debug:
                import traceback

                traceback.print_exc()
            print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except (RunFailed, interrupt.RunTimeout) as exc:
            if debug:
                import traceback

                traceback.print_exc()
            print(f"{command}: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt as exc:
            if debug:
                import traceback

                traceback.print_exc()
            note = str(exc) if isinstance(exc, Interrupted) and str(exc) else \
                INTERRUPT_NOTES.get(command.removeprefix("tlslab "), DEFAULT_INTERRUPT_NOTE)
            print(f"{command}: interrupted: {note}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # the reader went away (| head): nothing more to say, and nothing to flush at exit
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            return EXIT_OK
        except OSError as exc:                  # a path the user named: missing, unreadable, a directory ...
            if debug:
                import traceback

                traceback.print_exc()
            print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except RecursionError as exc:
            print(f"{command}: error: input nested too deeply ({_one_line(exc)})", file=sys.stderr)
            return EXIT_USAGE
        except MemoryError:
            print(f"{command}: error: out of memory (is an input too large?)", file=sys.stderr)
            return EXIT_FAILED
        except Exception as exc:  # noqa: BLE001 -- the rule: one line unless --debug
            if debug:
                import traceback

                traceback.print_exc()
            print(f"{command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
                  "(a bug in tlslab; --debug shows the traceback)", file=sys.stderr)
            return EXIT_INTERNAL
