"""`tlslab faults GUEST --strategy S`: which fs/gs instructions fault, and what the strategy did."""

from __future__ import annotations

import json

from tlslab.cli import UsageError
from tlslab.cli.guestopts import add_guest_options, spec_from_args


MAX_ROWS = 1_000_000
WIDE = 120      # columns from which every column of the site table is shown


def register(sub) -> None:
    p = sub.add_parser(
        "faults",
        help="per-site view of the fs/gs instructions of a guest under one strategy (faults, handling, trace, coverage)",
        description="Run GUEST under --strategy and list one row per fs/gs instruction site: address, symbol+offset, "
        "disassembly, segment, offsets seen, accesses, faults, and whether the strategy handled or refused them "
        "(and why). --trace N prints the first N fault events with the descriptor before and after. --coverage "
        "shows which faulting sites each 2004 decoder (Xen emulate.c, Xen seg_fixup.c, XenLinux fixup.c) cannot "
        "handle.",
    )
    add_guest_options(p)
    p.add_argument("--strategy", "-s", default="emulate", help="fault strategy (default: emulate)")
    p.add_argument("--sort", choices=("faults", "accesses", "address"), default="faults", help="row order")
    p.add_argument("--limit", type=int, default=30, metavar="N",
                   help="show at most N sites (0: all; default 30; at most 1,000,000)")
    p.add_argument("--trace", type=int, default=0, metavar="N",
                   help="print the first N fault events in order (at most 1,000,000)")
    p.add_argument("--coverage", action="store_true",
                   help="coverage of the 2004 decoders on this guest's faulting sites (runs emulate and flip-full)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=run)


def _spec(args):
    from tlslab.hypervisor.strategies import STRATEGIES

    if args.strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {args.strategy!r} (choose from: {', '.join(STRATEGIES)})")
    if not 0 <= args.limit <= MAX_ROWS or not 0 <= args.trace <= MAX_ROWS:
        raise UsageError(f"--limit and --trace must be 0..{MAX_ROWS:,}")
    return spec_from_args(args, args.strategy, stdout="pipe")


def _guarded(fn, spec, *a, **kw):
    """Run ``fn(spec, ...)`` under the spec's --timeout (filesystem building included); bad guests and files
    are one-line usage errors."""
    from tlslab.cli.interrupt import deadline
    from tlslab.guests import GuestError
    from tlslab.linux.elf import ElfError
    from tlslab.linux.tree import TreeSpecError

    try:
        with deadline(spec.timeout_seconds, "the run"):
            return fn(spec, *a, **kw)
    except (GuestError, ElfError, TreeSpecError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as exc:
        raise UsageError(str(exc)) from None


def run(args) -> int:
    from tlslab.inspect import faults

    spec = _spec(args)
    if args.coverage:
        cov = _guarded(faults.coverage, spec)
        return _print_coverage(spec, cov, args)
    view = _guarded(faults.investigate, spec, trace_events=args.trace)
    rows = faults.sorted_sites(view.sites, args.sort)
    shown = rows if not args.limit else rows[: args.limit]
    r = view.result
    if args.json:
        from tlslab.record import from_result

        record = from_result(  # the run record (tlslab.record): schema, outcome, faults as everywhere
            r, spec={**spec.to_dict(), "args": list(spec.args)},
            guest={"name": view.guest.name, "variant": view.guest.variant, "sha256": view.guest.sha256},
            sites=shown, trace=[e.to_dict() for e in view.recorder.events],
            processes=(r.counters.get("kernel") or {}).get("listing"))
        print(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        return 0
    _print_sites(view, rows, shown, args)
    if args.trace:
        _print_trace(view, args.trace)
    kernel = r.counters.get("kernel")
    if kernel:
        from rich.markup import escape

        from tlslab.inspect.processes import tree_lines

        con = _console()
        con.print(f"[bold]process tree[/] ({kernel['processes']:,} processes, {kernel['threads']:,} threads, "
                  f"{kernel['tls_reloads']:,} TLS slot reloads at switches)")
        for line in tree_lines(kernel["listing"]):
            con.print("  " + escape(line), soft_wrap=True)
    return 0


def _console():
    """As wide as the terminal (or $COLUMNS); 150 columns when writing to a file or pipe with neither."""
    import os

    from rich.console import Console

    c = Console(highlight=False)
    if not c.is_terminal and not os.environ.get("COLUMNS") and c.width < 150:
        c.width = 150
    return c


def _print_sites(view, rows, shown, args) -> None:
    from rich.markup import escape
    from rich.table import Table

    from tlslab.inspect.faults import fmt_offset

    console = _console()
    r = view.result
    c = r.counters
    faults = c["strategy"]["traps"]
    faulting = sum(1 for x in rows if x["faults"])
    head = (f"{view.guest.name} ({view.guest.variant}) under {args.strategy}: {c['instructions']:,} instructions, "
            f"{faults:,} faults at {faulting} of {len(rows)} fs/gs sites")
    console.print(f"[bold]{escape(head)}[/]")
    if r.crash:
        console.print(f"[bold red]{escape(r.crash.describe())}[/]")
    wide = console.width >= WIDE
    t = Table(header_style="bold", title=f"fs/gs sites by {args.sort}" +
              (f" (first {len(shown)} of {len(rows)})" if len(shown) < len(rows) else ""))
    cols = (("address", "right"), ("symbol", "left"), ("instruction", "left"), ("seg", "left"),
            ("offsets", "right"), ("sign", "center"), ("accesses", "right"), ("faults", "right"),
            ("strategy", "left"))
    narrow_cols = {"address", "symbol", "instruction", "faults", "strategy"}
    for col, just in cols:
        if wide or col in narrow_cols:
            t.add_column(col, justify=just, overflow="fold")
    for x in shown:
        offs = "?" if x["min_offset"] is None else (
            fmt_offset(x["min_offset"]) if x["min_offset"] == x["max_offset"]
            else f"{fmt_offset(x['min_offset'])}..{fmt_offset(x['max_offset'])}")
        style = "red" if x["refused"] else ("yellow" if x["faults"] else "")
        handling = escape(x["handling"])
        values = {"address": f"{x['eip']:#010x}", "symbol": escape(x["symbol"]),
                  "instruction": escape(x["instruction"]), "seg": escape(x["segment"]), "offsets": offs,
                  "sign": escape(x["sign"]), "accesses": f"{x['accesses']:,}", "faults": f"{x['faults']:,}",
                  "strategy": f"[{style}]{handling}[/]" if style else handling}
        t.add_row(*(values[c] for c, _ in cols if wide or c in narrow_cols))
    console.print(t)
    if not wide:
        console.print(f"[dim]seg, offsets, sign and accesses: at {WIDE}+ columns (COLUMNS={WIDE}) or with --json[/]")


def _print_trace(view, n: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    from tlslab.inspect.faults import fmt_offset

    console = _console()
    ev = view.recorder.events
    t = Table(header_style="bold", title=f"first {len(ev)} fault events (of {len(view.recorder.trap_instructions):,})")
    for col in ("#", "instr", "address", "symbol", "access", "verdict", "descriptor before", "descriptor after"):
        t.add_column(col, overflow="fold")
    for e in ev:
        off = e.offset - (1 << 32) if e.offset & 0x80000000 else e.offset
        access = f"{'W' if e.write else 'R'}{e.size} %{e.segment}:{fmt_offset(off)}"
        changed = e.before != e.after
        verdict = e.action + (f": {e.reason}" if e.reason else "")
        t.add_row(str(e.index), f"{e.instructions:,}", f"{e.eip:#010x}", escape(e.symbol), access, escape(verdict),
                  escape(_short(e.before)), ("[bold]" if changed else "[dim]") + escape(_short(e.after)) + "[/]")
    console.print(t)
    flips = sum(1 for e in ev if e.before != e.after)
    if flips:
        console.print(f"{flips} of {len(ev)} events changed the descriptor (flip ping-pong: every change of sign "
                      "between consecutive accesses faults once more)")


def _short(desc: str | None) -> str:
    if desc is None:
        return "-"
    # "data RW expand-up base=0x80f2380 limit=0xf3f0cfff dpl=3 32-bit" -> "expand-up limit=0xf3f0cfff"
    parts = desc.split()
    keep = [p for p in parts if p.startswith(("expand-", "limit=", "base="))]
    return " ".join(keep) or desc


def _print_coverage(spec, cov, args) -> int:
    from rich.markup import escape
    from rich.table import Table

    if args.json:
        out = {"spec": {**spec.to_dict(), "args": list(spec.args)},
               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "guest"} for k, v in cov["runs"].items()},
               "decoders": cov["decoders"]}
        from tlslab.record import stamp

        print(json.dumps(stamp(out), indent=2, sort_keys=True, default=str))
        return 0
    console = _console()
    for strat, run in cov["runs"].items():
        status = "ran to completion" if run["ok"] else f"crashed: {run['crash']}"
        console.print(escape(f"{spec.guest} under {strat}: {run['faults']:,} faults at {len(run['sites'])} sites; "
                             f"{status}"))
    t = Table(header_style="bold", title=escape(f"2004 decoders on the faulting sites of {spec.guest} ({spec.variant})"))
    for col in ("decoder", "source", "faces faults of", "faulting sites", "cannot handle", "faults at those sites"):
        t.add_column(col, justify="left" if col in ("decoder", "source", "faces faults of") else "right",
                     overflow="fold")
    for label, d in cov["decoders"].items():
        pct = 100.0 * d["unhandled_faults"] / d["faults"] if d["faults"] else 0.0
        t.add_row(escape(label), escape(str(d["source"])), escape(str(d["faces"])), str(d["sites"]),
                  str(d["unhandled_sites"]), f"{d['unhandled_faults']:,} of {d['faults']:,} ({pct:.1f}%)")
    console.print(t)
    for label, d in cov["decoders"].items():
        if not d["unhandled"]:
            console.print(f"[green]{escape(label)}: handles every faulting site[/]")
            continue
        u = Table(header_style="bold", title=escape(f"{label}: sites it cannot handle"))
        for col in ("address", "symbol", "instruction", "faults", "why"):
            u.add_column(col, overflow="fold", justify="right" if col in ("address", "faults") else "left")
        rows = u_rows = d["unhandled"] if not args.limit else d["unhandled"][: args.limit]
        for s in rows:
            u.add_row(f"{s['eip']:#010x}", escape(s["symbol"]), escape(s["instruction"]), f"{s['violations']:,}",
                      escape(s["why"]))
        console.print(u)
        if len(u_rows) < len(d["unhandled"]):
            console.print(f"  ... {len(d['unhandled']) - len(u_rows)} more (--limit 0 for all)")
    return 0
