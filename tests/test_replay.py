"""Replaying a recorded access trace through an online rule gives the rule's real counts.

The replay (tlslab.inspect.replay) is the design tool behind the rule
comparisons of docs/online-strategies.md; a figure from it is worth something
only if the replay of a shipped rule takes exactly the traps, emulations and
descriptor writes the rule takes for real. Checked here on a single-threaded
program, on one with thread switches (TLS reloads), on one whose own %fs
accesses fault, and on a pipeline of forked processes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from tlslab.experiment import RunSpec, make_domain
from tlslab.hypervisor.strategies import STRATEGIES, online_names
from tlslab.hypervisor.strategies.online import PriceOptions
from tlslab.inspect.replay import EmulateRule, FlipRule, ReplayError, record_accesses, replay, replaying

KEYS = ("traps", "decodes", "emulated_instructions", "emulated_accesses", "descriptor_writes", "refused")
WORKLOADS = {
    "lsr": RunSpec(guest="lsr", strategy="native", tree="small"),
    "threads": RunSpec(guest="threads", args=("3", "40"), strategy="native"),
    "fs-user": RunSpec(guest="fs-user", strategy="native"),
}


@pytest.fixture(scope="module")
def recorded():
    out = {}
    for name, spec in WORKLOADS.items():
        native_domain, _ = make_domain(spec)
        native = native_domain.run()
        trace, result = record_accesses(spec)
        assert result.ok and result.stdout == native.stdout, name
        out[name] = (spec, trace, native_domain)
    return out


def real_counters(spec, strategy, **options):
    domain, _ = make_domain(replace(spec, strategy=strategy, **options))
    result = domain.run()
    assert result.ok
    return domain.counters()["strategy"]


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("prices", ["hw-vm", "xen-2004"])
def test_replay_of_each_online_strategy_equals_its_real_run(recorded, workload, prices):
    spec, trace, _ = recorded[workload]
    assert set(online_names()) >= {"online-site", "online-rate", "online-probe"}
    for name in online_names():
        got = replay(trace, replaying(STRATEGIES[name])(PriceOptions(prices))).counters["strategy"]
        real = real_counters(spec, name, prices=prices)
        assert {k: got[k] for k in KEYS} == {k: real[k] for k in KEYS}, name
        assert got["traps"] > 0
        assert got["by_kind"].get("probe", 0) == real["by_kind"].get("probe", 0)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_emulate_rule_replays_the_emulate_strategy(recorded, workload):
    spec, trace, _ = recorded[workload]
    got = replay(trace, replaying(EmulateRule)()).counters["strategy"]
    real = real_counters(spec, "emulate")
    assert {k: got[k] for k in KEYS} == {k: real[k] for k in KEYS}


def test_flip_rule_replays_the_flip_strategy_where_the_guest_leaves_fs_alone(recorded):
    spec, trace, _ = recorded["lsr"]
    got = replay(trace, replaying(FlipRule)()).counters["strategy"]
    real = real_counters(spec, "flip")
    assert (got["traps"], got["descriptor_writes"]) == (real["traps"], real["descriptor_writes"])
    assert got["emulated_instructions"] == 0


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_the_trace_holds_every_negative_gs_access(recorded, workload):
    _, trace, native_domain = recorded[workload]
    native = native_domain.counters()["segments"]["gs"]
    assert native["negative"] > 0
    assert trace.negative_gs_accesses() == native["negative"]
    assert native["negative"] < sum(trace.segment) <= native["accesses"]


def test_forked_processes_replay_exactly_here(debian_rootfs):
    spec = RunSpec(guest="/bin/dash", args=("-c", "echo b a | tr ' ' '\\n' | sort; echo x | cat"),
                   strategy="native", rootfs="debian", tree=None)
    trace, result = record_accesses(spec)
    assert result.ok and result.stdout == b"a\nb\nx\n"
    for name in ("online-probe", "online-site"):
        r = replay(trace, replaying(STRATEGIES[name])(PriceOptions("xen-2004")))
        assert r.inherited > 0    # forked spaces started from an approximation ...
        real = real_counters(spec, name, prices="xen-2004")
        assert {k: r.counters["strategy"][k] for k in KEYS} == {k: real[k] for k in KEYS}   # ... exact here


def test_a_rule_that_refuses_an_access_stops_the_replay(recorded):
    _, trace, _ = recorded["lsr"]

    class Refuses(EmulateRule):
        def decide(self, trap, insn, sign):
            from tlslab.hypervisor.strategies.base import Verdict
            return Verdict.kill("no")

    with pytest.raises(ReplayError, match="refused access 0"):
        replay(trace, replaying(Refuses)())
