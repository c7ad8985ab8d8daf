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
from tlslab.x86 import coverage, semantics

class EmulateStrategy(Strategy):
    name = "emulate"
    order = 10
    description = "decode the faulting instruction, perform the access in the hypervisor, advance EIP (full coverage)"

    historical = False

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
