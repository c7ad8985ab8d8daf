"""`tlslab run GUEST [-- ARGS]`: run one guest under one strategy and show what it cost."""

from __future__ import annotations

import json
import os
import sys
import time

from tlslab.cli import UsageError
from tlslab.cli.guestopts import add_guest_options, spec_from_args
from tlslab.hypervisor.patchpolicy import PAGE_SHARING, PATCH_POLICIES


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a guest under the hypervisor model and print its output, counters and modelled time",
        description="Run an i386 guest (a bundled name such as lsr, lsr.nosegneg, lsr.dyn, busybox, a path, "
        "or with --rootfs a program of the root such as /bin/ls) inside Unicorn under the Xen segment model. "
        "Dynamically linked programs run through the root's own ld.so and libraries. Guest output first, "
        "then exit status, counters and modelled time. Arguments after `--` go to the guest.",
        epilog="example: tlslab run --rootfs debian /bin/ls --strategy flip -- -R /usr/lib",
    )
    add_guest_options(p)
    p.add_argument("--strategy", "-s", default=None,
                   help="fault strategy (see `tlslab strategies`); default: native in --mode native, emulate in --mode xen")
    p.add_argument("--mode", choices=("native", "xen"), default=None,
                   help="native: no truncation; xen: truncated segments (implied by --strategy)")
    p.add_argument("--stdout", choices=("pipe", "file", "null", "tty"), default="pipe",
                   help="what the guest's stdout looks like to it (changes glibc's behaviour)")
    p.add_argument("--cost-profile", default="nominal", help="cost profile for modelled time (see `tlslab costs`)")
    p.add_argument("--backend", choices=("unicorn", "hw"), default="unicorn",
                   help="unicorn: the model (default); hw: this CPU with really truncated segments under a "
                   "ptrace supervisor (strategies native|emulate|flip|online-site|online-probe|online-lookahead)")
    p.add_argument("--cpu", type=int, default=0, help="hw backend: CPU to pin tracer and guest to (-1: unpinned)")
    p.add_argument("--save-patches", nargs="?", const="patches", default=None, metavar="DIR",
                   help="rewrite strategies: write the patch set to DIR/<guest>.<variant>.<strategy>.json")
    p.add_argument("--patch-policy", choices=PATCH_POLICIES, default="auto",
                   help="rewrite strategies: which code may be patched: lib = libraries mapped from under /lib with "
                   "no writable shared mapping (XenLinux's rule), exe = the executable (its analogue for static "
                   "programs), auto = lib for dynamic programs, exe for static ones (default), all, none")
    p.add_argument("--page-sharing", choices=PAGE_SHARING, default="",
                   help="patching strategies: patches land in shared page-cache pages (as XenLinux did) or private "
                   "copies (default: the strategy's own: shared for rewrite and rewrite-2004, private for online-patch)")
    p.add_argument("--fs-abi", action="store_true",
                   help="install the fs-twin descriptor (run a statically rewritten binary under any strategy)")
    p.add_argument("--quiet", "-q", action="store_true", help="do not print the guest's output")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of tables")
    p.add_argument("--sites", type=int, default=0, metavar="N", help="also list the N busiest fs/gs sites")
    p.set_defaults(handler=run)


def build_domain(spec, **options):
    """``make_domain`` under the run's --timeout: building the filesystem and loading the guest count
    against it, and the guest gets what is left. Bad guests, files, trees and strategy options: UsageError
    (one line)."""
    from tlslab.cli.interrupt import RunTimeout, deadline
    from tlslab.experiment import make_domain
    from tlslab.guests import GuestError
    from tlslab.hypervisor.strategies import StrategyOptionError
    from tlslab.linux.elf import ElfError
    from tlslab.linux.tree import TreeSpecError

    started = time.monotonic()
    try:
        with deadline(spec.timeout_seconds, "building the guest's filesystem and loading it"):
            domain, guest = make_domain(spec, **options)
    except (GuestError, ElfError, TreeSpecError, StrategyOptionError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError) as exc:
        raise UsageError(str(exc)) from None
    if spec.timeout_seconds:
        left = spec.timeout_seconds - (time.monotonic() - started)
        if left <= 0:
            raise RunTimeout(f"timed out: building the guest's filesystem and loading it took longer than "
                             f"--timeout {spec.timeout_seconds:g} s")
        domain.vcpu.timeout_us = max(1, int(left * 1_000_000))   # the rest of the budget, from the first run
    return domain, guest


def resolve_strategy(strategy: str | None, mode: str | None) -> str:
    from tlslab.hypervisor.strategies import STRATEGIES

    if strategy is None:
        strategy = "emulate" if mode == "xen" else "native"
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r} (choose from: {', '.join(STRATEGIES)})")
    truncates = STRATEGIES[strategy].truncates
    if mode == "native" and truncates:
        raise UsageError(f"strategy {strategy} runs under a truncating hypervisor; drop --mode native")
    if mode == "xen" and not truncates:
        raise UsageError("strategy native does not truncate; use --mode native or another strategy")
    return strategy


def run(args) -> int:
    from tlslab.hypervisor import costmodel

    strategy = resolve_strategy(args.strategy, args.mode)
    try:
        profile = costmodel.get_profile(args.cost_profile)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    spec = spec_from_args(args, strategy, stdout=args.stdout, patch_policy=args.patch_policy,
                          page_sharing=args.page_sharing, fs_abi=args.fs_abi)
    if args.backend == "hw":
        return run_hardware(spec, args)
    domain, guest = build_domain(spec)
    result = domain.run()
    if args.save_patches is not None:
        from tlslab.hypervisor.patches import default_patch_path, save_patch_set

        path = save_patch_set(domain, default_patch_path(guest.name, guest.variant, strategy, args.save_patches),
                              guest=guest.name, variant=guest.variant)
        print(f"patch set written to {path}", file=sys.stderr)
    modelled = costmodel.predict(profile, result.counters)

    if args.json:
        from tlslab.record import from_result

        record = from_result(  # the run record (tlslab.record): schema, outcome, faults as everywhere
            result,
            spec=spec.to_dict(),
            guest_sha256=guest.sha256,
            environment=[os.fsdecode(e) for e in domain.process.envp],
            rootfs=domain.program.rootfs,
            guest_path=domain.program.guest_path,
            objects=[{"path": m.path, "start": m.start, "end": m.end, "offset": m.offset}
                     for m in domain.process.objects.mappings()],
            modelled={"profile": profile.label(), "total_ms": modelled.total_ms,
                      "breakdown_ns": modelled.breakdown_ns},
            wall_seconds=result.wall_seconds,
            stdout=result.stdout.decode("utf-8", "replace") if not args.quiet else None,
            stderr=result.stderr.decode("utf-8", "replace") if not args.quiet else None,
        )
        print(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        return 0 if result.ok else 1

    if not args.quiet:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.flush()
    print_summary(spec, guest, result, modelled, profile, args.sites)
    return 0 if result.ok else 1


def console(stderr: bool = False):
    """A rich console as wide as the terminal (or $COLUMNS; 80 when neither says)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def modelled_text(modelled, profile) -> str:
    """'12.345 ms under nominal (...)': every modelled time names its profile, and says when the profile
    prices no faults (then the strategies cost the same)."""
    text = f"{modelled.total_ms:,.3f} ms under {profile.label()}"
    return text


def print_summary(spec, guest, result, modelled, profile, nsites: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = console()
    c = result.counters
    s = c["strategy"]
    title = f"{guest.name} ({guest.variant}) under {s['name']} -- {c['policy']}"
    if result.crash:
        con.print(f"[bold red]{escape(result.crash.describe())}[/]")
    else:
        con.print(f"[bold]exit status {result.status}[/]")
    t = Table(title=escape(title), show_header=True, header_style="bold")
    t.add_column("counter", overflow="fold")
    t.add_column("value", justify="right", overflow="fold")
    t.add_row("guest instructions", f"{c['instructions']:,}")
    t.add_row("system calls", f"{c['linux']['syscalls']['total']:,}")
    for seg, sc in sorted(c["segments"].items()):
        if sc["accesses"]:
            # accesses the CPU performed without a fault; faulting ones are the violations below
            t.add_row(f"%{seg} accesses (direct)", f"{sc['accesses']:,} (sign changes {sc['sign_changes']:,})")
            t.add_row("  -ve / +ve offset (direct)", f"{sc['negative']:,} / {sc['positive']:,}")
    t.add_row("segment violations (#GP)", f"{sum(c['violations'].values()):,}")
    for key in ("traps", "decodes", "descriptor_writes", "emulated_instructions", "emulated_accesses", "patches",
                "notifications", "refused"):
        if s.get(key):
            label = key.replace("_", " ") + (" (by the hypervisor)" if key.startswith("emulated") else "")
            t.add_row(label, f"{s[key]:,}")
    t.add_row("modelled time", f"{modelled.total_ms:,.3f} ms")
    t.add_row("wall time (this lab)", f"{result.wall_seconds:.3f} s")
    con.print(t)
    if s.get("traps"):
        con.print("[dim]direct: accesses the CPU made without a fault; an access that faulted is a segment "
                  "violation, handled by the strategy (emulated accesses are counted by the hypervisor)[/]")
    con.print(escape(f"modelled time: {modelled_text(modelled, profile)}"))
    if s.get("traps") and not profile.prices_faults():
        con.print(escape(f"note: {profile.name} gives faults no price, so the {s['traps']:,} faults above cost "
                         "nothing here and every strategy models as native; see `tlslab costs` (--cost-profile)"))
    for hazard in c.get("hazards", []):
        con.print(f"[bold yellow]hazard: {escape(str(hazard))}[/]")
    unsupported = c["linux"]["syscalls"].get("unsupported")
    if unsupported:
        con.print(f"[yellow]unsupported system calls (returned -ENOSYS): {escape(str(unsupported))}[/]")
    kernel = c.get("kernel")
    if kernel:
        from tlslab.inspect.processes import tree_lines

        con.print(f"[bold]processes[/] ({kernel['processes']:,} processes, {kernel['threads']:,} threads, "
                  f"{kernel['switches']:,} switches, {kernel['tls_reloads']:,} TLS slot reloads at switches)")
        for line in tree_lines(kernel["listing"]):
            con.print("  " + escape(line), soft_wrap=True)
    if nsites and result.sites:
        st = Table(title=f"busiest fs/gs sites (of {len(result.sites)})")
        for col in ("eip", "seg", "accesses", "-ve", "+ve", "violations", "offsets"):
            st.add_column(col, justify="right", overflow="fold")
        for site in sorted(result.sites, key=lambda x: -(x["accesses"] + x["violations"]))[:nsites]:
            st.add_row(f"{site['eip']:#010x}", site["segment"], f"{site['accesses']:,}", f"{site['negative']:,}",
                       f"{site['positive']:,}", f"{site['violations']:,}", f"{site['min_offset']:#x}..{site['max_offset']:#x}")
        con.print(st)


def run_hardware(spec, args) -> int:
    """The same run on this CPU: real truncated descriptors, real #GP faults."""
    from rich.table import Table

    from tlslab.guests import GuestError
    from tlslab.hw.backend import HW_STRATEGIES, HwError, run_spec

    if spec.strategy not in HW_STRATEGIES:
        raise UsageError(f"the hw backend runs strategies {', '.join(HW_STRATEGIES[1:])}, not {spec.strategy}")
    if spec.stdout == "tty":
        raise UsageError("the hw backend cannot model a tty stdout")
    from tlslab.cli import RunFailed
    from tlslab.hw.backend import HwUnavailable
    from tlslab.linux.elf import ElfError

    try:
        result, guest = run_spec(spec, cpu=None if args.cpu < 0 else args.cpu)
    except HwUnavailable as exc:        # this host cannot run it: not the user's input
        raise RunFailed(str(exc)) from None
    except (GuestError, HwError, ElfError) as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        from tlslab.record import RunRecord, hw_outcome

        outcome = hw_outcome(result)
        record = RunRecord(  # the run record (tlslab.record): the same outcome and faults fields as the model's
            outcome=outcome, backend="hw", faults=result.faults, status=result.status,
            reason=None if result.ok else f"guest died on the CPU: status {result.status}, signal {result.signal}",
            extra={"spec": spec.to_dict(), "guest_sha256": guest.sha256, "signal": result.signal,
                   "fault_sites": {f"{k:#x}": v for k, v in result.fault_sites.items()},
                   "object_sites": {f"{path}+{off:#x}": n for (path, off), n in result.object_sites().items()},
                   "hw_counters": result.counters(), "wall_seconds": result.wall_seconds,
                   "run_seconds": result.run_seconds,
                   # the guest's output, as the model's record carries it (--quiet: left out)
                   "stdout": result.stdout.decode("utf-8", "replace") if not args.quiet else None,
                   "stderr": result.stderr.decode("utf-8", "replace") if not args.quiet else None})
        print(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        return 0 if result.ok else 1
    if not args.quiet:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.flush()
    from rich.markup import escape

    con = console()
    con.print(f"[bold]exit status {result.status}[/]" if result.ok else
              f"[bold red]guest died: status {result.status}, signal {result.signal}[/]")
    t = Table(title=escape(f"{guest.name} ({guest.variant}) on this CPU under {spec.strategy} "
                           f"(truncated below the {spec.profile} hypervisor start)"))
    t.add_column("counter")
    t.add_column("value", justify="right")
    t.add_row("#GP faults taken", f"{result.faults:,}")
    t.add_row("faulting sites", f"{len(result.fault_sites):,}")
    t.add_row("descriptor switches", f"{result.descriptor_switches:,}")
    online = result.online
    if online is not None:   # the model's counts for the same run (`tlslab run --json`: counters.strategy)
        t.add_row(f"decision threshold ({spec.prices} prices)", f"{online['threshold']:.6g}")
        t.add_row("emulations", f"{online['emulations']:,}")
        t.add_row("flips", f"{online['flips']:,}")
        if spec.strategy in ("online-probe", "online-patch"):
            t.add_row("probes", f"{online['probes']:,}")
        if spec.strategy == "online-patch":
            t.add_row("sites patched (gs prefix rewritten)", f"{online['patches']:,}")
            t.add_row("refused (the guest's own %fs fault)", f"{online['refused']:,}")
        t.add_row("descriptor writes (model's count)", f"{online['descriptor_writes']:,}")
        for kind, n in sorted(online["by_kind"].items()):
            t.add_row(f"  {kind}", f"{n:,}")
    if result.decoder_misses:
        t.add_row("single-stepped (decoder misses)", str(result.decoder_misses))
    t.add_row("wall time (traced run, measured)", f"{result.run_seconds * 1000:.1f} ms")
    t.add_row("pinned to CPU", "no" if result.cpu < 0 else str(result.cpu))
    con.print(t)
    return 0 if result.ok else 1
