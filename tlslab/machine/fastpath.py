"""Build, load and wire the C fast path (``_fastpath.c``).

The C file judges every fs/gs access with the shared x86 core's segment check
(``tlslab/x86/_core.c``) and is otherwise a memo and a counter bank in front
of Python callbacks (see its header comment for why it exists at all). It is
compiled with the core on first use (:mod:`tlslab.x86.cbuild`: a cache keyed
by the sources' hash), so a fresh clone needs no build step beyond ``cc``.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from pathlib import Path

import mmap as _mmap

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _anonymous_pages(size: int) -> int | None:
    """``size`` bytes of fresh anonymous memory: zero pages the kernel backs only when written."""
    address = _libc.mmap(None, size, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS,
                         -1, 0)
    return None if address in (None, _MAP_FAILED) else address


def _free_buffers(buffers: list) -> None:
    """Unmap sign-trace buffers, (address, size) pairs (once: the list is emptied)."""
    while buffers:
        address, size = buffers.pop()
        _libc.munmap(address, size)

from unicorn.unicorn_py3.unicorn import uclib
from unicorn.unicorn_const import UC_HOOK_BLOCK

from tlslab.x86 import cbuild, core

SOURCE = Path(__file__).with_name("_fastpath.c")

SEG_NONE, SEG_FS, SEG_GS = 0, 4, 5  # x86 segment register numbers (es 0 .. gs 5)

EXIT_NONE = 0
EXIT_SEGMENT_VIOLATION = 1
EXIT_KERNEL_ACCESS = 2
EXIT_TABLE_FULL = 3
EXIT_PAGE_FAULT = 4

SITE_SLOTS = 1 << 15

CLASSIFY_SITE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32)
VERDICT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int, ctypes.c_int)
BLOCK_ICOUNT = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
FLIP_TARGET = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int)

# settling faults in the hook (``_fastpath.c``: settle_fault)
SETTLE_OFF, SETTLE_EMULATE, SETTLE_FLIP = 0, 1, 2
SITE_SETTLE_EMULATE = 1 << 20   # bits classify_site adds to a site's packed segment usage
SITE_SETTLE_FLIP = 1 << 21
SITE_SETTLE_STACK_WRITE = 1 << 22   # ... which also pushes (push, call through fs/gs)
SITE_SETTLE_STACK_READ = 1 << 23    # ... which also pops (pop to fs/gs)
SITE_SETTLE_ACCESSES_SHIFT = 24


def _inline_counter_entry():
    """Unicorn's inline block counter (``uc_tlslab_inline_counter``), present only in the library
    built from ``third_party/unicorn`` (our patch); None under a stock Unicorn."""
    if ctypes.sizeof(ctypes.c_void_p) != 8:
        return None   # the patch emits it on 64-bit hosts only
    try:
        fn = uclib.uc_tlslab_inline_counter
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_void_p] * 4
    fn.restype = ctypes.c_int
    return fn


#: How guest instructions are counted: Unicorn's inline counter where the library has it, else a
#: UC_HOOK_BLOCK callback (``fp_on_block``) per block. Both run the same general case and give the
#: same counts (tests/test_block_counter.py); the inline one costs no call per block. Tests may set
#: this to None to run the hook on a patched library.
INLINE_COUNTER = _inline_counter_entry()


def unicorn_build() -> str:
    """Which Unicorn this process runs, for records: its library file and how blocks are counted."""
    name = getattr(uclib, "_name", "?")
    how = "inline block counter (tlslab patch)" if INLINE_COUNTER is not None else "block hook (stock Unicorn)"
    return f"{name}: {how}"


class FastpathBuildError(RuntimeError):
    """The C fast path could not be compiled (no C compiler?)."""


class ExitInfo(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("seg", ctypes.c_int32),
        ("eip", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
        ("linear", ctypes.c_uint32),
        ("size", ctypes.c_int32),
        ("write", ctypes.c_int32),
    ]


class Window(ctypes.Structure):
    _fields_ = [
        ("real_base", ctypes.c_uint32),
        ("user_top", ctypes.c_uint32),
        ("base", ctypes.c_uint32),
        ("generation", ctypes.c_uint32),
        ("slot", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("emulate_generation", ctypes.c_int32),
        ("changed", ctypes.c_int32),
    ]


class SegStats(ctypes.Structure):
    _fields_ = [
        ("last_sign", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("accesses", ctypes.c_uint64),
        ("negative", ctypes.c_uint64),
        ("positive", ctypes.c_uint64),
        ("sign_changes", ctypes.c_uint64),
        ("runs", ctypes.POINTER(ctypes.c_int32)),
        ("runs_capacity", ctypes.c_uint32),
        ("runs_count", ctypes.c_uint32),
        ("run_length", ctypes.c_uint32),
        ("runs_dropped", ctypes.c_uint32),
    ]


class Settle(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_int32),
        ("segments", ctypes.c_int32),
        ("regid_ss", ctypes.c_int32),
        ("regid_esp", ctypes.c_int32),
        ("flat_ss", ctypes.c_uint32),
        ("pad2", ctypes.c_int32),
        ("flip_target", ctypes.c_void_p),
        ("faults", ctypes.c_uint64 * 2),
        ("emulated_accesses", ctypes.c_uint64),
        ("flips_down", ctypes.c_uint64),
        ("flips_up", ctypes.c_uint64),
        ("segment_loads", ctypes.c_uint64),
        ("pending_eip", ctypes.c_uint32),
        ("pending_linear", ctypes.c_uint32),
        ("pending", ctypes.c_int32),
        ("pad", ctypes.c_int32),
    ]


class Site(ctypes.Structure):
    _fields_ = [
        ("eip", ctypes.c_uint32),
        ("seg", ctypes.c_int32),
        ("read_seg", ctypes.c_uint8),
        ("write_seg", ctypes.c_uint8),
        ("second_read_seg", ctypes.c_uint8),
        ("stale", ctypes.c_uint8),
        ("rmw", ctypes.c_uint32),
        ("settle", ctypes.c_uint32),
        ("settle_accesses", ctypes.c_uint32),
        ("accesses", ctypes.c_uint64),
        ("reads", ctypes.c_uint64),
        ("writes", ctypes.c_uint64),
        ("negative", ctypes.c_uint64),
        ("positive", ctypes.c_uint64),
        ("violations", ctypes.c_uint64),
        ("min_offset", ctypes.c_uint32),
        ("max_offset", ctypes.c_uint32),
    ]


class FastpathHeader(ctypes.Structure):
    """Mirror of the leading fields of ``struct fastpath``."""

    _fields_ = [
        ("uc", ctypes.c_void_p),
        ("reg_read", ctypes.c_void_p),
        ("regid_eip", ctypes.c_int32),
        ("nwindows", ctypes.c_int32),
        ("regid_seg", ctypes.c_int32 * 6),
        ("regid_esi", ctypes.c_int32),
        ("regid_edi", ctypes.c_int32),
        ("classify_site", ctypes.c_void_p),
        ("verdict", ctypes.c_void_p),
        ("block_icount", ctypes.c_void_p),
        ("instructions", ctypes.c_uint64),
        ("count_limit", ctypes.c_uint64),
        ("cur_block_address", ctypes.c_uint32),
        ("cur_block_size", ctypes.c_uint32),
        ("cur_block_icount", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("verdict_misses", ctypes.c_uint64),
        ("site_misses", ctypes.c_uint64),
        ("block_misses", ctypes.c_uint64),
        ("last_eip", ctypes.c_uint32),
        ("last_linear", ctypes.c_uint32),
        ("hv_lo", ctypes.c_uint32),
        ("hv_hi", ctypes.c_uint32),
        ("host_access", ctypes.c_int32),
        ("pad2", ctypes.c_int32),
        ("last_was_read", ctypes.c_int32),
        ("nalias", ctypes.c_int32),
        ("emu_stop", ctypes.c_void_p),
        ("deadline_ns", ctypes.c_uint64),
        ("clock_check_at", ctypes.c_uint64),
        ("budget_hit", ctypes.c_uint32),
        ("pad5", ctypes.c_uint32),
        ("budget_end", ctypes.c_uint64),
        ("budget_first", ctypes.c_uint32),
        ("pad3", ctypes.c_uint32),
        ("settle", Settle),
        ("exit", ExitInfo),
        ("windows", Window * 3),
        ("stats", SegStats * 2),
        ("sites", Site * SITE_SLOTS),
    ]


class FastpathLayoutError(RuntimeError):
    """A ctypes mirror disagrees with the compiled C struct: running would corrupt memory."""


#: (C struct name, ctypes mirror, whole): a whole mirror has every C field and the C size; the
#: header mirrors only the leading fields of ``struct fastpath`` (its tables are reached from C only)
MIRRORS = (
    ("exit_info", ExitInfo, True),
    ("window", Window, True),
    ("seg_stats", SegStats, True),
    ("settle", Settle, True),
    ("site", Site, True),
    ("fastpath", FastpathHeader, False),
)


def c_layout(lib) -> tuple[dict[str, list[tuple[str, int, int]]], dict[str, int]]:
    """The C side's own layout table (``fp_layout``): {struct: [(field, offset, size), ...]}, {struct: size}."""
    fn = lib.fp_layout
    fn.argtypes = [ctypes.c_int] + [ctypes.POINTER(ctypes.c_char_p)] * 2 + [ctypes.POINTER(ctypes.c_size_t)] * 2
    fn.restype = ctypes.c_int
    fields: dict[str, list[tuple[str, int, int]]] = {}
    sizes: dict[str, int] = {}
    type_, field = ctypes.c_char_p(), ctypes.c_char_p()
    offset, size = ctypes.c_size_t(), ctypes.c_size_t()
    i = 0
    while fn(i, ctypes.byref(type_), ctypes.byref(field), ctypes.byref(offset), ctypes.byref(size)):
        name = type_.value.decode()
        if field.value is None:
            sizes[name] = size.value
        else:
            fields.setdefault(name, []).append((field.value.decode(), offset.value, size.value))
        i += 1
    return fields, sizes


def check_layout(fields: dict[str, list[tuple[str, int, int]]], sizes: dict[str, int], mirrors=None) -> None:
    """Raise FastpathLayoutError (one line: struct, field, C and Python offsets) at the first disagreement."""
    for struct, mirror, whole in MIRRORS if mirrors is None else mirrors:
        if struct not in fields or struct not in sizes:
            raise FastpathLayoutError(f"fastpath layout: struct {struct} missing from the C layout table")
        c_fields = {name: (off, size) for name, off, size in fields[struct]}
        py_names = [f[0] for f in mirror._fields_]
        for name in py_names:
            desc = getattr(mirror, name)
            if name not in c_fields:
                raise FastpathLayoutError(f"fastpath layout: struct {struct} field {name}: not in C, "
                                          f"Python offset {desc.offset}")
            c_off, c_size = c_fields[name]
            if (c_off, c_size) != (desc.offset, desc.size):
                raise FastpathLayoutError(f"fastpath layout: struct {struct} field {name}: C offset {c_off} "
                                          f"size {c_size}, Python offset {desc.offset} size {desc.size}")
        c_names = [f[0] for f in fields[struct]]
        expected = c_names if whole else c_names[: len(py_names)]
        for k, name in enumerate(expected):
            if k >= len(py_names) or py_names[k] != name:
                c_off = c_fields[name][0]
                raise FastpathLayoutError(f"fastpath layout: struct {struct} field {name}: C offset {c_off}, "
                                          f"Python offset none (missing from {mirror.__name__})")
        py_size = ctypes.sizeof(mirror)
        if whole and py_size != sizes[struct]:
            raise FastpathLayoutError(f"fastpath layout: struct {struct}: C size {sizes[struct]}, "
                                      f"Python size {py_size}")
        if not whole and py_size > sizes[struct]:
            raise FastpathLayoutError(f"fastpath layout: struct {struct}: C size {sizes[struct]} smaller than "
                                      f"the Python header's {py_size}")


CORE_SOURCE = Path(core.__file__).with_name("_core.c")
CORE_HEADER = CORE_SOURCE.with_name("_core.h")
COMPILE_FLAGS = (*cbuild.DEFAULT_FLAGS, "-I", str(CORE_SOURCE.parent))


def build_library() -> Path:
    """Compile ``_fastpath.c`` with the shared x86 core once per source version (tlslab.x86.cbuild)."""
    try:
        return cbuild.build_shared_library("fastpath", [SOURCE, CORE_SOURCE], [CORE_HEADER], COMPILE_FLAGS)
    except cbuild.CBuildError as exc:
        raise FastpathBuildError(f"the machine's fast path: {exc}") from None


_LIB: ctypes.CDLL | None = None

# Unicorn's own entry points, with prototypes of ours (the binding's would want Python callbacks)
_UC_MMIO_MAP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
    ctypes.cast(uclib.uc_mmio_map, ctypes.c_void_p).value)
_UC_MEM_PROTECT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_uint32)(
    ctypes.cast(uclib.uc_mem_protect, ctypes.c_void_p).value)

#: every live fast path, so that Ctrl-C can stop whichever one is running (:func:`request_stop_all`)
_LIVE: "weakref.WeakSet[Fastpath]" = weakref.WeakSet()


def request_stop_all() -> int:
    """Make every live fast path stop its guest at the block counter's next clock check (a deadline of "now").

    Called on Ctrl-C, possibly from a thread other than the one in ``emu_start``: a guest spinning
    without system calls never returns to Python, so only the block counter can stop it. Returns how many
    fast paths were told."""
    try:
        live = list(_LIVE)
    except RuntimeError:        # the set changed while we looked: try once more
        live = list(_LIVE)
    for fp in live:
        # in this order: the block counter's general case reads the first two after storing the third
        fp.header.deadline_ns = 1
        fp.header.clock_check_at = 0
        fp.header.count_limit = 0
    return len(live)


def load_library() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(build_library()))
        check_layout(*c_layout(lib))   # before anything touches a struct
        lib.fp_sizeof.restype = ctypes.c_size_t
        lib.fp_forget_sites.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
        lib.fp_forget_sites.restype = None
        lib.fp_set_aliases.argtypes = [ctypes.c_void_p] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
        lib.fp_set_aliases.restype = ctypes.c_int
        lib.fp_set_generation.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64]
        lib.fp_set_generation.restype = None
        lib.fp_used_sites.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
        lib.fp_used_sites.restype = ctypes.c_uint32
        lib.fp_on_block.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p]
        lib.fp_on_block.restype = None
        for name in ("fp_reset_sites", "fp_reset_verdicts", "fp_reset_blocks", "fp_reset_flips"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = None
        _LIB = lib
    return _LIB


@dataclass
class SiteCounters:
    """Per-instruction fs/gs access counters gathered by the fast path."""

    eip: int
    segment: str
    accesses: int
    reads: int
    writes: int
    negative: int
    positive: int
    violations: int
    min_offset: int
    max_offset: int


def _signed(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


class Fastpath:
    """One fast-path state block bound to one Unicorn instance."""

    def __init__(self, uc_handle, regid_eip: int, classify_site, verdict, block_icount):
        lib = load_library()
        self.lib = lib
        size = lib.fp_sizeof()
        self._buffer = ctypes.create_string_buffer(size)
        self.address = ctypes.addressof(self._buffer)
        self.header = FastpathHeader.from_address(self.address)
        self._exit = self.header.exit   # a view into the state block, looked at after every run
        # keep the ctypes callback objects alive as long as the state block
        self._callbacks = (CLASSIFY_SITE(classify_site), VERDICT(verdict), BLOCK_ICOUNT(block_icount))
        h = self.header
        h.uc = uc_handle.value if hasattr(uc_handle, "value") else uc_handle
        h.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
        h.emu_stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        h.regid_eip = regid_eip
        h.classify_site = ctypes.cast(self._callbacks[0], ctypes.c_void_p).value
        h.verdict = ctypes.cast(self._callbacks[1], ctypes.c_void_p).value
        h.block_icount = ctypes.cast(self._callbacks[2], ctypes.c_void_p).value
        lib.fp_reset_sites(self.address)
        lib.fp_reset_verdicts(self.address)
        lib.fp_reset_blocks(self.address)
        lib.fp_reset_flips(self.address)
        self.mmio_read = ctypes.cast(lib.fp_mmio_read, ctypes.c_void_p).value
        self.mmio_write = ctypes.cast(lib.fp_mmio_write, ctypes.c_void_p).value
        self.on_block = ctypes.cast(lib.fp_on_block, ctypes.c_void_p).value
        self.on_prot = ctypes.cast(lib.fp_on_prot, ctypes.c_void_p).value
        _LIVE.add(self)

    def count_blocks(self, uc_handle) -> None:
        """Count guest instructions a block at a time (see ``INLINE_COUNTER``)."""
        if INLINE_COUNTER is not None:
            area = self.address + FastpathHeader.instructions.offset
            err = INLINE_COUNTER(uc_handle, area, self.on_block, self.address)
        else:
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(uc_handle, ctypes.byref(hh), UC_HOOK_BLOCK, ctypes.c_void_p(self.on_block),
                                    ctypes.c_void_p(self.address), ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise RuntimeError(f"unicorn refused the block counter: error {err}")

    def enable_sign_trace(self, capacity: int = 1 << 22) -> None:
        """Record, per segment register, the lengths of runs of same-sign offsets.

        The buffers are anonymous mappings (not malloc, which may hand back
        recycled memory it must clear): the kernel backs a page only when the
        trace writes it, so a run of hundreds of address spaces holds the
        entries it wrote, not ``capacity`` per space; ``freeze_sign_trace``
        unmaps them when the space is over.
        """
        self._frozen_runs = None
        self._run_buffers = []
        size = capacity * ctypes.sizeof(ctypes.c_int32)
        for st in self.header.stats:
            buf = _anonymous_pages(size)
            if buf is None:
                raise MemoryError("no memory for the sign trace")
            self._run_buffers.append((buf, size))
            st.runs = ctypes.cast(buf, ctypes.POINTER(ctypes.c_int32))
            st.runs_capacity = capacity
        weakref.finalize(self, _free_buffers, self._run_buffers)

    def freeze_sign_trace(self) -> None:
        """The address space is over: keep its runs as Python data and free the C buffers."""
        if not getattr(self, "_run_buffers", None):
            return
        self._frozen_runs = [self.sign_runs(i) for i in range(len(self.header.stats))]
        for st in self.header.stats:
            st.runs = None
            st.runs_capacity = 0
        _free_buffers(self._run_buffers)

    def sign_break(self) -> None:
        """Mark a break in every sign trace (a 0 entry): the thread on this vCPU changed.

        The run so far is stored first; ``last_sign`` stays, so the access
        statistics are the same with or without a trace.
        """
        for st in self.header.stats:
            if not st.runs:
                continue
            for value in ((st.last_sign * st.run_length,) if st.run_length else ()) + (0,):
                if st.runs_count < st.runs_capacity:
                    st.runs[st.runs_count] = value
                    st.runs_count += 1
                else:
                    st.runs_dropped += 1
            st.run_length = 0

    def sign_runs(self, index: int) -> tuple[list[int], int]:
        """(runs as +len/-len including the current one, 0 at a break, runs dropped for lack of room)."""
        frozen = getattr(self, "_frozen_runs", None)
        if frozen is not None:
            return list(frozen[index][0]), frozen[index][1]
        st = self.header.stats[index]
        if not st.runs:
            return [], 0
        runs = list(st.runs[: st.runs_count])
        if st.run_length:
            runs.append(st.last_sign * st.run_length)
        return runs, st.runs_dropped

    def map_alias(self, start: int, size: int, host_address: int) -> None:
        """Map ``size`` bytes of guest memory (host buffer ``host_address``) again at ``start`` in a
        window: MMIO with no permissions, so that Unicorn asks ``fp_on_prot`` about every access."""
        err = _UC_MMIO_MAP(self.header.uc, start, size, self.mmio_read, host_address, self.mmio_write, host_address)
        if err == 0:
            err = _UC_MEM_PROTECT(self.header.uc, start, size, 0)
        if err:
            raise MemoryError(f"cannot map a window alias at {start:#010x}+{size:#x} (unicorn error {err})")

    def set_aliases(self, regions: list[tuple[int, int, int, bool]]) -> None:
        """Tell the hook where the judged regions are: (start, size, rights, hypervisor), sorted,
        non-overlapping. An alias has ``hypervisor`` False and the guest's rights (Unicorn perms)."""
        n = len(regions)
        arrays = [(ctypes.c_uint32 * max(n, 1))(*(int(r[k]) for r in regions)) for k in range(4)]
        if self.lib.fp_set_aliases(self.address, *arrays, n) != 0:
            raise MemoryError(f"too many guest regions for the fast path ({n})")

    def forget_sites(self, lo: int, hi: int) -> None:
        self.lib.fp_forget_sites(self.address, lo, hi)

    def reset_verdicts(self) -> None:
        self.lib.fp_reset_verdicts(self.address)

    def reset_blocks(self) -> None:
        self.lib.fp_reset_blocks(self.address)

    def reset_sites(self) -> None:
        self.lib.fp_reset_sites(self.address)

    def set_generation(self, generation: int, raw: bytes) -> None:
        """The descriptor (its 8 GDT bytes) a generation number stands for: checked by the core."""
        self.lib.fp_set_generation(self.address, generation, int.from_bytes(raw, "little"))

    def settle_in_hook(self, mode: int, segments: int, flip_target=None) -> None:
        """Let the hook settle faults itself (``SETTLE_*``; ``segments``: bit per register number);
        ``flip_target(slot, generation, offset, size)`` answers for the flip rule (memoised in C)."""
        h = self.header
        self._flip_callback = FLIP_TARGET(flip_target) if flip_target is not None else None
        h.settle.flip_target = ctypes.cast(self._flip_callback, ctypes.c_void_p).value if flip_target else None
        h.settle.segments = segments
        h.settle.mode = mode
        self.lib.fp_reset_flips(self.address)
        self.forget_sites(0, 0xFFFFFFFF)   # sites carry per-strategy settle bits: classify again

    def take_settled(self) -> tuple[tuple[int, int], int, int, int, int]:
        """What the hook settled since the last call: ((fs, gs) faults, emulated accesses, flips to
        expand-down, flips to expand-up, segment loads), and zero the counts."""
        st = self.header.settle
        out = ((st.faults[0], st.faults[1]), st.emulated_accesses, st.flips_down, st.flips_up, st.segment_loads)
        st.faults[0] = st.faults[1] = 0
        st.emulated_accesses = st.flips_down = st.flips_up = st.segment_loads = 0
        return out

    def take_exit(self) -> ExitInfo | None:
        e = self._exit
        if e.kind == EXIT_NONE:
            return None
        copy = ExitInfo()
        ctypes.pointer(copy)[0] = e
        e.kind = EXIT_NONE
        return copy

    def sites(self) -> list[SiteCounters]:
        """Every site that saw an access or a violation (the slots in use listed by C: a Python walk
        over the 32k ctypes records costs ~8 ms, and is paid at every exit of a process)."""
        names = {SEG_FS: "fs", SEG_GS: "gs"}
        table = self.header.sites
        fn = self.lib.fp_used_sites
        cap = 4096
        while True:
            used = (ctypes.c_uint32 * cap)()
            n = fn(self.address, used, cap)
            if n <= cap:
                break
            cap = n
        out = []
        for k in used[:n]:
            s = table[k]
            if s.seg not in names or (s.accesses == 0 and s.violations == 0):
                continue
            out.append(
                SiteCounters(
                    eip=s.eip,
                    segment=names[s.seg],
                    accesses=s.accesses,
                    reads=s.reads,
                    writes=s.writes,
                    negative=s.negative,
                    positive=s.positive,
                    violations=s.violations,
                    min_offset=_signed(s.min_offset) if s.accesses else 0,
                    max_offset=_signed(s.max_offset) if s.accesses else 0,
                )
            )
        return out
