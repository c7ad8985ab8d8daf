"""emulate: decode the faulting instruction and perform it in the hypervisor.

Two coverages: ``emulate`` handles every fs/gs memory-operand form gcc and
glibc emit (tlslab.x86.semantics); ``emulate-2004`` is what Xen's emulate.c
shipped in 2004: mov/cmp forms only, operand-size and segment prefixes only,
negative offsets only (top nibble 0xF), unsafe linear addresses refused.
Anything uncovered kills the guest, as it did then.
"""

from __future__ import annotations

from tlslab.hypervisor.access import AccessRefused, EmulatedCPU, GuestAccess
from tlslab.hypervisor.strategies.base import Strategy, Trap, Verdict
from tlslab.machine.settle import SettledFaults, SettlePlan
from tlslab.x86 import coverage, semantics

#: instructions a fault at which the access hook may settle by letting the access through: each one reads
#: and/or writes its explicit operand once, unconditionally, and push/pop/call also the stack, which the
#: hook checks as the emulator would (a flat %ss, guest user space, page rights)
HOOK_EMULATED = frozenset({"mov", "movzx", "movsx", "add", "or", "adc", "sbb", "and", "sub", "xor", "cmp", "test",
                           "inc", "dec", "not", "neg", "push", "pop", "call", "jmp"})


class _CountingCPU:
    """A CPU of zeros that counts the memory accesses an emulation makes."""

    def __init__(self) -> None:
        self.accesses = 0

    def read_reg(self, name: str) -> int:
        return 0

    def write_reg(self, name: str, value: int) -> None:
        pass

    def read_mem(self, segment: str, offset: int, size: int) -> int:
        self.accesses += 1
        return 0

    def write_mem(self, segment: str, offset: int, size: int, value: int) -> None:
        self.accesses += 1


def hook_emulated_accesses(insn) -> int:
    """0 if a fault at ``insn`` must come to Python, else how many accesses ``semantics.execute`` makes
    for it (the count EmulateStrategy reports): forms of :data:`HOOK_EMULATED` through fs/gs, with no
    lock, rep or address-size prefix and no segment-register operand."""
    p = insn.prefixes
    if (insn.mnemonic not in HOOK_EMULATED or insn.memory is None or insn.memory.segment not in ("fs", "gs")
            or p.lock or p.rep or p.repne or p.address_size_override or any(o.startswith("S") for o in insn.operands)
            or not semantics.supported(insn)[0]):
        return 0
    cpu = _CountingCPU()
    try:
        semantics.execute(insn, cpu)
    except (semantics.UnsupportedInstruction, semantics.DivideError):
        return 0
    return cpu.accesses

class EmulateStrategy(Strategy):
    name = "emulate"
    order = 10
    description = "decode the faulting instruction, perform the access in the hypervisor, advance EIP (full coverage)"

    historical = False
    settles_in_hook = True   # core_settle's plan mirrors this class exactly (not inherited)

    def covered(self, insn, violation) -> tuple[bool, str]:
        return semantics.supported(insn)

    def step(self, trap: Trap, insn) -> Verdict:
        v = trap.violation
        domain = trap.domain
        c = self.counters
        ok, why = self.covered(insn, v)
        if not ok:
            c.count("uncovered")
            return Verdict.kill(f"{self.name} does not handle `{insn.mnemonic}`: {why}")
        segments = {name: domain.segment_view(name) for name in ("es", "cs", "ss", "ds", "fs", "gs")}
        access = GuestAccess(domain, segments, domain.policy.hypervisor_start)
        cpu = EmulatedCPU(domain, access)
        try:
            semantics.execute(insn, cpu)
        except AccessRefused as exc:
            c.count("refused-unsafe" if exc.linear is not None else "refused-segment")
            return Verdict.kill(f"DISALLOWING UNSAFE ACCESS: {exc.reason}")
        except (semantics.UnsupportedInstruction, semantics.DivideError) as exc:
            return Verdict.kill(f"cannot emulate `{insn.mnemonic}`: {exc}")
        cpu.commit()
        c.emulated_instructions += 1
        c.emulated_accesses += access.accesses
        domain.vcpu.retire(1)
        return Verdict.resume()

    def core_settle(self, domain) -> SettlePlan | None:
        """The hook performs the access through what the guest asked for (``Domain.requested_for``),
        with the same refusals as ``GuestAccess``, for the forms :func:`hook_emulated_accesses` admits.
        The plan mirrors this class's ``step``, ``covered`` and counting exactly, so only a class that
        says so (``settles_in_hook = True`` in its own body, not inherited) gets one: a subclass that
        changes anything (as emulate-2004's coverage does) has every fault come to it."""
        if not type(self).__dict__.get("settles_in_hook"):
            return None
        return SettlePlan("emulate", ("fs", "gs"), hook_emulated_accesses, emulate_view=domain.requested_for)

    def absorb_settled(self, settled: SettledFaults) -> None:
        super().absorb_settled(settled)
        self.counters.emulated_instructions += settled.total
        self.counters.emulated_accesses += settled.emulated_accesses


class Emulate2004Strategy(EmulateStrategy):
    name = "emulate-2004"
    order = 11
    description = "Xen 2004 emulate.c: mov/cmp subset, -ve offsets only, unsafe addresses refused"
    historical = True

    def covered(self, insn, violation) -> tuple[bool, str]:
        ok, why = coverage.emulate_2004_handles(insn)
        if not ok:
            return ok, why
        if not coverage.emulate_2004_offset_ok(violation.offset):
            return False, f"offset {violation.offset:#x} is not negative (2004 emulated -ve offsets only)"
        return semantics.supported(insn)
