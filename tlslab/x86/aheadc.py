"""ctypes binding of the C decode-ahead (``_ahead.c``): the full decoder and the walk, in native code.

:mod:`tlslab.x86.decode` and :mod:`tlslab.x86.ahead` are the specification;
this is the same decoder and walk compiled (the tables are generated from the
Python ones, :mod:`tlslab.x86.optable`), held to exact agreement by
``tests/test_ahead_differential.py``. Two ways in:

* :func:`decode_full`: one instruction, as a plain dict (for the tests);
* :class:`RegionWalker`: the walk over guest memory given as host buffers
  (``(start, size, prot, host address)`` regions, as the model's
  :class:`~tlslab.machine.memory.GuestMemory` holds them), with nothing
  crossing into Python during a walk.
"""

from __future__ import annotations

import ctypes
from typing import Iterable, Mapping

from .ahead import LONG, SHORT, UNKNOWN, Ahead
from .core import CRegs, load_library
from .opcodes import REG8, REG16, REG32, SEGMENT_REGS

_u8, _u16, _u32, _i8, _i32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_int8, ctypes.c_int32
VERDICTS = {0: UNKNOWN, 1: LONG, 2: SHORT}


class CMem(ctypes.Structure):
    _fields_ = [("present", _u8), ("segment", _u8), ("overridden", _u8), ("address_size", _u8),
                ("base", _i8), ("index", _i8), ("scale", _u8), ("displacement", _i32)]


class CFullInsn(ctypes.Structure):
    _fields_ = [("address", _u32), ("opcode", _u32), ("immediate", _u32), ("immediate2", _u32),
                ("branch_target", _u32), ("has_immediate", _u8), ("has_immediate2", _u8),
                ("has_branch_target", _u8), ("length", _u8), ("mn", _u16), ("operand_size", _u8),
                ("memory_size", _u8), ("reg_kind", _u8), ("reg_num", _u8), ("rm_kind", _u8), ("rm_num", _u8),
                ("is_string", _u8), ("entry", ctypes.c_void_p), ("mem", CMem), ("mem2", CMem)]


class CRegion(ctypes.Structure):
    _fields_ = [("start", _u32), ("size", _u32), ("prot", _u32), ("host", ctypes.c_void_p)]


class CRegionMap(ctypes.Structure):
    _fields_ = [("regions", ctypes.POINTER(CRegion)), ("count", _u32), ("below", ctypes.c_uint64), ("hint", _u32),
                ("cache", ctypes.c_void_p), ("memo", ctypes.c_void_p)]


_BOUND = False


def _lib() -> ctypes.CDLL:
    global _BOUND
    lib = load_library()
    if not _BOUND:
        lib.tc_decode_full.argtypes = [ctypes.c_char_p, ctypes.c_size_t, _u32, ctypes.POINTER(CFullInsn)]
        lib.tc_decode_full.restype = ctypes.c_int
        lib.tc_mnemonic_name.argtypes = [_u16]
        lib.tc_mnemonic_name.restype = ctypes.c_char_p
        lib.tc_lookahead_regions.argtypes = [ctypes.POINTER(CRegionMap), ctypes.POINTER(CRegs), ctypes.c_int,
                                             ctypes.c_double, _u32, ctypes.POINTER(_u32), ctypes.POINTER(_u32)]
        lib.tc_lookahead_regions.restype = ctypes.c_int
        lib.tc_lookahead_regions_timed.argtypes = [ctypes.POINTER(CRegionMap), ctypes.POINTER(CRegs), ctypes.c_int,
                                                   ctypes.c_double, _u32, ctypes.POINTER(_u32),
                                                   ctypes.POINTER(_u32), ctypes.POINTER(ctypes.c_uint64)]
        lib.tc_decode_sweep_ns.argtypes = [ctypes.c_char_p, ctypes.c_size_t, _u32, ctypes.POINTER(ctypes.c_uint64)]
        lib.tc_decode_sweep_ns.restype = ctypes.c_uint64
        lib.tc_clock_overhead_ns.argtypes = []
        lib.tc_clock_overhead_ns.restype = ctypes.c_double
        lib.tc_lookahead_regions_timed.restype = ctypes.c_int
        lib.tc_decode_cache_size.argtypes = []
        lib.tc_decode_cache_size.restype = ctypes.c_size_t
        lib.tc_decode_cache_stats.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                              ctypes.POINTER(ctypes.c_uint64)]
        lib.tc_decode_cache_stats.restype = None
        lib.tc_walk_memo_size.argtypes = []
        lib.tc_walk_memo_size.restype = ctypes.c_size_t
        lib.tc_walk_memo_stats.argtypes = lib.tc_decode_cache_stats.argtypes
        lib.tc_walk_memo_stats.restype = None
        _BOUND = True
    return lib


def _register(kind: int, num: int) -> str | None:
    if kind == 1:
        return REG8[num]
    if kind == 2:
        return REG16[num]
    if kind == 4:
        return REG32[num]
    if kind == 8:
        return SEGMENT_REGS[num]
    return None


def _memory(m: CMem) -> dict | None:
    if not m.present:
        return None
    names = REG16 if m.address_size == 16 else REG32
    return {"segment": SEGMENT_REGS[m.segment], "base": names[m.base] if m.base >= 0 else None,
            "index": names[m.index] if m.index >= 0 else None, "scale": m.scale,
            "displacement": m.displacement, "address_size": m.address_size,
            "segment_overridden": bool(m.overridden)}


def decode_full(code: bytes, address: int = 0) -> dict | int:
    """The C decoder's reading of ``code`` at ``address``: a dict of the fields the walk uses (named as
    :class:`tlslab.x86.decode.Instruction` names them), or its nonzero status when it does not decode."""
    lib = _lib()
    out = CFullInsn()
    status = lib.tc_decode_full(bytes(code), len(code), address & 0xFFFF_FFFF, ctypes.byref(out))
    if status:
        return status
    return {
        "length": out.length, "opcode": out.opcode, "mnemonic": lib.tc_mnemonic_name(out.mn).decode(),
        "operand_size": out.operand_size, "memory_size": out.memory_size or None,
        "reg": _register(out.reg_kind, out.reg_num), "rm_reg": _register(out.rm_kind, out.rm_num),
        "immediate": out.immediate if out.has_immediate else None,
        "immediate2": out.immediate2 if out.has_immediate2 else None,
        "branch_target": out.branch_target if out.has_branch_target else None,
        "memory": _memory(out.mem), "memory2": _memory(out.mem2), "is_string": bool(out.is_string),
    }


def c_regs(registers: Mapping[str, int], eip: int) -> CRegs:
    regs = CRegs()
    for i, name in enumerate(REG32):
        regs.gpr[i] = registers.get(name, 0) & 0xFFFF_FFFF
    regs.eip = eip & 0xFFFF_FFFF
    return regs


class RegionWalker:
    """The C walk over guest memory held in host buffers.

    ``regions``: ``(start, size, prot, host address)`` sorted by start, not
    overlapping (PROT_READ 1, PROT_EXEC 4); ``below``: the hypervisor's start.
    The caller keeps the buffers alive and mapped while it walks, and builds a
    new walker when the regions change. ``decode_cache``: keep decoded
    instructions by address for the walker's life; ``memo``: keep each walk's
    answer with the inputs it read, for a later fault at the same site whose
    inputs all read the same (for one threshold and budget). With either, the
    caller must also build a new walker when guest code changes.
    """

    def __init__(self, regions: Iterable[tuple[int, int, int, int]], below: int, decode_cache: bool = False,
                 memo: bool = False) -> None:
        rows = sorted(regions)
        self._lib = _lib()
        self._array = (CRegion * max(1, len(rows)))(*(CRegion(s, n, p, h) for s, n, p, h in rows))
        self._cache = ctypes.create_string_buffer(self._lib.tc_decode_cache_size()) if decode_cache else None
        self._memo = ctypes.create_string_buffer(self._lib.tc_walk_memo_size()) if memo else None
        self._map = CRegionMap(self._array, len(rows), min(below, 1 << 32), 0,
                               ctypes.addressof(self._cache) if decode_cache else None,
                               ctypes.addressof(self._memo) if memo else None)
        self._walked, self._reused = _u32(), _u32()

    def _stats(self, fn, buffer) -> tuple[int, int]:
        if buffer is None:
            return 0, 0
        hits, misses = ctypes.c_uint64(), ctypes.c_uint64()
        fn(ctypes.addressof(buffer), ctypes.byref(hits), ctypes.byref(misses))
        return hits.value, misses.value

    def cache_stats(self) -> tuple[int, int]:
        """(hits, misses) of the decode cache; (0, 0) without one."""
        return self._stats(self._lib.tc_decode_cache_stats, self._cache)

    def memo_stats(self) -> tuple[int, int]:
        """(walks reused, walks made) through the memo; (0, 0) without one."""
        return self._stats(self._lib.tc_walk_memo_stats, self._memo)

    def walk(self, regs: CRegs, sign: int, threshold: float, budget: int) -> Ahead:
        """ahead.walk from ``regs.eip`` (the faulting %gs access, offset of ``sign``)."""
        verdict = self._lib.tc_lookahead_regions(ctypes.byref(self._map), ctypes.byref(regs), sign,
                                                 float(threshold), budget, ctypes.byref(self._walked),
                                                 ctypes.byref(self._reused))
        if verdict < 0:
            raise MemoryError("the C walk ran out of memory")
        return Ahead(VERDICTS[verdict], self._walked.value, bool(self._reused.value))

    def timed(self, regs: CRegs, sign: int, threshold: float, budget: int) -> tuple[Ahead, int]:
        """:meth:`walk`, timed in C: (answer, nanoseconds, the clock's own reading included; see
        :func:`clock_overhead_ns`)."""
        elapsed = ctypes.c_uint64()
        verdict = self._lib.tc_lookahead_regions_timed(ctypes.byref(self._map), ctypes.byref(regs), sign,
                                                       float(threshold), budget, ctypes.byref(self._walked),
                                                       ctypes.byref(self._reused), ctypes.byref(elapsed))
        if verdict < 0:
            raise MemoryError("the C walk ran out of memory")
        return Ahead(VERDICTS[verdict], self._walked.value, bool(self._reused.value)), elapsed.value


def clock_overhead_ns() -> float:
    """The median nanoseconds two back-to-back readings of the clock :meth:`RegionWalker.timed` uses take."""
    return _lib().tc_clock_overhead_ns()


def decode_sweep_ns(code: bytes, rounds: int = 10) -> tuple[int, int]:
    """The C decoder alone: (decodes, nanoseconds) for a linear sweep over ``code`` ``rounds`` times."""
    decodes = ctypes.c_uint64()
    ns = _lib().tc_decode_sweep_ns(bytes(code), len(code), rounds, ctypes.byref(decodes))
    return decodes.value, ns
