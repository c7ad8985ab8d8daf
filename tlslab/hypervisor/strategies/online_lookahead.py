"""online-lookahead: read the code after the fault; flip where it shows the run pays, emulate elsewhere.

The other online rules learn run lengths from faults, and learning costs
faults: on a program that meets each site once or twice there is nothing to
learn from, and a probe never repays itself (fs-user, selfread, prelink: 1.8
to 2.2 negative accesses per site). This rule does not learn. At a fault it
decodes ahead in the guest's code (:mod:`tlslab.hypervisor.lookahead`) and
gets a bound on the run the access starts:

* at least ``low`` same-sign accesses on every path: if ``low`` exceeds the
  threshold ``2F/E`` a flip pays for itself whatever else happens: **flip**;
* every path ends at an access of the other sign, after at most ``high``
  accesses, and ``high`` does not exceed the threshold: emulating the whole
  run costs no more than a flip and its flip back: **emulate**;
* otherwise the code does not say: do what ``emulate`` does, **emulate** a
  negative offset; a positive one (the slot is flipped) **flips back**, as
  Xen does.

So it is ``emulate`` except where the code proves a flip pays, and its flips
are undone the way Xen's are: where the lookahead is right it never costs
more than emulate, and it flips runs that emulate pays for access by access.
It never installs anything but emulate's and flip's descriptors.

Inputs, all available to Xen's #GP handler: the faulting address and
instruction, the guest's registers (the trap frame), its code and memory
below the hypervisor (x86_emulate reads both to emulate one instruction; this
reads a few dozen), the slot's descriptor. ``%fs`` faults are emulated as by
every online rule.

Its price: every instruction decoded ahead (counter ``lookahead-instructions``)
is priced at the profile's ``lookahead_ns``, measured for this C walk where
it runs (benchmarks/lookahead_price.py; for the fitted xen-2004 profile the
same figure stands as a lower bound). The walk is the C one
(``tlslab/x86/_ahead.c``, held to the Python specification
:mod:`tlslab.x86.ahead`). The hw backend's ptrace supervisor runs the same
rule with the same walk over the tracee's memory (tlslab/hw/supervisor/
lookahead.c; tests/test_hw_online.py: the model's decisions). A recording of
accesses cannot replay it (it reads guest code and memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from tlslab.hypervisor.lookahead import BUDGET, LONG, SHORT, Lookahead
from tlslab.hypervisor.strategies.base import Trap, Verdict
from tlslab.hypervisor.strategies.online import OnlineStrategy, PriceOptions


@dataclass(frozen=True)
class LookaheadOptions(PriceOptions):
    """``budget``: instructions decoded ahead per fault, over all paths (1 to 4096)."""

    budget: int = BUDGET

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or not 1 <= self.budget <= 4096:
            raise ValueError(f"budget must be a number of instructions from 1 to 4096, not {self.budget!r}")


class LookaheadStrategy(OnlineStrategy):
    """online-lookahead (see the module docstring for its rule and inputs)."""

    name = "online-lookahead"
    order = 53
    reads_guest_memory = True
    Options = LookaheadOptions
    description = "online: decode ahead from the fault; flip where the code shows the run pays, else emulate"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.lookahead = Lookahead(self.threshold, self.options.budget)

    def decide(self, trap: Trap, insn, sign: int) -> Verdict:
        domain = trap.domain
        vcpu = domain.vcpu
        ahead = self.lookahead.ahead(vcpu, domain.policy.hypervisor_start, insn, sign)
        kinds = self.counters.by_kind
        kinds["lookahead-instructions"] = kinds.get("lookahead-instructions", 0) + ahead.walked
        if ahead.reused:
            self.counters.count("lookahead-reused")
        if ahead.verdict == LONG:
            self.counters.count("ahead-flip")
            return self.flip(trap)
        if ahead.verdict == SHORT:
            self.counters.count("ahead-emulate")
            return self.emulate(trap, insn)
        if sign > 0:
            self.counters.count("flip-back")
            return self.flip(trap)
        return self.emulate(trap, insn)
