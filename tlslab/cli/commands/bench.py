"""`tlslab bench [SPEC.toml] [--jobs N] [--resume RUN] [--out DIR]`: run a benchmark matrix."""

from __future__ import annotations

import os
import sys

from tlslab.cli import Interrupted, RunFailed, UsageError
from tlslab.record import MEASURED, Outcome


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="run a matrix of guests x strategies x parameters in worker processes; results to results/<run-id>/",
        description="Run a benchmark matrix (default: the bundled default spec, tlslab/bench/default.toml) in "
        "worker processes. Every finished cell is appended durably to RESULTS/<run-id>/cells.jsonl; a killed run "
        "is finished with --resume RUN. At the end: modelled time of each strategy relative to native, and "
        "faults per 1,000 instructions, per guest and build.",
    )
    p.add_argument("spec", nargs="?", default=None, help="matrix spec (TOML); default: the bundled default matrix")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help=f"worker processes, 1..{MAX_JOBS} (default: one per core)")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="finish an interrupted run (a run id under --out, or a run directory)")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: run failed and skipped cells again (the newest record of a cell wins)")
    p.add_argument("--cluster", metavar="ADDRESS", default=None,
                   help="run the model cells on a Dask cluster: a scheduler address (tcp://HOST:8786) or local:N "
                   "(start a LocalCluster of N worker processes); results are still written here, hw cells still "
                   "run here one at a time (needs tlslab[cluster]; docs/cli.md)")
    p.add_argument("--out", default="results", help="results directory (default: results)")
    p.add_argument("--list", action="store_true", help="print the cells of the matrix and exit")
    p.add_argument("--report", action="store_true",
                   help="also write the report (figures + HTML) to RUN/report when the matrix is done")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cost-profile", default=None,
                   help="cost profile for the summary table (default: the spec's cost_profile)")
    p.set_defaults(handler=run)


MAX_JOBS = 1024


def default_jobs() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run(args) -> int:
    from rich.console import Console

    from tlslab.bench.spec import SpecError

    jobs = args.jobs if args.jobs is not None else default_jobs()
    if not 1 <= jobs <= MAX_JOBS:
        raise UsageError(f"--jobs must be 1..{MAX_JOBS}")
    if args.resume and args.spec:
        raise UsageError("give either a SPEC or --resume RUN (a run keeps its own spec in run.json)")
    if args.retry_failed and not args.resume:
        raise UsageError("--retry-failed needs --resume RUN")
    cluster_spec = None
    if args.cluster is not None:
        from tlslab.bench.cluster import ClusterError, parse_cluster

        try:
            cluster_spec = parse_cluster(args.cluster)
        except ClusterError as exc:
            raise UsageError(str(exc)) from None
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)
    if not out.is_terminal and not os.environ.get("COLUMNS") and out.width < 160:
        out.width = 160     # a file or pipe, with no width asked for: the full tables
    if args.cost_profile is not None:
        from tlslab.bench.spec import _check_cost_profile

        try:
            _check_cost_profile("--cost-profile", args.cost_profile)
        except SpecError as exc:
            raise UsageError(str(exc)) from None
    argv = ["tlslab", "bench", *sys.argv[2:]] if sys.argv and sys.argv[0].endswith(("tlslab", "__main__.py")) \
        else list(sys.argv)

    connection = None
    if cluster_spec is not None and not args.list:
        from tlslab.bench.cluster import ClusterError, Connection

        try:    # before a run directory exists or a cell runs: an unreachable scheduler is bad input
            connection = Connection(cluster_spec)
        except ClusterError as exc:
            raise UsageError(str(exc)) from None
    try:
        return _run(args, rundir_args=(jobs, err, out, argv), connection=connection)
    finally:
        if connection is not None:
            connection.close()


def _run(args, rundir_args, connection) -> int:
    from rich.markup import escape

    from tlslab.bench import runner, summary
    from tlslab.bench.spec import SpecError, load_spec
    from tlslab.bench.store import StoreError, resolve_run

    jobs, err, out, argv = rundir_args
    if args.resume:
        try:
            rundir = resolve_run(args.resume, args.out)
            cells, todo, warnings = runner.cells_to_run(rundir, retry_failed=args.retry_failed)
        except StoreError as exc:
            raise UsageError(str(exc)) from None
        for w in warnings:
            err.print(f"[yellow]warning:[/] {escape(str(w))}")
        err.print(escape(f"resuming run {rundir.id}: {len(cells) - len(todo)} of {len(cells)} cells already "
                         f"recorded, {len(todo)} to run"))
    else:
        try:
            spec = load_spec(args.spec)
            if args.list:
                for c in spec.cells():
                    print(f"{c.id}  {c.label}" + (f"  [skip: {c.skip}]" if c.skip else ""))
                return 0
            rundir, cells = runner.start_run(spec, args.out, jobs, argv)
        except SpecError as exc:
            raise UsageError(str(exc)) from None
        todo = cells
        where = f"model cells on {connection.spec.describe()}" if connection is not None else f"{jobs} worker(s)"
        err.print(escape(f"run {rundir.id}: {len(cells)} cells ({spec.source}), {where} -> {rundir.cells_path}"))

    try:
        if todo:
            _run_with_progress(rundir, todo, jobs, err, args.no_progress, argv, connection)
        s = summary.summarize(rundir, args.cost_profile)
        summary.render(s, out)
        (rundir.path / "summary.txt").write_text(_render_text(s))
        if args.report:
            from tlslab.report.build import build_report

            index = build_report(rundir, rundir.path / "report", args.cost_profile, "tlslab bench --report")
            out.print(escape(f"report: {index}"))
    except KeyboardInterrupt:
        raise Interrupted(f"finished cells are saved in {rundir.path}; finish with "
                          f"`tlslab bench --resume {rundir.path}`") from None
    out.print(escape(f"results: {rundir.path}  (report: tlslab report {rundir.path}; "
                     f"csv: tlslab export {rundir.path} --csv)"))
    measured = sum(v for k, v in s.counts.items() if k.split(" ")[0] in MEASURED)
    failed = sum(v for k, v in s.counts.items() if k.split(" ")[0] == Outcome.FAILED)
    if failed and not measured:
        err.print(f"[bold red]every cell that ran failed[/] ({failed}): see the reasons above")
        return 1
    return 0


def _render_text(s) -> str:
    """The summary table as plain text, kept beside the cells."""
    import io

    from rich.console import Console

    from tlslab.bench import summary

    buf = io.StringIO()
    summary.render(s, Console(file=buf, width=160, force_terminal=False, color_system=None))
    return buf.getvalue()


def _run_with_progress(rundir, todo, jobs, err, no_progress, argv, connection=None) -> None:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rich.markup import escape

    from tlslab.bench import runner

    total = sum(c.weight for c in todo if not c.skip) or 1.0
    counts = {"done": 0, "failed": 0, "crash": 0}
    n = len(todo)
    if err.width >= 120:
        columns = (SpinnerColumn(), TextColumn("[bold]bench[/]"), BarColumn(),
                   TextColumn("{task.fields[cells]}"), TextColumn("elapsed"), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[last]}"))
    else:   # 80 columns: no last-cell label, a shorter bar; the cell count and both times stay whole
        columns = (SpinnerColumn(), BarColumn(bar_width=max(10, err.width - 62)),
                   TextColumn("{task.fields[cells]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn())
    progress = Progress(*columns, console=err, disable=no_progress, transient=False)
    task = progress.add_task("bench", total=total, cells=f"0/{n} cells", last="")

    def on_cell(cell, record) -> None:
        counts["done"] += 1
        outcome = record.get("outcome")
        if outcome == Outcome.FAILED:
            counts["failed"] += 1
            progress.console.print(f"[bold red]FAILED[/] {escape(cell.label)}: {escape(str(record.get('reason')))}")
        elif outcome == Outcome.GUEST_CRASH:
            counts["crash"] += 1
        extra = "".join([f", {counts['failed']} failed" if counts["failed"] else "",
                         f", {counts['crash']} crashed" if counts["crash"] else ""])
        progress.update(task, advance=0 if cell.skip else cell.weight, cells=f"{counts['done']}/{n} cells{extra}",
                        last=escape(cell.label))
        if no_progress:
            err.print(escape(f"[{counts['done']}/{n}] {cell.label}: {outcome}"))

    try:
        with progress:
            runner.execute_run(rundir, todo, jobs, progress=on_cell, argv=argv, cluster=connection,
                               log=lambda line: progress.console.print(escape(line)))
    except Exception as exc:
        from tlslab.bench.cluster import ClusterError

        if isinstance(exc, ClusterError):
            raise RunFailed(str(exc)) from None
        raise

