"""`tlslab version`: the versions a result depends on."""

from __future__ import annotations

import platform


def register(sub) -> None:
    p = sub.add_parser("version", help="print tlslab and dependency versions")
    p.set_defaults(handler=run)


def run(args) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from tlslab import __version__

    print(f"tlslab {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    for dist in ("unicorn", "capstone", "keystone-engine", "pyelftools"):
        try:
            print(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            print(f"{dist} (not installed)")
    return 0
