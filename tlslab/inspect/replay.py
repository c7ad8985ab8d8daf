"""Every fs/gs access of a run, recorded once, then replayed through an online rule without the guest.

Designing an online strategy means trying many rules on many programs; a real
run per rule and program costs seconds to minutes. The decisions of a
fault-driven rule depend only on the accesses that reach it, so one recording
of every ``%gs`` access (site, offset, size, direction, instruction count) is
enough to replay any rule: the replay keeps each slot's descriptor, asks
:func:`tlslab.x86.segcheck.check_data_access` whether an access faults under
it, and hands the faults to the rule's *own* ``step``, unchanged. Only the
two actions that touch guest state are replaced: emulating an access (it is
counted, not performed) and installing a descriptor (it goes to the replay's
table). The counters come out in the strategy's own format, so
:func:`tlslab.hypervisor.costmodel.fault_handling_ns` prices them as it prices
a real run.

Recording (:func:`record_accesses`) runs the guest once with
:class:`AccessRecorder`: it emulates every faulting access, as ``emulate``
does, and then gives ``%gs`` the empty descriptor of ``online-probe``
(:func:`tlslab.hypervisor.strategies.online.probe_descriptor`), so the next
access through that slot faults whatever its sign. A fault that arrives with
another descriptor in its TLS slot follows a reload by the guest kernel (a
thread switch to a thread with other TLS, ``set_thread_area``): the replay
installs that descriptor there too, at that access. Accesses between a reload
and that fault ran free under the reloaded descriptor, and they run free in
the replay under the same one, whatever the rule.

The replay keeps one table of TLS slots for the whole CPU, as the guest
kernel does: a switch that does not reload a slot (the threads or processes
have the same TLS, as after ``fork``) carries its content, a flipped or empty
descriptor included, to the next address space (tlslab.linux.kernel's
``_load_tls``). ``%fs`` accesses are checked against the same table when
``%fs`` holds a TLS selector (a guest may load its ``%gs`` selector into
``%fs``); through any other selector every recorded ``%fs`` access is a fault
(every online rule emulates it).

Exactness: the replay of a rule takes the same traps, decodes, emulations,
emulated accesses and descriptor writes as the rule's real run; checked on
one thread, thread switches, a guest sharing its TLS slot between ``%fs``
and ``%gs``, and processes forked and switched in short time slices
(``tests/test_replay.py``). A rule that reads anything else of the guest
(memory, registers) cannot be replayed.
"""

from __future__ import annotations

import weakref
from array import array
from dataclasses import asdict, dataclass, field, replace

from tlslab.hypervisor import costmodel
from tlslab.hypervisor.strategies.base import Action, Verdict
from tlslab.hypervisor.strategies.online import OnlineStrategy, is_probe_descriptor, probe_descriptor
from tlslab.machine import layout
from tlslab.machine.exits import SegmentViolation
from tlslab.x86.descriptor import SegmentDescriptor
from tlslab.x86.segcheck import check_data_access

SEGMENTS = ("fs", "gs")


@dataclass
class AccessTrace:
    """The fs/gs accesses that reached the hypervisor under :class:`AccessRecorder`, in order.

    Parallel arrays, one entry per access: address space (0, 1, ... in order of
    first access), segment (0 fs, 1 gs), selector, EIP, offset, size, write,
    guest instructions retired before it, memory accesses its emulation made.
    ``reloads``: index -> the descriptor an access met in its TLS slot where
    that was not the recorder's empty one (the kernel reloaded the slot).
    """

    space: array = field(default_factory=lambda: array("I"))
    segment: array = field(default_factory=lambda: array("B"))
    selector: array = field(default_factory=lambda: array("H"))
    eip: array = field(default_factory=lambda: array("I"))
    offset: array = field(default_factory=lambda: array("I"))
    size: array = field(default_factory=lambda: array("B"))
    write: array = field(default_factory=lambda: array("B"))
    instructions: array = field(default_factory=lambda: array("Q"))
    emulated_accesses: array = field(default_factory=lambda: array("I"))
    reloads: dict[int, SegmentDescriptor] = field(default_factory=dict)
    profile: str = "nonpae"      # the hypervisor profile the recording ran under (Xen's flip depends on it)

    def __len__(self) -> int:
        return len(self.eip)

    def negative_gs_accesses(self) -> int:
        """%gs accesses with a negative offset: each faults on a truncated slot, so all of them are here
        (positive ones are here from a slot's first fault on; before it, after a reload, they fault under
        no rule and are not)."""
        return sum(1 for i in range(len(self)) if self.segment[i] == 1 and self.offset[i] & 0x8000_0000)


class AccessRecorder(OnlineStrategy):
    """Emulate every fault (as ``emulate``) and leave %gs empty, so every %gs access comes here.

    Not a registered strategy (it lives outside the strategies package): its
    cost is meaningless, its record is the point.
    """

    name = "record-accesses"
    online = False
    description = "record every fs/gs access (emulating each one)"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.trace = AccessTrace()
        self._spaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # vcpu -> space number
        self._made = 0

    def attach(self, domain) -> None:
        self.trace.profile = domain.policy.profile

    def step(self, trap, insn) -> Verdict:
        v = trap.violation
        vcpu = trap.domain.vcpu
        space = self._spaces.get(vcpu)
        if space is None:
            space = self._spaces[vcpu] = self._made
            self._made += 1
        t = self.trace
        index = len(t)
        in_slot = is_tls_selector(v.selector)
        if in_slot and not is_probe_descriptor(v.descriptor):
            t.reloads[index] = v.descriptor
        t.space.append(space)
        t.segment.append(SEGMENTS.index(v.segment))
        t.selector.append(v.selector & 0xFFFF)
        t.eip.append(v.eip)
        t.offset.append(v.offset)
        t.size.append(v.size)
        t.write.append(1 if v.write else 0)
        t.instructions.append(vcpu.instructions_retired())
        before = self.counters.emulated_accesses
        verdict = self.emulate(trap, insn)
        t.emulated_accesses.append(self.counters.emulated_accesses - before)
        if (verdict.action is Action.RESUME and v.segment == "gs" and in_slot
                and not is_probe_descriptor(v.descriptor)):
            self.install(trap, probe_descriptor(v.descriptor))
        return verdict


def is_tls_selector(selector: int) -> bool:
    """A GDT selector of one of the TLS slots (what set_thread_area fills and strategies rewrite)."""
    selector &= 0xFFFF
    return not selector & 4 and layout.selector_index(selector) in layout.TLS_SLOTS


def record_accesses(spec, **domain_options) -> tuple[AccessTrace, object]:
    """Run ``spec`` (its strategy is replaced) under :class:`AccessRecorder`: (trace, run result).

    The guest's output is the native run's (every access is emulated exactly);
    callers compare it to be sure. ``domain_options`` go to the Domain (e.g. ``quantum``).
    """
    from tlslab.experiment import make_domain

    domain, _ = make_domain(replace(spec, strategy="emulate"), **domain_options)
    recorder = AccessRecorder()
    recorder.attach(domain)
    domain.strategy = recorder
    result = domain.run()
    return recorder.trace, result


# ------------------------------------------------------------------------------------------ replay

class ReplayError(RuntimeError):
    """A rule refused an access the recording shows the guest made (it would have killed the guest)."""


class _Space:
    """One address space of the replay: its identity (rules key state by vCPU), its clock, and the CPU's
    one table of TLS slots, shared by every space (the guest kernel carries slots across switches)."""

    def __init__(self, table: dict[int, SegmentDescriptor]) -> None:
        self.descriptors = table
        self.now = 0

    def set_descriptor(self, index: int, desc: SegmentDescriptor) -> None:
        self.descriptors[index] = desc

    def instructions_retired(self) -> int:
        return self.now


class _Policy:
    """What a rule may ask of the descriptor policy: Xen's profile, and the home descriptor of a slot."""

    def __init__(self, profile: str) -> None:
        self.profile = profile
        self.home: SegmentDescriptor | None = None

    def __call__(self, requested):
        return self.home


class _Domain:
    def __init__(self, profile: str) -> None:
        self.policy = _Policy(profile)
        self.vcpu: _Space | None = None
        self.access_index = 0     # the trace entry being replayed: for offline reference rules only

    def requested_descriptor(self, segment: str):
        return self.policy.home


@dataclass(frozen=True)
class _Trap:
    violation: SegmentViolation
    domain: _Domain
    accesses: int


class _Replaying:
    """Mixed in before an online strategy: emulation is counted, not performed."""

    def emulate(self, trap, insn) -> Verdict:
        c = self.counters
        c.count("emulate")
        c.emulated_instructions += 1
        c.emulated_accesses += trap.accesses
        return Verdict.resume()


class EmulateRule(OnlineStrategy):
    """The 2004 emulate mechanism as a rule: every fault emulated (for replay beside the online rules)."""

    name = "emulate (rule)"
    online = False

    def decide(self, trap, insn, sign: int) -> Verdict:
        return self.emulate(trap, insn)


class FlipRule(OnlineStrategy):
    """The 2004 flip mechanism as a rule: every %gs fault flips (%fs faults are emulated, as online rules do)."""

    name = "flip (rule)"
    online = False

    def decide(self, trap, insn, sign: int) -> Verdict:
        return self.flip(trap)


def replaying(cls: type[OnlineStrategy]) -> type[OnlineStrategy]:
    """``cls`` with its guest-touching action replaced for replay (its decisions untouched)."""
    return type(f"Replayed{cls.__name__}", (_Replaying, cls), {})


@dataclass
class Replay:
    """A rule's work over a trace, in ``Domain.counters()`` format under ``counters``."""

    name: str
    counters: dict

    def fault_ns(self, profile: costmodel.CostProfile) -> float:
        return costmodel.fault_handling_ns(profile, self.counters)


def replay(trace: AccessTrace, strategy: OnlineStrategy) -> Replay:
    """Run ``strategy`` (made with :func:`replaying`) over ``trace``; ReplayError if it refuses an access."""
    domain = _Domain(trace.profile)
    table: dict[int, SegmentDescriptor] = {}                 # the CPU's TLS slots
    spaces: dict[int, _Space] = {}
    homes: dict[tuple[int, int], SegmentDescriptor] = {}     # (space, slot) -> what the kernel last loaded
    c = strategy.counters
    for i in range(len(trace)):
        space, selector = trace.space[i], trace.selector[i]
        here = spaces.get(space)
        if here is None:
            here = spaces[space] = _Space(table)
        here.now = trace.instructions[i]
        domain.vcpu = here
        domain.access_index = i
        index = layout.selector_index(selector)
        in_slot = is_tls_selector(selector)
        if in_slot:
            reload = trace.reloads.get(i)
            if reload is not None:
                table[index] = homes[space, index] = reload
            if index not in table:
                raise ReplayError(f"access {i}: TLS slot {index} has no descriptor to replay from")
            # the orphan path of a rule asks what the kernel would load here: this space's last load
            domain.policy.home = homes.get((space, index), table[index])
        offset, size, write = trace.offset[i], trace.size[i], bool(trace.write[i])
        for _ in range(4):
            desc = table[index] if in_slot else None
            if in_slot and check_data_access(desc, offset, size, write):
                break
            c.traps += 1
            c.decodes += 1
            violation = SegmentViolation(trace.eip[i], SEGMENTS[trace.segment[i]], selector, offset, size, write,
                                         0, desc, "replayed")
            verdict = strategy.step(_Trap(violation, domain, trace.emulated_accesses[i]), None)
            if verdict.action is Action.RESUME:
                break
            if verdict.action is Action.KILL:
                c.refused += 1
                raise ReplayError(f"{strategy.name} refused access {i} at {trace.eip[i]:#x}: {verdict.reason}")
            if not in_slot:
                raise ReplayError(f"{strategy.name} restarted access {i} at {trace.eip[i]:#x} through a "
                                  "selector that is not a TLS slot")
        else:
            raise ReplayError(f"{strategy.name} restarted access {i} at {trace.eip[i]:#x} four times")
    return Replay(strategy.name, {"strategy": {"name": strategy.name, **asdict(c)}})   # as Domain.counters()
