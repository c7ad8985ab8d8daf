"""ctypes binding of the C x86 core (``_core.c``): the per-fault work in native code.

The core holds what both backends do on every fault: the segment check, Xen's
truncate/flip rule, decoding the fs/gs instruction forms and emulating them.
This module gives it Python-shaped wrappers (SegmentDescriptor in and out,
dicts of registers and memory) for tests and for callers that want the native
speed without writing ctypes themselves.

The Python in this package is the specification: ``check`` must answer as
:func:`tlslab.x86.segcheck.check_data_access`, ``flip``/``truncate`` as
:mod:`tlslab.x86.xen`, ``decode``/``emulate`` as :mod:`tlslab.x86.decode` and
:func:`tlslab.x86.semantics.execute` wherever the core claims support
(``tests/test_core_differential.py`` enforces it). The library is compiled on
first use into the cache (:mod:`tlslab.x86.cbuild`) and its struct layout is
checked against these mirrors when it loads.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, MutableMapping

from tlslab.x86.cbuild import build_shared_library
from tlslab.x86.descriptor import SegmentDescriptor
from tlslab.x86.opcodes import REG32, SEGMENT_REGS
from tlslab.x86.segcheck import AccessFault
from tlslab.x86.semantics import MemoryAccess
from tlslab.x86.xen import HypervisorProfile, get_profile

SOURCE = Path(__file__).with_name("_core.c")
HEADER = Path(__file__).with_name("_core.h")
#: the decoder of every instruction and the walk ahead (tlslab.x86.aheadc binds them), in the same library
AHEAD_SOURCE = Path(__file__).with_name("_ahead.c")
AHEAD_HEADERS = (Path(__file__).with_name("_ahead.h"), Path(__file__).with_name("_optable.h"))
COMPILE_FLAGS = ("-O2", "-std=c99", "-shared", "-fPIC")

#: tc_check's verdicts 1..6, in the order of segcheck.AccessFault
ACCESS_FAULTS = (None, AccessFault.NOT_PRESENT, AccessFault.NOT_DATA, AccessFault.NOT_WRITABLE,
                 AccessFault.BEYOND_LIMIT, AccessFault.AT_OR_BELOW_LIMIT, AccessFault.ABOVE_UPPER_BOUND)
DECODE_STATUS = ("ok", "truncated", "too long", "invalid", "unsupported")
KINDS = ("none", "mov", "movzx", "movsx", "alu", "test", "inc", "dec", "not", "neg",
         "xchg", "cmpxchg", "xadd", "push", "pop", "call", "jmp")
FORMS = ("mem,reg", "reg,mem", "mem,imm", "mem")
EMULATE_OK, EMULATE_REFUSED, EMULATE_UNSUPPORTED = 0, 1, 2


class CoreLayoutError(RuntimeError):
    """A ctypes mirror below disagrees with the C struct (a field moved)."""


# ------------------------------------------------------------------ C mirrors
_u8, _u16, _u32, _i8, _i32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_int8, ctypes.c_int32

_DESCRIPTOR_FLAGS = ("accessed", "rw", "dc", "executable", "s", "dpl", "present", "avl", "l", "db", "granularity")


class CDescriptor(ctypes.Structure):
    _fields_ = [("base", _u32), ("limit", _u32)] + [(name, _u8) for name in _DESCRIPTOR_FLAGS]


class CInsn(ctypes.Structure):
    _fields_ = [
        ("immediate", _u32), ("displacement", _i32), ("opcode", _u16),
        ("length", _u8), ("prefix_count", _u8), ("kind", _u8), ("alu_op", _u8), ("form", _u8),
        ("operand_size", _u8), ("memory_size", _u8), ("segment", _u8), ("segment_overridden", _u8),
        ("operand_size_override", _u8), ("lock", _u8), ("rep", _u8), ("repne", _u8),
        ("has_modrm", _u8), ("modrm", _u8), ("has_sib", _u8), ("sib", _u8),
        ("base", _i8), ("index", _i8), ("scale", _u8), ("reg", _u8), ("has_immediate", _u8),
        ("only_explicit_memory", _u8), ("reads", _u8), ("writes", _u8),
    ]


class CRegs(ctypes.Structure):
    _fields_ = [("gpr", _u32 * 8), ("eip", _u32), ("eflags", _u32)]


READ_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, _u32, _u32, ctypes.POINTER(_u32))
WRITE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, _u32, _u32, _u32)


class CMemoryOps(ctypes.Structure):
    _fields_ = [("read", READ_FN), ("write", WRITE_FN)]


class CFieldLayout(ctypes.Structure):
    _fields_ = [("structure", ctypes.c_char_p), ("field", ctypes.c_char_p), ("offset", _u32), ("size", _u32)]


_MIRRORS = {"tc_descriptor": CDescriptor, "tc_insn": CInsn, "tc_regs": CRegs, "tc_memory_ops": CMemoryOps}


def check_layout(lib: ctypes.CDLL) -> None:
    """Compare every mirror's fields and size with the C side's offsetof table."""
    count = _u32()
    lib.tc_layout.restype = ctypes.POINTER(CFieldLayout)
    lib.tc_layout.argtypes = [ctypes.POINTER(_u32)]
    table = lib.tc_layout(ctypes.byref(count))
    c_fields: dict[str, dict[str | None, tuple[int, int]]] = {}
    for i in range(count.value):
        row = table[i]
        field = row.field.decode() if row.field else None
        c_fields.setdefault(row.structure.decode(), {})[field] = (row.offset, row.size)
    for struct, mirror in _MIRRORS.items():
        fields = c_fields.get(struct)
        if fields is None:
            raise CoreLayoutError(f"x86 core layout: struct {struct} missing from the C table")
        _, c_size = fields.pop(None, (0, None))
        if c_size != ctypes.sizeof(mirror):
            raise CoreLayoutError(f"x86 core layout: sizeof {struct} is {c_size} in C, "
                                  f"{ctypes.sizeof(mirror)} in Python")
        py = {name: (getattr(mirror, name).offset, getattr(mirror, name).size) for name, *_ in mirror._fields_}
        if py != fields:
            diff = sorted(set(py.items()) ^ set(fields.items()))
            raise CoreLayoutError(f"x86 core layout: struct {struct} differs (field, (offset, size)): {diff}")


_LIB: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    """Build (once per source version) and load the core; the layout is checked first."""
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(build_shared_library("x86core", [SOURCE, AHEAD_SOURCE], [HEADER, *AHEAD_HEADERS],
                                                    COMPILE_FLAGS)))
        check_layout(lib)
        d = ctypes.POINTER(CDescriptor)
        lib.tc_check.argtypes = [d, _u32, _u32, ctypes.c_int]
        lib.tc_check.restype = ctypes.c_int
        lib.tc_truncate.argtypes = [d, _u32, d]
        lib.tc_truncate.restype = None
        lib.tc_flip.argtypes = [d, _u32, _u32, _u32, d]
        lib.tc_flip.restype = ctypes.c_int
        lib.tc_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(CInsn)]
        lib.tc_decode.restype = ctypes.c_int
        lib.tc_mnemonic.argtypes = [ctypes.POINTER(CInsn)]
        lib.tc_mnemonic.restype = ctypes.c_char_p
        lib.tc_effective_offset.argtypes = [ctypes.POINTER(CInsn), ctypes.POINTER(CRegs)]
        lib.tc_effective_offset.restype = _u32
        lib.tc_emulate.argtypes = [ctypes.POINTER(CInsn), ctypes.POINTER(CRegs), ctypes.POINTER(CMemoryOps),
                                   ctypes.c_void_p]
        lib.tc_emulate.restype = ctypes.c_int
        lib.tc_descriptor_encode.argtypes = [d]
        lib.tc_descriptor_encode.restype = ctypes.c_uint64
        lib.tc_descriptor_decode.argtypes = [ctypes.c_uint64, d]
        lib.tc_descriptor_decode.restype = None
        _LIB = lib
    return _LIB


# ---------------------------------------------------------------- descriptors
def to_c(desc: SegmentDescriptor) -> CDescriptor:
    return CDescriptor(desc.base, desc.limit, *(int(getattr(desc, name)) for name in _DESCRIPTOR_FLAGS))


def from_c(c: CDescriptor) -> SegmentDescriptor:
    return SegmentDescriptor(base=c.base, limit=c.limit, dpl=c.dpl,
                             **{name: bool(getattr(c, name)) for name in _DESCRIPTOR_FLAGS if name != "dpl"})


def encode_descriptor(desc: SegmentDescriptor) -> int:
    """SegmentDescriptor.encode, by the core: the 64-bit value in the GDT."""
    return load_library().tc_descriptor_encode(ctypes.byref(to_c(desc)))


def decode_descriptor(raw: int) -> SegmentDescriptor:
    """SegmentDescriptor.decode, by the core."""
    out = CDescriptor()
    load_library().tc_descriptor_decode(raw, ctypes.byref(out))
    return from_c(out)


def access_fault(desc: SegmentDescriptor, offset: int, size: int, write: bool) -> AccessFault | None:
    """Why the access faults (segcheck.AccessFault), or None when it is allowed."""
    if not 1 <= size <= 0xFFFF_FFFF:
        raise ValueError(f"access size must be 1..2**32-1 (the core's uint32_t), got {size}")
    return ACCESS_FAULTS[load_library().tc_check(ctypes.byref(to_c(desc)), offset, size, int(write))]


def check(desc: SegmentDescriptor, offset: int, size: int, write: bool) -> bool:
    """segcheck.check_data_access(...).allowed, computed by the core."""
    return access_fault(desc, offset, size, write) is None


def truncate(desc: SegmentDescriptor, profile: HypervisorProfile | str) -> SegmentDescriptor:
    out = CDescriptor()
    load_library().tc_truncate(ctypes.byref(to_c(desc)), get_profile(profile).hypervisor_start, ctypes.byref(out))
    return from_c(out)


def flip(desc: SegmentDescriptor, offset: int, profile: HypervisorProfile | str,
         size: int | None = None) -> SegmentDescriptor | None:
    """xen.flip computed by the core: the descriptor to install, or None (a genuine fault)."""
    if size is not None and not 1 <= size <= 0xFFFF_FFFF:
        raise ValueError(f"access size must be 1..2**32-1 (the core's uint32_t), got {size}")
    out = CDescriptor()
    found = load_library().tc_flip(ctypes.byref(to_c(desc)), offset, size or 0,
                                   get_profile(profile).hypervisor_start, ctypes.byref(out))
    return from_c(out) if found else None


# -------------------------------------------------------------------- decoder
@dataclass(frozen=True)
class CoreRefusal:
    """The core does not decode these bytes: "truncated", "too long", "invalid" or "unsupported"."""

    reason: str


@dataclass(frozen=True)
class CoreInstruction:
    """One instruction as the core decoded it (the fields of ``struct tc_insn``, named)."""

    raw: bytes
    length: int
    mnemonic: str
    kind: str
    form: str
    opcode: int
    operand_size: int
    memory_size: int
    segment: str
    segment_overridden: bool
    base: str | None
    index: str | None
    scale: int
    displacement: int
    reg: int
    immediate: int | None
    lock: bool
    rep: bool
    repne: bool
    operand_size_override: bool
    modrm: int | None
    sib: int | None
    only_explicit_memory: bool
    reads: int
    writes: int
    c_struct: bytes  # the tc_insn as decoded, handed back to the core by effective_offset/emulate

    @property
    def accesses(self) -> int:
        """Memory accesses an emulation performs (reads + writes, stack included)."""
        return self.reads + self.writes


def decode(code: bytes) -> CoreInstruction | CoreRefusal:
    """Decode one instruction (at most 15 bytes are looked at)."""
    code = bytes(code)
    lib = load_library()
    c = CInsn()
    status = lib.tc_decode(code, len(code), ctypes.byref(c))
    if status != 0:
        return CoreRefusal(DECODE_STATUS[status])
    return CoreInstruction(
        raw=code[:c.length], length=c.length, mnemonic=lib.tc_mnemonic(ctypes.byref(c)).decode(),
        kind=KINDS[c.kind], form=FORMS[c.form], opcode=c.opcode, operand_size=c.operand_size,
        memory_size=c.memory_size, segment=SEGMENT_REGS[c.segment], segment_overridden=bool(c.segment_overridden),
        base=REG32[c.base] if c.base >= 0 else None, index=REG32[c.index] if c.index >= 0 else None,
        scale=c.scale, displacement=c.displacement, reg=c.reg,
        immediate=c.immediate if c.has_immediate else None,
        lock=bool(c.lock), rep=bool(c.rep), repne=bool(c.repne), operand_size_override=bool(c.operand_size_override),
        modrm=c.modrm if c.has_modrm else None, sib=c.sib if c.has_sib else None,
        only_explicit_memory=bool(c.only_explicit_memory), reads=c.reads, writes=c.writes,
        c_struct=bytes(c),
    )


def _c_insn(insn: CoreInstruction) -> CInsn:
    return CInsn.from_buffer_copy(insn.c_struct)


def _c_regs(registers: Mapping[str, int]) -> CRegs:
    regs = CRegs()
    for i, name in enumerate(REG32):
        regs.gpr[i] = registers.get(name, 0) & 0xFFFFFFFF
    regs.eip = registers.get("eip", 0) & 0xFFFFFFFF
    regs.eflags = registers.get("eflags", 0) & 0xFFFFFFFF
    return regs


def effective_offset(insn: CoreInstruction, registers: Mapping[str, int]) -> int:
    """semantics.effective_offset: the memory operand's offset with these registers."""
    return load_library().tc_effective_offset(ctypes.byref(_c_insn(insn)), ctypes.byref(_c_regs(registers)))


# ------------------------------------------------------------------ emulation
@dataclass(frozen=True)
class Emulation:
    """What tc_emulate did: "ok", "refused" (registers untouched) or "unsupported"."""

    status: str
    registers: dict[str, int]          # all ten afterwards (unchanged unless "ok")
    accesses: tuple[MemoryAccess, ...]  # the accesses that were performed, in order


@dataclass
class _Session:
    memory: MutableMapping[tuple[str, int], int]
    refuse: Callable[[str, int, int, bool], bool] | None
    accesses: list
    error: BaseException | None = None


_SESSIONS: dict[int, _Session] = {}
_SESSION_IDS = itertools.count(1)


def _guarded(fn):
    """A callback that raises must refuse, not return ctypes' default 0 ("done")."""
    def wrapper(ctx, *args):
        session = _SESSIONS[ctx]
        try:
            return fn(session, *args)
        except BaseException as exc:  # re-raised by emulate once the core returned
            session.error = session.error or exc
            return 1
    return wrapper


@READ_FN
@_guarded
def _read(session: _Session, segment: int, offset: int, size: int, value) -> int:
    name = SEGMENT_REGS[segment]
    if session.refuse is not None and session.refuse(name, offset, size, False):
        return 1
    v = 0
    for i in range(size):
        v |= (session.memory.get((name, (offset + i) & 0xFFFFFFFF), 0) & 0xFF) << (8 * i)
    value[0] = v
    session.accesses.append(MemoryAccess(name, offset, size, "read", v))
    return 0


@WRITE_FN
@_guarded
def _write(session: _Session, segment: int, offset: int, size: int, value: int) -> int:
    name = SEGMENT_REGS[segment]
    if session.refuse is not None and session.refuse(name, offset, size, True):
        return 1
    for i in range(size):
        session.memory[(name, (offset + i) & 0xFFFFFFFF)] = (value >> (8 * i)) & 0xFF
    session.accesses.append(MemoryAccess(name, offset, size, "write", value))
    return 0


_OPS = CMemoryOps(_read, _write)


def emulate(insn: CoreInstruction, registers: Mapping[str, int], memory: MutableMapping[tuple[str, int], int],
            refuse: Callable[[str, int, int, bool], bool] | None = None) -> Emulation:
    """Run ``insn`` in the core on a copy of ``registers`` (eax..edi, eip, eflags; missing: 0).

    ``memory`` maps (segment name, offset) to a byte (missing bytes read as 0)
    and receives the writes. ``refuse(segment, offset, size, write)`` returning
    True refuses that access, as a backend's safety check would.
    """
    regs = _c_regs(registers)
    session = _Session(memory, refuse, [])
    ctx = next(_SESSION_IDS)
    _SESSIONS[ctx] = session
    try:
        status = load_library().tc_emulate(ctypes.byref(_c_insn(insn)), ctypes.byref(regs), ctypes.byref(_OPS), ctx)
    finally:
        del _SESSIONS[ctx]
    if session.error is not None:
        raise session.error
    out = {name: regs.gpr[i] for i, name in enumerate(REG32)}
    out.update(eip=regs.eip, eflags=regs.eflags)
    return Emulation(("ok", "refused", "unsupported")[status], out, tuple(session.accesses))


__all__ = [
    "CoreInstruction", "CoreLayoutError", "CoreRefusal", "Emulation", "access_fault", "check", "decode",
    "decode_descriptor", "effective_offset", "emulate", "encode_descriptor", "flip", "load_library", "truncate",
]
