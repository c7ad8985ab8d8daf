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
access through that slot faults whatever its sign. It also records, at their
place among the accesses, what the guest kernel does to the TLS slots
(``Kernel.on_tls_load``, ``set_thread_area``, ``fork``): a reload with the
task's own descriptor, a carry of another address space's slot (the kernel
rewrites a slot at a switch only when the threads' TLS differ, so a flip or
an empty descriptor can pass to the next process), a copy at fork. The
replay applies the same events to its own tables, so each address space's
slots hold what they would hold under the replayed rule. Accesses before the
first fault after a reload ran free under the reloaded descriptor, as they
do in the replay under every rule.

``%fs`` accesses are checked against the same tables when ``%fs`` holds a TLS
selector (a guest may load its ``%gs`` selector into ``%fs``); through any
other selector every recorded ``%fs`` access is a fault (every online rule
emulates it).

Exactness: the replay of a rule takes the same traps, decodes, emulations,
emulated accesses and descriptor writes as the rule's real run; checked on
one thread, thread switches, a guest sharing its TLS slot between ``%fs``
and ``%gs``, and processes forked and switched in short time slices
(``tests/test_replay.py``). A rule that reads anything else of the guest
(memory, registers) cannot be replayed.
"""

from __future__ import annotations

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
    ``events``: what the guest kernel did to TLS slots, each as (position: the
    number of accesses recorded before it, kind, space, slot, descriptor,
    source space): "reload" (a descriptor installed), "carry" (the slot takes
    the source space's content), "fork" (the space starts as a copy of the
    source's slots; slot and descriptor None).
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
    events: list[tuple] = field(default_factory=list)
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

    def attach(self, domain) -> None:
        self.trace.profile = domain.policy.profile
        kernel = domain.kernel
        kernel.on_tls_load.append(self._on_tls_load)
        kernel.on_new_address_space.append(self._on_new_address_space)
        # set_thread_area runs in the current task; forked processes copy the hook list
        domain.first_process.tls_hooks.append(
            lambda slot, requested, installed: self._event("reload", kernel.current.process, slot, installed))

    def _event(self, kind: str, process, slot, desc, source=None) -> None:
        if process is None or process.vcpu is None:
            return
        src = self.space_number(source.vcpu) if source is not None and source.vcpu is not None else None
        self.trace.events.append((len(self.trace), kind, self.space_number(process.vcpu), slot, desc, src))

    def _on_tls_load(self, task, slot: int, how: str, desc, source) -> None:
        if how != "keep":   # "keep": the slot holds what it held
            self._event(how, task.process, slot, desc, source)

    def _on_new_address_space(self, process, how: str) -> None:
        if how == "fork":
            self._event("fork", process, None, None, process.parent)

    def step(self, trap, insn) -> Verdict:
        v = trap.violation
        vcpu = trap.domain.vcpu
        t = self.trace
        in_slot = is_tls_selector(v.selector)
        t.space.append(self.space_number(vcpu))
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
    """One address space of the replay: its identity (rules key state by vCPU), its clock, its TLS slots."""

    def __init__(self, descriptors: dict[int, SegmentDescriptor]) -> None:
        self.descriptors = descriptors
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
    """``cls`` with its guest-touching action replaced for replay (its decisions untouched); a strategy that
    patches code, or reads guest code and memory to decide, needs what a recording of accesses does not hold
    (ValueError)."""
    if getattr(cls, "patches_code", False):
        raise ValueError(f"{cls.name} patches guest code: a recording of accesses cannot replay it")
    if getattr(cls, "reads_guest_memory", False):
        raise ValueError(f"{cls.name} reads guest code and memory: a recording of accesses cannot replay it")
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
    spaces: dict[int, _Space] = {}
    homes: dict[int, dict[int, SegmentDescriptor]] = {}   # space -> slot -> what its kernel last loaded

    def space(number: int) -> _Space:
        here = spaces.get(number)
        if here is None:
            here = spaces[number] = _Space({})
            homes[number] = {}
        return here

    events = iter(trace.events)
    event = next(events, None)
    c = strategy.counters
    for i in range(len(trace)):
        while event is not None and event[0] <= i:
            _, kind, number, slot, desc, source = event
            if kind == "reload":
                space(number).descriptors[slot] = homes[number][slot] = desc
            elif kind == "carry":
                space(number).descriptors[slot] = space(source).descriptors.get(slot)
            elif kind == "fork":
                space(number).descriptors.update(space(source).descriptors)
                homes[number].update(homes[source])
            event = next(events, None)
        here = space(trace.space[i])
        here.now = trace.instructions[i]
        domain.vcpu = here
        domain.access_index = i
        selector = trace.selector[i]
        index = layout.selector_index(selector)
        in_slot = is_tls_selector(selector)
        if in_slot:
            if here.descriptors.get(index) is None:
                raise ReplayError(f"access {i}: TLS slot {index} is empty in address space {trace.space[i]}")
            # the orphan path of a rule asks what the kernel would load here: this space's last load
            domain.policy.home = homes[trace.space[i]].get(index)
        offset, size, write = trace.offset[i], trace.size[i], bool(trace.write[i])
        for _ in range(4):
            desc = here.descriptors[index] if in_slot else None
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
