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
import enum
import time
from dataclasses import dataclass, field

import capstone
from unicorn import (
    UC_ARCH_X86,
    UC_ERR_FETCH_PROT,
    UC_ERR_FETCH_UNMAPPED,
    UC_ERR_READ_PROT,
    UC_ERR_READ_UNMAPPED,
    UC_ERR_WRITE_PROT,
    UC_ERR_WRITE_UNMAPPED,
    UC_HOOK_BLOCK,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_FETCH_UNMAPPED,
    UC_HOOK_MEM_READ,
    UC_HOOK_MEM_READ_PROT,
    UC_HOOK_MEM_READ_UNMAPPED,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_MEM_WRITE_PROT,
    UC_HOOK_MEM_WRITE_UNMAPPED,
    UC_MEM_WRITE_UNMAPPED,
    UC_MODE_32,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

from tlslab.machine import fastpath, layout
from tlslab.machine.memory import GuestMemory
from tlslab.x86.decode import decode
from tlslab.x86.descriptor import SegmentDescriptor
from tlslab.x86.segcheck import check_data_access
from tlslab.x86.segusage import SEGMENT_NAMES, SEGMENT_NUMBERS, SegmentUsage, segment_usage

REGISTER_IDS = {
    "eax": X.UC_X86_REG_EAX, "ebx": X.UC_X86_REG_EBX, "ecx": X.UC_X86_REG_ECX,
    "edx": X.UC_X86_REG_EDX, "esi": X.UC_X86_REG_ESI, "edi": X.UC_X86_REG_EDI,
    "ebp": X.UC_X86_REG_EBP, "esp": X.UC_X86_REG_ESP, "eip": X.UC_X86_REG_EIP,
    "eflags": X.UC_X86_REG_EFLAGS, "cs": X.UC_X86_REG_CS, "ds": X.UC_X86_REG_DS,
    "es": X.UC_X86_REG_ES, "ss": X.UC_X86_REG_SS, "fs": X.UC_X86_REG_FS, "gs": X.UC_X86_REG_GS,
}
SYSCALL_REGS = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")

VECTOR_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
                10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC"}

SEGMENT_PREFIX = {0x26: None, 0x2E: None, 0x36: None, 0x3E: None, 0x64: fastpath.SEG_FS, 0x65: fastpath.SEG_GS}
LEGACY_PREFIXES = {0x66, 0x67, 0xF0, 0xF2, 0xF3} | set(SEGMENT_PREFIX)
SEGMENT_REGISTER_IDS = {fastpath.SEG_FS: "fs", fastpath.SEG_GS: "gs"}
# A valid ring-3 data descriptor with P=0: loading it raises #NP. Used for a
# slot that has no window, so that it can never be used unchecked.
_NOT_PRESENT_TLS = SegmentDescriptor(limit=0xFFFFF, rw=True, s=True, dpl=3, present=False, db=True,
                                     granularity=True).to_bytes()
_EMPTY_SLOT = bytes(8)  # what Linux has in an unused TLS slot: loading it faults


class ExitReason(enum.Enum):
    SYSCALL = "syscall"                      # int 0x80; EIP already past it
    SEGMENT_VIOLATION = "segment-violation"  # fs/gs access refused by its descriptor (#GP)
    PAGE_FAULT = "page-fault"                # access to an unmapped page or outside user space
    EXCEPTION = "exception"                  # other CPU exception (#UD, #GP from privileged insn, ...)
    TIMEOUT = "timeout"                      # wall-clock limit reached


@dataclass(frozen=True)
class SegmentViolation:
    """A refused fs/gs access: everything a #GP handler needs to act on it."""

    eip: int
    segment: str            # "fs" or "gs"
    selector: int
    offset: int             # 32-bit effective address within the segment
    size: int
    write: bool
    linear: int             # (real base + offset) mod 2^32
    descriptor: SegmentDescriptor
    reason: str


@dataclass(frozen=True)
class PageFault:
    eip: int
    linear: int
    size: int
    write: bool
    fetch: bool = False
    via_segment: str | None = None  # "fs"/"gs" when the access used one


@dataclass(frozen=True)
class Exit:
    reason: ExitReason
    eip: int
    violation: SegmentViolation | None = None
    page_fault: PageFault | None = None
    vector: int | None = None
    message: str = ""


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


class _RawRegisters:
    """Register access through the C API directly: ~3x cheaper than Uc.reg_read."""

    def __init__(self, uc: Uc):
        self._handle = uc._uch
        self._value = ctypes.c_uint32()
        self._ref = ctypes.byref(self._value)
        self._read = uclib.uc_reg_read
        self._write = uclib.uc_reg_write
        n = len(SYSCALL_REGS)
        self._batch_ids = (ctypes.c_int * n)(*(REGISTER_IDS[r] for r in SYSCALL_REGS))
        self._batch_vals = (ctypes.c_uint32 * n)()
        self._batch_ptrs = (ctypes.c_void_p * n)(*(ctypes.addressof(self._batch_vals) + 4 * i for i in range(n)))
        self._read_batch = uclib.uc_reg_read_batch
        self.fastpath_header = None  # set by VCpu when the access hook is installed

    def get(self, name: str) -> int:
        self._read(self._handle, REGISTER_IDS[name], self._ref)
        return self._value.value

    def set(self, name: str, value: int) -> None:
        self._value.value = value & 0xFFFFFFFF
        if name in SEGMENT_NUMBERS and self.fastpath_header is not None:
            # loading a segment register makes the CPU read the GDT: that is
            # the host's doing, not a guest access for the hook to judge
            self.fastpath_header.host_access = 1
            try:
                self._write(self._handle, REGISTER_IDS[name], self._ref)
            finally:
                self.fastpath_header.host_access = 0
            return
        self._write(self._handle, REGISTER_IDS[name], self._ref)

    def syscall_registers(self) -> tuple[int, ...]:
        self._read_batch(self._handle, self._batch_ids, self._batch_ptrs, len(SYSCALL_REGS))
        return tuple(self._batch_vals)


class VCpu:
    """One guest CPU and its address space.

    ``checks=False`` gives the baseline the brief's speed target is measured
    against: no windows, no protection events, fs/gs bases used as-is (and
    therefore no segment enforcement at all, as in plain Unicorn).
    """

    def __init__(self, checks: bool = True, count_instructions: bool = True, timeout_seconds: float = 0,
                 trace_signs: bool = False):
        self.checks = checks
        self.count_instructions = count_instructions
        self.timeout_us = int(timeout_seconds * 1_000_000)
        self._deadline_ns: int | None = None  # the limit is for the whole run, set when it starts
        self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self.regs = _RawRegisters(self.uc)
        shifts = tuple(layout.SLOT_WINDOW_SHIFT.values()) if checks else ()
        self.mem = GuestMemory(self.uc, alias_offsets=shifts, on_change=self._mappings_changed)
        self.counters = MachineCounters()
        self.descriptors: list[SegmentDescriptor | None] = [None] * layout.GDT_ENTRIES
        self._generations: dict[SegmentDescriptor, int] = {}
        self._by_generation: list[SegmentDescriptor] = []
        self._disasm = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
        self._pending: Exit | None = None
        self._unmapped: tuple[int, int, bool, bool] | None = None
        self._site_usage: dict[int, SegmentUsage] = {}
        self._not_retired: dict[tuple[int, int, int], int] = {}
        self.decoded: dict[int, object] = {}  # eip -> decoded instruction, for strategies; cleared on code patches
        self._views: dict[tuple[SegmentDescriptor, int], bytes] = {}
        self._started = False
        self._setup_hypervisor_pages()
        self._setup_hooks()
        if trace_signs:
            if not checks:
                raise ValueError("sign tracing needs checks=True (it is done by the access hook)")
            self._fast.enable_sign_trace()

    # ------------------------------------------------------------ set-up
    def _setup_hypervisor_pages(self) -> None:
        uc = self.uc
        uc.mem_map(layout.HYPERVISOR_PAGES, layout.HYPERVISOR_PAGES_SIZE, UC_PROT_ALL)
        flat = dict(base=0, limit=0xFFFFF, present=True, s=True, db=True, granularity=True, rw=True)
        gdt = bytearray(8 * layout.GDT_ENTRIES)
        for index, dpl, code in (
            (layout.GDT_ENTRY_KERNEL_CS, 0, True), (layout.GDT_ENTRY_KERNEL_DS, 0, False),
            (layout.GDT_ENTRY_USER_CS, 3, True), (layout.GDT_ENTRY_USER_DS, 3, False),
        ):
            d = SegmentDescriptor(dpl=dpl, executable=code, accessed=True, **flat)
            gdt[8 * index : 8 * index + 8] = d.to_bytes()
        uc.mem_write(layout.GDT_BASE, bytes(gdt))
        uc.reg_write(X.UC_X86_REG_GDTR, (0, layout.GDT_BASE, 8 * layout.GDT_ENTRIES - 1, 0))
        uc.mem_write(layout.ENTRY_STUB, b"\xcf")  # iret: the one way into ring 3 (BRIEF section 4)

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
            for kinds, callback in ((UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, self._fast.on_window_access),
                                    (UC_HOOK_MEM_READ_PROT | UC_HOOK_MEM_WRITE_PROT, self._fast.on_prot)):
                hh = ctypes.c_size_t()
                err = uclib.uc_hook_add(handle, ctypes.byref(hh), kinds, ctypes.c_void_p(callback),
                                        ctypes.c_void_p(self._fast.address), ctypes.c_uint64(lo), ctypes.c_uint64(hi))
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
                w.base = shift
        if self.count_instructions:
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(handle, ctypes.byref(hh), UC_HOOK_BLOCK, ctypes.c_void_p(self._fast.on_block),
                                    ctypes.c_void_p(self._fast.address), ctypes.c_uint64(1), ctypes.c_uint64(0))
            if err:
                raise UcError(err)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED, self._on_unmapped)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)

    def _refusable_regions(self) -> list[tuple[int, int, int, bool]]:
        """(start, size, rights, strip) of the regions the fast path refuses accesses in: the aliases
        (no Unicorn permissions; the guest's rights checked by the hook) and the hypervisor pages
        (refused by stripping their permissions)."""
        hv = (layout.HYPERVISOR_PAGES, layout.HYPERVISOR_PAGES_SIZE, UC_PROT_ALL, True)
        return sorted([*((s, z, p, False) for s, z, p in self.mem.alias_regions()), hv])

    def _mappings_changed(self) -> None:
        if self.checks and getattr(self, "_fast", None) is not None:
            self._fast.set_aliases(self._refusable_regions())

    # ------------------------------------------------------- fast-path callbacks
    def _classify_site(self, eip: int) -> int:
        """Which segment register each access of the instruction at ``eip`` uses (packed)."""
        return self.segment_usage(eip).pack()

    def segment_usage(self, eip: int) -> SegmentUsage:
        usage = self._site_usage.get(eip)
        if usage is None:
            try:
                code = self.mem.read(eip, 15) if self.mem.is_mapped(eip, 15) else bytes(self.uc.mem_read(eip, 15))
            except Exception:
                code = b""
            prefix = None
            for b in code:
                if b not in LEGACY_PREFIXES:
                    break
                if b in SEGMENT_PREFIX:
                    prefix = SEGMENT_REGISTER_IDS.get(SEGMENT_PREFIX[b] or 0)
            usage = self._site_usage[eip] = segment_usage(decode(code, eip), prefix)
        return usage

    def _verdict(self, slot: int, generation: int, offset: int, size: int, write: int) -> int:
        desc = self._by_generation[generation]
        return 1 if check_data_access(desc, offset, size, bool(write)).allowed else 0

    def _block_icount(self, address: int, size: int) -> int:
        try:
            code = self.mem.read(address, size)
        except Exception:
            code = bytes(self.uc.mem_read(address, size))
        return sum(1 for _ in self._disasm.disasm_lite(code, address))

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

    def _on_invalid(self, uc) -> bool:
        eip = self.regs.get("eip")
        self._pending = Exit(ExitReason.EXCEPTION, eip, vector=6, message=f"#UD invalid instruction at {eip:#010x}")
        return False

    # ------------------------------------------------------------ segments
    def generation_of(self, desc: SegmentDescriptor) -> int:
        gen = self._generations.get(desc)
        if gen is None:
            gen = len(self._by_generation)
            self._generations[desc] = gen
            self._by_generation.append(desc)
        return gen

    @property
    def loaded(self) -> dict[str, int]:
        """Selectors held by fs and gs (read from the CPU: loads are not intercepted)."""
        return {"fs": self.regs.get("fs") & 0xFFFF, "gs": self.regs.get("gs") & 0xFFFF}

    def set_descriptor(self, index: int, desc: SegmentDescriptor | None) -> None:
        """Install a (policy-shaped) descriptor in a TLS slot and refresh fs/gs using it.

        Refreshing models what Xen's #GP path and Linux's return to user mode do:
        the segment registers are reloaded from the table on the way back.
        """
        if not layout.GDT_ENTRY_TLS_MIN <= index < layout.GDT_ENTRY_TLS_MIN + layout.GDT_ENTRY_TLS_ENTRIES:
            raise ValueError(f"GDT entry {index} is not a TLS slot")
        self.descriptors[index] = desc
        self.uc.mem_write(layout.GDT_BASE + 8 * index, self._view(index, desc))
        if self.checks and index in layout.SLOT_WINDOW_SHIFT and desc is not None:
            for w in self._fast.header.windows:
                if w.slot == index:
                    w.base = (desc.base + layout.SLOT_WINDOW_SHIFT[index]) & 0xFFFFFFFF
                    w.real_base = desc.base
                    w.generation = self.generation_of(desc)
        if self._started:
            for reg, selector in self.loaded.items():
                if selector and layout.selector_index(selector) == index and not selector & 4:
                    self._host_load(reg, selector)
                    self.counters.segment_loads += 1

    def _host_load(self, reg: str, selector: int) -> None:
        """Reload a segment register from the table (the CPU reads the GDT: not a guest access)."""
        if self._fast is not None:
            self._fast.header.host_access = 1
        try:
            self.regs.set(reg, selector)
        finally:
            if self._fast is not None:
                self._fast.header.host_access = 0

    def _view(self, index: int, desc: SegmentDescriptor | None) -> bytes:
        """The 8 bytes Unicorn reads for a TLS slot."""
        if desc is None:
            return _EMPTY_SLOT
        if not desc.present:
            return desc.to_bytes()
        if not self.checks:
            return desc.to_bytes()  # baseline: plain Unicorn, limits unenforced
        if index not in layout.SLOT_WINDOW_SHIFT:
            return _NOT_PRESENT_TLS
        view = self._views.get((desc, index))
        if view is None:
            # flat expand-up data with the base shifted into the slot's window;
            # Unicorn ignores limits anyway, the model descriptor is what is checked
            base = (desc.base + layout.SLOT_WINDOW_SHIFT[index]) & 0xFFFFFFFF
            view = self._views[(desc, index)] = SegmentDescriptor(
                base=base, limit=0xFFFFF, present=True, s=True, rw=True, accessed=True,
                db=True, granularity=True, dpl=3).to_bytes()
        return view

    # ------------------------------------------------------------ control
    def enter_user_mode(self, eip: int, esp: int) -> None:
        """Start the guest at ``eip`` in ring 3 by an ``iret`` from the entry stub."""
        uc = self.uc
        frame = b"".join(v.to_bytes(4, "little") for v in (eip, layout.USER_CS, 0x202, esp, layout.USER_DS))
        sp = layout.ENTRY_STACK - len(frame)
        uc.mem_write(sp, frame)
        uc.reg_write(X.UC_X86_REG_ESP, sp)
        uc.reg_write(X.UC_X86_REG_SS, layout.KERNEL_DS)
        uc.reg_write(X.UC_X86_REG_DS, layout.USER_DS)
        uc.reg_write(X.UC_X86_REG_ES, layout.USER_DS)
        header = self._fast.header if self._fast is not None else None
        if header is not None:
            header.host_access = 1  # the entry stub's iret reads hypervisor pages
        try:
            uc.emu_start(layout.ENTRY_STUB, eip, count=1)
        finally:
            if header is not None:
                header.host_access = 0
        if self.regs.get("cs") != layout.USER_CS or self.regs.get("eip") != eip:
            raise RuntimeError("could not enter ring 3")
        self._started = True
        if self._fast is not None:
            self._fast.header.instructions = 0  # the entry stub is not the guest's

    def run(self) -> Exit:
        """Run until the guest needs a layer above; see ``ExitReason``."""
        self._pending = None
        self._unmapped = None
        eip = self.regs.get("eip")
        error = None
        unicorn_timeout_us = 0
        if self.timeout_us:
            now = time.monotonic_ns()
            if self._deadline_ns is None:
                self._deadline_ns = now + self.timeout_us * 1000
                if self._fast is not None and self.count_instructions:
                    self._fast.header.deadline_ns = self._deadline_ns  # checked by the block hook
            if now >= self._deadline_ns:  # e.g. a guest that loops in system calls
                return self._timeout_exit(eip)
            if self._fast is None or not self.count_instructions:
                # no block hook to check the clock: Unicorn's watcher thread (slow, see _fastpath.c)
                unicorn_timeout_us = max(1, (self._deadline_ns - now) // 1000)
        try:
            self.uc.emu_start(eip, 0xFFFFFFFF, timeout=unicorn_timeout_us)
        except UcError as exc:
            error = exc.errno
        if self._fast is not None and self.count_instructions:
            self.counters.instructions = self._fast.header.instructions
        stop_eip = self.regs.get("eip")

        fast_exit = self._fast.take_exit() if self.checks else None
        if self.checks:
            for start, _size in self._fast.take_protected():  # only strip regions: the hypervisor pages
                if start != layout.HYPERVISOR_PAGES:
                    raise RuntimeError(f"fast path stripped an unexpected region at {start:#010x}")
                self.uc.mem_protect(layout.HYPERVISOR_PAGES, layout.HYPERVISOR_PAGES_SIZE, UC_PROT_ALL)
        if fast_exit is not None and error in (UC_ERR_READ_PROT, UC_ERR_WRITE_PROT):
            if stop_eip != fast_exit.eip:
                # Unicorn could not stop this store before the instruction completed
                # (helper-implemented stores such as cmpxchg8b): never resume from it
                self.counters.exceptions += 1
                return Exit(ExitReason.EXCEPTION, fast_exit.eip,
                            message=f"access refused at {fast_exit.eip:#010x} but the instruction could not be "
                            f"stopped before it completed (stopped at {stop_eip:#010x}); run abandoned")
            self._uncount_rest_of_block(stop_eip)
            return self._exit_from_fastpath(fast_exit)
        if error in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT):
            self._uncount_rest_of_block(stop_eip)
            return self._exit_from_unmapped(stop_eip, error)
        if self._pending is not None:
            if self._pending.reason is ExitReason.EXCEPTION:
                self.counters.exceptions += 1
                self._uncount_rest_of_block(self._pending.eip)
            return self._pending
        if error is not None:
            return Exit(ExitReason.EXCEPTION, stop_eip, message=f"unicorn error: {UcError(error)}")
        return self._timeout_exit(stop_eip)  # stopped by the deadline (block hook or Unicorn's timer)

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

    def _exit_from_fastpath(self, e) -> Exit:
        seg_name = SEGMENT_NAMES.get(e.seg, "ds")
        if e.kind == fastpath.EXIT_SEGMENT_VIOLATION:
            selector = self.regs.get(seg_name) & 0xFFFF
            desc = self.descriptors[layout.selector_index(selector)]
            check = check_data_access(desc, e.offset, e.size, bool(e.write))
            v = SegmentViolation(e.eip, seg_name, selector, e.offset, e.size, bool(e.write), e.linear, desc,
                                 check.message if not check.allowed else "refused")
            self.counters.violations[seg_name] = self.counters.violations.get(seg_name, 0) + 1
            return Exit(ExitReason.SEGMENT_VIOLATION, e.eip, violation=v)
        if e.kind in (fastpath.EXIT_PAGE_FAULT, fastpath.EXIT_KERNEL_ACCESS):
            self.counters.page_faults += 1
            pf = PageFault(e.eip, e.linear, e.size, bool(e.write), via_segment=seg_name)
            if e.linear >= layout.USER_TOP:
                where = "outside guest user space"
            elif self.mem.is_mapped(e.linear, e.size):
                where = "page not writable" if e.write else "page not readable"
            else:
                where = "unmapped"
            return Exit(ExitReason.PAGE_FAULT, e.eip, page_fault=pf, message=f"access to {e.linear:#010x} ({where})")
        return Exit(ExitReason.EXCEPTION, e.eip, message="fast-path site table full")

    def _unicorn_base(self, seg: str) -> int:
        """The base Unicorn uses for ``seg`` now (shifted into a window for TLS slots)."""
        selector = self.regs.get(seg) & 0xFFFF
        index = layout.selector_index(selector)
        if selector & 4 or selector < 4 or index >= len(self.descriptors) or self.descriptors[index] is None:
            return 0
        shift = layout.SLOT_WINDOW_SHIFT.get(index, 0) if self.checks else 0
        return (self.descriptors[index].base + shift) & 0xFFFFFFFF

    def _access_segment(self, usage: SegmentUsage, address: int, write: bool) -> str:
        """The segment register an access at Unicorn ``address`` went through (as the C hook decides)."""
        if write:
            return usage.write
        if usage.second_read and (address - self._unicorn_base(usage.read)) & 0xFFFFFFFF != self.regs.get("esi"):
            return usage.second_read  # cmps: not the esi operand, so the es:[edi] one
        return usage.read

    def _exit_from_unmapped(self, eip: int, error: int) -> Exit:
        self.counters.page_faults += 1
        address, size, write, _ = self._unmapped or (eip, 1, False, True)
        fetch = error in (UC_ERR_FETCH_UNMAPPED, UC_ERR_FETCH_PROT)
        linear, seg = address, None
        if not fetch:
            usage = self.segment_usage(eip)
            seg = self._access_segment(usage, address, write)
            if usage.read_modify_write and seg == usage.write:
                write = True  # the write permission is checked at the read, as the CPU does
            selector = self.regs.get(seg) & 0xFFFF
            index = layout.selector_index(selector)
            desc = self.descriptors[index] if not selector & 4 and index < len(self.descriptors) else None
            if seg in ("fs", "gs") and selector < 4:
                self.counters.page_faults -= 1
                self.counters.exceptions += 1
                return Exit(ExitReason.EXCEPTION, eip, vector=13,
                            message=f"#GP: memory access through %{seg} holding the null selector")
            if desc is not None and self.checks and index in layout.SLOT_WINDOW_SHIFT:
                # through a window: translate back to the guest's own address, and
                # let the segment check take precedence as it does on x86
                window_base = (desc.base + layout.SLOT_WINDOW_SHIFT[index]) & 0xFFFFFFFF
                offset = (address - window_base) & 0xFFFFFFFF
                linear = (desc.base + offset) & 0xFFFFFFFF
                check = check_data_access(desc, offset, size, write)
                if not check.allowed:
                    self.counters.page_faults -= 1
                    self.counters.violations[seg] = self.counters.violations.get(seg, 0) + 1
                    v = SegmentViolation(eip, seg, selector, offset, size, write, linear, desc, check.message)
                    return Exit(ExitReason.SEGMENT_VIOLATION, eip, violation=v)
        pf = PageFault(eip, linear, size, write, fetch=fetch, via_segment=seg)
        kind = "instruction fetch from" if fetch else ("write to" if write else "read from")
        return Exit(ExitReason.PAGE_FAULT, eip, page_fault=pf, message=f"{kind} unmapped {linear:#010x}")

    # ------------------------------------------------------------ counters
    def segment_counters(self) -> dict[str, SegmentCounters]:
        out = {}
        if self.checks:
            for name, st in zip(("fs", "gs"), self._fast.header.stats):
                out[name] = SegmentCounters(st.accesses, st.negative, st.positive, st.sign_changes)
        return out

    def sign_runs(self, segment: str = "gs") -> tuple[list[int], int]:
        """Runs of same-sign %fs/%gs offsets in access order (+n: n non-negative, -n: n negative)."""
        return self._fast.sign_runs(0 if segment == "fs" else 1)

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
        for eip in [e for e in self._site_usage if address - 15 <= e < address + size]:
            del self._site_usage[eip]
        if self._fast is not None:
            self._fast.reset_blocks()
            if self.checks:
                self._fast.forget_sites(address, address + size)
