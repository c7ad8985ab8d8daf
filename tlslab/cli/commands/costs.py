"""`tlslab costs`: list cost profiles; `tlslab costs fit-xen-2004`: fit Keir's table."""

from __future__ import annotations

from tlslab.cli import UsageError


def register(sub) -> None:
    p = sub.add_parser("costs", help="list cost profiles, or fit the xen-2004 profile to Keir Fraser's 2004 table")
    p.add_argument("action", nargs="?", choices=("list", "fit-xen-2004"), default="list")
    p.add_argument("--guest", default="lsr", help="fit workload guest (default lsr)")
    p.add_argument("--tree", default="4k", help="fit workload tree (default: the 4k tree)")
    p.add_argument("--no-write", action="store_true", help="print the fitted profile, do not save it")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tlslab.hypervisor import costmodel

    if args.action == "list":
        for name, prof in costmodel.available_profiles().items():
            prices = ", ".join(f"{f.removesuffix('_ns')} {getattr(prof, f):,.1f} ns" for f in costmodel.PRICE_FIELDS
                               if getattr(prof, f))
            print(f"{prof.label()}\n    {prof.description}\n    {prices}")
        return 0

    from tlslab.experiment import RunSpec, execute

    counters = {}
    for strategy in ("native", "emulate", "flip"):
        result, guest = execute(RunSpec(args.guest, strategy=strategy, tree=args.tree))
        if not result.ok:
            raise UsageError(f"{strategy} run failed: {result.crash.describe()}")
        counters[strategy] = result.counters
    workload = f"{guest.name} ({guest.variant}, sha256 {guest.sha256[:12]}) on tree {args.tree!r}"
    profile = costmodel.fit_xen_2004(counters["native"], counters["emulate"], counters["flip"], workload)
    print(profile.to_json(), end="")
    for strategy, target in costmodel.KEIR_2004_MS.items():
        got = costmodel.predict(profile, counters[strategy]).total_ms
        print(f"check: {strategy:8s} modelled {got:7.1f} ms  (Keir: {target:.0f} ms; equal by construction: FITTED)")
    if not args.no_write:
        path = costmodel.PROFILE_DIR / f"{profile.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(profile.to_json())
        print(f"wrote {path}")
    return 0
