"""Replaying a recorded access trace through an online rule gives the rule's real counts.

The replay (tlslab.inspect.replay) is the design tool behind the rule
comparisons of docs/online-strategies.md; a figure from it is worth something
only if the replay of a shipped rule takes exactly the traps, emulations and
descriptor writes the rule takes for real. Checked here on single-threaded
programs (lsr; fs-user, which loads %fs itself), on threads (TLS reloads at
switches), on a guest that loads its %gs selector into %fs (one slot, two
segment registers), and on forked processes switched in short time slices
(the kernel carries a slot's content from one process to the next).
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


def real_counters(spec, strategy, domain_options=None, **options):
    domain, _ = make_domain(replace(spec, strategy=strategy, **options), **(domain_options or {}))
    result = domain.run()
    assert result.ok
    return domain.counters()["strategy"]


def assert_replays_exactly(spec, trace, domain_options=None):
    """Every online strategy a recording can replay (both price sets) and emulate: the replay's counters are
    the real run's. (Strategies that patch code or read guest memory to decide are refused by ``replaying``.)"""
    rules = [(name, STRATEGIES[name], {"prices": prices}) for name in online_names()
             if not STRATEGIES[name].patches_code and not STRATEGIES[name].reads_guest_memory
             for prices in ("hw-vm", "xen-2004")]
    for name, cls, options in [*rules, ("emulate", EmulateRule, {})]:
        made = replaying(cls)(PriceOptions(**options)) if options else replaying(cls)()
        got = replay(trace, made).counters["strategy"]
        real = real_counters(spec, name, domain_options, **options)
        assert {k: got[k] for k in KEYS} == {k: real[k] for k in KEYS}, (name, options)
        assert got["traps"] > 0
        assert got["by_kind"].get("probe", 0) == real["by_kind"].get("probe", 0)
        assert got["by_kind"].get("probe-orphan", 0) == real["by_kind"].get("probe-orphan", 0)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_replay_of_emulate_and_each_online_strategy_equals_its_real_run(recorded, workload):
    spec, trace, _ = recorded[workload]
    assert set(online_names()) >= {"online-site", "online-rate", "online-probe"}
    assert_replays_exactly(spec, trace)


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


@pytest.mark.parametrize("quantum", [None, 20011])
def test_forked_processes_switched_in_short_slices_replay_exactly(debian_rootfs, quantum):
    """Processes with the same TLS share the CPU's slot as the kernel carries it across switches: a flip or
    a probe made in one process is met in the next (the orphan path of online-probe)."""
    spec = RunSpec(guest="/bin/dash", strategy="native", rootfs="debian", tree=None,
                   args=("-c", "f(){ i=0; while [ $i -lt 300 ]; do i=$((i+1)); done; echo $1; }; "
                               "f a & f b & f c; wait; echo x | tr x y"))
    options = {"quantum": quantum} if quantum else {}
    native_domain, _ = make_domain(spec, **options)
    native = native_domain.run()
    trace, result = record_accesses(spec, **options)
    assert result.ok and result.stdout == native.stdout and b"y\n" in native.stdout
    assert max(trace.space) >= 4     # dash, three subshells, tr
    assert_replays_exactly(spec, trace, options)


SHARED_SLOT_C = r"""
#include <stdio.h>
static __thread int tv[4] = {1, 2, 3, 4};
static int fs_neg(void) { int v; __asm__ volatile("movl %%fs:-16, %0" : "=r"(v)); return v; }
static int gs_neg(void) { int v; __asm__ volatile("movl %%gs:-16, %0" : "=r"(v)); return v; }
static int fs_pos(void) { int v; __asm__ volatile("movl %%fs:0, %0" : "=r"(v)); return v; }
static int gs_pos(void) { int v; __asm__ volatile("movl %%gs:0, %0" : "=r"(v)); return v; }
int main(void)
{
    unsigned short gs;
    unsigned long sum = 0;
    __asm__ volatile("mov %%gs, %0" : "=r"(gs));
    __asm__ volatile("mov %0, %%fs" :: "r"(gs));      /* %fs and %gs now use one TLS slot */
    for (int i = 0; i < 200; i++) {
        for (int j = 0; j < i % 7; j++) sum += gs_neg() + tv[j & 3];
        sum += fs_neg() + (fs_pos() != 0);
        for (int j = 0; j < i % 5; j++) sum += gs_pos() != 0;
        sum += fs_neg();
    }
    printf("%lu\n", sum);
    return 0;
}
"""


def test_a_guest_sharing_its_tls_slot_between_fs_and_gs_replays_exactly(tmp_path):
    """%fs through the %gs slot meets whatever the rule left there (flipped, empty): the replay checks %fs
    against the same table."""
    import subprocess

    from conftest import GCC32, require_gcc32

    require_gcc32()
    src, exe = tmp_path / "shared.c", tmp_path / "shared"
    src.write_text(SHARED_SLOT_C)
    subprocess.run([*GCC32, "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    spec = RunSpec(guest=str(exe), strategy="native", tree=None)
    native_domain, _ = make_domain(spec)
    native = native_domain.run()
    trace, result = record_accesses(spec)
    assert result.ok and result.stdout == native.stdout
    assert trace.segment.count(0) > 0     # %fs accesses reached the recorder
    assert_replays_exactly(spec, trace)


def test_a_rule_that_refuses_an_access_stops_the_replay(recorded):
    _, trace, _ = recorded["lsr"]

    class Refuses(EmulateRule):
        def decide(self, trap, insn, sign):
            from tlslab.hypervisor.strategies.base import Verdict
            return Verdict.kill("no")

    with pytest.raises(ReplayError, match="refused access 0"):
        replay(trace, replaying(Refuses)())


def test_the_design_script_prints_every_rule_and_caches_its_recording(tmp_path):
    """benchmarks/online_design.py on one small workload: both profiles, every rule with its tallies, the
    shipped rules' figures equal to real runs priced against the bench's bound; the second run reuses the
    recording."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "online_design.py"
    env = {**os.environ, "TLSLAB_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "design.json"

    def design():
        return subprocess.run([sys.executable, str(script), "--workloads", "canary 40 (default)", "--json", str(out)],
                              capture_output=True, text=True, env=env, timeout=600)

    first, second = design(), design()
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "recorded" in first.stderr and "cached" in second.stderr
    assert first.stdout == second.stdout
    for text in ("deciding and priced with hw-vm", "deciding and priced with xen-2004 (FITTED profile)",
                 "online-probe: at most min(emulate, flip) on", "last-value oracle (offline)",
                 "probe, re-probe x16", "probe, offset prior"):
        assert text in first.stdout, text
    (row,) = json.loads(out.read_text())["rows"]
    assert row["workload"] == "canary 40 (default)"
    from tlslab.analysis import hybrid
    from tlslab.hypervisor import costmodel

    spec = RunSpec(guest="canary", args=("40",), strategy="native")
    native_domain, _ = make_domain(spec, trace_signs=True)
    native_domain.run()
    runs, _ = native_domain.sign_runs("gs")
    profile = costmodel.get_profile("xen-2004")
    bound = hybrid.optimal_over(runs, *costmodel.fault_prices(profile)).cost_ns
    probe_domain, _ = make_domain(replace(spec, strategy="online-probe", prices="xen-2004"))
    probe_domain.run()
    real = costmodel.fault_handling_ns(profile, probe_domain.counters())
    assert row["by_profile"]["xen-2004"]["bound_ns"] == pytest.approx(bound)
    assert row["by_profile"]["xen-2004"]["online-probe"] == pytest.approx(real / bound)


def test_online_probe_re_probes_on_its_class_schedule(recorded):
    """``reprobe_factor`` (what the design studies vary) is the schedule online-probe follows."""
    from tlslab.hypervisor.strategies.online import REPROBE_FACTOR, ProbeStrategy

    _, trace, _ = recorded["lsr"]

    def probes(factor):
        cls = type("Probe", (ProbeStrategy,), {"reprobe_factor": factor})
        return replay(trace, replaying(cls)(PriceOptions("hw-vm"))).counters["strategy"]["by_kind"]["probe"]

    shipped = replay(trace, replaying(ProbeStrategy)(PriceOptions("hw-vm"))).counters["strategy"]["by_kind"]["probe"]
    assert probes(REPROBE_FACTOR) == shipped
    assert probes(2) > shipped > probes(1 << 40)


def test_a_patching_strategy_is_refused_by_replay_with_the_reason():
    with pytest.raises(ValueError, match="online-patch patches guest code"):
        replaying(STRATEGIES["online-patch"])
