"""`tlslab report RUN [--out DIR]`: figures (PNG+SVG) and one self-contained HTML page for a bench run."""

from __future__ import annotations

from pathlib import Path

from tlslab.cli import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="figures and a self-contained HTML page for a bench run",
        description="Draw the figures of a bench run (overhead per strategy, faults per 1,000 instructions, "
        "fault timeline emulate vs flip, coverage of the 2004 decoders) as PNG and SVG, and write one "
        "self-contained HTML page (figures embedded) with the tables: DIR/index.html.",
    )
    p.add_argument("run", help="a run id under --results, or a run directory")
    p.add_argument("--out", default=None, help="output directory (default: RUN/report)")
    p.add_argument("--results", default="results", help="where run ids are looked up (default: results)")
    p.add_argument("--cost-profile", default=None, help="cost profile (default: the run's spec)")
    p.add_argument("--command", default=None, help="command line to record on the page (default: this one)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import shlex
    import sys

    from tlslab.bench.store import StoreError, resolve_run
    from tlslab.report.build import build_report

    try:
        rundir = resolve_run(args.run, args.results)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out) if args.out else rundir.path / "report"
    command = args.command or "python -m tlslab " + shlex.join(sys.argv[1:])
    index = build_report(rundir, out, args.cost_profile, command)
    print(f"report: {index}")
    return 0
