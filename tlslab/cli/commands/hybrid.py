"""`tlslab hybrid GUEST`: emulate, flip and the online strategies, each really run, against the offline bound."""

from __future__ import annotations

from tlslab.cli import UsageError
from tlslab.cli.guestopts import add_guest_options, spec_from_args

SCHEMA = "tlslab.hybrid/1"


def register(sub) -> None:
    p = sub.add_parser(
        "hybrid",
        help="run emulate, flip and every online strategy on a guest and price them against the offline-optimal "
        "emulate/flip hybrid (a bound no emulate/flip policy can beat)",
        description="Runs the guest natively (recording the sign of every %%gs offset, thread by thread), then "
        "under emulate, flip and each online strategy (online-site, online-rate, online-probe, online-lookahead, "
        "online-patch: real runs on real guest state, deciding with the chosen profile's prices). Prints each policy's faults, "
        "emulations, flips, patches and modelled fault-handling time, and the offline optimum over the native "
        "sign sequence: it knows the future, so it bounds every policy that only emulates and flips at faults. "
        "online-patch also rewrites code (a patched site never faults again): the bound does not bound it.",
    )
    add_guest_options(p)
    p.add_argument("--cost-profile", default=None,
                   help="profile giving the per-fault prices (default: a measured hw profile if present)")
    p.add_argument("--emulate-ns", type=float, default=None, help="override the price of one emulated fault")
    p.add_argument("--flip-ns", type=float, default=None, help="override the price of one flip")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of the table")
    p.set_defaults(handler=run)


def choose_prices(args):
    """(profile name or None, label, warning, emulate_ns, flip_ns, pricing profile) from the options."""
    import math

    from tlslab.bench.summary import profile_origin, same_machine, this_machine
    from tlslab.hypervisor import costmodel

    for opt, v in (("--emulate-ns", args.emulate_ns), ("--flip-ns", args.flip_ns)):
        if v is not None and (not math.isfinite(v) or not 0 < v <= 1e12):
            raise UsageError(f"{opt} {v:g}: expected a price in ns, > 0")
    profiles = costmodel.available_profiles()
    name = args.cost_profile or next((n for n, p in profiles.items() if p.kind == "measured"), None)
    if name is None:
        raise UsageError("no measured cost profile (run `tlslab calibrate`): give --cost-profile")
    if name not in profiles:
        raise UsageError(f"unknown cost profile {name!r} (choose from: {', '.join(profiles)})")
    profile = profiles[name]
    emulate_ns, flip_ns = costmodel.fault_prices(profile)
    label, where = profile.label(), ""
    if profile.kind == "measured":
        host, cpu = this_machine()
        same, _ = same_machine(profile, host, cpu)
        p_host, p_cpu = profile_origin(profile)
        where = (f"{name} was measured on this machine ({host}, {cpu})" if same else
                 f"{name} was measured on {p_host or '?'} ({p_cpu or 'CPU not recorded'}), not on this machine "
                 f"({host}, {cpu}): its prices are another machine's (`tlslab calibrate` measures this one)")
    if args.emulate_ns is not None or args.flip_ns is not None:
        emulate_ns = args.emulate_ns if args.emulate_ns is not None else emulate_ns
        flip_ns = args.flip_ns if args.flip_ns is not None else flip_ns
        label += " with prices from the command line"
        # a profile that prices exactly the two actions: an emulated fault and a flip
        profile = costmodel.CostProfile("command line", "measured", label, trap_ns=0.0,
                                        emulated_access_ns=emulate_ns, descriptor_write_ns=flip_ns)
    if emulate_ns <= 0 or flip_ns <= 0:
        raise UsageError(f"profile {name} gives no per-fault prices (emulate {emulate_ns} ns, flip {flip_ns} ns): "
                         "choose a measured or fitted one (`tlslab costs`) or give --emulate-ns and --flip-ns")
    return name, label, where, emulate_ns, flip_ns, profile


def policy_record(name: str, online: bool, result, domain, native_stdout, profile) -> dict:
    from tlslab.hypervisor import costmodel
    from tlslab.hypervisor.strategies import patches_code

    counters = domain.counters() if result.ok or result.crash is not None else {}
    s = counters.get("strategy", {})
    kinds = s.get("by_kind", {})
    record = {
        "name": name,
        "online": online,
        "ok": bool(result.ok),
        "faults": s.get("traps", 0),
        "emulations": s.get("emulated_instructions", 0),
        "flips": kinds.get("flip", 0) + kinds.get("to-expand-down", 0) + kinds.get("to-expand-up", 0)
                 + kinds.get("probe-flip", 0),
        "probes": kinds.get("probe", 0),
        "descriptor_writes": s.get("descriptor_writes", 0),
        "patches": s.get("patches", 0),
        "patches_code": patches_code(name),
        "fault_time_ns": costmodel.fault_handling_ns(profile, counters),
        "output_identical": result.stdout == native_stdout,
    }
    if not result.ok:
        record["crash"] = result.crash.describe() if result.crash is not None else "did not finish"
    return record


def run(args) -> int:
    import dataclasses
    import json

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tlslab.analysis import hybrid
    from tlslab.cli import RunFailed
    from tlslab.cli.commands.run import build_domain
    from tlslab.hypervisor.strategies import online_names

    name, label, where, emulate_ns, flip_ns, pricing = choose_prices(args)
    base = spec_from_args(args, "native")
    domain, guest = build_domain(base, trace_signs=True)
    native = domain.run()
    if not native.ok:
        raise RunFailed(f"the native run failed: {native.crash.describe()}")
    traces, dropped = domain.sign_runs("gs")
    if dropped:
        raise RunFailed(f"sign trace overflowed ({dropped} runs dropped): use a smaller workload")
    policies = []
    names = online_names()
    price_fields = {"prices": name, "emulate_ns": args.emulate_ns or 0.0, "flip_ns": args.flip_ns or 0.0}
    for strategy in ("emulate", "flip", *names):
        online = strategy in names
        spec = dataclasses.replace(base, strategy=strategy, **(price_fields if online else {}))
        d, _ = build_domain(spec)
        result = d.run()
        policies.append(policy_record(strategy, online, result, d, native.stdout, pricing))
    flat = [r for runs in traces for r in runs]
    negative_accesses, negative_sites = hybrid.negative_gs_sites(native.sites)
    bound = hybrid.optimal_over(traces, emulate_ns, flip_ns)
    oracle = hybrid.run_oracle_over(traces, emulate_ns, flip_ns)
    record = {
        "schema": SCHEMA,
        "guest": guest.name, "variant": guest.variant, "args": list(base.args),
        "cost_profile": name, "cost_profile_label": label,
        "prices_ns": {"emulate": emulate_ns, "flip": flip_ns},
        "threshold": 2 * flip_ns / emulate_ns,
        "gs_accesses": sum(abs(r) for r in flat),
        "same_sign_runs": sum(1 for r in flat if r),
        "address_spaces": len(traces),
        # how often a rule meets each site it could learn about (docs/online-strategies.md, "Why ...")
        "negative_gs_accesses": negative_accesses,
        "negative_gs_sites": negative_sites,
        "policies": policies,
        "offline_optimum": {"name": bound.policy, "online": False, "faults": bound.faults,
                            "emulations": bound.emulations, "flips": bound.flips, "fault_time_ns": bound.cost_ns},
        # offline too, but one run deep: the threshold rule online-probe approximates, given exact run lengths
        "run_oracle": {"name": oracle.policy, "online": False, "faults": oracle.faults,
                       "emulations": oracle.emulations, "flips": oracle.flips, "fault_time_ns": oracle.cost_ns},
    }
    usable = [p for p in policies if p["online"] and p["ok"] and p["output_identical"]]
    best_online = min(usable, key=lambda p: p["fault_time_ns"], default=None)
    best_rule = min((p for p in usable if not p["patches_code"]), key=lambda p: p["fault_time_ns"], default=None)
    record["best_online"] = best_online["name"] if best_online else None
    # the best of the rules the bound bounds (online-patch leaves the emulate/flip mechanism set)
    record["best_online_emulate_flip"] = best_rule["name"] if best_rule else None
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    console = Console(highlight=False)
    console.print(escape(f"{guest.name} ({guest.variant}): {record['gs_accesses']:,} %gs accesses in "
                         f"{record['same_sign_runs']:,} same-sign runs, {len(traces)} address space(s); prices per "
                         f"fault: emulate {emulate_ns / 1000:.2f} us, flip {flip_ns / 1000:.2f} us [{label}]; "
                         f"a run is worth a flip above {record['threshold']:.2f} accesses"))
    if where:
        console.print(("[yellow]" if "not on this" in where else "[dim]") + escape(where) + "[/]")
    t = Table()
    for col in ("policy", "online", "faults", "emulations", "flips", "patches", "fault time (ms)", "vs bound",
                "output"):
        t.add_column(col, justify="left" if col in ("policy", "online") else "right", overflow="fold")
    best = bound.cost_ns
    for p in [*policies, *({**record[k], "ok": True, "output_identical": None} for k in ("run_oracle", "offline_optimum"))]:
        output = "-" if p["output_identical"] is None else ("same" if p["output_identical"] else "DIFFERS")
        if not p["ok"]:
            output = "crash"
        t.add_row(escape(p["name"]), "yes" if p["online"] else "no", f"{p['faults']:,}", f"{p['emulations']:,}",
                  f"{p['flips']:,}", f"{p.get('patches', 0):,}", f"{p['fault_time_ns'] / 1e6:.2f}",
                  f"{p['fault_time_ns'] / best:.2f}x" if best else "-", output)
    console.print(t)
    patching = [p["name"] for p in policies if p["patches_code"]]
    if patching:
        console.print(escape(f"vs bound: the offline optimum bounds the policies that only emulate and flip; "
                             f"{', '.join(patching)} also rewrite(s) code, so it may go below 1.00x"))
    if negative_sites:
        console.print(escape(
            hybrid.describe_sites(negative_accesses, negative_sites, bound.faults)
            + ": where the bound's faults per site are a handful, learning a site (a probe, about one fault) "
            "costs much of what there is to save there (docs/online-strategies.md)"))
    return 0
