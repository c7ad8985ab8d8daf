"""online-lookahead: emulate, except where decoding ahead shows a flip pays (real runs on real guest state)."""

from __future__ import annotations

import pytest

from tlslab.experiment import RunSpec, execute, make_domain
from tlslab.hypervisor import costmodel
from tlslab.hypervisor.strategies import STRATEGIES, StrategyOptionError, get_strategy, is_online
from tlslab.inspect.replay import replaying

GUESTS = [("canary", ("40",), "default"), ("canary", ("40",), "nosegneg"), ("fs-user", (), "default"),
          ("selfread", (), "default"), ("selfread", (), "nosegneg"), ("threads", ("4", "50"), "default"),
          ("syscalls", ("100",), "default")]
PRICES = ("hw-vm", "xen-2004")


def test_registered_online_reading_guest_memory_with_a_checked_budget():
    cls = STRATEGIES["online-lookahead"]
    assert is_online("online-lookahead") and cls.truncates and cls.reads_guest_memory and not cls.patches_code
    assert get_strategy("online-lookahead", budget=8).lookahead.budget == 8
    for bad in (0, 5000, True, "32"):
        with pytest.raises(StrategyOptionError):
            get_strategy("online-lookahead", budget=bad)


def test_a_recording_of_accesses_cannot_replay_it():
    with pytest.raises(ValueError, match="reads guest code and memory"):
        replaying(STRATEGIES["online-lookahead"])


@pytest.mark.parametrize("prices", PRICES)
@pytest.mark.parametrize("guest,args,variant", GUESTS)
def test_native_output_deterministic_counts_and_decisions_never_dearer_than_emulate(guest, args, variant, prices,
                                                                                    native):
    """Output identical to native, the same counters twice, and on these programs its decisions cost no more
    fault-handling time than emulate's: it flips only where the code shows that a flip pays (it would not
    have to hold for a program whose code the walk mispredicts; it holds here, and a change that breaks the
    rule shows). The walk itself is priced on top (the profile's lookahead_ns per instruction decoded)."""
    spec = RunSpec(guest, args=args, variant=variant, strategy="online-lookahead", prices=prices)
    first, d = execute(spec)
    again, _ = execute(spec)
    nat = native(guest, args, variant)
    assert first.ok, first.crash
    assert (first.status, first.stdout) == (nat.status, nat.stdout)
    assert first.counters == again.counters
    c = first.counters["strategy"]
    assert c["refused"] == 0
    profile = costmodel.get_profile(prices)
    emulate = execute(RunSpec(guest, args=args, variant=variant, strategy="emulate"))[0]
    walked, reused = c["by_kind"]["lookahead-instructions"], c["by_kind"].get("lookahead-reused", 0)
    walk_ns = walked * profile.lookahead_ns + reused * profile.lookahead_reuse_ns
    assert profile.lookahead_ns > 0 and profile.lookahead_reuse_ns > 0 and walked > 0
    own = costmodel.fault_handling_ns(profile, first.counters)
    assert own - walk_ns <= costmodel.fault_handling_ns(profile, emulate.counters)
    breakdown = costmodel.predict(profile, first.counters).breakdown_ns
    assert breakdown["lookahead"] + breakdown["lookahead_reuse"] == pytest.approx(walk_ns)


def test_flips_the_hot_loop_that_emulate_pays_access_by_access(native):
    """canary's loop reads the stack guard and thread variables back to back: the walk sees the run and flips
    it, where emulate takes one fault per access."""
    spec = RunSpec("canary", args=("40",), strategy="online-lookahead", prices="xen-2004")
    d, _ = make_domain(spec)
    r = d.run()
    assert r.ok and r.stdout == native("canary", ("40",)).stdout
    kinds = r.counters["strategy"]["by_kind"]
    emulate = execute(RunSpec("canary", args=("40",), strategy="emulate"))[0]
    assert kinds.get("ahead-flip", 0) > 0
    assert r.counters["strategy"]["traps"] * 10 < emulate.counters["strategy"]["traps"]
    assert kinds["lookahead-instructions"] > 0 and d.strategy.lookahead.walks > 0


@pytest.mark.parametrize("guest,args,variant", GUESTS + [("prelink", (), "default"), ("malloc", ("200",), "default"),
                                                         ("stdio", (), "default")])
def test_the_c_walk_decides_as_the_python_walk_on_real_guests(guest, args, variant):
    """The strategy's walk is the C one, memoised by site; the Python one is its specification. On real
    guests (their code, their GOT words and stacks, every fault's registers) the C walk without its memo
    gives every counter the Python walk gives; with its memo, every decision is the same and only what
    was walked and reused differs (a memo hit decodes nothing)."""
    runs = {}
    for native_walk, memo in ((True, True), (True, False), (False, False)):
        spec = RunSpec(guest, args=args, variant=variant, strategy="online-lookahead", prices="hw-vm")
        d, _ = make_domain(spec)
        d.strategy.lookahead.native = native_walk
        d.strategy.lookahead.memo = memo
        r = d.run()
        assert r.ok, r.crash
        runs[native_walk, memo] = r.counters["strategy"]
    memoised, plain, spec = runs[True, True], runs[True, False], runs[False, False]
    assert plain == spec
    assert spec["by_kind"]["lookahead-instructions"] > 0

    def decisions(counters):
        walk_kinds = ("lookahead-instructions", "lookahead-reused")
        kinds = {k: v for k, v in counters["by_kind"].items() if k not in walk_kinds}
        return {**counters, "by_kind": kinds}

    assert decisions(memoised) == decisions(spec)
    assert memoised["by_kind"]["lookahead-instructions"] <= spec["by_kind"]["lookahead-instructions"]
    reused = memoised["by_kind"].get("lookahead-reused", 0)
    assert (reused > 0) == (memoised["by_kind"]["lookahead-instructions"] < spec["by_kind"]["lookahead-instructions"])


def test_the_walk_price_is_measured_where_it_runs_and_lands_in_a_calibrated_profile():
    """tlslab calibrate (and benchmarks/lookahead_price.py) time every walk at its fault: the figures are the
    strategy's own counts, the prices positive, and make_profile carries them with their provenance."""
    from tlslab.hw.calibrate import make_profile, measure_lookahead_price

    price = measure_lookahead_price(workloads=(("syscalls", ("100",)), ("no-such-guest", ())),
                                    variants=("default",))
    assert [r["workload"] for r in price["rows"]] == ["syscalls"] and len(price["skipped"]) == 1
    row = price["rows"][0]
    run = execute(RunSpec("syscalls", args=("100",), strategy="online-lookahead", prices="hw-vm"))[0]
    kinds = run.counters["strategy"]["by_kind"]
    assert (row["instructions"], row["reuses"]) == (kinds["lookahead-instructions"], kinds["lookahead-reused"])
    assert row["walks"] + row["reuses"] == run.counters["strategy"]["traps"] - kinds.get("fs-emulated", 0)
    assert price["ns_per_instruction"] > 0 and price["ns_per_reuse"] > 0
    stats = {"n": 1, "min": 1.0, "median": 1.0, "max": 1.0}
    raw = {"host": "h", "cpu_model": "c", "kernel": "k", "started": "t", "guests": {}, "lookahead": price,
           "options": {"repeat": 1, "tree": "small"},
           "summary": {"pinned": {"emulate": {**stats, "median": 3000.0}, "flip": {**stats, "median": 2000.0}}}}
    profile = make_profile(raw)
    assert profile.lookahead_ns == price["ns_per_instruction"] and profile.lookahead_reuse_ns == price["ns_per_reuse"]
    assert profile.provenance["lookahead"]["instructions"] == row["instructions"]
