"""flip: Xen's seg_fixup -- turn the faulting segment expand-down or back, restart.

The descriptor really changes in the guest's table and %gs is reloaded from it,
so every alternation between +ve and -ve offsets costs a fault. Variants:
``flip`` has seg_fixup's 2004 coverage (its own small decoder, %gs only);
``flip-full`` decodes anything; ``flip-fs`` also fixes %fs.
"""

from __future__ import annotations

from tlslab.hypervisor.strategies.base import Strategy, Trap, Verdict
from tlslab.machine import layout
from tlslab.machine.settle import SettledFaults, SettlePlan
from tlslab.x86 import coverage, xen


class FlipStrategy(Strategy):
    name = "flip"
    order = 20
    description = "Xen 2004 seg_fixup: flip %gs expand-up <-> expand-down and restart (its decoder, gs only)"
    segments = ("gs",)
    full_decoder = False
    settles_in_hook = True   # core_settle's plan mirrors this class exactly (not inherited)

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._memo: dict = {}  # (descriptor, offset, size) -> flipped descriptor (pure function)

    def before_decode(self, trap: Trap) -> Verdict | None:
        v = trap.violation
        if v.segment not in self.segments:
            return Verdict.kill(f"{self.name} only fixes {'/'.join(self.segments)}, fault was on {v.segment}")
        return None

    def step(self, trap: Trap, insn) -> Verdict:
        v = trap.violation
        domain = trap.domain
        c = self.counters
        if not self.full_decoder:
            ok, why = coverage.seg_fixup_decodes(insn)
            if not ok:
                c.count("uncovered")
                return Verdict.kill(f"seg_fixup cannot decode `{insn.mnemonic}`: {why}")
        key = (v.descriptor, v.offset, v.size)
        flipped = self._memo.get(key, False)
        if flipped is False:
            flipped = self._memo[key] = xen.flip(v.descriptor, v.offset, domain.policy.profile, size=v.size)
        if flipped is None:
            return Verdict.kill(f"genuine fault: {v.reason}")
        domain.vcpu.set_descriptor(layout.selector_index(v.selector), flipped)
        c.descriptor_writes += 1
        c.count("to-expand-down" if flipped.expand_down else "to-expand-up")
        return Verdict.restart()

    def core_settle(self, domain) -> SettlePlan | None:
        """The hook flips by the same rule (this strategy's memo) at the sites its decoder covers.
        The plan mirrors the class exactly, so only a class that says so (``settles_in_hook = True``
        in its own body, not inherited) gets one: a subclass that changes what a fault does
        (rewrite-2004 patches code after a flip) has every fault come to it."""
        if not type(self).__dict__.get("settles_in_hook"):
            return None
        profile = domain.policy.profile

        def admit(insn) -> int:
            return 1 if self.full_decoder or coverage.seg_fixup_decodes(insn)[0] else 0

        def flip(desc, offset: int, size: int):
            key = (desc, offset, size)
            flipped = self._memo.get(key, False)
            if flipped is False:
                flipped = self._memo[key] = xen.flip(desc, offset, profile, size=size)
            return flipped

        return SettlePlan("flip", self.segments, admit, flip=flip)

    def absorb_settled(self, settled: SettledFaults) -> None:
        super().absorb_settled(settled)
        c = self.counters
        c.descriptor_writes += settled.total
        for kind, n in (("to-expand-down", settled.flips_down), ("to-expand-up", settled.flips_up)):
            if n:
                c.by_kind[kind] = c.by_kind.get(kind, 0) + n


class FlipFullStrategy(FlipStrategy):
    name = "flip-full"
    order = 21
    description = "flip with a full decoder (any fs/gs form), gs only"
    full_decoder = True
    settles_in_hook = True


class FlipFsStrategy(FlipStrategy):
    name = "flip-fs"
    order = 22
    description = "flip with a full decoder, fixing both %gs and %fs"
    full_decoder = True
    segments = ("fs", "gs")
    settles_in_hook = True
