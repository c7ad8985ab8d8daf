"""The emulate/flip/hybrid analysis: DP against brute force, policies against real traps."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tlslab.analysis import hybrid
from tlslab.experiment import RunSpec, execute, make_domain

runs_strategy = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=9).map(
    lambda lengths: [n if i % 2 == 0 else -n for i, n in enumerate(lengths)]
)


def brute_force(runs, e, f):
    """Try every choice (flip or emulate-all) at every wrong-state run."""
    best = float("inf")
    for choices in itertools.product((False, True), repeat=len(runs)):
        up, cost = True, 0.0
        for r, flip in zip(runs, choices):
            if (r > 0) != up:
                if flip:
                    cost += f
                    up = r > 0
                else:
                    cost += abs(r) * e
        best = min(best, cost)
    return best


@settings(max_examples=300, deadline=None)
@given(runs=runs_strategy, start_negative=st.booleans(), e=st.integers(1, 50), f=st.integers(1, 50))
def test_optimal_equals_brute_force_and_bounds_every_policy(runs, start_negative, e, f):
    if start_negative:
        runs = [-r for r in runs]
    opt = hybrid.optimal(runs, e, f)
    assert opt.cost_ns == brute_force(runs, e, f)
    assert opt.emulations * e + opt.flips * f == opt.cost_ns
    for policy in (hybrid.pure_emulate, hybrid.pure_flip, hybrid.predictive, hybrid.run_oracle):
        assert policy(runs, e, f).cost_ns >= opt.cost_ns


def test_pure_policies_predict_the_traps_the_strategies_take():
    domain, _ = make_domain(RunSpec("lsr", strategy="native"), trace_signs=True)
    assert domain.run().ok
    runs, dropped = domain.vcpu.sign_runs("gs")
    assert dropped == 0
    gs = domain.vcpu.segment_counters()["gs"]
    assert sum(abs(r) for r in runs) == gs.accesses and len(runs) == gs.sign_changes + 1
    emulate = execute(RunSpec("lsr", strategy="emulate"))[0].counters["strategy"]["traps"]
    flip = execute(RunSpec("lsr", strategy="flip"))[0].counters["strategy"]["traps"]
    assert hybrid.pure_emulate(runs, 1, 1).faults == emulate
    assert hybrid.pure_flip(runs, 1, 1).faults == flip


def test_run_oracle_decides_each_run_from_its_own_length_only():
    # threshold 2 * 1.5 / 1 = 3: runs of 2 are emulated run by run, although flipping once and emulating
    # the single positive accesses is cheaper over the whole sequence (the bound sees that, the oracle not)
    runs = [-2, 1, -2, 1, -2, 1]
    oracle = hybrid.run_oracle(runs, 1.0, 1.5)
    assert (oracle.emulations, oracle.flips, oracle.cost_ns) == (6, 0, 6.0)
    assert hybrid.optimal(runs, 1.0, 1.5).cost_ns == 4.5
    # a run longer than the threshold is flipped, and the flipped slot lets the next same-sign run through
    oracle = hybrid.run_oracle([-4, 1, -4, 5], 1.0, 1.5)
    assert (oracle.emulations, oracle.flips) == (1, 2)
    # a run exactly at the threshold is emulated (ProbeStrategy flips only above it: estimate > threshold)
    assert (hybrid.run_oracle([-3], 1.0, 1.5).emulations, hybrid.run_oracle([-3], 1.0, 1.5).flips) == (3, 0)
    # free emulation: never flip
    assert hybrid.run_oracle([-50], 0.0, 1.0).flips == 0
    # a break resets the slot to "up"
    assert hybrid.run_oracle([-4, 0, -4], 1.0, 1.5).flips == 2
    over = hybrid.run_oracle_over([[-4, 1], [-1]], 1.0, 1.5)
    assert (over.emulations, over.flips) == (2, 1)
