"""From a run's cell records to today's version of Keir's table.

For every workload x build variant x hypervisor profile: the modelled time of
each strategy relative to native (``x``), and faults (#GP traps taken) per
1,000 guest instructions. Modelled times are re-priced from the stored
counters with the chosen cost profile, so any profile -- stored, or fitted in
this run -- applies to old runs too.

The cost profile: the spec's ``cost_profile``. If that is ``fit``, or
``xen-2004`` and no stored profile has that name, it is *fitted in this run* with
:func:`tlslab.hypervisor.costmodel.fit_xen_2004` on the spec's ``[fit]``
workload (native/emulate/flip cells of that workload). The fitted workload's
row then reproduces Keir's 1.00/1.67/2.17 by construction and is marked as
the fit target: it is not evidence; the other rows are predictions.

Keir's benchmark (``Summary.keir``, :func:`keir_comparison`): the rows that
run Keir Fraser's 2004 command itself (``ls -R`` of a pinned root filesystem:
the ``keir`` workload of the default matrix) and the fit target, beside his
2004 row: emulate and flip faults, their ratio ("nearly twice" in 2004) and
modelled times under the profile in use. With a FITTED profile every row but
the fit target is an out-of-sample prediction, and is labelled so.

hw cells (the same guests on this CPU, :mod:`tlslab.bench.hwcells`) are kept
out of those rows; ``Summary.hw`` is their own table: per workload and
strategy, the modelled time under the measured ``hw-*`` profile (from the
model's counters) against the measured time, the prediction error, and the
fault counts of model and CPU (which must be equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlslab.analysis import hybrid
from tlslab.bench.store import RunDir
from tlslab.hypervisor import costmodel
from tlslab.record import MEASURED, Outcome

KEIR_RATIOS = {k: v / costmodel.KEIR_2004_MS["native"] for k, v in costmodel.KEIR_2004_MS.items()}
KEIR_2004_FAULTS = "nearly twice"   # Keir Fraser's flip/emulate fault ratio (xen-devel, October 2004)
DEBIAN_RELEASES = {"buster": "10", "bullseye": "11", "bookworm": "12", "trixie": "13"}


@dataclass
class ProfileChoice:
    profile: costmodel.CostProfile
    note: str
    fitted: bool
    fit_key: tuple | None = None      # (workload, variant, hv) the fit was made on


@dataclass
class Summary:
    run_id: str
    choice: ProfileChoice
    strategies: list[str]
    rows: list[dict]
    failures: list[dict]
    crashes: list[dict]
    skipped: list[dict]
    counts: dict
    meta: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)
    missing: int = 0
    hw: dict | None = None          # tlslab.bench.hwcells.comparison(): None if the run has no hw cells
    keir: dict | None = None        # keir_comparison(): None if the run has no Keir-benchmark row
    processes: dict | None = None   # process_comparison(): multi-process workloads (boot, threads), or None
    online: dict | None = None      # online_comparison(): policies against the offline bound, or None
    online_extra: dict = field(default_factory=dict)   # the same under each of the matrix's online_extra_prices


def _key(rec: dict) -> tuple:
    s = rec["spec"]
    return (rec["workload"], s["variant"], s["profile"])


def fit_profile(records: list[dict], fit: dict) -> tuple[costmodel.CostProfile, tuple] | None:
    guest, tree = fit.get("guest", "lsr"), fit.get("tree", "4k")
    variant, hv = fit.get("variant", "default"), fit.get("profile", "nonpae")
    by_strategy = {}
    for rec in records:
        s = rec["spec"]
        if (s["guest"], s.get("tree"), s["variant"], s["profile"]) == (guest, tree, variant, hv) \
                and rec.get("outcome") == Outcome.OK:
            by_strategy[s["strategy"]] = rec
    if not all(k in by_strategy for k in ("native", "emulate", "flip")):
        return None
    workload = by_strategy["native"]["workload"]
    try:
        p = costmodel.fit_xen_2004(by_strategy["native"]["counters"], by_strategy["emulate"]["counters"],
                                   by_strategy["flip"]["counters"], f"{workload} ({variant}, {hv})")
    except (ValueError, ZeroDivisionError):
        return None
    return p, (workload, variant, hv)


def _stored_fit_key(profile: costmodel.CostProfile, records: list[dict]) -> tuple | None:
    """The (workload, variant, hv) of this run that a stored fitted profile was fitted on, if any.

    ``fit_xen_2004``'s workload strings look like "lsr (default, sha256 afcafdd19133) on tree '4k'".
    """
    import re

    text = str(profile.provenance.get("workload") or profile.fitted_on)
    m = re.search(r"(\S+) \((\w+), sha256 ([0-9a-f]+)\) on tree '([^']+)'", text)
    if not m:
        return None
    guest, variant, sha, tree = m.groups()
    for rec in records:
        s = rec["spec"]
        if s["guest"] == guest and s["variant"] == variant and s.get("tree") == tree and s["profile"] == "nonpae" \
                and (rec.get("guest") or {}).get("sha256", "").startswith(sha):
            return (rec["workload"], variant, "nonpae")
    return None


def choose_profile(records: list[dict], name: str, fit: dict) -> ProfileChoice:
    profiles = costmodel.available_profiles()
    if name in profiles and name != "fit":
        p = profiles[name]
        if p.kind == "fitted":
            key = _stored_fit_key(p, records)
            where = "; its fit workload is the row marked (fit target): it reproduces the targets by " \
                    "construction and is not evidence, the other rows are predictions" if key else ""
            return ProfileChoice(p, f"cost profile {p.label()} (stored, FITTED){where}", True, key)
        return ProfileChoice(p, f"cost profile {p.label()} (stored)", False)
    if name in ("xen-2004", "fit"):  # "fit": always fit in this run, even if a stored xen-2004 exists
        fitted = fit_profile(records, fit)
        if fitted:
            p, key = fitted
            return ProfileChoice(p, f"cost profile {p.name}: FITTED in this run to Keir Fraser's 2004 table "
                                    f"(180/300/390 ms) on {p.fitted_on.split(' on ', 1)[1]}; that row reproduces "
                                    "the table by construction (not evidence), the other rows are predictions",
                                 True, key)
        p = costmodel.NOMINAL
        return ProfileChoice(p, "cost profile xen-2004 could not be fitted (no ok native/emulate/flip cells of the "
                                f"[fit] workload {fit or '(lsr, 4k)'}); using {p.label()}: weighted instruction "
                                "counts, not times", False)
    p = costmodel.NOMINAL
    return ProfileChoice(p, f"cost profile {name!r} is unknown here; using {p.label()}", False)


def split_online_extra(records: list[dict], spec: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """(main records, {prices: records}): the online strategies' cells that decided with one of the matrix's
    ``online_extra_prices`` (run.json) go apart; every table but their own online table uses the main ones."""
    from tlslab.hypervisor.strategies import is_online

    extra_prices = list(spec.get("online_extra_prices") or [])
    main, extra = [], {p: [] for p in extra_prices}   # in the matrix's order, not the records'
    for rec in records:
        prices = rec["spec"].get("prices")
        if prices in extra and is_online(rec["spec"]["strategy"]):
            extra[prices].append(rec)
        else:
            main.append(rec)
    return main, extra


def summarize(run: RunDir, profile_name: str | None = None) -> Summary:
    from tlslab.bench import hwcells
    from tlslab.hypervisor.strategies import online_names

    info = run.read_run()
    all_records = list(run.latest().values())
    records = [r for r in all_records if not hwcells.is_hw(r)]     # the model's cells: the rows below
    spec = info.get("spec", {})
    choice = choose_profile(records, profile_name or spec.get("cost_profile", "nominal"), spec.get("fit", {}))
    all_cells = info.get("cells", [])
    cells = [c for c in all_cells if c.get("backend", "unicorn") == "unicorn"]
    strategies: list[str] = []
    order: list[tuple] = []
    for c in cells:
        s = c["spec"]
        if s["strategy"] not in strategies:
            strategies.append(s["strategy"])
        k = (c["workload"], s["variant"], s["profile"])
        if k not in order:
            order.append(k)
    for rec in records:  # records of cells not in run.json (should not happen) still show
        k = _key(rec)
        if k not in order:
            order.append(k)
        if rec["spec"]["strategy"] not in strategies:
            strategies.append(rec["spec"]["strategy"])

    # online cells deciding with one of the matrix's extra price profiles are judged in tables of their own
    main_records, extra_records = split_online_extra(records, spec)
    online = set(online_names())
    grouped: dict[tuple, dict[str, dict]] = {k: {} for k in order}
    for rec in main_records:
        grouped[_key(rec)][rec["spec"]["strategy"]] = rec
    extra: dict[str, dict[tuple, dict[str, dict]]] = {}
    for prices, recs in extra_records.items():
        for rec in recs:
            extra.setdefault(prices, {}).setdefault(_key(rec), {})[rec["spec"]["strategy"]] = rec

    rows = []
    for key in order:
        by = grouped[key]
        native = by.get("native")
        native_ns = None
        if native and native.get("outcome") == Outcome.OK:
            native_ns = costmodel.predict(choice.profile, native["counters"]).total_ns
        any_rec = next(iter(by.values()), None)
        row = {"workload": key[0], "variant": key[1], "hv_profile": key[2],
               "native_ms": native_ns / 1e6 if native_ns else None,
               "fit_target": key == choice.fit_key, "cells": {},
               "keir": bool(any_rec and is_keir_benchmark(any_rec["spec"])),
               "rootfs": next((r["rootfs"] for r in by.values() if r.get("rootfs")), None)}
        for strat in strategies:
            rec = by.get(strat)
            if rec is None:
                row["cells"][strat] = {"outcome": "missing"}
                continue
            cell = {"outcome": rec.get("outcome"), "reason": rec.get("reason"), "cell": rec["cell"]}
            counters = rec.get("counters")
            if counters and rec.get("outcome") in MEASURED:
                ns = costmodel.predict(choice.profile, counters).total_ns
                instr = counters.get("instructions", 0)
                traps = rec["faults"]          # the record's common fault count (tlslab.record)
                cell.update({
                    "ms": ns / 1e6,
                    "ratio": (ns / native_ns) if native_ns and rec.get("outcome") == Outcome.OK else None,
                    "instructions": instr,
                    "traps": traps,
                    "faults_per_k": 1000.0 * traps / instr if instr else None,
                    "negative": counters.get("segments", {}).get("gs", {}).get("negative", 0),
                    "sign_changes": counters.get("segments", {}).get("gs", {}).get("sign_changes", 0),
                    "wall_seconds": rec.get("wall_seconds"),
                })
                if native and native.get("outcome") == Outcome.OK and rec.get("outcome") == Outcome.OK:
                    cell["output_matches"] = rec["stdout"]["sha256"] == native["stdout"]["sha256"]
            if rec.get("crash"):
                cell["crash"] = rec["crash"]
            row["cells"][strat] = cell
        em, fl = row["cells"].get("emulate", {}), row["cells"].get("flip", {})
        row["flip_over_emulate_faults"] = (fl["traps"] / em["traps"]) if em.get("traps") and fl.get("traps") is not None \
            and em.get("outcome") == Outcome.OK and fl.get("outcome") == Outcome.OK else None
        rows.append(row)

    failures = [r for r in all_records if r.get("outcome") == Outcome.FAILED]
    crashes = [r for r in records if r.get("outcome") == Outcome.GUEST_CRASH]
    skipped = [r for r in all_records if r.get("outcome") == Outcome.SKIPPED]
    counts: dict[str, int] = {}
    for r in all_records:
        key = r.get("outcome", "?") + (" (hw)" if hwcells.is_hw(r) else "")
        counts[key] = counts.get(key, 0) + 1
    cell_ids = {c["id"] for c in all_cells}
    missing = len(cell_ids - {r["cell"] for r in all_records})
    hw = hwcells.comparison(all_records, choice)
    if hw and hw.get("profile"):
        hw = honest_provenance(hw, all_records)
    online_extra: dict[str, dict | None] = {}
    for prices, by_key in extra.items():
        try:
            profile = costmodel.get_profile(prices)
        except ValueError:
            online_extra[prices] = None   # a profile this machine does not have: said, not dropped
            continue
        merged = {k: {**{n: r for n, r in grouped[k].items() if n not in online}, **by_key.get(k, {})}
                  for k in order}
        online_extra[prices] = online_comparison(order, merged, profile)
    return Summary(info.get("run_id", run.id), choice, strategies, rows, failures, crashes, skipped, counts,
                   info.get("meta", {}), spec, missing, hw,
                   keir_comparison(rows, choice, all_cells, skipped), process_comparison(main_records),
                   online_comparison(order, grouped, choice.profile), online_extra)


BOUND_POLICIES = ("emulate", "flip")   # the two 2004 mechanisms every online strategy must beat


BEST_ONLINE = "best online strategy per workload (chosen after the fact)"
BEST_EMULATE_FLIP = "best online emulate/flip rule per workload (chosen after the fact; no patching)"
BOUND_NOTE = ("1.00x = the offline-optimal emulate/flip hybrid (knows the future: no policy that only emulates "
              "and flips can beat it; a policy that patches code, online-patch, can: a patched site never faults "
              "again)")


def probe_cost_ns(profile, rec: dict) -> tuple[int, float | None]:
    """(probes, ns): an estimate of what a probing strategy's probes cost beyond taking, at each probe's
    first fault, the decision its measurement led to (ProbeStrategy, tlslab.hypervisor.strategies.online).

    A probe that ends at an access of the other sign (``probe-end``: the run was short, emulating it was
    right) cost one more trap and decode and two descriptor writes (the empty descriptor in, the slot's
    own back). A probe that reaches the cap (``probe-flip``: the run was long, flipping at once was right)
    cost cap - 1 emulated faults and the empty descriptor's write; cap = int(2F/E) + 1 from the prices
    the cell decided with. Any other probe (ended unseen by a TLS reload) is priced at its one write.
    ``profile`` prices the counts. ns is None where the cell's decision prices are unknown here.
    """
    from tlslab.hypervisor.strategies.online import PriceOptions

    kinds = rec["counters"].get("strategy", {}).get("by_kind", {})
    probes = kinds.get("probe", 0)
    if not probes:
        return 0, 0.0
    s = rec["spec"]
    try:
        e, f = PriceOptions(s.get("prices") or "hw-vm", s.get("emulate_ns") or 0.0,
                            s.get("flip_ns") or 0.0).fault_prices()
    except ValueError:
        return probes, None
    cap = int(2 * f / e) + 1
    price = {k: getattr(profile, k, 0.0) for k in ("trap_ns", "decode_ns", "descriptor_write_ns",
                                                    "emulated_access_ns")}
    fault = price["trap_ns"] + price["decode_ns"]
    write = price["descriptor_write_ns"]
    ended, flipped = kinds.get("probe-end", 0), kinds.get("probe-flip", 0)
    ns = (ended * (fault + 2 * write) + flipped * ((cap - 1) * (fault + price["emulated_access_ns"]) + write)
          + max(0, probes - ended - flipped) * write)
    return probes, ns


def walk_cost_ns(profile, rec: dict) -> tuple[int, float]:
    """(instructions decoded ahead, what they and the memo's reuses cost under ``profile``) for a cell of a
    strategy that decodes ahead of faults (online-lookahead; (0, 0.0) for any other)."""
    kinds = rec["counters"].get("strategy", {}).get("by_kind", {})
    instructions, reuses = kinds.get("lookahead-instructions", 0), kinds.get("lookahead-reused", 0)
    return instructions, (instructions * getattr(profile, "lookahead_ns", 0.0)
                          + reuses * getattr(profile, "lookahead_reuse_ns", 0.0))


def shortfall(row: dict, bound: dict, by: dict, online: list[str], profile) -> dict | None:
    """Why no online strategy reaches the acceptance marks on this workload, in a few numbers (None where
    the best one is at most min(emulate, flip) and within 10% of the bound).

    ``to_win``: min(emulate, flip) over the bound, minus 1: all any policy could gain over the better
    2004 mechanism (None if emulate or flip did not run to the end). ``run_oracle``: the run-length
    oracle over the bound (tlslab.analysis.hybrid: the threshold rule online-probe approximates, given
    each run's exact length as the run starts; the distance to 1.00x is what the rule leaves, the
    optimum depending on runs further ahead). ``learning``: per strategy that probes, the estimated
    extra cost of its probes over the bound (``probe_cost_ns``). ``walking``: per strategy that decodes
    ahead, what its walks cost over the bound and where it would be without them (``walk_cost_ns``).
    ``none_ran``: no online strategy ran
    to the end with native's output. ``negative_accesses``/``negative_sites``: native's negative %gs
    accesses and the sites making them (their ratio is how often a rule meets each site it could learn
    about: a program with a few faults per site cannot repay learning).
    """
    if not bound["fault_time_ns"]:
        return None
    # the emulate/flip rules' shortfall: a patching policy below the bound says nothing about them
    best = row["cells"].get(row["best_emulate_flip"]) if row["best_emulate_flip"] else None
    if best is not None and best["vs_bound"] is not None and best["at_most_best_pure"] and best["vs_bound"] <= 1.10:
        return None
    oracle = bound.get("run_oracle")
    negative_accesses, negative_sites = hybrid.negative_gs_sites((by.get("native") or {}).get("sites"))
    learning, walking = {}, {}
    for name in online:
        rec = by.get(name)
        if rec is None or (row["cells"].get(name) or {}).get("fault_ms") is None:
            continue
        probes, ns = probe_cost_ns(profile, rec)
        if probes:
            learning[name] = {"probes": probes, "vs_bound": ns / bound["fault_time_ns"] if ns is not None else None}
        instructions, ns = walk_cost_ns(profile, rec)
        if instructions:
            walking[name] = {"instructions": instructions, "vs_bound": ns / bound["fault_time_ns"],
                             "without": row["cells"][name]["vs_bound"] - ns / bound["fault_time_ns"]}
    return {"to_win": (row["best_pure_ms"] * 1e6 / bound["fault_time_ns"] - 1
                       if row["best_pure_ms"] is not None else None),
            "run_oracle": oracle["fault_time_ns"] / bound["fault_time_ns"] if oracle else None,
            "learning": learning, "walking": walking, "none_ran": best is None or best["vs_bound"] is None,
            # how often a rule meets each site it could learn about: under emulate, every negative %gs
            # access faults, so this is faults per faulting site (native's per-site counters)
            "negative_accesses": negative_accesses, "negative_sites": negative_sites}


def fmt_shortfall(row: dict) -> str:
    """One line: the numbers of ``shortfall`` for a workload."""
    why = row["why"]
    parts = []
    if why.get("none_ran"):
        parts.append("no online strategy ran to the end with native's output")
    if why["to_win"] is not None:
        parts.append(f"min(emulate, flip) is {why['to_win'] + 1:.2f}x the bound")
    if why["run_oracle"] is not None:
        parts.append(f"the threshold rule, knowing each run's length, {why['run_oracle']:.2f}x")
    for name, cost in why["learning"].items():
        if cost["vs_bound"] is not None:
            parts.append(f"{name}'s {cost['probes']:,} probes cost about {cost['vs_bound']:.2f}x")
    for name, cost in why.get("walking", {}).items():
        parts.append(f"{name}'s walks ({cost['instructions']:,} instructions decoded ahead) cost "
                     f"{cost['vs_bound']:.2f}x, {cost['without']:.2f}x without them")
    if why.get("negative_sites"):
        parts.append(hybrid.describe_sites(why["negative_accesses"], why["negative_sites"], row["bound_faults"]))
    return f"{row['workload']} ({row['variant']}): " + "; ".join(parts)


def online_comparison(order: list[tuple], grouped: dict, profile: costmodel.CostProfile) -> dict | None:
    """Per workload: each fault-driven policy's fault-handling time against the offline bound.

    The bound is the native cell's ``offline_optimum`` under ``profile``
    (tlslab.analysis.hybrid: it knows the future). A policy counts only where
    its cell ran to the end with native's output. None if the run has no
    online strategy or no bound.
    """
    from tlslab.hypervisor.strategies import online_names, patches_code

    online = online_names()
    emulate_flip = [n for n in online if not patches_code(n)]   # the rules the bound bounds
    policies = [*BOUND_POLICIES, *online]
    rows = []
    decided_with = set()   # the prices the online cells decided with (the table's title says which)
    for key in order:
        by = grouped[key]
        native = by.get("native")
        bound = ((native or {}).get("offline_optimum") or {}).get("by_profile", {}).get(profile.name)
        if not bound or not any(n in by for n in online):
            continue
        cells = {}
        for name in policies:
            rec = by.get(name)
            if rec is None:
                continue
            same = (rec.get("outcome") == "ok" and native.get("outcome") == "ok"
                    and rec["stdout"]["sha256"] == native["stdout"]["sha256"])
            ns = costmodel.fault_handling_ns(profile, rec["counters"]) if same else None
            if name in online and rec.get("spec", {}).get("prices"):
                decided_with.add(rec["spec"]["prices"])
            cells[name] = {"fault_ms": ns / 1e6 if ns is not None else None,
                           "vs_bound": (ns / bound["fault_time_ns"]) if ns is not None and bound["fault_time_ns"]
                           else (1.0 if ns == 0 else None),
                           "faults": rec["counters"].get("strategy", {}).get("traps") if same else None,
                           # a run that ended but printed something else than native is "!out", as in the
                           # main table (it does not count)
                           "outcome": ("!out" if rec.get("outcome") == "ok" and native.get("outcome") == "ok"
                                       and not same else rec.get("outcome"))}
        pure = [cells[n]["fault_ms"] for n in BOUND_POLICIES if cells.get(n, {}).get("fault_ms") is not None]
        best_pure = min(pure) if len(pure) == len(BOUND_POLICIES) else None
        for name in online:   # the acceptance question per cell: at most the better 2004 mechanism?
            c = cells.get(name)
            if c is not None:
                c["at_most_best_pure"] = (best_pure is not None and c["fault_ms"] is not None
                                          and c["fault_ms"] <= best_pure * (1 + 1e-9))
        ranked = sorted((cells[n]["fault_ms"], n) for n in online if cells.get(n, {}).get("fault_ms") is not None)
        ranked_ef = [(ms, n) for ms, n in ranked if n in emulate_flip]
        row = {"workload": key[0], "variant": key[1], "hv_profile": key[2], "cells": cells,
               "bound_ms": bound["fault_time_ns"] / 1e6, "bound_faults": bound["faults"],
               "best_pure_ms": best_pure, "best_online": ranked[0][1] if ranked else None,
               "best_emulate_flip": ranked_ef[0][1] if ranked_ef else None}
        row["why"] = shortfall(row, bound, by, emulate_flip, profile)
        rows.append(row)
    if not rows:
        return None
    tally = {}
    for name in online:
        done = [r for r in rows if r["cells"].get(name, {}).get("fault_ms") is not None]
        tally[name] = {
            "workloads": len(done),
            "at_most_best_pure": sum(1 for r in done if r["cells"][name]["at_most_best_pure"]),
            "within_10pct_of_bound": sum(1 for r in done if r["cells"][name]["vs_bound"] is not None
                                         and r["cells"][name]["vs_bound"] <= 1.10),
            "patches_code": name not in emulate_flip,
        }
    # the acceptance question is about the best online strategy per workload: chosen after the
    # fact, so it is a tally, not a policy any hypervisor could run; once with the emulate/flip rules only
    # (the policies the bound bounds), once with every online strategy (patching ones too)
    ran_patching = any(r["cells"].get(n) is not None for r in rows for n in online if n not in emulate_flip)
    for label, names, best_key in ((BEST_EMULATE_FLIP, emulate_flip, "best_emulate_flip"),
                                   (BEST_ONLINE, online, "best_online")):
        if label == BEST_EMULATE_FLIP and not ran_patching:
            continue   # no patching strategy ran: one tally says it all
        ran = [r for r in rows if r[best_key] is not None]
        best = [r["cells"][r[best_key]] for r in ran]
        tally[label] = {
            "workloads": len(ran),
            "at_most_best_pure": sum(1 for r in ran if any(r["cells"].get(n, {}).get("at_most_best_pure")
                                                             for n in names)),
            "within_10pct_of_bound": sum(1 for c in best if c["vs_bound"] is not None and c["vs_bound"] <= 1.10),
            "patches_code": names != emulate_flip and ran_patching,
        }
    return {"profile": profile.name, "label": profile.label(), "policies": policies, "online": online,
            "rows": rows, "tally": tally, "decided_with": sorted(decided_with)}


def fmt_tally(name: str, tally: dict) -> str:
    """One tally line: the two acceptance marks (a patching policy's is against a bound that does not bound it)."""
    below = (" (it patches code: the emulate/flip bound does not bound it, 1.10x is a ceiling, not a distance)"
             if tally.get("patches_code") else "")
    return (f"{name}: at most min(emulate, flip) on {tally['at_most_best_pure']} of {tally['workloads']} "
            f"workloads; at most 1.10x the bound on {tally['within_10pct_of_bound']} of {tally['workloads']}{below}")


# --------------------------------------------------------------------------- where a profile was measured

def _host_key(name: str | None) -> str | None:
    import re

    return (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) or "host") if name else None


def profile_origin(prof: costmodel.CostProfile) -> tuple[str | None, str | None]:
    """(host, CPU model) a measured profile was measured on: from its provenance (calibrate records both
    since they were compared), else its raw timings file, else its description; None where unknown."""
    import json
    import re

    pv = prof.provenance or {}
    host, cpu = pv.get("host"), pv.get("cpu_model")
    if (not host or not cpu) and pv.get("raw"):
        for base in (costmodel.user_profile_dir(), costmodel.PROFILE_DIR):
            try:
                raw = json.loads((base / str(pv["raw"])).read_text())
            except (OSError, ValueError, TypeError):
                continue
            host, cpu = host or raw.get("host"), cpu or raw.get("cpu_model")
            break
    if not host or not cpu:
        m = re.search(r"calibrate on (\S+) \((.+?), Linux", prof.description or "")
        if m:
            host, cpu = host or m.group(1), cpu or m.group(2)
    if not host and prof.name.startswith("hw-"):
        host = prof.name.removeprefix("hw-")
    return host, cpu


def this_machine() -> tuple[str, str]:
    """(host, CPU model) of this machine, as records and calibrate name them."""
    import socket

    from tlslab.bench.runner import cpu_model

    return socket.gethostname(), cpu_model()


def same_machine(prof: costmodel.CostProfile, host: str | None, cpu: str | None) -> tuple[bool, str]:
    """Whether runs on (host, cpu) are on the machine ``prof`` was measured on -- host name AND CPU model
    must agree (a host name alone says little: "vm", "localhost") -- and one sentence saying so."""
    p_host, p_cpu = profile_origin(prof)
    if host and cpu and p_host and p_cpu and _host_key(host) == _host_key(p_host) and cpu == p_cpu:
        return True, (f"the hw cells ran on the host and CPU model the profile was measured on ({host}, {cpu}), "
                      "so this is a consistency check of the cost model's linearity (counters x per-event "
                      "prices), not an independent validation")
    if host and p_host and _host_key(host) == _host_key(p_host):
        verdict = ("a different machine under the same host name" if cpu and p_cpu
                   else "not known to be the same machine")
        return False, (f"the hw cells ran on a host also named {host} but on {cpu or 'an unrecorded CPU'}, and "
                       f"{prof.name} was measured on {p_cpu or 'an unrecorded CPU'}: {verdict}, so absolute "
                       "errors include the machines' difference")
    return False, (f"the hw cells ran on host {host or '?'} ({cpu or 'CPU not recorded'}), {prof.name} was "
                   f"measured on {p_host or '?'} ({p_cpu or 'CPU not recorded'}): a different machine, so absolute "
                   "errors include the machines' difference")


def honest_provenance(hw: dict, records: list[dict]) -> dict:
    """The hw comparison with its provenance sentence decided on host name and CPU model."""
    prof = costmodel.available_profiles().get(hw["profile"])
    if prof is None:
        return hw
    metas = [r.get("meta", {}) for r in records if r.get("backend") == "hw" and r.get("outcome") == Outcome.OK]
    meta = metas[0] if metas else {}
    same, sentence = same_machine(prof, meta.get("hostname") or hw.get("host"), meta.get("cpu_model"))
    text = hw.get("profile_provenance") or ""
    for cut in ("; the hw cells ran on",):
        if cut in text:
            text = text[: text.index(cut)]
    return {**hw, "profile_provenance": f"{text}; {sentence}" if text else sentence, "same_machine": same}


# --------------------------------------------------------------------------- Keir's benchmark

def is_keir_benchmark(spec: dict) -> bool:
    """Keir Fraser's 2004 command: ``ls -R`` of a pinned root filesystem (a program of the root)."""
    guest = str(spec.get("guest") or "")
    return bool(spec.get("rootfs")) and guest.startswith("/") and guest.rsplit("/", 1)[-1] == "ls" \
        and "-R" in (spec.get("args") or ())


def _upstream(version: str | None) -> str:
    """Debian version -> upstream: '2.36-9+deb12u14' -> '2.36', '1:2.5.1-4' -> '2.5.1'."""
    if not version:
        return "?"
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


def keir_caption(workload: str, facts: dict | None, args: list[str] | tuple = ()) -> str:
    """One line: what the keir workload is (from the root filesystem facts its cells recorded)."""
    if not facts:
        return f"{workload}: ls -R of a pinned root filesystem (ran no cell here: no facts recorded)"
    pk = facts.get("packages") or {}
    suite = facts.get("suite", "?")
    release = f"Debian {DEBIAN_RELEASES[suite]} ({suite})" if suite in DEBIAN_RELEASES else f"Debian {suite}"
    entries = facts.get("arg_entries") or {}
    listed = next((a for a in args if a in entries), None) or next(iter(entries), None)
    what = f"{listed} of the pinned {facts.get('arch', 'i386')} root ({entries[listed]:,} entries)" if listed \
        else f"the pinned {facts.get('arch', 'i386')} root"
    return (f"{workload}: {release} coreutils {_upstream(pk.get('coreutils'))} ls -R, dynamically linked, "
            f"glibc {_upstream(pk.get('libc6'))} (NPTL), listing {what}; Keir Fraser's 2004 command, run today")


def keir_comparison(rows: list[dict], choice: ProfileChoice, cells: list[dict] | None = None,
                    skipped: list[dict] | None = None) -> dict | None:
    """Keir's 2004 row beside today's: the Keir-benchmark rows and the fit target (faults, ratio, ms)."""
    keir_cells = [c for c in cells or [] if c.get("backend", "unicorn") == "unicorn" and is_keir_benchmark(c["spec"])]
    picked = [r for r in rows if r.get("keir") or r.get("fit_target")]
    if not keir_cells and not any(r.get("keir") for r in picked):
        return None
    prof = choice.profile
    fit_name = next((r["workload"] for r in rows if r.get("fit_target")), None) or _fitted_on(prof)
    out_rows = []
    for r in sorted(picked, key=lambda r: not r.get("keir")):
        c = r["cells"]
        em, fl, nat = c.get("emulate", {}), c.get("flip", {}), c.get("native", {})
        if r.get("fit_target"):
            role = "fit target (Keir's times by construction)"
        elif choice.fitted:
            role = f"out-of-sample prediction (FITTED on {fit_name or 'another workload'})"
        else:
            role = f"priced with {prof.label()}"
        args = next((cc["spec"].get("args") for cc in keir_cells if cc["workload"] == r["workload"]), ())
        out_rows.append({
            "workload": r["workload"], "variant": r["variant"], "hv_profile": r["hv_profile"],
            "keir": r.get("keir", False), "fit_target": r.get("fit_target", False), "role": role,
            "instructions": next((x.get("instructions") for x in (nat, em, fl) if x.get("instructions")), None),
            "emulate_faults": em.get("traps") if em.get("outcome") == Outcome.OK else None,
            "flip_faults": fl.get("traps") if fl.get("outcome") == Outcome.OK else None,
            "flip_over_emulate": r.get("flip_over_emulate_faults"),
            "native_ms": r.get("native_ms"),
            "emulate_ms": em.get("ms") if em.get("outcome") == Outcome.OK else None,
            "flip_ms": fl.get("ms") if fl.get("outcome") == Outcome.OK else None,
            "emulate_x": em.get("ratio"), "flip_x": fl.get("ratio"),
            "outcomes": {k: c.get(k, {}).get("outcome", "missing") for k in ("native", "emulate", "flip")},
            "caption": keir_caption(r["workload"], r.get("rootfs"), args) if r.get("keir") else None,
        })
    skip = next((s for s in skipped or [] if is_keir_benchmark(s.get("spec") or {})), None)
    return {
        "profile": prof.name, "profile_label": prof.label(), "fitted": choice.fitted, "fit_workload": fit_name,
        "keir_2004": {"native_ms": costmodel.KEIR_2004_MS["native"], "emulate_ms": costmodel.KEIR_2004_MS["emulate"],
                      "flip_ms": costmodel.KEIR_2004_MS["flip"], "emulate_x": KEIR_RATIOS["emulate"],
                      "flip_x": KEIR_RATIOS["flip"], "flip_over_emulate": KEIR_2004_FAULTS},
        "rows": out_rows,
        "skipped": skip.get("reason") if skip else None,
        "note": keir_note(choice, fit_name),
    }


def _fitted_on(prof: costmodel.CostProfile) -> str | None:
    """'lsr (default, sha256 afcafdd19133) on tree '4k'' from a fitted profile's description, or None."""
    text = str(prof.provenance.get("workload") or prof.fitted_on or "")
    return text.split(") on ", 1)[-1] if text.startswith("Keir") else (text or None)


def keir_note(choice: ProfileChoice, fit_name: str | None) -> str:
    prof = choice.profile
    if choice.fitted:
        return (f"ms: modelled under {prof.name}, FITTED to Keir's three times on {fit_name or 'its fit workload'}; "
                "on keir (Keir's own command, run today) it is an out-of-sample prediction, not a measurement")
    return f"ms: modelled under {prof.label()}"


# --------------------------------------------------------------------------- many processes

KEIR_2004_BOOT_FAULTS = 2_500_000  # "about 2.5 million" flips/emulations to boot a minimal Fedora Core (Keir, 2004)


def process_comparison(records: list[dict]) -> dict | None:
    """Workloads of several processes or threads: faults per strategy, per process, beside Keir's boot count."""
    rows = []
    for rec in records:
        kernel = (rec.get("counters") or {}).get("kernel")
        if not kernel or rec.get("outcome") not in MEASURED:
            continue
        listing = kernel.get("listing") or []
        faults = rec["faults"]
        n = max(1, len(listing))
        rows.append({
            "workload": rec["workload"], "variant": rec["spec"]["variant"], "strategy": rec["spec"]["strategy"],
            "outcome": rec.get("outcome"), "processes": kernel.get("processes"), "threads": kernel.get("threads"),
            "faults": faults, "faults_per_process": faults / n, "tls_reloads": kernel.get("tls_reloads"),
            "instructions": rec["counters"].get("instructions"),
            "busiest": sorted(({"program": p["program"], "faults": p["faults"]} for p in listing),
                              key=lambda x: -x["faults"])[:3],
        })
    if not rows:
        return None
    rows.sort(key=lambda r: (r["workload"], r["variant"], r["strategy"]))
    return {"keir_2004_boot_faults": KEIR_2004_BOOT_FAULTS, "rows": rows,
            "note": ("Keir Fraser (xen-devel, October 2004): booting a minimal Fedora Core took about 2.5 million "
                     "flips/emulations; a 2004 boot ran a few thousand processes, ours a few hundred")}


# --------------------------------------------------------------------------- rendering

def fmt_ratio(cell: dict) -> str:
    o = cell.get("outcome")
    if o == Outcome.OK:
        r = cell.get("ratio")
        text = f"{r:.2f}x" if r is not None else "?"
        if cell.get("output_matches") is False:
            text += " !out"
        return text
    if o == Outcome.GUEST_CRASH:
        return "crash"
    if o == Outcome.FAILED:
        return "FAILED"
    if o == Outcome.SKIPPED:
        return "skip"
    return "-"


def fmt_faults(cell: dict) -> str:
    o = cell.get("outcome")
    f = cell.get("faults_per_k")
    if o in MEASURED and f is not None:
        return f"{f:.2f}" + ("" if o == Outcome.OK else " (crash)")
    return fmt_ratio(cell) if o != Outcome.OK else "-"


def render(summary: Summary, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    if console.width < NARROW:
        return render_narrow(summary, console)
    st = summary.strategies
    console.print(f"[bold]{escape(summary.choice.note)}[/]")
    t = Table(title=escape(f"modelled time relative to native (x) -- run {summary.run_id}"), header_style="bold",
              caption="crash: the strategy refused a fault and the guest got SIGSEGV (a measurement, see `tlslab "
                      "faults`); !out: output differs from native; FAILED: the cell did not run (see failures)")
    t.add_column("workload")
    t.add_column("build")
    t.add_column("native ms", justify="right")
    for s in st:
        if s != "native":
            t.add_column(s, justify="right")
    t.add_column("flip/emul faults", justify="right")
    for row in summary.rows:
        name = escape(row["workload"]) + (" (fit target)" if row["fit_target"] else "")
        if row["hv_profile"] != "nonpae":
            name += escape(f" [{row['hv_profile']}]")
        cells = []
        for s in st:
            if s == "native":
                continue
            c = row["cells"][s]
            text = fmt_ratio(c)
            style = {Outcome.GUEST_CRASH: "yellow", Outcome.FAILED: "bold red", Outcome.SKIPPED: "dim"}.get(c.get("outcome"), "")
            cells.append(f"[{style}]{text}[/]" if style else text)
        fr = row["flip_over_emulate_faults"]
        t.add_row(name, row["variant"], f"{row['native_ms']:.1f}" if row["native_ms"] else fmt_ratio(row["cells"].get("native", {})),
                  *cells, f"{fr:.2f}" if fr is not None else "-")
    keir = [f"{KEIR_RATIOS[s]:.2f}x" if s in KEIR_RATIOS else "" for s in st if s != "native"]
    t.add_row("[italic]Keir 2004: ls -R /usr/lib[/]", "[italic]Xen[/]", "180.0", *keir, "~2 (\"nearly twice\")",
              style="dim")
    console.print(t)
    render_keir(summary, console)
    render_processes(summary, console)
    render_online(summary, console)

    f = Table(title="faults (#GP traps) per 1,000 guest instructions", header_style="bold")
    f.add_column("workload")
    f.add_column("build")
    f.add_column("instructions", justify="right")
    for s in st:
        if s != "native":
            f.add_column(s, justify="right")
    for row in summary.rows:
        instr = next((c.get("instructions") for c in row["cells"].values() if c.get("outcome") == Outcome.OK), None)
        f.add_row(escape(row["workload"]), row["variant"], f"{instr:,}" if instr else "-",
                  *[fmt_faults(row["cells"][s]) for s in st if s != "native"])
    console.print(f)

    render_hw(summary, console)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items()))
    console.print(escape(f"cells: {counts}") + (f", {summary.missing} not run yet (resume the run)"
                                                if summary.missing else ""))
    for r in summary.failures:
        console.print(f"[bold red]FAILED[/] {escape(r['label'])}: {escape(str(r.get('reason')))}")
    meta = summary.meta
    if meta:
        console.print("[dim]" + escape(f"tlslab {meta.get('tlslab_version')} @ {str(meta.get('git_commit') or '?')[:12]}"
                      f"{' (dirty)' if meta.get('git_dirty') else ''}, Python {meta.get('python_version')}, "
                      f"unicorn {meta.get('unicorn_version')}{_counter_note(meta)}, capstone {meta.get('capstone_version')}, "
                      f"{meta.get('cpu_model')} ({meta.get('cpu_count')} CPUs), host {meta.get('hostname')}") + "[/]")


def _counter_note(meta: dict) -> str:
    """How the run's Unicorn counted instructions (older runs did not record it)."""
    library = meta.get("unicorn_library")
    if not library:
        return ""
    return " (tlslab build, inline counter)" if "inline block counter" in library else " (stock library, block hook)"


NARROW = 120   # columns below which the summary is printed one table per build (render_narrow)

#: strategy column headers at narrow widths
SHORT = {"emulate": "emul", "emulate-2004": "em04", "flip": "flip", "flip-full": "flipF", "flip-fs": "flipfs",
         "rewrite": "rewr", "rewrite-2004": "rw04", "native": "nat", "online-site": "onS", "online-rate": "onR",
         "online-probe": "onP", "online-lookahead": "onL", "online-patch": "onX"}


def render_narrow(summary: Summary, console) -> None:
    """The summary for a terminal narrower than NARROW columns (80): one table per strategy group with
    abbreviated headers (legend below), workloads wrapped, every figure whole; the full tables are in
    RUN/summary.txt."""
    from rich.markup import escape
    from rich.table import Table

    st = [s for s in summary.strategies if s != "native"]
    console.print(f"[bold]{escape(summary.choice.note)}[/]")
    per = max(1, (console.width - 34) // 8)      # strategy columns that fit beside workload/build/native
    groups = [st[i:i + per] for i in range(0, len(st), per)] or [[]]
    for k, group in enumerate(groups):
        t = Table(title=f"modelled time / native (x), run {summary.run_id}" +
                  (f" ({k + 1}/{len(groups)})" if len(groups) > 1 else ""), header_style="bold", pad_edge=False)
        t.add_column("workload", overflow="fold", ratio=1, min_width=12)
        t.add_column("build", overflow="fold", max_width=8)
        t.add_column("nat ms", justify="right", no_wrap=True)
        for s in group:
            t.add_column(escape(SHORT.get(s, s[:6])), justify="right", no_wrap=True)
        for row in summary.rows:
            name = escape(row["workload"]) + (" (fit)" if row["fit_target"] else "")
            if row["hv_profile"] != "nonpae":
                name += escape(f" [{row['hv_profile']}]")
            cells = []
            for s in group:
                c = row["cells"][s]
                text = fmt_ratio(c)
                style = {Outcome.GUEST_CRASH: "yellow", Outcome.FAILED: "bold red", Outcome.SKIPPED: "dim"}.get(c.get("outcome"), "")
                cells.append(f"[{style}]{text}[/]" if style else text)
            native = f"{row['native_ms']:.1f}" if row["native_ms"] else fmt_ratio(row["cells"].get("native", {}))
            t.add_row(name, escape(row["variant"]), native, *cells)
        keir = [f"{KEIR_RATIOS[s]:.2f}x" if s in KEIR_RATIOS else "" for s in group]
        t.add_row("[italic]Keir 2004[/]", "[italic]Xen[/]", "180.0", *keir, style="dim")
        console.print(t)
    legend = ", ".join(f"{SHORT.get(s, s[:6])} = {s}" for s in st if SHORT.get(s, s[:6]) != s)
    if legend:
        console.print(f"[dim]{escape(legend)}; crash: SIGSEGV under the strategy; !out: output differs; "
                      "FAILED: did not run[/]")
    f = Table(title="faults per 1,000 instructions; flip/emulate faults", header_style="bold", pad_edge=False)
    f.add_column("workload", overflow="fold", ratio=1, min_width=12)
    f.add_column("build", overflow="fold", max_width=8)
    for s in ("emulate", "flip"):
        if s in st:
            f.add_column(SHORT[s], justify="right", no_wrap=True)
    f.add_column("flip/emul", justify="right", no_wrap=True)
    for row in summary.rows:
        fr = row["flip_over_emulate_faults"]
        f.add_row(escape(row["workload"]), escape(row["variant"]),
                  *[fmt_faults(row["cells"][s]) for s in ("emulate", "flip") if s in st],
                  f"{fr:.2f}" if fr is not None else "-")
    console.print(f)
    if summary.keir:
        k = summary.keir
        for r in k["rows"]:
            fr = r["flip_over_emulate"]
            console.print(escape(f"keir: {r['workload']} ({r['variant']}): emulate {fmt_count(r['emulate_faults'])}"
                                 f" faults, flip {fmt_count(r['flip_faults'])}"
                                 + (f" ({fr:.2f}x; 2004: nearly twice)" if fr is not None else "")
                                 + f"; {r['role']}"))
    if summary.online:
        for name, tally in summary.online["tally"].items():
            console.print(escape(fmt_tally(name, tally)))
    if summary.hw:
        hw = summary.hw
        n = len(hw["rows"])
        console.print(escape(f"hw backend: {hw['ok']} of {n} cells ran on the CPU; "
                             f"{len(hw['mismatches'])} disagree with the model"))
        for m in hw["mismatches"]:
            console.print(f"[bold red]MODEL != HW[/] {escape(m)}")
        for m in hw.get("scheduler_differences", []):
            console.print(f"[yellow]threads[/] {escape(m)}")
        if hw.get("profile_provenance"):
            console.print(f"[dim]{escape(hw['profile_provenance'])}[/]")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items()))
    console.print(escape(f"cells: {counts}") + (f", {summary.missing} not run yet (resume the run)"
                                                if summary.missing else ""))
    for r in summary.failures:
        console.print(f"[bold red]FAILED[/] {escape(r['label'])}: {escape(str(r.get('reason')))}")
    console.print("[dim]the full tables (every strategy, instructions, Keir's table, hw vs model): "
                  "RUN/summary.txt, or a terminal of 120+ columns[/]")


def fmt_count(v) -> str:
    return "-" if v is None else f"{v:,}"


def fmt_xr(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


SHORTFALL_NOTE = ("relative to the bound: what the better 2004 mechanism leaves to win; what the threshold "
                  "rule costs given each run's exact length (docs/online-strategies.md); an estimate of what "
                  "probing for those lengths cost; then how often a rule meets each site it could learn about, and how many "
                  "faults per site even the bound takes")


def fmt_online(cell: dict | None) -> tuple[str, bool]:
    """(text, measured) of one policy's cell of the online table: "1.06x*", "-" or its outcome."""
    if cell is None:
        return "-", True
    if cell["vs_bound"] is None:
        return str(cell.get("outcome") or "?"), False
    return f"{cell['vs_bound']:.2f}x" + ("*" if cell.get("at_most_best_pure") else ""), True


def render_online(summary: Summary, console) -> None:
    """Each fault-driven policy's fault-handling time as a multiple of the offline bound: under the summary's
    cost profile, then under each profile the matrix also had the online strategies decide with."""
    from rich.markup import escape

    if summary.online:
        render_online_table(summary.online, console)
    for prices, on in summary.online_extra.items():
        if on:
            render_online_table(on, console)
        else:
            console.print(escape(f"online strategies deciding with {prices}'s prices: not judged here (this "
                                 f"machine has no cost profile {prices!r}, or their run has no bound under it)"))


def decided(on: dict) -> str:
    """The title's note on which prices the table's online cells decided with."""
    prices = on.get("decided_with") or []
    return f"; online strategies deciding with {', '.join(prices)}'s prices" if prices else ""


def render_online_table(on: dict, console) -> None:
    """One ``online_comparison``: the table, the tallies and, where no online strategy makes both marks, why."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"fault-handling time / offline bound, under {on['label']}{decided(on)}"),
              header_style="bold",
              caption=BOUND_NOTE + "; emulate and "
                      "flip are the 2004 mechanisms; online-* choose per fault from what the hypervisor sees (see "
                      "`tlslab strategies`). *: at most min(emulate, flip). Only runs with native's output count.")
    t.add_column("workload", overflow="fold")
    t.add_column("build")
    t.add_column("bound ms", justify="right")
    for name in on["policies"]:
        t.add_column(name, justify="right")
    for row in on["rows"]:
        cells = [escape(fmt_online(row["cells"].get(name))[0]) for name in on["policies"]]
        t.add_row(escape(row["workload"]), row["variant"], f"{row['bound_ms']:.2f}", *cells)
    console.print(t)
    for name, tally in on["tally"].items():
        console.print(escape(fmt_tally(name, tally)))
    short = [r for r in on["rows"] if r.get("why")]
    if short:
        console.print(escape(f"where no online emulate/flip rule is both at most min(emulate, flip) and within 10% "
                             f"of the bound, why ({SHORTFALL_NOTE}):"))
        for r in short:
            console.print(escape("  " + fmt_shortfall(r)))


def render_processes(summary: Summary, console) -> None:
    """Multi-process and threaded workloads: faults per strategy and per process, beside Keir's boot."""
    from rich.markup import escape
    from rich.table import Table

    p = summary.processes
    if not p:
        return
    t = Table(title="Many processes and threads: faults per run and per process", header_style="bold",
              caption=escape(p["note"]))
    for col, j in (("workload", "left"), ("build", "left"), ("strategy", "left"), ("processes", "right"),
                   ("threads", "right"), ("faults", "right"), ("per process", "right"), ("TLS reloads", "right"),
                   ("outcome", "left")):
        t.add_column(col, justify=j)
    t.add_row("[italic]Keir 2004: boot a minimal Fedora Core[/]", "[italic]Xen[/]", "flip/emulate", "-", "-",
              f"~{p['keir_2004_boot_faults']:,}", "-", "-", "", style="dim")
    for r in p["rows"]:
        t.add_row(escape(r["workload"]), escape(r["variant"]), escape(r["strategy"]), fmt_count(r["processes"]),
                  fmt_count(r["threads"]), fmt_count(r["faults"]), f"{r['faults_per_process']:,.0f}",
                  fmt_count(r["tls_reloads"]), escape(str(r["outcome"])))
    console.print(t)


def render_keir(summary: Summary, console) -> None:
    """Keir Fraser's 2004 row and today's keir row(s) (+ the fit target): faults, ratio, modelled ms."""
    from rich.markup import escape
    from rich.table import Table

    k = summary.keir
    if not k:
        return
    fitted = " FITTED" if k["fitted"] else ""
    t = Table(title=escape(f"Keir Fraser's benchmark, ls -R /usr/lib: 2004 vs today (ms: {k['profile']}{fitted})"),
              header_style="bold", caption=escape(k["note"]))
    for col, j in (("workload", "left"), ("build", "left"), ("instructions", "right"), ("emulate faults", "right"),
                   ("flip faults", "right"), ("flip/emul", "right"), ("native ms", "right"), ("emulate ms", "right"),
                   ("flip ms", "right"), ("what", "left")):
        t.add_column(col, justify=j)
    k4 = k["keir_2004"]
    t.add_row("[italic]Keir 2004: ls -R /usr/lib[/]", "[italic]Xen[/]", "-", "-", "-", f"\"{k4['flip_over_emulate']}\"",
              f"{k4['native_ms']:.0f}", f"{k4['emulate_ms']:.0f} ({k4['emulate_x']:.2f}x)",
              f"{k4['flip_ms']:.0f} ({k4['flip_x']:.2f}x)", "measured on Xen, 2004", style="dim")
    for r in k["rows"]:
        name = escape(r["workload"]) + (" (fit target)" if r["fit_target"] else "")
        if r["hv_profile"] != "nonpae":
            name += escape(f" [{r['hv_profile']}]")

        def ms(key, x):
            if r[key] is None:
                return r["outcomes"].get(key.removesuffix("_ms"), "-")
            return fmt_ms(r[key]) + (f" ({r[x]:.2f}x)" if r.get(x) is not None else "")

        fr = r["flip_over_emulate"]
        t.add_row(name, r["variant"], fmt_count(r["instructions"]), fmt_count(r["emulate_faults"]),
                  fmt_count(r["flip_faults"]), f"{fr:.2f}" if fr is not None else "-",
                  fmt_ms(r["native_ms"]) if r["native_ms"] is not None else r["outcomes"]["native"],
                  ms("emulate_ms", "emulate_x"), ms("flip_ms", "flip_x"), escape(r["role"]))
    console.print(t)
    for r in k["rows"]:
        if r.get("caption"):
            console.print(f"[dim]{escape(r['caption'])}[/]")
    if k.get("skipped"):
        console.print(f"[yellow]keir cells skipped[/]: {escape(str(k['skipped']))}")


# --------------------------------------------------------------------------- hw vs model

HW_CAPTION = ("measured: median exec-to-exit time of the traced run on this CPU (tracer and guest pinned; "
              "[min-max] over the repeats); modelled: the model's counters x the measured profile's prices; "
              "error = (modelled - measured) / measured. The profile prices an instruction from untraced runs "
              "and has no price for tracing itself (ptrace attach, the seccomp filter on every system call, the "
              "stop at set_thread_area; tracing_overhead_ns in the calibration's raw file), so native cells are "
              "under-predicted by that cost, most on syscall-heavy guests. "
              "Faults must be equal: the model and the CPU take the same #GP faults at the same instructions. "
              "The FITTED column prices the same counters for Xen in 2004: not comparable to this CPU's times.")


def hw_equal_text(row: dict) -> str:
    """'=' when faults, sites, stdout and status agree, else what differs (loud)."""
    if row.get("hw_outcome") != Outcome.OK:
        return row.get("hw_outcome") or "-"
    if row.get("faults_equal") is None:
        return "no model cell"
    names = {"faults_equal": "FAULTS", "sites_equal": "SITES", "stdout_equal": "STDOUT", "status_equal": "STATUS",
             "faults_stable": "UNSTABLE"}
    bad = [k for k in names if row.get(k) is False]
    return "=" if not bad else "DIFFER: " + ",".join(names[k] for k in bad)


def fmt_ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}" if v >= 10 else f"{v:.2f}"


def fmt_pct(v) -> str:
    return "-" if v is None else f"{v:+.0f}%"


def fmt_x(v) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def render_hw(summary: Summary, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    hw = summary.hw
    if not hw:
        return
    prof = hw["profile"] or "no measured hw-* profile stored"
    fit = hw["fitted"] or "no fitted profile"
    t = Table(title=escape(f"hw backend: measured on this CPU vs modelled under {prof} (measured profile); "
                           f"{fit} FITTED beside"), header_style="bold", caption=escape(HW_CAPTION))
    for col, j in (("workload", "left"), ("build", "left"), ("strategy", "left"), ("faults model", "right"),
                   ("faults hw", "right"), ("model=hw", "left"), ("measured ms", "right"),
                   (f"{prof} ms", "right"), ("error", "right"), (f"{fit} ms (FITTED)", "right")):
        t.add_column(col, justify=j)
    for r in hw["rows"]:
        eq = hw_equal_text(r)
        eq_s = f"[bold red]{escape(eq)}[/]" if eq.startswith("DIFFER") else (
            f"[dim]{escape(eq)}[/]" if eq != "=" else eq)
        meas = "-"
        if r.get("measured_ms") is not None:
            meas = escape(f"{fmt_ms(r['measured_ms'])} [{fmt_ms(r['measured_min_ms'])}-{fmt_ms(r['measured_max_ms'])}]")
        elif r.get("hw_outcome") == Outcome.SKIPPED:
            meas = "[dim]skipped[/]"
        t.add_row(escape(r["workload"]), r["variant"], r["strategy"],
                  f"{r['model_faults']:,}" if r.get("model_faults") is not None else "-",
                  f"{r['hw_faults']:,}" if r.get("hw_faults") is not None else "-", eq_s, meas,
                  fmt_ms(r.get("modelled_ms")), fmt_pct(r.get("error_pct")), fmt_ms(r.get("fitted_ms")))
    console.print(t)
    if hw["profile_provenance"]:
        console.print(f"[dim]{escape(hw['profile_provenance'])}[/]")
    if hw["median_abs_error_pct"] is not None:
        console.print(escape(f"prediction error of {prof}: median |error| {hw['median_abs_error_pct']:.0f}%, "
                             f"max {hw['max_abs_error_pct']:.0f}% over "
                             f"{sum(1 for r in hw['rows'] if r.get('error_pct') is not None)} cells"))
    if hw["skipped"]:
        console.print(f"[yellow]{len(hw['skipped'])} hw cells skipped[/]: {escape(str(hw['skipped'][0].get('reason')))}")
    for m in hw["mismatches"]:
        console.print(f"[bold red]MODEL != HW[/] {escape(m)}")
    for m in hw.get("scheduler_differences", []):
        console.print(f"[yellow]threads[/] {escape(m)}")
