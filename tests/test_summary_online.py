"""The online-vs-bound comparison of a bench summary, on hand-made cells (tlslab.bench.summary)."""

from __future__ import annotations

from types import SimpleNamespace

from tlslab.bench import summary


def _cell(ns: float | None, ok: bool = True, stdout: str = "same") -> dict:
    return {"outcome": "ok" if ok else "guest-crash", "stdout": {"sha256": stdout}, "counters": {"ns": ns}}


def _row(bound_ns, emulate, flip, **online) -> dict:
    native = _cell(0)
    native["offline_optimum"] = {"by_profile": {"p": {"fault_time_ns": bound_ns, "faults": 1}}}
    return {"native": native, "emulate": _cell(emulate), "flip": _cell(flip),
            **{name.replace("_", "-"): _cell(ns) for name, ns in online.items()}}


def test_the_best_online_tally_takes_each_workload_s_best(monkeypatch):
    monkeypatch.setattr(summary.costmodel, "fault_handling_ns", lambda profile, counters: counters["ns"])
    grouped = {
        ("a", "default", "nonpae"): _row(100, 130, 200, online_site=120, online_rate=125, online_probe=150),
        ("b", "default", "nonpae"): _row(100, 101, 300, online_site=150, online_rate=140, online_probe=105),
        ("c", "default", "nonpae"): _row(100, 400, 105, online_site=104, online_rate=300, online_probe=108),
    }
    out = summary.online_comparison(list(grouped), grouped, SimpleNamespace(name="p", label=lambda: "p"))
    tally = out["tally"]
    rule = {"patches_code": False}
    assert tally["online-site"] == {"workloads": 3, "at_most_best_pure": 2, "within_10pct_of_bound": 1, **rule}
    assert tally["online-probe"] == {"workloads": 3, "at_most_best_pure": 0, "within_10pct_of_bound": 2, **rule}
    # a: site 120 <= 130 (not within 10%); b: no online strategy beats emulate's 101, the best (probe)
    # is within 10%; c: site 104 beats flip and is within 10%
    # no patching strategy ran: one best-of tally, not marked as patching
    assert tally[summary.BEST_ONLINE] == {"workloads": 3, "at_most_best_pure": 2, "within_10pct_of_bound": 2, **rule}
    assert summary.BEST_EMULATE_FLIP not in tally
    assert [r["best_online"] for r in out["rows"]] == ["online-site", "online-probe", "online-site"]


def test_patching_policies_are_tallied_apart_from_the_rules_the_bound_bounds(monkeypatch):
    """online-patch below the bound counts for the best-of-everything tally, not for the emulate/flip one,
    and its own tally line says the bound does not bound it."""
    monkeypatch.setattr(summary.costmodel, "fault_handling_ns", lambda profile, counters: counters["ns"])
    grouped = {
        ("a", "default", "nonpae"): _row(100, 130, 200, online_probe=150, online_patch=3),
        ("b", "default", "nonpae"): _row(100, 101, 300, online_probe=105, online_patch=90),
    }
    grouped[("b", "default", "nonpae")]["online-patch"]["stdout"]["sha256"] = "differs"   # a hazard: !out
    out = summary.online_comparison(list(grouped), grouped, SimpleNamespace(name="p", label=lambda: "p"))
    tally = out["tally"]
    assert tally["online-patch"] == {"workloads": 1, "at_most_best_pure": 1, "within_10pct_of_bound": 1,
                                     "patches_code": True}
    assert [r["best_online"] for r in out["rows"]] == ["online-patch", "online-probe"]
    assert [r["best_emulate_flip"] for r in out["rows"]] == ["online-probe", "online-probe"]
    assert tally[summary.BEST_EMULATE_FLIP] == {"workloads": 2, "at_most_best_pure": 0, "within_10pct_of_bound": 1,
                                                "patches_code": False}
    assert tally[summary.BEST_ONLINE] == {"workloads": 2, "at_most_best_pure": 1, "within_10pct_of_bound": 2,
                                          "patches_code": True}
    assert summary.fmt_online(out["rows"][1]["cells"]["online-patch"]) == ("!out", False)
    assert "does not bound it" in summary.fmt_tally("online-patch", tally["online-patch"])
    # the why lines are about the emulate/flip rules: a is explained although online-patch is below the bound
    assert out["rows"][0]["why"] is not None and abs(out["rows"][0]["why"]["to_win"] - 0.3) < 1e-12
    assert "does not bound it" not in summary.fmt_tally("online-probe", tally["online-probe"])


def test_a_workload_no_online_rule_handles_gets_its_three_numbers(monkeypatch):
    monkeypatch.setattr(summary.costmodel, "fault_handling_ns", lambda profile, counters: counters["ns"])
    grouped = {
        ("a", "default", "nonpae"): _row(100, 101, 300, online_site=150, online_probe=130),
        ("b", "default", "nonpae"): _row(100, 400, 300, online_site=150, online_probe=105),
    }
    native = grouped[("a", "default", "nonpae")]["native"]
    native["offline_optimum"]["by_profile"]["p"]["run_oracle"] = {"fault_time_ns": 180.0}
    native["sites"] = [{"segment": "gs", "eip": 1, "negative": 6, "positive": 9},
                       {"segment": "gs", "eip": 2, "negative": 0, "positive": 4},    # no negative: no fault
                       {"segment": "fs", "eip": 3, "negative": 5, "positive": 0},    # %fs: not a %gs site
                       {"segment": "gs", "eip": 4, "negative": 1, "positive": 0}]
    probe = grouped[("a", "default", "nonpae")]["online-probe"]
    probe["counters"]["strategy"] = {"by_kind": {"probe": 5, "probe-end": 3, "probe-flip": 1}}
    probe["spec"] = {"prices": "hw-vm", "emulate_ns": 2.0, "flip_ns": 3.0}   # threshold 3: cap 4
    profile = SimpleNamespace(name="p", label=lambda: "p", trap_ns=3.0, decode_ns=0.0, descriptor_write_ns=1.0,
                              emulated_access_ns=0.5)
    out = summary.online_comparison(list(grouped), grouped, profile)
    a, b = out["rows"]
    assert b["why"] is None   # probe 105: at most min(400, 300) and within 10% of the bound
    assert abs(a["why"]["to_win"] - 0.01) < 1e-12
    assert a["why"]["run_oracle"] == 1.8
    # 3 ended probes x (a trap + two writes) = 15, 1 capped probe x (3 emulated faults + a write) = 11.5,
    # 1 probe ended unseen x a write = 1: 27.5 ns over a bound of 100 ns
    assert a["why"]["learning"] == {"online-probe": {"probes": 5, "vs_bound": 0.275}}
    assert a["why"]["none_ran"] is False
    line = summary.fmt_shortfall(a)
    assert line.startswith("a (default): min(emulate, flip) is 1.01x the bound") and "1.80x" in line
    assert "online-probe's 5 probes cost about 0.28x" in line
    assert (a["why"]["negative_accesses"], a["why"]["negative_sites"]) == (7, 2)
    assert line.endswith("7 negative %gs accesses at 2 sites (3.5 per site; the bound's 1 faults, 0.5 per site)")


def test_a_workload_where_no_online_strategy_ran_is_listed_with_that(monkeypatch):
    monkeypatch.setattr(summary.costmodel, "fault_handling_ns", lambda profile, counters: counters["ns"])
    grouped = {("a", "default", "nonpae"): _row(100, 120, 300, online_probe=90)}
    grouped[("a", "default", "nonpae")]["online-probe"]["outcome"] = "guest-crash"
    out = summary.online_comparison(list(grouped), grouped, SimpleNamespace(name="p", label=lambda: "p"))
    (row,) = out["rows"]
    assert row["why"]["none_ran"] is True and abs(row["why"]["to_win"] - 0.2) < 1e-12
    assert summary.fmt_shortfall(row).startswith("a (default): no online strategy ran to the end")


def test_a_walk_that_costs_more_than_it_saves_is_named_with_its_price(monkeypatch):
    """Where decoding ahead loses, the why line says what the walks cost and where the rule would be without."""
    monkeypatch.setattr(summary.costmodel, "fault_handling_ns", lambda profile, counters: counters["ns"])
    grouped = {("a", "default", "nonpae"): _row(100, 130, 200, online_lookahead=140)}
    cell = grouped[("a", "default", "nonpae")]["online-lookahead"]
    cell["counters"]["strategy"] = {"by_kind": {"lookahead-instructions": 20, "lookahead-reused": 4}}
    profile = SimpleNamespace(name="p", label=lambda: "p", lookahead_ns=1.0, lookahead_reuse_ns=2.5)
    (row,) = summary.online_comparison(list(grouped), grouped, profile)["rows"]
    # 20 instructions x 1 ns + 4 reuses x 2.5 ns = 30 ns over a bound of 100: 0.30x; 1.40 - 0.30 = 1.10x
    walking = row["why"]["walking"]["online-lookahead"]
    assert walking["instructions"] == 20 and abs(walking["vs_bound"] - 0.3) < 1e-12
    assert abs(walking["without"] - 1.1) < 1e-12
    assert "online-lookahead's walks (20 instructions decoded ahead) cost 0.30x, 1.10x without them" in \
        summary.fmt_shortfall(row)
    assert summary.walk_cost_ns(profile, grouped[("a", "default", "nonpae")]["emulate"]) == (0, 0.0)
