"""The strategy interface: what a hypervisor does with a segment #GP.

A strategy receives a ``Trap`` (the vCPU's segment-violation exit plus a
handle on the guest) and returns a ``Verdict``: resume (it completed the
instruction and moved EIP), restart (it changed state; run the instruction
again) or kill (inject SIGSEGV: the fault is genuine or unhandled, reported
with its site). Strategies act on real guest state -- a wrong one breaks the
guest instead of producing numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tlslab.machine.vcpu import SegmentViolation

if TYPE_CHECKING:
    from tlslab.hypervisor.domain import Domain


class Action(enum.Enum):
    RESUME = "resume"    # instruction completed by the strategy, EIP advanced
    RESTART = "restart"  # state changed (descriptor, code); execute the instruction again
    KILL = "kill"        # deliver SIGSEGV to the guest process


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""

    @classmethod
    def resume(cls) -> "Verdict":
        return cls(Action.RESUME)

    @classmethod
    def restart(cls) -> "Verdict":
        return cls(Action.RESTART)

    @classmethod
    def kill(cls, reason: str) -> "Verdict":
        return cls(Action.KILL, reason)


@dataclass
class StrategyCounters:
    """Work a strategy did; the cost model maps these to time."""

    traps: int = 0               # #GP faults taken into the hypervisor
    decodes: int = 0             # instructions decoded
    descriptor_writes: int = 0   # descriptor table updates (flips)
    emulated_accesses: int = 0   # memory accesses performed by an emulator
    emulated_instructions: int = 0
    patches: int = 0             # code sites rewritten
    notifications: int = 0       # events bounced to the guest kernel
    refused: int = 0             # faults turned into guest SIGSEGV
    by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


@dataclass(frozen=True)
class Trap:
    violation: SegmentViolation
    domain: "Domain"


class Strategy:
    """Base class: subclasses set ``name``/``description`` and implement ``handle``."""

    name = "?"
    description = ""
    truncates = True  # does this strategy run under a truncating hypervisor?

    def __init__(self) -> None:
        self.counters = StrategyCounters()

    def attach(self, domain: "Domain") -> None:
        """Called once the guest is loaded, before it runs."""

    def handle(self, trap: Trap) -> Verdict:
        raise NotImplementedError
