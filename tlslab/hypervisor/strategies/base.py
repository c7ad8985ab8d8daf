"""The strategy interface: what a hypervisor does with a segment #GP.

A strategy receives a ``Trap`` (the vCPU's segment-violation exit plus a
handle on the guest) and returns a ``Verdict``: resume (it completed the
instruction and moved EIP), restart (it changed state; run the instruction
again) or kill (inject SIGSEGV: the fault is genuine or unhandled, reported
with its site). Strategies act on real guest state -- a wrong one breaks the
guest instead of producing numbers.

Every strategy follows one template (``Strategy.handle``): count the trap,
let the strategy refuse or settle it before decoding (``before_decode``: the
2004 code looked at the segment first), decode the instruction once
(``fetch_and_decode``, cached), hand it to the strategy's own ``step``, and
count a kill as a refusal. Options are declared per strategy as a frozen
dataclass (``Options``) and validated when the strategy is made
(``tlslab.hypervisor.strategies.get_strategy(name, **options)``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from tlslab.hypervisor.policy import DescriptorPolicy
from tlslab.linux.process import Process
from tlslab.machine.settle import SettledFaults, SettlePlan
from tlslab.machine.vcpu import SegmentViolation, VCpu
from tlslab.x86.decode import DecodeError, decode
from tlslab.x86.descriptor import SegmentDescriptor

MAX_INSN = 15


class Action(enum.Enum):
    RESUME = "resume"    # instruction completed by the strategy, EIP advanced
    RESTART = "restart"  # state changed (descriptor, code); execute the instruction again
    KILL = "kill"        # deliver SIGSEGV to the guest process


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str = ""

    @classmethod
    def resume(cls) -> Verdict:
        return cls(Action.RESUME)

    @classmethod
    def restart(cls) -> Verdict:
        return cls(Action.RESTART)

    @classmethod
    def kill(cls, reason: str) -> Verdict:
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


class DomainView(Protocol):
    """What a strategy may use of the domain that trapped to it (the domain drives; strategies receive)."""

    vcpu: VCpu
    process: Process
    policy: DescriptorPolicy
    strategy: Strategy

    def segment_view(self, segment: str) -> SegmentDescriptor | None: ...

    def requested_descriptor(self, segment: str) -> SegmentDescriptor | None: ...

    def symbolize(self, eip: int) -> str: ...


@dataclass(frozen=True)
class Trap:
    violation: SegmentViolation
    domain: DomainView


@dataclass(frozen=True)
class NoOptions:
    """A strategy without options."""


class StrategyOptionError(ValueError):
    """An option the strategy does not declare, or a bad value (one line)."""


def fetch_and_decode(domain, eip: int):
    """Decode the instruction at ``eip`` (fewer bytes near the end of a mapping).

    Cached per address: guest code does not change unless a strategy patches
    it, and patching clears the cache (``VCpu.invalidate_code``). Returns a
    ``DecodeError`` (never raises) when nothing is mapped there.
    """
    cached = domain.vcpu.decoded.get(eip)
    if cached is not None:
        return cached
    mem = domain.vcpu.mem
    n = MAX_INSN
    while n > 0 and not mem.is_mapped(eip, n):
        n -= 1
    if n == 0:
        return DecodeError(f"instruction at {eip:#010x} is not mapped")
    insn = domain.vcpu.decoded[eip] = decode(mem.read(eip, n), eip)
    return insn


class Strategy:
    """Base class: subclasses set ``name``/``description`` and implement ``step``.

    ``Options`` is the strategy's declared options (a frozen dataclass whose
    ``__post_init__`` validates); the instance holds them as ``options``.
    """

    name = "?"
    description = ""
    truncates = True  # does this strategy run under a truncating hypervisor?
    order: ClassVar[int] = 100  # position in listings and "all" (the historical ones first)
    # does it rewrite guest code? The offline bound (tlslab.analysis.hybrid) prices emulate and flip
    # only, so it bounds the strategies that do not
    patches_code: ClassVar[bool] = False
    # does it read guest code or memory beyond the faulting instruction (online-lookahead)? A recording of
    # accesses (tlslab.inspect.replay) does not hold them, so it cannot replay such a strategy
    reads_guest_memory: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options=None) -> None:
        self.options = options if options is not None else self.Options()
        self.counters = StrategyCounters()

    @classmethod
    def make(cls, **options) -> Strategy:
        """A strategy with ``options`` checked against its declaration (StrategyOptionError)."""
        try:
            opts = cls.Options(**options)
        except TypeError as exc:
            known = ", ".join(f.name for f in cls.Options.__dataclass_fields__.values()) or "none"
            raise StrategyOptionError(f"strategy {cls.name}: {exc} (its options: {known})") from None
        except ValueError as exc:
            raise StrategyOptionError(f"strategy {cls.name}: {exc}") from None
        return cls(opts)

    def attach(self, domain: DomainView) -> None:
        """Called once the guest is loaded, before it runs."""

    def attach_process(self, domain: DomainView, process, how: str) -> str | None:
        """A new address space appeared (``how``: "fork" copies the parent's, "exec" is fresh).

        Returns None, or why this strategy cannot follow the guest there (the run stops with it).
        """
        return None

    def handle(self, trap: Trap) -> Verdict:
        """The template: count, pre-check, decode once, step, count a kill."""
        c = self.counters
        c.traps += 1
        verdict = self.before_decode(trap)
        if verdict is None:
            insn = fetch_and_decode(trap.domain, trap.violation.eip)
            c.decodes += 1
            if isinstance(insn, DecodeError):
                verdict = Verdict.kill(f"cannot decode: {insn}")
            else:
                verdict = self.step(trap, insn)
        if verdict.action is Action.KILL:
            c.refused += 1
        return verdict

    def null_selector_fault(self, domain: DomainView, eip: int, segment: str) -> Verdict | None:
        """A #GP from an access through %fs/%gs holding the null selector (Xen's #GP handler sees these
        too). None (the default): the guest gets its SIGSEGV, as natively; a strategy whose own code
        change caused the fault (a rewritten site) may repair it and restart."""
        return None

    def before_decode(self, trap: Trap) -> Verdict | None:
        """A verdict reached without decoding (None: decode and ``step``)."""
        return None

    def core_settle(self, domain: DomainView) -> SettlePlan | None:
        """The faults this strategy lets the access hook settle without a trip through Python
        (``tlslab.machine.settle``); None: every fault comes to ``handle``."""
        return None

    def absorb_settled(self, settled: SettledFaults) -> None:
        """Count faults the hook settled under this strategy's plan as ``handle`` would have."""
        self.counters.traps += settled.total
        self.counters.decodes += settled.total

    def step(self, trap: Trap, insn) -> Verdict:
        raise NotImplementedError


class WatchesLeaks:
    """Patching strategies: record "patched bytes reached a file" from the page-cache model."""

    patches_code = True

    hazards: list[str]

    def watch_leaks(self, domain) -> None:
        self.hazards = []
        domain.process.page_cache.on_leak.append(self._on_leak)

    def _on_leak(self, leak) -> None:
        self.counters.count("patched-bytes-reached-a-file")
        self.hazards.append(leak.describe())
