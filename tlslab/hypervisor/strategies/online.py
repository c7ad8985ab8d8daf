"""Online strategies: at each fault, emulate or flip, chosen from what a hypervisor sees then.

``emulate`` and ``flip`` are one mechanism each for every program; which one
wins depends on the program (runs of same-sign %gs offsets: long runs favour a
flip, short alternations favour emulation). These strategies choose per fault,
acting on real guest state exactly as ``emulate`` and ``flip`` do, and use
only what Xen's #GP handler has at that moment: the faulting address (the
*site*), the decoded instruction and its offset's sign, the descriptor in
the slot (truncated expand-up, flipped expand-down, or the probe descriptor
below), the history of earlier faults, and for ``online-rate`` the guest's
instruction count since the last fault (Xen would read a cycle counter; the
model's clock is its instruction count). They never see accesses that did not
fault. Every one of them is judged against ``tlslab.analysis.hybrid.optimal``,
the offline bound that knows the whole future (it bounds these three, which
only emulate and flip; ``online-patch``, which also rewrites code, goes below it).

The decision threshold comes from the prices of the two actions under a cost
profile (option ``prices``): handling a run of ``n`` wrong-sign accesses by
emulation costs ``n * emulate_ns``; by flipping costs one flip now and, when
the other sign returns, the fault that flips back: ``2 * flip_ns``. So a run is
worth flipping when ``n > threshold = 2 * flip_ns / emulate_ns``.

Sites are keyed by (address, sign) domain-wide: processes forked from one
another share code at the same addresses; a wrong guess costs time, never
correctness.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

from tlslab.hypervisor import costmodel
from tlslab.hypervisor.strategies.base import Action, Strategy, Trap, Verdict
from tlslab.hypervisor.strategies.emulate import EmulateStrategy
from tlslab.machine import layout
from tlslab.x86 import xen
from tlslab.x86.descriptor import LIMIT_MASK, SegmentDescriptor

DEFAULT_PRICES = "hw-vm"
REPROBE_FACTOR = 8      # online-probe: probe a site again after 8x, 64x, ... its faults
RATE_WINDOW = 8         # online-rate: EWMA weight 1/8 on the gap between faults
RATE_DENSE = 100        # online-rate: "dense" = faults less than this many instructions apart on average
RATE_DWELL = 16         # online-rate: faults in a mode before it may change again (hysteresis)
RATE_GAP_CAP = 4 * RATE_DENSE   # online-rate: a longer gap counts as this one (sparse is sparse; the average's start)


def probe_descriptor(desc: SegmentDescriptor) -> SegmentDescriptor:
    """``desc`` made empty: expand-down, limit 4 GiB - 1 in pages, 32-bit: no offset is valid.

    Installed after an emulation, it makes the next %gs access fault whatever
    its sign, so the hypervisor sees where a run of same-sign accesses ends. It
    admits no linear address at all, so it cannot open the hypervisor hole.
    """
    return replace(desc, dc=True, limit=LIMIT_MASK, granularity=True, db=True, present=True)


def is_probe_descriptor(desc: SegmentDescriptor | None) -> bool:
    return desc is not None and desc.dc and desc.limit == LIMIT_MASK and desc.granularity and desc.db


@dataclass(frozen=True)
class PriceOptions:
    """``prices``: the cost profile whose emulate and flip prices set the decision threshold;
    ``emulate_ns``/``flip_ns`` (> 0) replace that profile's prices."""

    prices: str = DEFAULT_PRICES
    emulate_ns: float = 0.0
    flip_ns: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.prices, str):
            raise ValueError(f"prices must be a cost profile name, not {self.prices!r}")
        for name in ("emulate_ns", "flip_ns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e12:
                raise ValueError(f"{name} must be a price in ns (0: the profile's), not {value!r}")
        emulate_ns, flip_ns = self.fault_prices()
        if emulate_ns <= 0 or flip_ns <= 0:
            raise ValueError(f"cost profile {self.prices!r} does not price faults (emulate {emulate_ns:g} ns, "
                             f"flip {flip_ns:g} ns); choose a measured or fitted one")

    def fault_prices(self) -> tuple[float, float]:
        try:
            profile = costmodel.get_profile(self.prices)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        emulate_ns, flip_ns = costmodel.fault_prices(profile)
        return self.emulate_ns or emulate_ns, self.flip_ns or flip_ns


class OnlineStrategy(Strategy):
    """Shared mechanics: emulate (as ``emulate``), flip (as ``flip-full``), and the decision hook."""

    online = True
    Options = PriceOptions

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.emulate_ns, self.flip_ns = self.options.fault_prices()
        self.threshold = 2 * self.flip_ns / self.emulate_ns
        self._emulator = EmulateStrategy()
        self._emulator.counters = self.counters   # one set of counters: its work is ours
        self._flips: dict = {}
        self._spaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # vcpu -> its number
        self._spaces_made = 0

    def space_number(self, vcpu) -> int:
        """A number for ``vcpu``'s address space, never reused. Per-space state keyed by ``id(vcpu)`` was
        inherited by a later vCPU that Python gave a freed one's id: multi-process decisions then
        depended on memory allocation (one run of a dash loop took 1,033 faults, the next 1,363)."""
        number = self._spaces.get(vcpu)
        if number is None:
            number = self._spaces[vcpu] = self._spaces_made
            self._spaces_made += 1
        return number

    def step(self, trap: Trap, insn) -> Verdict:
        v = trap.violation
        if v.segment != "gs":
            return self.emulate(trap, insn)   # %fs: no flip rule for it, as in Xen 2004; emulate
        return self.decide(trap, insn, -1 if v.offset & 0x8000_0000 else 1)

    def decide(self, trap: Trap, insn, sign: int) -> Verdict:
        raise NotImplementedError

    # ---------------------------------------------------------------- actions
    def emulate(self, trap: Trap, insn) -> Verdict:
        self.counters.count("emulate")
        return self._emulator.step(trap, insn)

    def flipped(self, trap: Trap, desc: SegmentDescriptor) -> SegmentDescriptor | None:
        """What Xen's flip would install for this fault (None: a genuine fault), memoised: a pure function."""
        v = trap.violation
        key = (desc, v.offset, v.size)
        if key not in self._flips:
            self._flips[key] = xen.flip(desc, v.offset, trap.domain.policy.profile, size=v.size)
        return self._flips[key]

    def install(self, trap: Trap, desc: SegmentDescriptor) -> None:
        trap.domain.vcpu.set_descriptor(layout.selector_index(trap.violation.selector), desc)
        self.counters.descriptor_writes += 1

    def flip(self, trap: Trap) -> Verdict:
        v = trap.violation
        new = self.flipped(trap, v.descriptor)
        if new is None:
            return Verdict.kill(f"genuine fault: {v.reason}")
        self.install(trap, new)
        self.counters.count("flip")
        return Verdict.restart()


class SiteStreakStrategy(OnlineStrategy):
    """online-site: flip at a site whose history shows a run of same-sign accesses; emulate elsewhere.

    Rule: a negative-offset fault (truncated segment) is emulated unless its
    site is *hot*: the same site faulted back to back (no other fault in
    between, same slot) more than ``threshold`` times once; at a hot site it
    flips. A positive-offset fault (the slot is flipped) flips back, as Xen
    does. Inputs: the faulting address and sign, the previous fault's (the
    hypervisor's own history). A loop touching one thread variable shows up as
    one site repeating; a short alternation never repeats and is emulated.
    """

    name = "online-site"
    order = 50
    description = "online: flip at sites seen repeating back to back (a same-sign run), emulate elsewhere"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.hot: set = set()
        self._last: dict = {}    # (space number, selector) -> (site, streak)

    def decide(self, trap: Trap, insn, sign: int) -> Verdict:
        v = trap.violation
        key = (v.eip, sign)
        if sign > 0 or key in self.hot:
            return self.flip(trap)
        where = (self.space_number(trap.domain.vcpu), v.selector)
        last, streak = self._last.get(where, (None, 0))
        streak = streak + 1 if last == key else 1
        self._last[where] = (key, streak)
        if streak > self.threshold:
            self.hot.add(key)
            self._last[where] = (None, 0)
            self.counters.count("site-marked-hot")
            return self.flip(trap)
        return self.emulate(trap, insn)


class RateStrategy(OnlineStrategy):
    """online-rate: one mode for the whole domain, changed when faults get dense, with hysteresis.

    Rule: keep an average (EWMA, weight 1/8) of guest instructions between
    consecutive faults of an address space, each gap counted up to
    ``RATE_GAP_CAP`` (4x the dense mark, the value the average starts from and
    is reset to: a gap that long is sparse, however long it is, so one pause
    cannot hide a dense phase that follows it for dozens of faults). In emulate
    mode, dense faults (average below ``RATE_DENSE``) mean long same-sign runs
    are being emulated one access at a time: switch to flip. In flip mode,
    dense faults mean the signs alternate quickly and every alternation costs
    a flip: switch to emulate. A mode is kept for at least ``RATE_DWELL``
    faults. Inputs: the fault count and the guest instructions retired since
    the address space's previous fault, up to the cap (a hypervisor reads a
    retired-instruction counter; tlslab's ptrace supervisor, on a CPU without
    one it may use, single-steps the guest after each fault until the next
    fault or the cap: the cap is also what makes that affordable). The
    constants are chosen, not fitted to any workload.
    """

    name = "online-rate"
    order = 51
    gap_cap = RATE_GAP_CAP   # a class attribute so that design studies can vary it (benchmarks/online_design.py)
    description = "online: emulate or flip for the whole domain, switching when faults get dense (hysteresis)"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.mode = "emulate"
        self._avg = RATE_DENSE * 4 * RATE_WINDOW   # fixed point (x RATE_WINDOW), start "sparse"
        self._last_at: dict = {}
        self._dwell = 0

    def decide(self, trap: Trap, insn, sign: int) -> Verdict:
        vcpu = trap.domain.vcpu
        now = vcpu.instructions_retired()
        space = self.space_number(vcpu)
        gap = min(now - self._last_at.get(space, now), self.gap_cap)
        self._last_at[space] = now
        self._avg += gap - self._avg // RATE_WINDOW
        self._dwell += 1
        if self._dwell >= RATE_DWELL and self._avg < RATE_DENSE * RATE_WINDOW:
            self.mode = "flip" if self.mode == "emulate" else "emulate"
            self._dwell = 0
            self._avg = RATE_DENSE * 4 * RATE_WINDOW
            self.counters.count(f"mode-{self.mode}")
        if self.mode == "flip":
            return self.flip(trap)
        return self.emulate(trap, insn)


@dataclass
class Probe:
    """A probe in progress in one slot: the run's sign, what to restore, what a flip would install."""

    sign: int
    home: SegmentDescriptor     # the slot before the probe (admits the other sign)
    away: SegmentDescriptor     # what a flip would have installed (admits this sign)
    sites: list


class ProbeStrategy(OnlineStrategy):
    """online-probe: learn each site's run length by probing, then flip only the runs that pay.

    Rule: a fault at a site with no estimate (or due a re-check: after 8x,
    64x, ... its faults) is *probed*: emulated, and the slot is given an empty
    descriptor so that every following %gs access faults. Accesses of the same
    sign are emulated and counted; the first of the other sign ends the run:
    the slot gets its previous descriptor back and the access restarts. Each
    site seen in the run learns how many same-sign accesses followed it. A
    probe that reaches ``threshold`` + 1 accesses stops there with a flip (the
    run already pays for one). Any other fault flips if its site's learned
    remaining run exceeds ``threshold`` and is emulated otherwise. A probe
    costs one fault more than emulating the run would (the one that ends it).

    Context, only where it is needed: a site whose probes have measured two
    different remaining runs is *ambiguous* (it is reached from several
    places); there the estimate is kept per (site, previous fault's site), with
    the same probe-and-back-off schedule, and the decision uses it. A site whose
    measurements agree keeps one estimate (no extra probes).

    Inputs: the faulting address, sign and slot descriptor, the previous
    fault's address, and the faults of the probes (the hypervisor's own
    history).
    """

    name = "online-probe"
    order = 52
    reprobe_factor = REPROBE_FACTOR   # a class attribute so that design studies can vary it (tlslab.inspect.replay)
    description = "online: probe each site's same-sign run with an empty segment, then flip only runs that pay"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.cap = int(self.threshold) + 1
        # per site (address, sign) and per context (address, sign, previous fault's address):
        self.estimate: dict = {}
        self.seen: dict = {}
        self.next_probe: dict = {}
        self.ambiguous: set = set()   # sites whose probes measured different remaining runs
        self._probes: dict = {}       # (space number, selector) -> Probe
        self._previous = 0            # address of the previous fault this strategy handled

    def decide(self, trap: Trap, insn, sign: int) -> Verdict:
        v = trap.violation
        where = (self.space_number(trap.domain.vcpu), v.selector)
        key = ((v.eip, sign), (v.eip, sign, self._previous))   # (site, site in context)
        self._previous = v.eip
        probe = self._probes.pop(where, None)
        if is_probe_descriptor(v.descriptor):
            return self._in_probe(trap, insn, sign, key, probe, where)
        # (a probe that ended without us, e.g. a TLS reload at a switch, teaches nothing)
        site, context = key
        estimate = self._due(site)
        if estimate is not None and site in self.ambiguous:
            estimate = self._due(context)
        if estimate is None:
            return self._start_probe(trap, insn, sign, key, where)
        if estimate > self.threshold:
            return self.flip(trap)
        return self.emulate(trap, insn)

    def _due(self, key) -> int | None:
        """Count a fault at ``key``; its estimate, or None when it has none or is due a probe."""
        seen = self.seen[key] = self.seen.get(key, 0) + 1
        estimate = self.estimate.get(key)
        if estimate is None or seen >= self.next_probe.get(key, 0):
            self.next_probe[key] = seen * self.reprobe_factor
            return None
        return estimate

    def _start_probe(self, trap: Trap, insn, sign: int, key, where) -> Verdict:
        v = trap.violation
        away = self.flipped(trap, v.descriptor)
        verdict = self.emulate(trap, insn)
        if away is None or verdict.action is not Action.RESUME:
            return verdict
        empty = probe_descriptor(v.descriptor)
        self.install(trap, empty)
        self._probes[where] = Probe(sign, v.descriptor, away, [key])
        self.counters.count("probe")
        return verdict

    def _in_probe(self, trap: Trap, insn, sign: int, key, probe: Probe | None, where) -> Verdict:
        v = trap.violation
        if probe is None:
            # the empty descriptor reached this slot without our record (carried by a switch between
            # address spaces with identical TLS descriptors): give the slot what the policy gives it
            requested = trap.domain.requested_descriptor(v.segment)
            home = trap.domain.policy(requested) if requested is not None else None
            if home is None or is_probe_descriptor(home):
                return Verdict.kill(f"genuine fault: {v.reason}")
            self.install(trap, home)
            self.counters.count("probe-orphan")
            return Verdict.restart()
        if sign == probe.sign:
            probe.sites.append(key)
            if len(probe.sites) >= self.cap:
                self._learn(probe.sites)
                self.install(trap, probe.away)
                self.counters.count("probe-flip")
                return Verdict.restart()
            self._probes[where] = probe
            return self.emulate(trap, insn)
        self._learn(probe.sites)
        self.install(trap, probe.home)
        self.counters.count("probe-end")
        return Verdict.restart()

    def _learn(self, keys: list) -> None:
        """Each (site, context) seen in a probed run learns its remaining run; a site measured at two
        different values becomes ambiguous."""
        n = len(keys)
        first: dict = {}
        for i in range(n - 1, -1, -1):   # a site seen twice keeps its first (longest) remainder
            first[keys[i]] = n - i
        for (site, context), remaining in first.items():
            old = self.estimate.get(site)
            if old is not None and old != remaining:
                self.ambiguous.add(site)
            self.estimate[site] = remaining
            self.estimate[context] = remaining
