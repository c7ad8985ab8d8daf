"""`tlslab export RUN --csv [-o FILE]`: one CSV row per cell of a bench run."""

from __future__ import annotations

import sys

from tlslab.cli import UsageError


def register(sub) -> None:
    p = sub.add_parser("export", help="export a bench run as CSV (one row per cell)",
                       description="Export a bench run: one row per cell (newest record), with spec, outcome, "
                       "counters, faults per 1,000 instructions, modelled ns for every stored cost profile, and "
                       "run metadata.")
    p.add_argument("run", help="a run id under --results, or a run directory")
    p.add_argument("--csv", action="store_true", help="CSV output (the only format, required)")
    p.add_argument("-o", "--output", default=None, help="write to FILE (default: stdout)")
    p.add_argument("--results", default="results", help="where run ids are looked up (default: results)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tlslab.bench.store import StoreError, resolve_run
    from tlslab.report.export import to_csv

    if not args.csv:
        raise UsageError("choose a format: --csv")
    try:
        rundir = resolve_run(args.run, args.results)
    except StoreError as exc:
        raise UsageError(str(exc)) from None
    text = to_csv(rundir)
    if args.output:
        with open(args.output, "w", newline="") as f:
            f.write(text)
        print(f"wrote {args.output} ({text.count(chr(10)) - 1} cells)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
