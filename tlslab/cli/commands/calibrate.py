"""`tlslab calibrate`: measure real per-fault costs on this host (the hw backend).

    tlslab calibrate                       # 5 guests x 5 repeats, CPU 0, + one unpinned round
    tlslab calibrate --repeat 9 --guest lsr --guest syscalls.nosegneg
    tlslab calibrate --no-write            # measure and print only

Writes ``hw-<host>.json`` (a CostProfile, kind "measured") and
``raw/hw-<host>.raw.json`` to the user's profile directory ($TLSLAB_PROFILES or
~/.config/tlslab/profiles); ``--replace-bundled`` writes the bundled
``tlslab/hypervisor/profiles/`` instead (the copy tracked in the repository).
"""

from __future__ import annotations

import os
import sys

from tlslab.cli import RunFailed, UsageError


MAX_REPEAT = 1000


def register(sub) -> None:
    from tlslab.hw.calibrate import DEFAULT_GUESTS

    p = sub.add_parser(
        "calibrate",
        help="measure per-fault costs of emulate and flip on this host's CPU (hw backend)",
        description="Run each guest untraced, traced without truncation, and under hw emulate and "
        "hw flip; per-fault cost = (strategy time - traced native time) / faults. Writes a "
        "measured cost profile hw-<host> and the raw timings.",
    )
    p.add_argument("--repeat", type=int, default=5, help=f"repeats per guest and strategy, 1..{MAX_REPEAT} (default 5)")
    p.add_argument("--guest", action="append", metavar="GUEST",
                   help=f"guest to measure (repeatable; default: {' '.join(DEFAULT_GUESTS)})")
    p.add_argument("--cpu", type=int, default=0, help="CPU to pin tracer and guest to (default 0)")
    p.add_argument("--tree", default="small", help="synthetic tree spec or name for the guests' cwd")
    p.add_argument("--no-unpinned", action="store_true", help="skip the one unpinned round")
    p.add_argument("--no-model", action="store_true",
                   help="do not run the Unicorn model for instruction counts (instruction_ns = 0)")
    p.add_argument("--no-write", action="store_true", help="print only; write no profile")
    p.add_argument("--out-dir", help="write the profile here (default: $TLSLAB_PROFILES or ~/.config/tlslab/profiles)")
    p.add_argument("--replace-bundled", action="store_true",
                   help="write the bundled profile in tlslab/hypervisor/profiles (tracked in the repository) "
                   "instead of the user's directory")
    p.set_defaults(handler=run)


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tlslab.guests import GuestError
    from tlslab.hw.backend import HwError
    from tlslab.hw.calibrate import (DEFAULT_GUESTS, CalibrationOptions, host_name, make_profile,
                                     profile_paths, run_calibration)

    if not 1 <= args.repeat <= MAX_REPEAT:
        raise UsageError(f"--repeat must be 1..{MAX_REPEAT}")
    if args.replace_bundled and args.out_dir:
        raise UsageError("give --out-dir or --replace-bundled, not both")
    if args.cpu < 0 or args.cpu >= (os.cpu_count() or 1) * 64:
        raise UsageError(f"--cpu {args.cpu}: not a CPU number of this host")
    from tlslab.linux.tree import TreeSpec, TreeSpecError

    try:
        TreeSpec.parse(args.tree)
    except TreeSpecError as exc:
        raise UsageError(str(exc)) from None
    opts = CalibrationOptions(guests=tuple(args.guest or DEFAULT_GUESTS), repeat=args.repeat, cpu=args.cpu,
                              tree=args.tree, unpinned=not args.no_unpinned, with_model=not args.no_model)
    from rich.markup import escape

    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    profile_path, raw_path = profile_paths(host_name(), args.out_dir, bundled=args.replace_bundled)
    try:
        raw = run_calibration(opts, None if args.no_write else raw_path,
                              progress=lambda m: err.print(f"[dim]{escape(str(m))}[/dim]"))
    except (GuestError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except HwError as exc:
        raise RunFailed(str(exc)) from None

    us = lambda ns: f"{ns / 1000:.1f}"  # noqa: E731
    mmm = lambda st: f"{us(st['min'])} / {us(st['median'])} / {us(st['max'])}" if st.get("n") else "-"  # noqa: E731
    table = Table(title=escape(f"per-fault cost on {raw['host']}, µs min / median / max "
                               f"(pinned to CPU {opts.cpu}, {opts.repeat} repeats)"))
    # min / median / max wrap at the slashes in a narrow terminal instead of being cut to "1.6…"
    for col in ("guest", "E faults", "emulate µs", "F faults", "flip µs", "unpinned E/F", "=model"):
        table.add_column(col, justify="left" if col == "guest" else "right", overflow="fold")
    for key, rec in raw["guests"].items():
        pf = rec["per_fault_ns"]
        e, f = pf["emulate"], pf["flip"]
        un = pf.get("unpinned", {})
        agree = "-"
        if "model" in rec:
            agree = "yes" if (rec["model"]["emulate"]["traps"] == e["faults"]
                              and rec["model"]["flip"]["traps"] == f["faults"]) else "NO"
        unp = f"{us(un['emulate'])} / {us(un['flip'])}" if "emulate" in un and "flip" in un else "-"
        table.add_row(escape(key), str(e["faults"]), mmm(e), str(f["faults"]), mmm(f), unp, agree)
    s = raw["summary"]
    un = s["unpinned"]
    unp = (f"{us(un['emulate']['median'])} / {us(un['flip']['median'])}"
           if un["emulate"].get("n") and un["flip"].get("n") else "-")
    table.add_row("[bold]all[/bold]", "", mmm(s["pinned"]["emulate"]), "", mmm(s["pinned"]["flip"]), unp, "")
    console.print(table)
    console.print(escape(f"load average before/after: {raw.get('loadavg_before')} / {raw.get('loadavg_after')} "
                         f"({raw.get('cpus')} CPUs): other work on the pinned CPU inflates these costs"))
    profile = make_profile(raw)
    if args.no_write:
        console.print(f"profile {profile.name} (not written): trap {profile.trap_ns:.0f} ns, "
                      f"emulated access +{profile.emulated_access_ns:.0f} ns, "
                      f"descriptor write +{profile.descriptor_write_ns:.0f} ns")
        return 0
    profile_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = profile_path.with_name(profile_path.name + ".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(profile_path)
    console.print(escape(f"wrote {profile_path} and {raw_path}"))
    if not args.replace_bundled and not args.out_dir:
        console.print(escape(f"profile {profile.name} (user) overrides a bundled profile of that name; "
                             "--replace-bundled writes tlslab/hypervisor/profiles instead"))
    return 0
