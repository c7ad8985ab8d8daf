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
    from rich.console import Console
    from rich.table import Table

    from tlslab.analysis import hybrid
    from tlslab.experiment import make_domain
    from tlslab.linux.elf import ElfError
    from tlslab.guests import GuestError
    from tlslab.hypervisor import costmodel

    profiles = costmodel.available_profiles()
    name = args.cost_profile or next((n for n, p in profiles.items() if p.kind == "measured"), None)
    if name is None and (args.emulate_ns is None or args.flip_ns is None):
        raise UsageError("no measured cost profile (run `tlslab calibrate`) -- give --cost-profile or both prices")
    label = "command line"
    emulate_ns = flip_ns = 0.0
    if name is not None:
        if name not in profiles:
            raise UsageError(f"unknown cost profile {name!r} (choose from: {', '.join(profiles)})")
        emulate_ns, flip_ns = fault_prices(profiles[name])
        label = profiles[name].label()
    emulate_ns = args.emulate_ns if args.emulate_ns is not None else emulate_ns
    flip_ns = args.flip_ns if args.flip_ns is not None else flip_ns
    if emulate_ns <= 0 or flip_ns <= 0:
        raise UsageError(f"profile {name} gives no per-fault prices (emulate {emulate_ns} ns, flip {flip_ns} ns)")

    spec = spec_from_args(args, "native")
    try:
        domain, guest = make_domain(spec, trace_signs=True)
    except (GuestError, ElfError, FileNotFoundError, NotADirectoryError) as exc:
        raise UsageError(str(exc)) from None
    result = domain.run()
    if not result.ok:
        raise UsageError(f"the native run failed: {result.crash.describe()}")
    runs, dropped = domain.vcpu.sign_runs("gs")
    if dropped:
        raise UsageError(f"sign trace overflowed ({dropped} runs dropped): use a smaller workload")
    costs = hybrid.compare(runs, emulate_ns, flip_ns)
    best = min(c.cost_ns for c in costs)
    console = Console(highlight=False, width=110)
    n_access = sum(abs(r) for r in runs)
    console.print(f"{guest.name} ({guest.variant}): {n_access:,} %gs accesses in {len(runs):,} same-sign runs; "
                  f"prices per fault: emulate {emulate_ns / 1000:.2f} us, flip {flip_ns / 1000:.2f} us [{label}]")
    t = Table()
    for col in ("policy", "faults", "emulations", "flips", "fault time (ms)", "vs best"):
        t.add_column(col, justify="right" if col != "policy" else "left")
    for c in costs:
        t.add_row(c.policy, f"{c.faults:,}", f"{c.emulations:,}", f"{c.flips:,}", f"{c.cost_ns / 1e6:.2f}",
                  f"{c.cost_ns / best:.2f}x" if best else "-")
    console.print(t)
    return 0
