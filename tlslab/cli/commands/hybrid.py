"""`tlslab hybrid GUEST`: emulate vs flip vs the best any fault-driven policy could do."""

from __future__ import annotations

from tlslab.cli import UsageError
from tlslab.cli.guestopts import add_guest_options, spec_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "hybrid",
        help="price always-emulate, always-flip, an online predictor and the offline-optimal hybrid on a guest's "
        "exact sequence of %%gs offset signs",
        description="Runs the guest natively, records the sign of every %%gs offset in order, and prices fault-"
        "driven policies on that sequence with a cost profile's per-fault prices. The optimal hybrid is an "
        "offline bound (it knows the future); no real policy can beat it.",
    )
    add_guest_options(p)
    p.add_argument("--cost-profile", default=None,
                   help="profile giving the per-fault prices (default: a measured hw profile if present)")
    p.add_argument("--emulate-ns", type=float, default=None, help="override the price of one emulated fault")
    p.add_argument("--flip-ns", type=float, default=None, help="override the price of one flip")
    p.set_defaults(handler=run)


def fault_prices(profile) -> tuple[float, float]:
    emulate = profile.trap_ns + profile.decode_ns + profile.emulated_access_ns
    flip = profile.trap_ns + profile.decode_ns + profile.descriptor_write_ns
    return emulate, flip


def run(args) -> int:
    import math

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tlslab.analysis import hybrid
    from tlslab.bench.summary import profile_origin, same_machine, this_machine
    from tlslab.cli import RunFailed
    from tlslab.cli.commands.run import build_domain
    from tlslab.hypervisor import costmodel

    for opt, v in (("--emulate-ns", args.emulate_ns), ("--flip-ns", args.flip_ns)):
        if v is not None and (not math.isfinite(v) or not 0 < v <= 1e12):
            raise UsageError(f"{opt} {v:g}: expected a price in ns, > 0")
    profiles = costmodel.available_profiles()
    name = args.cost_profile or next((n for n, p in profiles.items() if p.kind == "measured"), None)
    if name is None and (args.emulate_ns is None or args.flip_ns is None):
        raise UsageError("no measured cost profile (run `tlslab calibrate`) -- give --cost-profile or both prices")
    label = "command line"
    where = ""
    emulate_ns = flip_ns = 0.0
    if name is not None:
        if name not in profiles:
            raise UsageError(f"unknown cost profile {name!r} (choose from: {', '.join(profiles)})")
        emulate_ns, flip_ns = fault_prices(profiles[name])
        label = profiles[name].label()
        if profiles[name].kind == "measured":
            host, cpu = this_machine()
            same, _ = same_machine(profiles[name], host, cpu)
            p_host, p_cpu = profile_origin(profiles[name])
            if not same:
                where = (f"{name} was measured on {p_host or '?'} ({p_cpu or 'CPU not recorded'}), not on this "
                         f"machine ({host}, {cpu}): its prices are another machine's (`tlslab calibrate` measures "
                         "this one)")
            else:
                where = f"{name} was measured on this machine ({host}, {cpu})"
    emulate_ns = args.emulate_ns if args.emulate_ns is not None else emulate_ns
    flip_ns = args.flip_ns if args.flip_ns is not None else flip_ns
    if emulate_ns <= 0 or flip_ns <= 0:
        raise UsageError(f"profile {name} gives no per-fault prices (emulate {emulate_ns} ns, flip {flip_ns} ns): "
                         "choose a measured or fitted one (`tlslab costs`) or give --emulate-ns and --flip-ns")

    spec = spec_from_args(args, "native")
    domain, guest = build_domain(spec, trace_signs=True)
    result = domain.run()
    if not result.ok:
        raise RunFailed(f"the native run failed: {result.crash.describe()}")
    runs, dropped = domain.vcpu.sign_runs("gs")
    if dropped:
        raise RunFailed(f"sign trace overflowed ({dropped} runs dropped): use a smaller workload")
    costs = hybrid.compare(runs, emulate_ns, flip_ns)
    best = min(c.cost_ns for c in costs)
    console = Console(highlight=False)
    n_access = sum(abs(r) for r in runs)
    console.print(escape(f"{guest.name} ({guest.variant}): {n_access:,} %gs accesses in {len(runs):,} same-sign "
                         f"runs; prices per fault: emulate {emulate_ns / 1000:.2f} us, flip {flip_ns / 1000:.2f} us "
                         f"[{label}]"))
    if where:
        console.print(("[yellow]" if "not on this" in where else "[dim]") + escape(where) + "[/]")
    t = Table()
    for col in ("policy", "faults", "emulations", "flips", "fault time (ms)", "vs best"):
        t.add_column(col, justify="right" if col != "policy" else "left", overflow="fold")
    for c in costs:
        t.add_row(escape(c.policy), f"{c.faults:,}", f"{c.emulations:,}", f"{c.flips:,}", f"{c.cost_ns / 1e6:.2f}",
                  f"{c.cost_ns / best:.2f}x" if best else "-")
    console.print(t)
    return 0
