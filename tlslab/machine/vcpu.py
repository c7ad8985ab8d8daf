"""A 32-bit protected-mode vCPU on Unicorn with exact fs/gs segment enforcement.

``VCpu.run()`` executes the guest until something needs the layers above and
returns an ``Exit`` with an explicit reason, as KVM's ``run`` does: a system
call, a segment violation (before the faulting access committed), a page
fault, a CPU exception, or the time limit. Nothing here knows about Linux or
Xen; descriptors arrive through ``set_descriptor`` already shaped by whatever
policy the hypervisor layer applies.

Segment loads need no interception: each GDT TLS slot that has a window is
installed in the GDT Unicorn reads with its base shifted into that window (see
``layout``), so whichever segment register the guest loads it into, accesses
land in the window, where the fast path sees them before they commit.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from dataclasses import dataclass, field

import capstone
from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_READ_PROT,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_PROT,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ_PROT,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE_PROT,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_32,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_NONE,
    Uc,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from tlslab.machine import fastpath, layout
from tlslab.machine.exits import (  # noqa: F401  (re-exported: the vCPU's public vocabulary)
    Exit,
    ExitReason,
    PageFault,
    SegmentViolation,
    exit_from_fastpath,
    exit_from_unmapped,
)
from tlslab.machine.memory import GuestMemory
from tlslab.machine.settle import SettledFaults, SettlePlan
from tlslab.machine.registers import REGISTER_IDS, SYSCALL_REGS, RawRegisters, host_access  # noqa: F401
from tlslab.machine.windows import DescriptorViews
from tlslab.x86.decode import DecodeError, decode
from tlslab.x86.descriptor import SegmentDescriptor
from tlslab.x86.segcheck import check_data_access
from tlslab.x86.segusage import SEGMENT_NUMBERS, SegmentUsage, segment_usage


_CONTROL_TRANSFERS = ("j", "call", "ret", "loop", "iret", "int")  # mnemonics that may leave the block
_BLOCK_ICOUNTS: dict[bytes, int] = {}  # block bytes -> instruction count (a count does not depend on where)

VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC"}

SEGMENT_PREFIX = {0x26: None, 0x2E: None, 0x36: None, 0x3E: None, 0x64: fastpath.SEG_FS, 0x65: fastpath.SEG_GS}
LEGACY_PREFIXES = {0x66, 0x67, 0xF0, 0xF2, 0xF3} | set(SEGMENT_PREFIX)
SEGMENT_REGISTER_IDS = {fastpath.SEG_FS: "fs", fastpath.SEG_GS: "gs"}


@dataclass
class SegmentCounters:
    accesses: int = 0
    negative: int = 0
    positive: int = 0
    sign_changes: int = 0


@dataclass
class MachineCounters:
    instructions: int = 0
    segment_loads: int = 0
    violations: dict[str, int] = field(default_factory=dict)
    page_faults: int = 0
    exceptions: int = 0


class VCpu:
    """One guest CPU and its address space.

    ``checks=False`` gives the baseline the speed target (docs/machine.md#history) is measured
    against: no windows, no protection events, fs/gs bases used as-is (and
    therefore no segment enforcement at all, as in plain Unicorn).
    """

    def __init__(self, checks: bool = True, count_instructions: bool = True, timeout_seconds: float = 0,
                 trace_signs: bool = False):
        self.checks = checks
        self.count_instructions = count_instructions
        self.on_release = None   # called with this vCPU when its address space is over
        self.timeout_us = int(timeout_seconds * 1_000_000)
        self._deadline_ns: int | None = None  # the limit is for the whole run, set when it starts
        self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self.regs = RawRegisters(self.uc)
        shifts = tuple(layout.SLOT_WINDOW_SHIFT.values()) if checks else ()
        self.mem = GuestMemory(self.uc, alias_offsets=shifts, on_change=self._mappings_changed,
                               map_alias=lambda start, size, host: self._fast.map_alias(start, size, host))
        self.counters = MachineCounters()
        self.descriptors: list[SegmentDescriptor | None] = [None] * layout.GDT_ENTRIES
        self.views = DescriptorViews(checks)
        self._disasm = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
        self._pending: Exit | None = None
        self._unmapped: tuple[int, int, bool, bool] | None = None
        self._site_usage: dict[int, SegmentUsage] = {}
        self._not_retired: dict[tuple[int, int, int], int] = {}
        self.decoded: dict[int, object] = {}  # eip -> decoded instruction, for strategies; cleared on code patches
        self.code_generation = 0   # bumped whenever the host changed guest code (caches of decoded code check it)
        self._faulted: tuple[int, int, bool] | None = None  # the last run's faulting instruction (see run)
        self._fault_shapes: dict[int, tuple[int, bool]] = {}
        self._settle: SettlePlan | None = None   # faults the access hook settles itself (settle.py)
        self._settled = SettledFaults()
        self._started = False
        # what run() last wrote to the block counter's inputs (see run: it writes only what changes)
        self._budget_first_written = 0
        self._budget_written = False
        self._setup_hypervisor_pages()
        self._setup_hooks()
        if trace_signs:
            if not checks:
                raise ValueError("sign tracing needs checks=True (it is done by the access hook)")
            self._fast.enable_sign_trace()

    # ------------------------------------------------------------ set-up
    def _setup_hypervisor_pages(self) -> None:
        """The GDT page and the entry stack, in a host buffer of ours mapped with no permissions.

        Without permissions every guest write asks the fast path, and so does every read until the
        fast path allows one (the GDT page only, see _fastpath.c). The host writes GDT entries and
        the entry frame by slicing the buffer: ``uc.mem_write`` to a page without write permission
        grants it and takes it back, each time rebuilding Unicorn's memory map (~4 ms per call with
        a dynamic program's aliases mapped, measured).
        """
        uc = self.uc
        self._hv_pages = mmap.mmap(-1, layout.HYPERVISOR_PAGES_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._hv_host = ctypes.addressof(ctypes.c_char.from_buffer(self._hv_pages))
        perms = UC_PROT_NONE if self.checks else UC_PROT_ALL
        uc.mem_map_ptr(layout.GDT_BASE, layout.PAGE_SIZE, perms, self._hv_host)
        # the entry stub's page (iret: the one way into ring 3, docs/measurements.md#unicorn) is mapped
        # only while the host enters ring 3 (enter_user_mode): a page Unicorn has executed from stayed
        # readable to the guest without asking the protection hook (measured), so it is not left there
        stack = layout.ENTRY_STUB + layout.PAGE_SIZE
        uc.mem_map_ptr(stack, layout.HYPERVISOR_PAGES + layout.HYPERVISOR_PAGES_SIZE - stack, perms,
                       self._hv_host + (stack - layout.HYPERVISOR_PAGES))
        flat = dict(base=0, limit=0xFFFFF, present=True, s=True, db=True, granularity=True, rw=True)
        for index, dpl, code in (
            (layout.GDT_ENTRY_KERNEL_CS, 0, True), (layout.GDT_ENTRY_KERNEL_DS, 0, False),
            (layout.GDT_ENTRY_USER_CS, 3, True), (layout.GDT_ENTRY_USER_DS, 3, False),
        ):
            self._write_hv(layout.GDT_BASE + 8 * index,
                           SegmentDescriptor(dpl=dpl, executable=code, accessed=True, **flat).to_bytes())
        uc.reg_write(X.UC_X86_REG_GDTR, (0, layout.GDT_BASE, 8 * layout.GDT_ENTRIES - 1, 0))

    def _write_hv(self, address: int, data: bytes) -> None:
        """The host writes the hypervisor pages (GDT entries, the entry frame) in its own buffer."""
        offset = address - layout.HYPERVISOR_PAGES
        self._hv_pages[offset : offset + len(data)] = data

    def _setup_hooks(self) -> None:
        uc = self.uc
        self._fast = None
        if self.checks or self.count_instructions:
            self._fast = fastpath.Fastpath(
                uc._uch, X.UC_X86_REG_EIP, self._classify_site, self._verdict, self._block_icount
            )
        handle = uc._uch
        if self.checks:
            lo, hi = layout.WATCHED_REGION
            # a protection hook only: a UC_HOOK_MEM_READ/WRITE hook would slow every guest access (_fastpath.c)
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(handle, ctypes.byref(hh), UC_HOOK_MEM_READ_PROT | UC_HOOK_MEM_WRITE_PROT,
                                    ctypes.c_void_p(self._fast.on_prot), ctypes.c_void_p(self._fast.address),
                                    ctypes.c_uint64(lo), ctypes.c_uint64(hi))
            if err:
                raise UcError(err)
            h = self._fast.header
            for name, number in SEGMENT_NUMBERS.items():
                h.regid_seg[number] = REGISTER_IDS[name]
            h.regid_esi, h.regid_edi = X.UC_X86_REG_ESI, X.UC_X86_REG_EDI
            # plain reads allowed above user space: the GDT page only (Xen maps it read-only)
            h.hv_lo = layout.GDT_BASE
            h.hv_hi = layout.GDT_BASE + layout.PAGE_SIZE
            self.regs.fastpath_header = h
            self._fast.set_aliases(self._refusable_regions())
            h.nwindows = len(layout.SLOT_WINDOW_SHIFT)
            for k, (slot, shift) in enumerate(layout.SLOT_WINDOW_SHIFT.items()):
                w = h.windows[k]
                w.slot = slot
                w.user_top = layout.USER_TOP
                w.base = shift  # window_base(slot, 0): no descriptor yet
        if self.count_instructions:
            self._fast.count_blocks(handle)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)

    def _refusable_regions(self) -> list[tuple[int, int, int, bool]]:
        """(start, size, rights, hypervisor) of the regions the fast path judges accesses in: the
        aliases (the guest's rights, checked by the hook) and the hypervisor pages."""
        hv = (layout.HYPERVISOR_PAGES, layout.HYPERVISOR_PAGES_SIZE, UC_PROT_ALL, True)
        return sorted([*((s, z, p, False) for s, z, p in self.mem.alias_regions()), hv])

    def _mappings_changed(self) -> None:
        if self.checks and getattr(self, "_fast", None) is not None:
            self._fast.set_aliases(self._refusable_regions())

    # ------------------------------------------------------- fast-path callbacks
    def _classify_site(self, eip: int) -> int:
        """Which segment register each access of the instruction at ``eip`` uses (packed), and
        whether a fault there may be settled in the hook (bits from 20: ``fastpath.SITE_SETTLE_*``)."""
        packed = self.segment_usage(eip).pack()
        plan = self._settle
        if plan is not None:
            insn = decode(self._code_at(eip), eip)
            try:
                admitted = 0 if isinstance(insn, DecodeError) else int(plan.admit(insn))
            except Exception:   # a callback from C must not raise: decline, Python decides at the fault
                admitted = 0
            if admitted > 0:
                flag = fastpath.SITE_SETTLE_EMULATE if plan.mode == "emulate" else fastpath.SITE_SETTLE_FLIP
                usage = self.segment_usage(eip)
                if usage.write == "ss":
                    flag |= fastpath.SITE_SETTLE_STACK_WRITE
                elif usage.read == "ss":
                    flag |= fastpath.SITE_SETTLE_STACK_READ
                packed |= flag | min(admitted, 15) << fastpath.SITE_SETTLE_ACCESSES_SHIFT
        return packed

    def _code_at(self, eip: int) -> bytes:
        try:
            return self.mem.read(eip, 15) if self.mem.is_mapped(eip, 15) else bytes(self.uc.mem_read(eip, 15))
        except Exception:
            return b""

    def segment_usage(self, eip: int) -> SegmentUsage:
        usage = self._site_usage.get(eip)
        if usage is None:
            code = self._code_at(eip)
            prefix = None
            for b in code:
                if b not in LEGACY_PREFIXES:
                    break
                if b in SEGMENT_PREFIX:
                    prefix = SEGMENT_REGISTER_IDS.get(SEGMENT_PREFIX[b] or 0)
            usage = self._site_usage[eip] = segment_usage(decode(code, eip), prefix)
        return usage

    # ------------------------------------------------------------ settling faults in the hook
    def settle_in_hook(self, plan: SettlePlan | None) -> None:
        """Let the access hook settle the faults ``plan`` admits (None: every fault exits to Python)."""
        if not self.checks or self._fast is None:
            return
        self._settle = plan
        if plan is None:
            self._fast.settle_in_hook(fastpath.SETTLE_OFF, 0)
            return
        mode = fastpath.SETTLE_EMULATE if plan.mode == "emulate" else fastpath.SETTLE_FLIP
        st = self._fast.header.settle
        st.regid_ss, st.regid_esp, st.flat_ss = X.UC_X86_REG_SS, X.UC_X86_REG_ESP, layout.USER_DS
        segments = sum(1 << SEGMENT_NUMBERS[seg] for seg in plan.segments if seg in ("fs", "gs"))
        self._fast.settle_in_hook(mode, segments, self._flip_target if plan.flip is not None else None)
        self.refresh_emulate_views()

    def refresh_emulate_views(self) -> None:
        """Recompute, per window, the descriptor an emulator applies (the plan's ``emulate_view``)."""
        if self._fast is None or not self.checks:
            return
        for w in self._fast.header.windows:
            w.emulate_generation = self._emulate_generation(self.descriptors[w.slot] if w.slot else None)

    def _emulate_generation(self, installed: SegmentDescriptor | None) -> int:
        """The generation of what an emulator applies for a slot holding ``installed`` (-1: nothing)."""
        view = self._settle.emulate_view if self._settle is not None else None
        target = view(installed) if view is not None and installed is not None else None
        return self.generation_of(target) if target is not None else -1

    def _flip_target(self, slot: int, generation: int, offset: int, size: int) -> int:
        """For the hook: the flipped descriptor's generation * 2 + expand-down, or -1 (Python decides)."""
        try:
            desc = self.views.descriptor(generation)
            flipped = self._settle.flip(desc, offset, size)
            if flipped is None or self.views.view(slot, flipped) != self.views.view(slot, desc):
                return -1   # a genuine fault, or a flip Unicorn would have to see: not settled here
            return self.generation_of(flipped) * 2 + int(flipped.expand_down)
        except Exception:
            return -1

    def _collect_settled(self) -> None:
        """After a run: take what the hook settled, and the descriptors its flips installed."""
        h = self._fast.header
        for w in h.windows:
            if w.changed:
                w.changed = 0
                self.descriptors[w.slot] = self.views.descriptor(w.generation)
        (fs, gs), accesses, down, up, loads = self._fast.take_settled()
        if not (fs or gs or loads):
            return
        self.counters.segment_loads += loads
        for seg, n in (("fs", fs), ("gs", gs)):
            if n:
                self.counters.violations[seg] = self.counters.violations.get(seg, 0) + n
        self._settled.add(SettledFaults({"fs": fs, "gs": gs}, accesses, down, up))

    def take_settled(self) -> SettledFaults | None:
        """Faults the hook settled since the last call (None: none)."""
        if self._settled.total == 0:
            return None
        out, self._settled = self._settled, SettledFaults()
        return out

    def _verdict(self, slot: int, generation: int, offset: int, size: int, write: int) -> int:
        desc = self.views.descriptor(generation)
        return 1 if check_data_access(desc, offset, size, bool(write)).allowed else 0

    def _block_icount(self, address: int, size: int) -> int:
        try:
            code = self.mem.read(address, size)
        except Exception:
            code = bytes(self.uc.mem_read(address, size))
        n = _BLOCK_ICOUNTS.get(code)
        if n is None:  # the same library code is translated again in every new address space
            n = _BLOCK_ICOUNTS[code] = sum(1 for _ in self._disasm.disasm_lite(code, address))
            if len(_BLOCK_ICOUNTS) > 1 << 18:
                _BLOCK_ICOUNTS.clear()
        return n

    # ------------------------------------------------------------ Python hooks
    def _on_interrupt(self, uc, intno, user_data) -> None:
        eip = self.regs.get("eip")
        if intno == 0x80:
            self._pending = Exit(ExitReason.SYSCALL, eip)
        else:
            name = VECTOR_NAMES.get(intno, f"vector {intno}")
            self._pending = Exit(ExitReason.EXCEPTION, eip, vector=intno, message=f"{name} at {eip:#010x}")
        uc.emu_stop()

    def _on_unmapped(self, uc, access, address, size, value, user_data) -> bool:
        self._unmapped = (address, size, access == UC_MEM_WRITE_UNMAPPED, False)
        return False

    def _on_invalid(self, uc, user_data=None) -> bool:
        eip = self.regs.get("eip")
        self._pending = Exit(ExitReason.EXCEPTION, eip, vector=6, message=f"#UD invalid instruction at {eip:#010x}")
        return False

    # ------------------------------------------------------------ segments
    def generation_of(self, desc: SegmentDescriptor) -> int:
        """The number the fast path knows ``desc`` by (interned; the core checks accesses against it)."""
        known = len(self.views)
        gen = self.views.generation_of(desc)
        if gen >= known and self._fast is not None and self.checks:
            self._fast.set_generation(gen, desc.to_bytes())
        return gen

    @property
    def loaded(self) -> dict[str, int]:
        """Selectors held by fs and gs (read from the CPU: loads are not intercepted)."""
        return {"fs": self.regs.get("fs") & 0xFFFF, "gs": self.regs.get("gs") & 0xFFFF}

    def instructions_retired(self) -> int:
        """Guest instructions retired so far, exact at an exit (a clock for online strategies)."""
        if self._fast is not None and self.count_instructions:
            return int(self._fast.header.instructions)
        return self.counters.instructions

    def set_descriptor(self, index: int, desc: SegmentDescriptor | None) -> None:
        """Install a (policy-shaped) descriptor in a TLS slot and refresh fs/gs using it.

        Refreshing models what Xen's #GP path and Linux's return to user mode do:
        the segment registers are reloaded from the table on the way back.
        """
        if index not in layout.TLS_SLOTS:
            raise ValueError(f"GDT entry {index} is not a TLS slot")
        self.descriptors[index] = desc
        self._write_hv(layout.GDT_BASE + 8 * index, self.views.view(index, desc))
        if self.checks and index in layout.SLOT_WINDOW_SHIFT and desc is not None:
            for w in self._fast.header.windows:
                if w.slot == index:
                    w.base = layout.window_base(index, desc.base)
                    w.real_base = desc.base
                    w.generation = self.generation_of(desc)
                    w.changed = 0
                    w.emulate_generation = self._emulate_generation(desc)
        if self._started:
            for reg, selector in self.loaded.items():
                if selector and layout.selector_index(selector) == index and not selector & 4:
                    self._host_load(reg, selector)
                    self.counters.segment_loads += 1

    def _host_load(self, reg: str, selector: int) -> None:
        """Reload a segment register from the table (the CPU reads the GDT: not a guest access)."""
        with host_access(self._fast.header if self._fast is not None else None):
            self.regs.set(reg, selector)

    # ------------------------------------------------------------ control
    def enter_user_mode(self, eip: int, esp: int) -> None:
        """Start the guest at ``eip`` in ring 3 by an ``iret`` from the entry stub."""
        uc = self.uc
        frame = b"".join(v.to_bytes(4, "little") for v in (eip, layout.USER_CS, 0x202, esp, layout.USER_DS))
        sp = layout.ENTRY_STACK - len(frame)
        self._write_hv(sp, frame)
        uc.reg_write(X.UC_X86_REG_ESP, sp)
        uc.reg_write(X.UC_X86_REG_SS, layout.KERNEL_DS)
        uc.reg_write(X.UC_X86_REG_DS, layout.USER_DS)
        uc.reg_write(X.UC_X86_REG_ES, layout.USER_DS)
        self._reset_fpu()
        self._write_hv(layout.ENTRY_STUB, b"\xcf")  # iret
        uc.mem_map_ptr(layout.ENTRY_STUB, layout.PAGE_SIZE, UC_PROT_EXEC if self.checks else UC_PROT_ALL,
                       self._hv_host + (layout.ENTRY_STUB - layout.HYPERVISOR_PAGES))
        try:
            with host_access(self._fast.header if self._fast is not None else None):
                uc.emu_start(layout.ENTRY_STUB, eip, count=1)  # the stub's iret reads hypervisor pages
        finally:
            uc.mem_unmap(layout.ENTRY_STUB, layout.PAGE_SIZE)
        uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)  # what the CPU read there for the host is not the guest's
        if self.regs.get("cs") != layout.USER_CS or self.regs.get("eip") != eip:
            raise RuntimeError("could not enter ring 3")
        self._started = True
        if self._fast is not None:
            self._fast.header.instructions = 0  # the entry stub is not the guest's

    def _reset_fpu(self) -> None:
        """The x87/SSE state a new program starts with on Linux (as after FNINIT and a fresh MXCSR).

        Unicorn's engine starts with a zero control word: x87 precision "single", every exception
        unmasked, and MXCSR 0 (SSE exceptions unmasked). glibc never loads a control word at start-up,
        so a program would compute doubles in single precision as soon as code saves and restores the
        control word (gcc's (int)double conversion does). Linux gives every new image 0x037f
        (extended precision, round to nearest, all exceptions masked) and MXCSR 0x1f80 (Intel SDM
        vol. 1, 8.1.5 and 10.2.3.1: the values FNINIT and a processor reset give).
        """
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_FPCW, 0x037F)
        uc.reg_write(X.UC_X86_REG_FPSW, 0)
        uc.reg_write(X.UC_X86_REG_FPTAG, 0xFFFF)   # every x87 register empty
        uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80)
        for i in range(8):
            uc.reg_write(getattr(X, f"UC_X86_REG_XMM{i}"), 0)

    def share_deadline(self, other: VCpu) -> None:
        """Run under ``other``'s wall-clock limit (one limit for every address space of a run)."""
        self.timeout_us = other.timeout_us
        if other._deadline_ns is not None:
            self._deadline_ns = other._deadline_ns
            if self._fast is not None and self.count_instructions:
                self._fast.header.deadline_ns = self._deadline_ns
                self._fast.header.count_limit = 0   # the block counter's general case reads it

    def release(self) -> None:
        """This address space is over (exit, exec): drop the engine and its memory together.

        The counters stay readable; the engine and the host buffers it maps go
        when the last reference does (nothing is unmapped one region at a time).
        """
        if self.on_release is not None:
            self.on_release(self)            # e.g. the domain keeps this space's sign trace
            self.on_release = None
        if self._fast is not None:
            self._fast.freeze_sign_trace()   # its runs stay readable, its buffers go
        self.mem = None
        self.uc = None
        self.regs = None

    def load_context(self, context) -> None:
        """Resume a thread: registers saved with ``uc.context_save()`` (from this or another vCPU)."""
        with host_access(self._fast.header if self._fast is not None else None):
            self.uc.context_restore(context)
        self._started = True

    def run(self, budget: int | None = None) -> Exit:
        """Run until the guest needs a layer above; see ``ExitReason``.

        ``budget``: stop (PREEMPTED) at the first block boundary at or past
        that many more instructions (0 or less: the first boundary): what is
        left of a scheduler's time slice, deterministic because block
        boundaries are a property of the code. Resuming inside the block a
        fault stopped is not a boundary (``_continues_faulted_block``), so a
        fault taken to Python and one settled in the hook give the same
        schedule.
        """
        # one EIP read and few header accesses: this runs once per system call and fault
        eip = self.regs.get("eip")
        fast = self._fast
        h = fast.header if fast is not None else None
        # The block counter's general case must see whatever is set here: every write below also
        # sets count_limit to 0 (_fastpath.c). C clears budget_first at the first block, so a 0 is
        # written only after a 1 (a run may end before any block).
        if h is not None:
            limit_stale = False
            if budget is not None and self.count_instructions:
                h.budget_end = max(1, h.instructions + budget)
                h.budget_hit = 0
                self._budget_written = limit_stale = True
            first = 1 if self._faulted is not None and self._continues_faulted_block(eip) else 0
            if first or self._budget_first_written:
                h.budget_first = self._budget_first_written = first
                limit_stale = True
            if limit_stale:
                h.count_limit = 0   # the first block takes the counter's general case: what was just set
        self._faulted = None
        self._pending = None
        self._unmapped = None
        error = None
        unicorn_timeout_us = 0
        if self.timeout_us:
            now = time.monotonic_ns()
            if self._deadline_ns is None:
                self._deadline_ns = now + self.timeout_us * 1000
                if self._fast is not None and self.count_instructions:
                    self._fast.header.deadline_ns = self._deadline_ns  # checked by the block counter
                    self._fast.header.count_limit = 0
            if now >= self._deadline_ns:  # e.g. a guest that loops in system calls
                return self._timeout_exit(eip)
            if self._fast is None or not self.count_instructions:
                # no block counter to check the clock: Unicorn's watcher thread (slow, see _fastpath.c)
                unicorn_timeout_us = max(1, (self._deadline_ns - now) // 1000)
        try:
            self.uc.emu_start(eip, 0xFFFFFFFF, timeout=unicorn_timeout_us)
        except UcError as exc:
            error = exc.errno
        if h is not None and self.count_instructions:
            self.counters.instructions = h.instructions
        if self._settle is not None:
            self._collect_settled()
        stop_eip = self.regs.get("eip")

        if self._budget_written:
            h.budget_end = 0   # budget_hit stays for the check below
            self._budget_written = False
        fast_exit = fast.take_exit() if self.checks else None
        if fast_exit is not None and error in (UC_ERR_READ_PROT, UC_ERR_WRITE_PROT):
            if stop_eip != fast_exit.eip:
                # Unicorn could not stop this store before the instruction completed
                # (helper-implemented stores such as cmpxchg8b): never resume from it
                self.counters.exceptions += 1
                return Exit(ExitReason.EXCEPTION, fast_exit.eip,
                            message=f"access refused at {fast_exit.eip:#010x} but the instruction could not be "
                            f"stopped before it completed (stopped at {stop_eip:#010x}); run abandoned")
            self._uncount_rest_of_block(stop_eip)
            if fast_exit.kind == fastpath.EXIT_SEGMENT_VIOLATION:
                self._note_fault(fast_exit.eip)
            return exit_from_fastpath(self, fast_exit)
        if error in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT):
            self._uncount_rest_of_block(stop_eip)
            return exit_from_unmapped(self, stop_eip, error, self._unmapped)
        if self._pending is not None:
            if self._pending.reason is ExitReason.EXCEPTION:
                self.counters.exceptions += 1
                self._uncount_rest_of_block(self._pending.eip)
            return self._pending
        if error is not None:
            return Exit(ExitReason.EXCEPTION, stop_eip, message=f"unicorn error: {UcError(error)}")
        if self._fast is not None and self._fast.header.budget_hit:
            self._fast.header.budget_hit = 0
            return Exit(ExitReason.PREEMPTED, stop_eip)
        return self._timeout_exit(stop_eip)  # stopped by the deadline (block counter or Unicorn's timer)

    def _continues_faulted_block(self, eip: int) -> bool:
        """Does this run resume, in program order, inside the block whose fault ended the last run?

        Then Unicorn starts a new translation block here, but the program has no
        block boundary here -- and a fault settled in the hook has none either --
        so the block counter must not end a time slice at it. A control transfer
        (jmp/call through fs/gs) resumes at its target, a real boundary.
        """
        if self._faulted is None or self._fast is None:
            return False
        fault_eip, length, transfers = self._faulted
        h = self._fast.header
        start, end = h.cur_block_address, h.cur_block_address + h.cur_block_size
        return not transfers and eip in (fault_eip, fault_eip + length) and start <= fault_eip and eip < end

    def _note_fault(self, eip: int) -> None:
        """Remember the faulting instruction (its length, whether it transfers control) for the next run."""
        shape = self._fault_shapes.get(eip)
        if shape is None:
            insn = decode(self._code_at(eip), eip)
            if isinstance(insn, DecodeError):
                shape = (0, True)
            else:
                shape = (insn.length, insn.mnemonic.startswith(_CONTROL_TRANSFERS))
            self._fault_shapes[eip] = shape
        self._faulted = (eip, *shape)

    def _timeout_exit(self, eip: int) -> Exit:
        return Exit(ExitReason.TIMEOUT, eip, message=f"wall-clock limit of {self.timeout_us / 1e6:g} s reached")

    def _uncount_rest_of_block(self, eip: int) -> None:
        """A precise stop at ``eip`` retired only the block's instructions before it."""
        if not self.count_instructions:
            return
        h = self._fast.header
        start, size = h.cur_block_address, h.cur_block_size
        if not start <= eip < start + size:
            return
        key = (start, size, eip)
        not_retired = self._not_retired.get(key)
        if not_retired is None:
            code = self.mem.read(eip, start + size - eip) if self.mem.is_mapped(eip, 1) else b""
            not_retired = self._not_retired[key] = sum(1 for _ in self._disasm.disasm_lite(code, eip))
        h.instructions -= not_retired
        self.counters.instructions = h.instructions

    # ------------------------------------------------------------ counters
    def segment_counters(self) -> dict[str, SegmentCounters]:
        out = {}
        if self.checks:
            for name, st in zip(("fs", "gs"), self._fast.header.stats):
                out[name] = SegmentCounters(st.accesses, st.negative, st.positive, st.sign_changes)
        return out

    def sign_runs(self, segment: str = "gs") -> tuple[list[int], int]:
        """Runs of same-sign %fs/%gs offsets in access order (+n: n non-negative, -n: n negative, 0: a
        thread switch on this vCPU, see ``sign_break``)."""
        return self._fast.sign_runs(0 if segment == "fs" else 1)

    def sign_break(self) -> None:
        """A thread was switched onto this vCPU: the slot's state may have changed under the trace."""
        if self._fast is not None and self.checks:
            self._fast.sign_break()

    def site_counters(self) -> list[fastpath.SiteCounters]:
        return self._fast.sites() if self.checks else []

    def retire(self, count: int) -> None:
        """Account instructions completed outside the CPU (by an emulator)."""
        if self._fast is not None and self.count_instructions:
            self._fast.header.instructions += count
            self.counters.instructions = self._fast.header.instructions

    def invalidate_code(self, address: int, size: int) -> None:
        """Drop translated code after the host patched guest code bytes."""
        self.uc.ctl_remove_cache(address, address + size)
        self._not_retired.clear()
        self.decoded.clear()
        self.code_generation += 1
        for eip in [e for e in self._site_usage if address - 15 <= e < address + size]:
            del self._site_usage[eip]
        if self._fast is not None:
            self._fast.reset_blocks()
            if self.checks:
                self._fast.forget_sites(address, address + size)
