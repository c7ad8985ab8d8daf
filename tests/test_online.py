"""Online strategies (online-site, online-rate, online-probe) against emulate, flip and the offline bound.

They act on real guest state, so the first thing checked is that the guest
still runs as natively; then that their decisions are deterministic, that the
probe descriptor opens nothing, that the offline bound really bounds them,
and that online-probe beats both 2004 mechanisms where the sign structure
allows it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlslab.analysis import hybrid
from tlslab.experiment import RunSpec, make_domain
from tlslab.hypervisor import costmodel
from tlslab.hypervisor.strategies import STRATEGIES, StrategyOptionError, get_strategy
from tlslab.hypervisor.strategies.online import is_probe_descriptor, probe_descriptor
from tlslab.x86 import xen
from tlslab.x86.descriptor import SegmentDescriptor

ONLINE = [n for n, cls in STRATEGIES.items() if getattr(cls, "online", False)]
WORKLOADS = [("canary", ("40",)), ("malloc", ("500",)), ("lsr", ())]


def run(guest, args, strategy, prices="xen-2004", trace=False):
    spec = RunSpec(guest=guest, args=tuple(args), strategy=strategy, prices=prices)
    domain, _ = make_domain(spec, trace_signs=trace)
    result = domain.run()
    return result, domain


def fault_ns(domain, profile="xen-2004"):
    return costmodel.fault_handling_ns(costmodel.get_profile(profile), domain.counters())


def test_three_online_strategies_are_registered():
    assert set(ONLINE) >= {"online-site", "online-rate", "online-probe"}


@pytest.mark.parametrize("guest,args", WORKLOADS)
@pytest.mark.parametrize("strategy", ["online-site", "online-rate", "online-probe"])
def test_online_output_is_native_and_counts_are_deterministic(guest, args, strategy):
    native, _ = run(guest, args, "native")
    first, d1 = run(guest, args, strategy)
    second, d2 = run(guest, args, strategy)
    assert first.ok and first.stdout == native.stdout and first.status == native.status
    c1, c2 = d1.counters()["strategy"], d2.counters()["strategy"]
    assert c1 == c2
    assert c1["traps"] > 0 and c1["refused"] == 0


def test_probe_descriptor_admits_nothing():
    base = SegmentDescriptor(base=0x0804_0000, limit=0xFFFFF, rw=True, present=True, db=True, granularity=True,
                             dpl=3, s=True)
    probe = probe_descriptor(xen.truncate(base, xen.get_profile("nonpae")))
    assert is_probe_descriptor(probe)
    assert xen.admitted_linear_ranges(probe) == []


@settings(max_examples=300, deadline=None)
@given(base=st.integers(0, 0xFFFF_FFFF), limit=st.integers(0, 0xFFFFF), g=st.booleans(), dc=st.booleans(),
       db=st.booleans())
def test_probe_descriptor_of_any_descriptor_admits_nothing(base, limit, g, dc, db):
    d = SegmentDescriptor(base=base, limit=limit, rw=True, dc=dc, present=True, db=db, granularity=g, dpl=3)
    assert xen.admitted_linear_ranges(probe_descriptor(d)) == []


def test_online_options_are_checked():
    with pytest.raises(StrategyOptionError, match="unknown cost profile"):
        get_strategy("online-probe", prices="no-such-profile")
    with pytest.raises(StrategyOptionError, match="does not price faults"):
        get_strategy("online-probe", prices="nominal")
    with pytest.raises(StrategyOptionError, match="emulate_ns"):
        get_strategy("online-probe", emulate_ns=-1.0)
    s = get_strategy("online-probe", prices="xen-2004")
    e, f = costmodel.fault_prices(costmodel.get_profile("xen-2004"))
    assert s.threshold == pytest.approx(2 * f / e)


@pytest.mark.parametrize("guest,args", WORKLOADS)
def test_offline_bound_bounds_every_real_policy(guest, args):
    """The DP over the native sign trace is a bound: no real run of a policy that only emulates and flips is
    cheaper; a patching one (online-patch) is, and is checked to be."""
    native, dn = run(guest, args, "native", trace=True)
    traces, dropped = dn.sign_runs("gs")
    assert not dropped
    e, f = costmodel.fault_prices(costmodel.get_profile("xen-2004"))
    bound = hybrid.optimal_over(traces, e, f).cost_ns
    assert bound > 0
    for strategy in ["emulate", "flip", *ONLINE]:
        _, d = run(guest, args, strategy)
        if STRATEGIES[strategy].patches_code:
            # a patched site never faults again: the emulate/flip bound does not bound it (and must not
            # claim to: this is why summaries mark patching policies apart)
            assert fault_ns(d) < bound, strategy
        else:
            assert fault_ns(d) >= bound * (1 - 1e-9), strategy


@pytest.mark.parametrize("guest,args", [("canary", ("40",)), ("malloc", ("500",))])
@pytest.mark.parametrize("prices", ["xen-2004", "hw-vm"])
def test_online_probe_beats_both_2004_mechanisms(guest, args, prices):
    """Where emulate and flip each lose somewhere (canary: emulate; malloc: both), probing beats the better one."""
    _, de = run(guest, args, "emulate")
    _, df = run(guest, args, "flip")
    _, dp = run(guest, args, "online-probe", prices=prices)
    assert fault_ns(dp, prices) < min(fault_ns(de, prices), fault_ns(df, prices))


def test_probe_learns_and_stops_probing():
    _, d = run("lsr", (), "online-probe")
    kinds = d.counters()["strategy"]["by_kind"]
    probes = kinds.get("probe", 0)
    assert 0 < probes < d.counters()["strategy"]["traps"] / 20   # learning is a small part of the faults
    assert kinds.get("probe-end", 0) + kinds.get("probe-flip", 0) <= probes


def test_sign_trace_breaks_at_thread_switches():
    _, d = run("threads", ("4", "50"), "native", trace=True)
    traces, dropped = d.sign_runs("gs")
    assert not dropped and any(0 in t for t in traces)
    e, f = costmodel.fault_prices(costmodel.get_profile("xen-2004"))
    bound = hybrid.optimal_over(traces, e, f).cost_ns
    for strategy in ["emulate", "flip", "online-probe"]:
        result, dd = run("threads", ("4", "50"), strategy)
        assert result.ok
        assert fault_ns(dd) >= bound * (1 - 1e-9), strategy


def test_optimal_breaks_relax_to_either_state():
    e, f = 1.0, 1.0
    # without a break: one long -ve run costs a flip; a break in it lets the bound start the rest "down" for free
    assert hybrid.optimal([-10], e, f).cost_ns == 1.0
    assert hybrid.optimal([-5, 0, -5], e, f).cost_ns == 1.0
    assert hybrid.optimal([5, 0, -5], e, f, start_free=True).cost_ns == 0.0
    assert hybrid.pure_flip([-5, 0, -5], e, f).flips == 2     # the model's slot is truncated again after a switch


def test_hybrid_json_record_runs_every_policy():
    out = subprocess.run([sys.executable, "-m", "tlslab", "hybrid", "canary", "--cost-profile", "xen-2004", "--json",
                          "--", "20"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["schema"] == "tlslab.hybrid/1" and rec["cost_profile"] == "xen-2004"
    names = [p["name"] for p in rec["policies"]]
    assert names[:2] == ["emulate", "flip"] and set(ONLINE) <= set(names)
    for p in rec["policies"]:
        assert p["ok"] and p["output_identical"], p
        assert p["patches_code"] == STRATEGIES[p["name"]].patches_code
        if p["patches_code"]:   # online-patch: below the emulate/flip bound, which does not bound it
            assert p["patches"] > 0 and p["fault_time_ns"] < rec["offline_optimum"]["fault_time_ns"]
        else:
            assert p["fault_time_ns"] >= rec["offline_optimum"]["fault_time_ns"] * (1 - 1e-9)
        assert set(p) >= {"name", "online", "faults", "emulations", "flips", "patches", "fault_time_ns"}
    rules = [p for p in rec["policies"] if p["online"] and not p["patches_code"]]
    assert rec["best_online_emulate_flip"] == min(rules, key=lambda p: p["fault_time_ns"])["name"]
    assert [p["online"] for p in rec["policies"]][:2] == [False, False]
    assert rec["best_online"] in ONLINE
    # native's per-site counters: every negative %gs access is at a site that makes some
    assert 0 < rec["negative_gs_sites"] < rec["negative_gs_accesses"] < rec["gs_accesses"]
    emulate = next(p for p in rec["policies"] if p["name"] == "emulate")
    assert emulate["faults"] == rec["negative_gs_accesses"]      # each negative access faults once under emulate
    # the run-length oracle: offline, one run deep, never below the bound
    oracle = rec["run_oracle"]
    assert oracle["online"] is False and oracle["fault_time_ns"] >= rec["offline_optimum"]["fault_time_ns"]


def test_dead_address_spaces_leave_their_traces_and_free_their_engines(debian_rootfs):
    """A boot traces hundreds of address spaces: a released one keeps its sign trace with the domain and is
    not kept alive by it (the native boot cell was once OOM-killed holding 934 engines)."""
    import gc
    import weakref

    from tlslab.machine.vcpu import VCpu

    spec = RunSpec("/bin/dash", ("-c", "for i in 1 2 3 4 5; do /bin/true; echo $i | /bin/cat; done"),
                   rootfs="debian", tree=None)
    domain, _ = make_domain(spec, trace_signs=True)
    made: list = []
    original = domain._watch_vcpu

    def watch(vcpu):
        made.append(weakref.ref(vcpu))
        original(vcpu)

    domain._watch_vcpu = watch
    result = domain.run()
    assert result.ok and result.stdout == b"1\n2\n3\n4\n5\n"
    traces, dropped = domain.sign_runs("gs")
    gc.collect()
    alive = [r for r in made if r() is not None and isinstance(r(), VCpu) and r().uc is None]
    assert not alive, f"{len(alive)} released vCPUs still reachable"
    assert len(traces) == domain._vcpus_made >= 11 and not dropped
    assert sum(1 for t in traces if any(t)) >= 10   # every program touched %gs


def test_many_process_decisions_do_not_depend_on_memory_allocation(debian_rootfs):
    """Per-address-space state is keyed by a number that is never reused: keyed by id(vcpu), a process got
    the state of a dead one whose id Python reused, and the same run took 1,033 or 1,363 faults depending
    on what else had been allocated."""
    spec = RunSpec("/bin/dash", ("-c", "i=0; while [ $i -lt 30 ]; do i=$((i+1)); /bin/true; done; echo $i"),
                   rootfs="debian", tree=None)
    junk = []
    for strategy in ("online-rate", "online-probe", "online-site"):
        seen = set()
        for noise in (0, 3000, 7000):
            junk.append([object() for _ in range(noise)])   # shifts where the next vCPUs are allocated
            domain, _ = make_domain(replace(spec, strategy=strategy, prices="xen-2004"))
            result = domain.run()
            assert result.ok and result.stdout.endswith(b"30\n")
            c = domain.counters()["strategy"]
            seen.add((c["traps"], c["descriptor_writes"], c["emulated_instructions"]))
        assert len(seen) == 1, (strategy, seen)


def test_per_process_state_does_not_follow_python_ids(debian_rootfs, monkeypatch):
    """Had the strategies keyed per-process state by id(vcpu), making every id equal (what Python's reuse of a
    freed vCPU's id does to two processes) would change their decisions; keyed by a never-reused number, it
    changes nothing."""
    from tlslab.hypervisor.strategies import online

    spec = RunSpec("/bin/dash", ("-c", "i=0; while [ $i -lt 12 ]; do i=$((i+1)); /bin/true; done; echo $i"),
                   rootfs="debian", tree=None)

    def counts(strategy):
        domain, _ = make_domain(replace(spec, strategy=strategy, prices="xen-2004"), quantum=7919)
        assert domain.run().ok
        c = domain.counters()["strategy"]
        return c["traps"], c["descriptor_writes"], c["emulated_instructions"]

    for strategy in ("online-rate", "online-probe", "online-site"):
        honest = counts(strategy)
        monkeypatch.setattr(online, "id", lambda obj: 0, raising=False)   # shadows the builtin in that module
        assert counts(strategy) == honest, strategy
        monkeypatch.undo()
