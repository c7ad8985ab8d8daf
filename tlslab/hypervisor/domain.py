"""A domain: one guest process on one vCPU under one hypervisor strategy.

``Domain.run()`` is the run loop, explicit about every exit (KVM style):

    SYSCALL            -> the Linux personality handles it
    SEGMENT_VIOLATION  -> the strategy: resume / restart / kill (SIGSEGV)
    PAGE_FAULT         -> SIGSEGV (nothing to fix: the guest touched no memory)
    EXCEPTION          -> SIGSEGV/SIGILL/SIGFPE equivalent, reported
    TIMEOUT            -> the run is abandoned, reported
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import capstone

from tlslab.hypervisor.policy import DescriptorPolicy
from tlslab.hypervisor.strategies import Action, Strategy, Trap, get_strategy
from tlslab.linux.syscalls_proc import ProcessExit
from tlslab.machine import layout
from tlslab.machine.vcpu import Exit, ExitReason, VCpu
from tlslab.x86.descriptor import SegmentDescriptor

_DISASM = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
FLAT_USER = SegmentDescriptor.flat_user_data(0)


@dataclass(frozen=True)
class GuestCrash:
    """Where and why a guest died."""

    eip: int
    symbol: str
    instruction: str
    reason: str

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
                 trace_signs: bool = False, vcpu: VCpu | None = None):
        self.strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        self.policy = DescriptorPolicy.xen(profile) if self.strategy.truncates else DescriptorPolicy.native(profile)
        self.vcpu = vcpu if vcpu is not None else VCpu(checks=checks, timeout_seconds=timeout_seconds,
                                                       trace_signs=trace_signs)
        self._requested: dict[SegmentDescriptor, SegmentDescriptor] = {}
        self.max_traps = max_traps
        self.process = process_factory(self.vcpu, self._shape_descriptor)
        self.strategy.attach(self)

    @classmethod
    def adopt(cls, process, strategy: Strategy | str = "native", **options) -> Domain:
        """A domain around ``process`` and the vCPU it was built on (loaded here if it is not yet)."""
        if process.image is None:
            process.load()
        return cls(lambda _vcpu, _policy: process, strategy, vcpu=process.vcpu, **options)

    # the policy as the Linux layer sees it: remember what was asked for
    def _shape_descriptor(self, requested: SegmentDescriptor) -> SegmentDescriptor:
        shaped = self.policy(requested)
        self._requested[shaped] = requested
        return shaped

    def requested_descriptor(self, segment: str) -> SegmentDescriptor | None:
        """What the guest asked for behind the TLS descriptor a segment register holds now."""
        selector = self.vcpu.regs.get(segment) & 0xFFFF
        if selector < 4 or selector & 4 or layout.selector_index(selector) >= len(self.vcpu.descriptors):
            return None
        installed = self.vcpu.descriptors[layout.selector_index(selector)]
        if installed is None:
            return None
        if installed in self._requested:
            return self._requested[installed]
        # flipped descriptors: same base, the guest asked for a flat segment
        for shaped, requested in self._requested.items():
            if shaped.base == installed.base:
                return requested
        return installed

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

    def crash_at(self, eip: int, reason: str) -> GuestCrash:
        text = "??"
        try:
            code = self.vcpu.mem.read(eip, 15) if self.vcpu.mem.is_mapped(eip, 15) else b""
            insn = next(_DISASM.disasm(code, eip, 1), None)
            if insn is not None:
                text = f"{insn.mnemonic} {insn.op_str}".strip()
        except Exception:
            pass
        return GuestCrash(eip, self.symbolize(eip), text, reason)

    def run(self) -> RunResult:
        started = time.perf_counter()
        status: int | None = None
        crash: GuestCrash | None = None
        while True:
            e: Exit = self.vcpu.run()
            if e.reason is ExitReason.SYSCALL:
                try:
                    self.process.handle_syscall()
                except ProcessExit as done:
                    status = done.status
                    break
                continue
            if e.reason is ExitReason.SEGMENT_VIOLATION:
                verdict = self.strategy.handle(Trap(e.violation, self))  # the strategy counts its traps
                traps = self.strategy.counters.traps
                if verdict.action is Action.KILL:
                    crash = self.crash_at(e.eip, f"SIGSEGV ({self.strategy.name}): {verdict.reason}")
                    break
                if self.max_traps is not None and traps >= self.max_traps:
                    crash = self.crash_at(e.eip, f"stopped after {traps} traps (--max-traps)")
                    break
                continue
            if e.reason is ExitReason.PAGE_FAULT:
                pf = e.page_fault
                where = pf.linear if pf else 0
                hole = " (hypervisor hole)" if where >= self.policy.hypervisor_start else ""
                crash = self.crash_at(e.eip, f"SIGSEGV: {e.message}{hole}")
                break
            if e.reason is ExitReason.TIMEOUT:
                crash = self.crash_at(e.eip, "timed out")
                break
            crash = self.crash_at(e.eip, e.message or "CPU exception")
            break
        wall = time.perf_counter() - started
        return RunResult(status, bytes(self.process.stdout), bytes(self.process.stderr), crash,
                         self.counters(), wall, [asdict(s) for s in self.vcpu.site_counters()])

    def counters(self) -> dict:
        vc = self.vcpu.counters
        seg = {name: asdict(c) for name, c in self.vcpu.segment_counters().items()}
        sc = asdict(self.strategy.counters)
        return {
            "instructions": vc.instructions,
            "segment_loads": vc.segment_loads,
            "violations": dict(vc.violations),
            "page_faults": vc.page_faults,
            "segments": seg,
            "strategy": {"name": self.strategy.name, **sc},
            "policy": self.policy.describe(),
            "linux": self.process.counters.as_dict(),
            "hazards": list(getattr(self.strategy, "hazards", [])),
            "page_cache": page_cache.as_dict() if (page_cache := getattr(self.process, "page_cache", None)) else {},
        }


def run_process(process, strategy: Strategy | str = "native") -> int:
    """Run an already-built process to its exit status through the one run loop; GuestCrashed otherwise."""
    result = Domain.adopt(process, strategy).run()
    if result.crash is not None:
        raise GuestCrashed(result.crash)
    return result.status
