"""`tlslab costs`: list cost profiles; `tlslab costs fit-xen-2004`: fit Keir's table."""

from __future__ import annotations

from tlslab.cli import UsageError


def register(sub) -> None:
    p = sub.add_parser("costs", help="list cost profiles, or fit the xen-2004 profile to Keir Fraser's 2004 table")
    p.add_argument("action", nargs="?", choices=("list", "fit-xen-2004"), default="list")
    p.add_argument("--guest", default="lsr", help="fit workload guest (default lsr)")
    p.add_argument("--tree", default="4k", help="fit workload tree (default: the 4k tree)")
    p.add_argument("--no-write", action="store_true", help="print the fitted profile, do not save it")
    p.add_argument("--replace-bundled", action="store_true",
                   help="save to the bundled tlslab/hypervisor/profiles (tracked in the repository) instead of "
                   "the user's profile directory ($TLSLAB_PROFILES or ~/.config/tlslab/profiles)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tlslab.hypervisor import costmodel

    if args.action == "list":
        import textwrap

        for name, prof in costmodel.available_profiles().items():
            prices = ", ".join(f"{f.removesuffix('_ns')} {getattr(prof, f):,.1f} ns" for f in costmodel.PRICE_FIELDS
                               if getattr(prof, f))
            print(textwrap.fill(prof.label(), 79, subsequent_indent="    "))
            print(textwrap.fill(prof.description, 79, initial_indent="    ", subsequent_indent="    "))
            print(textwrap.fill(prices, 79, initial_indent="    ", subsequent_indent="    "))
            note = (prof.provenance.get("lookahead") or {}).get("note")
            if note:   # the walk's prices have their own provenance (a lower bound in a fitted profile)
                print(textwrap.fill(f"lookahead prices: {note}", 79, initial_indent="    ",
                                    subsequent_indent="    "))
        return 0

    from tlslab.cli import RunFailed
    from tlslab.experiment import RunSpec, execute
    from tlslab.guests import GuestError
    from tlslab.linux.elf import ElfError
    from tlslab.linux.tree import TreeSpec, TreeSpecError

    try:
        TreeSpec.parse(args.tree)
    except TreeSpecError as exc:
        raise UsageError(str(exc)) from None
    counters = {}
    for strategy in ("native", "emulate", "flip"):
        try:
            result, guest = execute(RunSpec(args.guest, strategy=strategy, tree=args.tree))
        except (GuestError, ElfError, FileNotFoundError, NotADirectoryError) as exc:
            raise UsageError(str(exc)) from None
        if not result.ok:
            raise RunFailed(f"{strategy} run failed: {result.crash.describe()}")
        counters[strategy] = result.counters
    workload = f"{guest.name} ({guest.variant}, sha256 {guest.sha256[:12]}) on tree {args.tree!r}"
    try:
        profile = costmodel.fit_xen_2004(counters["native"], counters["emulate"], counters["flip"], workload)
    except (ValueError, ZeroDivisionError) as exc:
        raise RunFailed(f"cannot fit on {workload}: {exc}") from None
    print(profile.to_json(), end="")
    for strategy, target in costmodel.KEIR_2004_MS.items():
        got = costmodel.predict(profile, counters[strategy]).total_ms
        print(f"check: {strategy:8s} modelled {got:7.1f} ms  (Keir: {target:.0f} ms; equal by construction: FITTED)")
    if not args.no_write:
        base = costmodel.PROFILE_DIR if args.replace_bundled else costmodel.user_profile_dir()
        path = base / f"{profile.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(profile.to_json())
        print(f"wrote {path}")
    return 0
