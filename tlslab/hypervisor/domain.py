"""A domain: a guest (one or many processes and threads) under one hypervisor strategy.

``Domain.run()`` is the run loop, explicit about every exit (KVM style), for
whichever task the guest kernel (``tlslab.linux.kernel``) has on the CPU:

    SYSCALL            -> the Linux personality handles it (it may block, fork, exec, exit)
    SEGMENT_VIOLATION  -> the strategy: resume / restart / kill (SIGSEGV to that process)
    PAGE_FAULT         -> SIGSEGV to that process (nothing to fix: the guest touched no memory)
    PREEMPTED          -> the task used its time slice while another was ready: the kernel switches
    EXCEPTION          -> SIGSEGV/SIGILL equivalent to that process, reported
    TIMEOUT            -> the run is abandoned, reported

Faults the strategy's plan lets the access hook settle (``core_settle``,
``tlslab.machine.settle``) never exit; after every run their counts go to the
process, the task and the strategy (``absorb_settled``), as if each had.
Between exits the kernel picks what runs next and delivers signals. The run
ends when the first process exits (its status is the run's); a crash of the
first process is the run's crash, a crash of any other is recorded in its
process listing and signalled to its parent, as on Linux.
"""

from __future__ import annotations

import signal as signal_module
import time
import weakref
from dataclasses import asdict, dataclass, field

import capstone

from tlslab.hypervisor.policy import DescriptorPolicy
from tlslab.hypervisor.strategies import Action, Strategy, Trap, get_strategy
from tlslab.linux.kernel import RUNNABLE, Block, Kernel, TooManyProcesses
from tlslab.linux.signals import SIGBUS, SIGFPE, SIGILL, SIGSEGV, SIGTRAP
from tlslab.linux.syscalls_proc import ProcessExit
from tlslab.machine import layout
from tlslab.machine.memory import GuestFault
from tlslab.machine.vcpu import Exit, ExitReason, VCpu
from tlslab.x86.descriptor import SegmentDescriptor

_DISASM = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
FLAT_USER = SegmentDescriptor.flat_user_data(0)

# si_code values (Linux uapi asm-generic/siginfo.h)
SEGV_MAPERR, SEGV_ACCERR = 1, 2
ILL_ILLOPN, FPE_INTDIV, FPE_FLTINV, TRAP_BRKPT, BUS_ADRALN, SI_KERNEL = 2, 1, 7, 1, 1, 0x80

# CPU exception vector -> the signal Linux's trap handlers send, and its si_code (arch/x86/kernel/traps.c)
FAULT_SIGNALS = {
    0: (SIGFPE, FPE_INTDIV),     # #DE divide error
    1: (SIGTRAP, TRAP_BRKPT),    # #DB
    3: (SIGTRAP, SI_KERNEL),     # int3 (do_int3: a plain SIGTRAP)
    4: (SIGSEGV, SI_KERNEL),     # #OF into
    5: (SIGSEGV, SI_KERNEL),     # #BR bound
    6: (SIGILL, ILL_ILLOPN),     # #UD
    10: (SIGSEGV, SI_KERNEL),    # #TS
    11: (SIGBUS, SI_KERNEL),     # #NP
    12: (SIGBUS, SI_KERNEL),     # #SS
    13: (SIGSEGV, SI_KERNEL),    # #GP (not a TLS access: those go to the strategies)
    16: (SIGFPE, FPE_FLTINV),    # #MF x87 error
    17: (SIGBUS, BUS_ADRALN),    # #AC
    19: (SIGFPE, FPE_FLTINV),    # #XM SIMD error
}


@dataclass(frozen=True)
class GuestCrash:
    """Where and why a guest died."""

    eip: int
    symbol: str
    instruction: str
    reason: str
    timed_out: bool = False         # the vCPU's time budget ended the run (not a fault): a typed flag, not a text

    def describe(self) -> str:
        return f"guest crashed at {self.eip:#010x} <{self.symbol}>: `{self.instruction}`: {self.reason}"


class GuestCrashed(RuntimeError):
    """``run_process`` raises this when the guest did not exit (it carries the one crash record)."""

    def __init__(self, crash: GuestCrash):
        super().__init__(crash.describe())
        self.crash = crash


@dataclass
class RunResult:
    status: int | None            # exit status; None if the guest crashed or timed out
    stdout: bytes
    stderr: bytes
    crash: GuestCrash | None
    counters: dict
    wall_seconds: float
    sites: list = field(default_factory=list)  # per-instruction fs/gs counters

    @property
    def ok(self) -> bool:
        return self.crash is None


class Domain:
    """One guest process on one vCPU under one strategy: ``run()`` is tlslab's only run loop.

    ``process_factory(vcpu, shape_descriptor)`` builds the loaded process on
    the domain's vCPU; ``adopt`` wraps a process that already has its own.
    """

    def __init__(self, process_factory, strategy: Strategy | str, profile: str = "nonpae",
                 checks: bool = True, timeout_seconds: float = 0, max_traps: int | None = None,
                 trace_signs: bool = False, vcpu: VCpu | None = None, settle: bool = True,
                 quantum: int | None = None):
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.policy = DescriptorPolicy.xen(profile) if self.strategy.truncates else DescriptorPolicy.native(profile)
        self._vcpu_options = dict(checks=checks, timeout_seconds=timeout_seconds, trace_signs=trace_signs)
        first_vcpu = vcpu if vcpu is not None else VCpu(**self._vcpu_options)
        # sign traces (trace_signs) of every address space, in creation order: live vCPUs are held weakly
        # (a dead process's engine must be freed), a released one leaves its trace here
        self._vcpus_made = 0
        self._live_vcpus: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._released_traces: dict[int, dict] = {}
        self._watch_vcpu(first_vcpu)
        self._requested: dict[SegmentDescriptor, SegmentDescriptor] = {}
        self.max_traps = max_traps
        self._refused: str | None = None
        self.first_process = process_factory(first_vcpu, self._shape_descriptor)
        # the run's one wall-clock limit lives on the first vCPU (set when it first runs); kept here
        # because the first process may exec, which releases that vCPU
        self._deadline_source = first_vcpu
        # quantum: the scheduler's time slice in guest instructions (None: the kernel's default)
        self.kernel = Kernel(self.first_process, self._new_vcpu, self._shape_descriptor,
                             **({"quantum": quantum} if quantum is not None else {}))
        self.kernel.on_new_address_space.append(self._on_new_address_space)
        self.strategy.attach(self)
        # faults the strategy lets the access hook settle (machine/settle.py), planned when the run
        # starts; not when each trap must be seen (--max-traps)
        self._settle_allowed = settle and max_traps is None
        self._settle_plan = None

    # the process and vCPU that trapped: the task the kernel has on the CPU
    @property
    def process(self):
        return self.kernel.current.process

    @property
    def vcpu(self) -> VCpu:
        return self.kernel.current.process.vcpu

    def _new_vcpu(self) -> VCpu:
        vcpu = VCpu(**self._vcpu_options)
        vcpu.share_deadline(self._deadline_source)
        self._watch_vcpu(vcpu)
        vcpu.settle_in_hook(self._settle_plan)
        return vcpu

    def _on_new_address_space(self, process, how: str) -> None:
        """A fork or exec made an address space: the strategy sets up its per-process state there.

        A strategy that cannot follow (its state is one address space's) returns
        why; the run then ends with that refusal instead of running on wrongly.
        """
        why = self.strategy.attach_process(self, process, how)
        if why and self._refused is None:
            self._refused = why

    @classmethod
    def adopt(cls, process, strategy: Strategy | str = "native", **options) -> Domain:
        """A domain around ``process`` and the vCPU it was built on (loaded here if it is not yet)."""
        if process.image is None:
            process.load()
        return cls(lambda _vcpu, _policy: process, strategy, vcpu=process.vcpu, **options)

    # the policy as the Linux layer sees it: remember what was asked for
    def _shape_descriptor(self, requested: SegmentDescriptor) -> SegmentDescriptor:
        shaped = self.policy(requested)
        before = self._requested.get(shaped)
        self._requested[shaped] = requested
        if before is not None and before != requested:   # what an emulator applies for `shaped` changed
            for vcpu in list(self._live_vcpus.values()):
                if vcpu.regs is not None:
                    vcpu.refresh_emulate_views()
        return shaped

    def requested_descriptor(self, segment: str) -> SegmentDescriptor | None:
        """What the guest asked for behind the TLS descriptor a segment register holds now."""
        selector = self.vcpu.regs.get(segment) & 0xFFFF
        if selector < 4 or selector & 4 or layout.selector_index(selector) >= len(self.vcpu.descriptors):
            return None
        installed = self.vcpu.descriptors[layout.selector_index(selector)]
        if installed is None:
            return None
        return self.requested_for(installed)

    def requested_for(self, installed: SegmentDescriptor) -> SegmentDescriptor:
        """What the guest asked for behind an installed (shaped, maybe flipped) TLS descriptor."""
        if installed in self._requested:
            return self._requested[installed]
        # flipped descriptors: same base, the guest asked for a flat segment
        for shaped, requested in self._requested.items():
            if shaped.base == installed.base:
                return requested
        return installed

    def _watch_vcpu(self, vcpu: VCpu) -> None:
        index = self._vcpus_made
        self._vcpus_made += 1
        self._live_vcpus[index] = vcpu
        if self._vcpu_options.get("trace_signs"):
            vcpu.on_release = lambda v, index=index: self._released_traces.__setitem__(
                index, {seg: v.sign_runs(seg) for seg in ("fs", "gs")})

    def sign_runs(self, segment: str = "gs") -> tuple[list[list[int]], int]:
        """Every address space's sign trace (``trace_signs``), and how many runs were dropped in all."""
        traces, dropped = [], 0
        for index in range(self._vcpus_made):
            if index in self._released_traces:
                runs, lost = self._released_traces[index][segment]
            elif index in self._live_vcpus:
                runs, lost = self._live_vcpus[index].sign_runs(segment)
            else:
                runs, lost = [], 0   # not traced
            traces.append(runs)
            dropped += lost
        return traces, dropped

    def segment_view(self, segment: str) -> SegmentDescriptor | None:
        """The descriptor an emulator applies to ``segment``; None: null selector (#GP).

        TLS selectors give what the guest asked for (the emulator performs the
        access the guest meant); Linux's flat user selectors give a flat
        segment. The hypervisor hole is refused separately, whatever this says.
        """
        selector = self.vcpu.regs.get(segment) & 0xFFFF
        if selector < 4:
            return None
        if selector in (layout.USER_DS, layout.USER_CS):
            return FLAT_USER
        return self.requested_descriptor(segment)

    def symbolize(self, eip: int) -> str:
        return self.process.symbolize(eip)

    def site_code(self, site: dict, size: int = 15) -> tuple[str, bytes]:
        """(symbol, code bytes) of a site of any program of the run, read from the file it was mapped from."""
        eip = site["eip"]
        objects = self.kernel.objects_of(site.get("program")) or self.first_process.objects
        m = objects.mapping_at(eip)
        code = b""
        if m is not None:
            try:
                code = m.node.read_at(m.offset + (eip - m.start), min(size, m.end - eip))
            except (AttributeError, OSError):
                code = b""
        return objects.symbolize(eip), bytes(code)

    def crash_at(self, eip: int, reason: str, timed_out: bool = False, vcpu=None) -> GuestCrash:
        text = "??"
        vcpu = vcpu if vcpu is not None else self.vcpu
        try:
            mem = vcpu.mem if vcpu is not None else None
            code = mem.read(eip, 15) if mem is not None and mem.is_mapped(eip, 15) else b""
            insn = next(_DISASM.disasm(code, eip, 1), None)
            if insn is not None:
                text = f"{insn.mnemonic} {insn.op_str}".strip()
        except Exception:
            pass
        return GuestCrash(eip, self.symbolize(eip), text, reason, timed_out)

    def run(self) -> RunResult:
        started = time.perf_counter()
        k = self.kernel
        self._settle_plan = self.strategy.core_settle(self) if self._settle_allowed else None
        for vcpu in list(self._live_vcpus.values()):
            if vcpu.regs is not None:
                vcpu.settle_in_hook(self._settle_plan)
        crash: GuestCrash | None = None
        try:
            while self._resume():
                task = k.current
                process = task.process
                e: Exit = process.vcpu.run(budget=k.budget(process.vcpu.instructions_retired()))
                settled = process.vcpu.take_settled()
                if settled is not None:     # faults the access hook settled for the strategy
                    process.faults += settled.total
                    task.faults += settled.total
                    self.strategy.absorb_settled(settled)
                if e.reason is ExitReason.PREEMPTED:
                    k.preempt()
                    continue
                if e.reason is ExitReason.SYSCALL:
                    try:
                        process.handle_syscall()
                    except Block as blocked:
                        k.block(task, blocked)
                    except ProcessExit as done:  # a bare process (no kernel) ending itself
                        k.exit_process(process, done.status, done.signal)
                    if self._refused is not None:
                        crash = self.crash_at(e.eip, f"SIGSEGV ({self.strategy.name}): {self._refused}")
                        break
                    continue
                if e.reason is ExitReason.SEGMENT_VIOLATION:
                    process.faults += 1
                    task.faults += 1
                    verdict = self.strategy.handle(Trap(e.violation, self))  # the strategy counts its traps
                    traps = self.strategy.counters.traps
                    if verdict.action is Action.KILL:
                        self._kill(process, self.crash_at(e.eip, f"SIGSEGV ({self.strategy.name}): {verdict.reason}"))
                    elif self.max_traps is not None and traps >= self.max_traps:
                        crash = self.crash_at(e.eip, f"stopped after {traps} traps (--max-traps)")
                        break
                    continue
                if e.reason is ExitReason.PAGE_FAULT:
                    pf = e.page_fault
                    if pf is not None and not pf.via_segment in ("fs", "gs") and process.grow_stack(pf.linear):
                        continue  # the stack grew down to the access: run the instruction again
                    where = pf.linear if pf else 0
                    hole = " (hypervisor hole)" if where >= self.policy.hypervisor_start else ""
                    # a handler runs for the guest's own faults; an access aimed at the hole is
                    # always reported and fatal (nothing of it happened either way)
                    code = SEGV_ACCERR if process.mem.is_mapped(where & ~0xFFF, 1) else SEGV_MAPERR
                    if not hole and k.fault_signal(task, SIGSEGV, code, where):
                        continue
                    self._kill(process, self.crash_at(e.eip, f"SIGSEGV: {e.message}{hole}"))
                    continue
                if e.reason is ExitReason.TIMEOUT:
                    crash = self.crash_at(e.eip, "timed out", timed_out=True)
                    break
                if e.null_segment is not None:
                    verdict = self.strategy.null_selector_fault(self, e.eip, e.null_segment)
                    if verdict is not None and verdict.action is Action.RESTART:
                        continue
                sig, code = self._fault_signal_of(process, e)
                address = e.eip if code not in (SI_KERNEL,) else 0
                if e.vector is not None and k.fault_signal(task, sig, code, address):
                    continue
                self._kill(process, self.crash_at(e.eip, e.message or "CPU exception"), sig)
        except TooManyProcesses as exc:
            crash = self.crash_at(self._eip(), f"stopped: {exc} (a fork bomb?)")
        if crash is None and not k.finished:
            crash = self.crash_at(self._eip(), f"deadlock: {k.deadlock_report()}")
        if not k.finished:
            k.stop_all()
        first = self.first_process
        if crash is None and first.crash is not None:
            crash = first.crash
        status = None
        if crash is None and first.exit_signal:   # killed by a signal (abort, SIGPIPE, kill): a crash,
            crash = self._signal_death(first)     # as the hw backend reports the same death
        if crash is None:
            status = first.exit_status
        wall = time.perf_counter() - started
        return RunResult(status, bytes(first.stdout), bytes(first.stderr), crash,
                         self.counters(), wall, self.sites())

    def _resume(self) -> bool:
        """Make the task the kernel chose ready to run (signals delivered); False: the run is over."""
        k = self.kernel
        while not k.finished:
            k.fire_alarms()   # an ITIMER_REAL that expired while the last task ran: SIGALRM now
            cur = k.current
            if cur.state == RUNNABLE and cur.process.alive and not k.yield_requested:
                k.deliver_signals(cur)
                if cur.state == RUNNABLE and cur.process.alive:
                    return True
                continue
            forced, k.yield_requested = k.yield_requested, False
            if not k.schedule(force=forced):
                return False
        return False

    @staticmethod
    def _fault_signal_of(process, e: Exit) -> tuple[int, int]:
        """(signal, si_code) Linux sends for a CPU exception exit. A software ``int N`` (Unicorn
        reports it by its vector, EIP after the instruction) other than int $3 and int $4 reaches a
        gate user mode may not use: #GP, SIGSEGV."""
        vector = e.vector
        if vector is not None and vector not in (3, 4):
            try:
                before = process.mem.read((e.eip - 2) & 0xFFFFFFFF, 2) if e.eip >= 2 else b""
            except GuestFault:   # nothing mapped before EIP
                before = b""
            if before == bytes((0xCD, vector)):
                return SIGSEGV, SI_KERNEL
        return FAULT_SIGNALS.get(vector, (SIGILL, ILL_ILLOPN))

    def _signal_death(self, process) -> GuestCrash:
        sig = process.exit_signal
        try:
            name = signal_module.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        vcpu = process.vcpu
        eip = vcpu.regs.get("eip") if vcpu is not None and vcpu.regs is not None else 0
        return self.crash_at(eip, f"killed by {name} (signal {sig})", vcpu=vcpu)

    def _eip(self) -> int:
        vcpu = self.vcpu
        return vcpu.regs.get("eip") if vcpu is not None and vcpu.regs is not None else 0

    def _kill(self, process, crash: GuestCrash, signal: int = SIGSEGV) -> None:
        self.kernel.exit_process(process, 0, signal, crash=crash)

    def sites(self) -> list[dict]:
        """Per-instruction fs/gs counters of every address space of the run."""
        return self.kernel.merged_sites()

    def counters(self) -> dict:
        k = self.kernel
        machine = k.machine_totals()
        first = self.first_process
        out = {
            "instructions": k.total_instructions(),
            "segment_loads": machine["segment_loads"],
            "violations": machine["violations"],
            "page_faults": machine["page_faults"],
            "segments": machine["segments"],
            "strategy": {"name": self.strategy.name, **asdict(self.strategy.counters)},
            "policy": self.policy.describe(),
            "linux": k.linux_totals(),
            "hazards": list(getattr(self.strategy, "hazards", [])),
            "page_cache": first.page_cache.as_dict(),
        }
        if len(k.processes) > 1 or len(k.tasks) > 1:
            out["kernel"] = k.summary()
        return out

def run_process(process, strategy: Strategy | str = "native") -> int:
    """Run an already-built process to its exit status through the one run loop; GuestCrashed otherwise."""
    result = Domain.adopt(process, strategy).run()
    if result.crash is not None:
        raise GuestCrashed(result.crash)
    return result.status
