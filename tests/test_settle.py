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


# ------------------------------------------------------------------ the machine-level details behind the contract
def _settling_vcpu(body: str):
    """A vCPU running ``body`` with a truncated %gs and the hook settling emulate faults."""
    from test_machine import TCB, make_vcpu, truncated

    from tlslab.machine.settle import SettlePlan
    from tlslab.x86.descriptor import SegmentDescriptor

    flat = SegmentDescriptor.flat_user_data(TCB)
    v = make_vcpu(body, truncated())
    v.settle_in_hook(SettlePlan("emulate", ("fs", "gs"), hook_emulated_accesses, emulate_view=lambda d: flat))
    return v


@pytest.mark.parametrize("insn, accesses", [
    ("mov dword ptr gs:[-0x1f], ebx", 1),   # an unaligned store: Unicorn retries it byte by byte, asking again
    ("add dword ptr gs:[-0x1f], ebx", 2),
    ("mov ebx, dword ptr gs:[-0x1f]", 1),
    ("mov word ptr gs:[-0x21], bx", 1),
])
def test_an_unaligned_access_is_one_settled_fault(insn, accesses):
    """As EmulateStrategy counts it: one trap, its emulator's accesses (not one more per byte)."""
    from test_machine import TCB

    from tlslab.machine.vcpu import ExitReason

    v = _settling_vcpu("mov ebx, 0x01020304; " + insn)
    assert v.run().reason is ExitReason.SYSCALL
    settled = v.take_settled()
    assert (settled.total, settled.emulated_accesses) == (1, accesses)
    assert v.counters.violations == {"gs": 1}
    if insn.startswith("mov dword ptr"):
        assert v.mem.read(TCB - 0x1F, 4) == bytes.fromhex("04030201")


def test_a_jmp_through_gs_keeps_the_schedule():
    """A settled jmp resumes at its target, a block boundary, as the Python path's resume does: a time slice
    ends at the same instruction both ways (found by review: the first run's block was exempt)."""
    from test_machine import CODE, KS, PROLOGUE, TCB

    from tlslab.machine.vcpu import ExitReason

    head = PROLOGUE + "inc ecx; " * 20 + "jmp dword ptr gs:[-0x20]; "
    target = CODE + len(bytes(KS.asm(head, CODE)[0]))
    body = "inc ecx; " * 20 + "jmp dword ptr gs:[-0x20]; " + "inc ecx; " * 30

    def drive(settle: bool, quantum: int):
        from test_machine import make_vcpu, truncated

        v = _settling_vcpu(body) if settle else make_vcpu(body, truncated())
        v.mem.write_u32(TCB - 0x20, target)
        while True:
            e = v.run(budget=quantum - v.instructions_retired())
            if e.reason is ExitReason.SEGMENT_VIOLATION:     # what EmulateStrategy does with it
                v.regs.set("eip", v.mem.read_u32(TCB - 0x20))
                v.retire(1)
                continue
            return e.reason, e.eip, v.instructions_retired()

    for quantum in (5, 23, 30):
        assert drive(True, quantum) == drive(False, quantum), quantum


def test_an_exec_keeps_what_is_left_of_the_time_slice():
    """The new image counts instructions from 0: the slice's end moves to its clock (found by review)."""
    from types import SimpleNamespace

    from tlslab.linux.kernel import Kernel

    class Clock:
        def __init__(self, now):
            self.now = now

        def instructions_retired(self):
            return self.now

        counters = SimpleNamespace(instructions=0)

    k = Kernel.__new__(Kernel)
    k.slice_end, k.gdt_owner, k.on_new_address_space = 1_600_000, None, []
    k._account = k._retire_vcpu = lambda *a: None
    k._load_tls = lambda task: None
    process = SimpleNamespace(vcpu=Clock(1_500_000), threads=[])
    task = SimpleNamespace(process=process)
    process.threads.append(task)
    k.new_vcpu = lambda: Clock(0)
    k.exec_image(task, lambda vcpu: setattr(process, "vcpu", vcpu))
    assert k.slice_end == 100_000
