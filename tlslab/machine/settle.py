"""Settling segment faults inside the access hook, without leaving Unicorn.

A fault the Python run loop handles costs an exit from Unicorn, a trip through
the strategy and a re-entry (tens of microseconds, benchmarks/FAULT_COST.md).
For the two mechanisms the 2004 question is about, the answer is simple
enough to give in the C hook itself (``_fastpath.c``: ``settle_fault``):

- *emulate*: the emulator performs the access through the descriptor the
  guest asked for, refusing the hypervisor hole and anything outside guest
  user space. The window aliases guest memory at exactly that address, so the
  hook lets the access through and the CPU completes the instruction.
- *flip*: the strategy's flip rule gives the new descriptor (same base, so
  Unicorn's view of the slot does not change); the hook judges the access
  again under it, as the restarted instruction would be.

A strategy states what may be settled (``SettlePlan``): which registers, and
per instruction whether it may be (for emulation, only forms whose every
access is their one explicit fs/gs operand, so nothing of the instruction
escapes the check). Every fault the hook declines -- a genuine one, an
instruction form not admitted, an access the emulator would refuse -- exits
to Python exactly as before. The counts the hook settled come back as
``SettledFaults`` after every run, and the strategy adds them to its
counters, so a run's counters are the same either way (a test runs the
default matrix both ways).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tlslab.x86.decode import Instruction
from tlslab.x86.descriptor import SegmentDescriptor


@dataclass(frozen=True)
class SettlePlan:
    """What a strategy lets the hook settle for it.

    ``admit(insn)``: 0 if a fault at ``insn`` must go to Python, else (emulate)
    how many memory accesses the strategy's emulator performs for it, the
    count its counters would show (flip: any positive number).
    ``emulate_view(installed)``: the descriptor the emulator applies for a slot
    holding ``installed`` (None: it refuses). ``flip(descriptor, offset,
    size)``: the flipped descriptor, or None for a genuine fault.
    """

    mode: str                                   # "emulate" or "flip"
    segments: tuple[str, ...]                   # registers whose faults may be settled ("fs", "gs")
    admit: Callable[[Instruction], int]
    emulate_view: Callable[[SegmentDescriptor], SegmentDescriptor | None] | None = None
    flip: Callable[[SegmentDescriptor, int, int], SegmentDescriptor | None] | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("emulate", "flip"):
            raise ValueError(f"settle mode {self.mode!r}: emulate or flip")
        if (self.mode == "emulate") != (self.emulate_view is not None) or (self.mode == "flip") != (
                self.flip is not None):
            raise ValueError("an emulate plan needs emulate_view, a flip plan needs flip (and only that)")


@dataclass
class SettledFaults:
    """Faults the hook settled during one or more runs of a vCPU."""

    faults: dict[str, int] = field(default_factory=lambda: {"fs": 0, "gs": 0})
    emulated_accesses: int = 0
    flips_down: int = 0    # to expand-down
    flips_up: int = 0      # back to expand-up

    @property
    def total(self) -> int:
        return sum(self.faults.values())

    def add(self, other: SettledFaults) -> None:
        for seg, n in other.faults.items():
            self.faults[seg] = self.faults.get(seg, 0) + n
        self.emulated_accesses += other.emulated_accesses
        self.flips_down += other.flips_down
        self.flips_up += other.flips_up
