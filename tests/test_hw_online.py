"""Hardware truth for the online strategies: the supervisor takes the model's decisions.

``online-site``, ``online-probe`` (tlslab/hypervisor/strategies/online.py)
and ``online-lookahead`` (online_lookahead.py, with the C walk of
tlslab/x86/_ahead.c over the tracee's memory), the specifications, are run by
the ptrace supervisor with the same rules and the threshold from the same
prices. On lsr, syscalls, malloc and canary, in
the default and nosegneg builds, under the xen-2004 and hw-vm prices, the
real CPU must take exactly the model's faults at exactly the model's sites,
the supervisor must count the model's decisions (``by_kind``: emulate, flip,
probe, probe-flip, probe-end, site-marked-hot, ahead-flip, ahead-emulate,
flip-back, mode-flip, mode-emulate, and the instructions decoded ahead; and
descriptor writes), and
output and status must be identical. ``online-rate`` decides from the guest's
instructions between faults: the supervisor counts them by single-stepping up
to the rule's cap (tlslab/hw/supervisor/rate.c), with the model's cpuid
answers so that glibc takes the model's code paths (tlslab/machine/cpuid.py),
and must take the model's mode switches (``mode-flip``, ``mode-emulate``).
``online-patch`` rewrites the gs prefix of the sites it patches (tlslab/hw/supervisor/patch.c): the same
sites patched (``patches``), the same twin installs and the same faults (tests/test_hw_patch.py has its
dynamic, threaded and %fs-using cases).

Skips (with the reason) where the host cannot run 32-bit code or ptrace is
refused; with CI=true in the environment those become failures.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys

import pytest

from conftest import unavailable

from tlslab.hw import backend
from tlslab.hw.backend import HwError, HwUnavailable, policy_mismatches, run_spec

GUESTS = [("lsr", (".",)), ("syscalls", ("300",)), ("malloc", ()), ("canary", ())]
VARIANTS = ("default", "nosegneg")
STRATEGIES = ("online-site", "online-rate", "online-probe", "online-lookahead", "online-patch")
PRICES = ("xen-2004", "hw-vm")


@pytest.fixture(scope="module")
def hw_ok():
    from tlslab.experiment import RunSpec
    from tlslab.guests import GuestError

    try:
        run_spec(RunSpec("syscalls", ("1",), strategy="native"))
    except HwUnavailable as exc:
        unavailable(f"hw backend: {exc}")
    except GuestError as exc:
        unavailable(str(exc))
    return True


def model_run(spec):
    """The model's run of ``spec`` and its strategy object (for the threshold and counters)."""
    from tlslab.experiment import make_domain

    domain, _guest = make_domain(spec)
    if hasattr(domain.strategy, "lookahead"):
        # the supervisor walks at every fault (it cannot see the guest's mappings change, so it keeps no
        # memo); the memo changes no decision (test_online_lookahead), only what is counted as decoded
        domain.strategy.lookahead.memo = False
    return domain.run(), domain.strategy


def compare(spec, hw_runner=run_spec) -> str:
    """Run ``spec`` on the model and on the CPU; assert the same decisions, faults, sites and output."""
    model, strategy = model_run(spec)
    hw, _guest = hw_runner(spec)
    msites = {s["eip"]: s["violations"] for s in model.sites if s["violations"]}
    counters = strategy.counters
    on = hw.online
    line = (f"{spec.guest}{'.nosegneg' if spec.variant == 'nosegneg' else ''} {spec.strategy} {spec.prices}: "
            f"model {sum(msites.values())} faults/{len(msites)} sites {counters.by_kind}, "
            f"hw {hw.faults}/{len(hw.fault_sites)} {on and on['by_kind']}")
    assert model.crash is None, model.crash.describe()
    assert hw.ok, f"hw run died: signal {hw.signal}: {hw.summary.get('first_delivered')}"
    assert hw.stdout == model.stdout and hw.stderr == model.stderr
    assert hw.status == model.status
    assert not policy_mismatches(hw, spec.profile)
    assert hw.summary["delivered"] == 0
    assert on is not None
    # the threshold and the probe's cap compare as in Python: the same doubles
    assert on["threshold"] == strategy.threshold, line
    assert on["probe_cap"] == int(strategy.threshold) + 1, line
    assert hw.faults == sum(msites.values()) == counters.traps, line
    assert hw.fault_sites == msites, line
    assert on["by_kind"] == counters.by_kind, line
    assert on["descriptor_writes"] == counters.descriptor_writes, line
    assert on["patches"] == counters.patches, line
    assert on["emulations"] == counters.emulated_instructions, line
    assert on["unknown_sign"] == 0
    assert hw.summary["emulated"] + hw.summary["stepped"] == counters.by_kind.get("emulate", 0)
    return line


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("prices", PRICES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,args", GUESTS, ids=[g for g, _ in GUESTS])
def test_hw_online_equals_model(hw_ok, oracle_summary, name, args, variant, strategy, prices):
    from tlslab.experiment import RunSpec

    spec = RunSpec(name, args, strategy=strategy, variant=variant, prices=prices, stdout="pipe")
    line = compare(spec)
    assert hw_ok
    oracle_summary[f"hw {name}.{variant} {strategy} {prices}"] = line + " (equal)"


@pytest.mark.oracle
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threshold_on_an_integer_boundary(hw_ok, strategy):
    """Prices from the spec's own fields, giving threshold exactly 3.0: `streak > 3`, cap 4, both sides."""
    from tlslab.experiment import RunSpec

    spec = RunSpec("lsr", (".",), strategy=strategy, prices="hw-vm", emulate_ns=1000.0, flip_ns=1500.0)
    assert backend.model_prices(spec) == (1000.0, 1500.0)
    compare(spec)


@pytest.mark.oracle
@pytest.mark.parametrize("guest,variant", [("canary", "nosegneg"), ("lsr", "default")])
def test_step_fallback_keeps_the_decisions(hw_ok, guest, variant):
    """--step-only: every emulation single-steps with the descriptor admitting the access's sign (the
    expand-down twin, or the truncated form for a positive offset under a probe) and then puts back the
    slot's state (up, down or the empty descriptor): the same faults and decisions as the model's."""
    from tlslab.experiment import RunSpec

    stepping = functools.partial(backend.run_hw, step_only=True)

    def runner(spec):
        original = backend.run_hw
        backend.run_hw = stepping
        try:
            return run_spec(spec)
        finally:
            backend.run_hw = original

    spec = RunSpec(guest, (".",) if guest == "lsr" else (), strategy="online-probe", variant=variant,
                   prices="hw-vm")
    compare(spec, runner)


@pytest.mark.oracle
def test_cli_hw_json_reports_the_model_counts(hw_ok):
    """`tlslab run GUEST -s online-probe --backend hw --json`: hw_counters.online.by_kind are the model's
    counters.strategy.by_kind for the same run."""
    import json

    args = ["run", "canary", "--variant", "nosegneg", "-s", "online-probe", "--json", "-q"]
    hw = subprocess.run([sys.executable, "-m", "tlslab", *args, "--backend", "hw"], capture_output=True,
                        text=True, timeout=300)
    model = subprocess.run([sys.executable, "-m", "tlslab", *args], capture_output=True, text=True, timeout=300)
    assert hw.returncode == 0 and model.returncode == 0, hw.stderr + model.stderr
    h, m = json.loads(hw.stdout), json.loads(model.stdout)
    s = m["counters"]["strategy"]
    assert h["faults"] == s["traps"]
    assert h["hw_counters"]["online"]["by_kind"] == s["by_kind"]
    assert h["hw_counters"]["online"]["descriptor_writes"] == s["descriptor_writes"]


@pytest.mark.oracle
def test_cli_hw_json_carries_the_guest_output_as_the_model_record_does(hw_ok):
    """`tlslab run --json` on either backend: the record holds the guest's stdout (it is not printed
    around the JSON, which would make the record unparseable), and `-q` leaves it out of both."""
    import json

    args = ["run", "lsr", "-s", "flip", "--json", "--", "."]
    hw = subprocess.run([sys.executable, "-m", "tlslab", *args[:-2], "--backend", "hw", *args[-2:]],
                        capture_output=True, text=True, timeout=300)
    model = subprocess.run([sys.executable, "-m", "tlslab", *args], capture_output=True, text=True, timeout=300)
    assert hw.returncode == 0 and model.returncode == 0, hw.stderr + model.stderr
    h, m = json.loads(hw.stdout), json.loads(model.stdout)
    assert h["stdout"] and h["stdout"] == m["stdout"] and h["stderr"] == m["stderr"] == ""
    quiet = subprocess.run([sys.executable, "-m", "tlslab", *args[:-2], "-q", "--backend", "hw", *args[-2:]],
                           capture_output=True, text=True, timeout=300)
    assert json.loads(quiet.stdout)["stdout"] is None


ORPHAN_C = r"""
#include <stdio.h>
#include <sys/wait.h>

static __thread int tv = 5;

int main(void) {
    int s = 0;
    tv++;                                   /* a new site: probed, the empty descriptor installed */
    long pid;
    __asm__ volatile("int $0x80" : "=a"(pid) : "0"(2L) : "memory"); /* fork: no %gs access in between */
    if (pid == 0) {
        tv++;                               /* the child's inherited slot: empty, no probe record */
        __asm__ volatile("int $0x80" ::"a"(1L), "b"((long)tv)); /* _exit(tv) */
    }
    waitpid((int)pid, &s, 0);
    printf("child %d parent %d\n", WEXITSTATUS(s), tv);
    return 0;
}
"""


@pytest.mark.oracle
def test_probe_orphan_in_a_forked_child(hw_ok, tmp_path):
    """A fork during a probe: the child inherits the empty descriptor but not the probe (per-thread state
    in the supervisor): its first %gs fault restores the truncated form (probe-orphan) and it runs on.
    (The model keys the probe by vCPU, so there the child continues the parent's probe: one fault fewer.)"""
    from conftest import build_c_guest

    exe = build_c_guest(ORPHAN_C, tmp_path, "orphan")
    r = backend.run_hw(exe, strategy="online-probe", tree=None, prices=(1000.0, 1500.0))
    assert r.ok and r.status == 0 and r.stdout == b"child 7 parent 6\n"
    assert r.summary["delivered"] == 0
    assert r.online["by_kind"].get("probe-orphan") == 1
    child = r.processes[1]
    assert child["exited"] and child["status"] == 7 and child["faults"] >= 2


# --------------------------------------------------------------------------- refusals (no hw needed)

def test_online_strategies_need_prices_and_a_known_patch_policy():
    for strategy in backend.ONLINE:
        with pytest.raises(ValueError, match="prices"):
            backend.run_hw("/nonexistent", strategy=strategy)
    with pytest.raises(ValueError, match="patch policy 'sometimes'"):
        backend.run_hw("/nonexistent", strategy="online-patch", prices=(1.0, 1.0), patch_policy="sometimes")


def test_model_prices_are_the_strategy_s():
    from tlslab.experiment import RunSpec
    from tlslab.hypervisor.strategies.online import PriceOptions

    for prices in PRICES:
        spec = RunSpec("lsr", strategy="online-site", prices=prices)
        assert backend.model_prices(spec) == PriceOptions(prices).fault_prices()
    spec = dataclasses.replace(spec, prices="no-such-profile")
    with pytest.raises(HwError):
        backend.model_prices(spec)


def test_bench_hw_cells_for_online_strategies_only_when_asked():
    from tlslab.bench.spec import MatrixSpec, SpecError

    base = 'strategies = ["native", "emulate", "online-probe"]\nbackends = ["unicorn", "hw"]\n'
    guest = '[[guest]]\nname = "lsr"\n'
    hw = [c for c in MatrixSpec.from_toml(base + guest, "a.toml").cells() if c.backend == "hw"]
    assert {c.spec.strategy for c in hw} == {"native", "emulate"}   # the default hw strategies
    asked = base + '[hw]\nstrategies = ["emulate", "online-probe"]\n' + guest
    hw = [c for c in MatrixSpec.from_toml(asked, "b.toml").cells() if c.backend == "hw"]
    assert {c.spec.strategy for c in hw} == {"emulate", "online-probe"}
    with pytest.raises(SpecError, match="no hw implementation"):
        MatrixSpec.from_toml(base + '[hw]\nstrategies = ["rewrite"]\n' + guest, "c.toml")
