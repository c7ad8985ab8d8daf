"""Faults settled inside the access hook (machine/settle.py) change nothing but the time they take.

Issue 14 item 2: the hook settles emulate and flip faults without leaving
Unicorn; every fault it declines goes to the Python strategy as before. The
contract is that a run's counters are *identical* either way, so the main
test runs every model cell of the default bench matrix whose strategy has a
settle plan, once with the hook settling and once with every fault taken to
Python, and compares everything a run reports: counters (strategy, machine,
Linux, per-thread), per-site counters, output and exit status.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tlslab.bench.spec import load_spec
from tlslab.experiment import RunSpec, make_domain
from tlslab.hypervisor.strategies import get_strategy
from tlslab.hypervisor.strategies.emulate import hook_emulated_accesses
from tlslab.x86.decode import decode


_DOMAIN = SimpleNamespace(policy=SimpleNamespace(profile="nonpae"), requested_for=lambda desc: desc)


def _settling_cells():
    """Model cells of the default matrix whose strategy has a settle plan (others settle nothing)."""
    return [cell for cell in load_spec().cells()
            if cell.backend == "unicorn" and not cell.skip
            and get_strategy(cell.spec.strategy).core_settle(_DOMAIN) is not None]


CELLS = _settling_cells()


def _run(spec: RunSpec, settle: bool):
    domain, _ = make_domain(spec, settle=settle)
    python_faults = 0
    handle = domain.strategy.handle

    def counting(trap):
        nonlocal python_faults
        python_faults += 1
        return handle(trap)

    domain.strategy.handle = counting
    return domain.run(), python_faults


def _observable(result) -> dict:
    return {"status": result.status, "stdout": result.stdout, "stderr": result.stderr,
            "crash": result.crash.describe() if result.crash else None,
            "counters": result.counters, "sites": result.sites}


def test_the_default_matrix_has_settling_cells():
    strategies = {c.spec.strategy for c in CELLS}
    assert {"emulate", "flip"} <= strategies, strategies
    assert len(CELLS) >= 40


@pytest.mark.parametrize("name", ["emulate-2004", "rewrite-2004", "online-probe", "rewrite", "native"])
def test_strategies_whose_step_differs_get_every_fault(name):
    """A subclass that changes what a fault does (coverage, patching) must not inherit a plan."""
    assert get_strategy(name).core_settle(_DOMAIN) is None


@pytest.mark.parametrize("cell", CELLS, ids=[c.label for c in CELLS])
def test_settling_in_the_hook_changes_no_counter(cell):
    python_path, all_to_python = _run(cell.spec, settle=False)
    hooked, to_python = _run(cell.spec, settle=True)
    assert _observable(hooked) == _observable(python_path)
    traps = python_path.counters["strategy"]["traps"]
    assert all_to_python == traps
    assert to_python <= traps


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_the_hook_settles_nearly_every_fault_of_lsr(strategy):
    """The comparison above is not vacuous: the hook really settles (lsr: all but a handful)."""
    result, to_python = _run(RunSpec("lsr", strategy=strategy), settle=True)
    traps = result.counters["strategy"]["traps"]
    assert traps > 4000
    assert to_python <= traps // 100, (to_python, traps)


def test_max_traps_sees_every_trap():
    """--max-traps counts traps one by one: nothing is settled behind its back."""
    domain, _ = make_domain(RunSpec("canary", args=("40",), strategy="emulate"), max_traps=25)
    result = domain.run()
    assert result.counters["strategy"]["traps"] == 25
    assert "stopped after 25 traps" in result.crash.reason


@pytest.mark.parametrize("code, accesses", [
    (b"\x65\xa1\xf0\xff\xff\xff", 1),            # mov %gs:-0x10, %eax
    (b"\x65\x01\x05\xfc\xff\xff\xff", 2),        # add %eax, %gs:-4 (read, then write)
    (b"\x65\x3b\x05\xfc\xff\xff\xff", 1),        # cmp %gs:-4, %eax
    (b"\x65\xff\x35\xfc\xff\xff\xff", 2),        # push %gs:-4 (and the stack)
    (b"\x65\xf0\x01\x05\xfc\xff\xff\xff", 0),    # lock add: not admitted
    (b"\x65\x0f\xb1\x0d\xfc\xff\xff\xff", 0),    # cmpxchg: its write is conditional
    (b"\x65\xa5", 0),                            # movs: a string access through %es too
    (b"\x65\x8e\x05\xfc\xff\xff\xff", 0),        # mov to a segment register
    (b"\x3e\xa1\xf0\xff\xff\xff", 0),            # not through fs/gs
])
def test_which_instructions_the_hook_may_emulate(code, accesses):
    insn = decode(code, 0x1000)
    assert hook_emulated_accesses(insn) == accesses
