"""Table-driven IA-32 instruction decoder (32-bit protected mode).

In the spirit of Xen's x86_emulate: one pass over prefixes, opcode, ModRM,
SIB, displacement and immediates, driven by the tables in
:mod:`tlslab.x86.opcodes`, and every way of *not* understanding an
instruction is an explicit :class:`DecodeError` carrying the reason (the
strategies count and report those reasons instead of guessing).

``decode`` never raises for bad input: it returns either an
:class:`Instruction` or a :class:`DecodeError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .opcodes import (
    CONDITION_CODES,
    GROUPS,
    ONE_BYTE,
    PREFIX_BYTES,
    REG8,
    REG16,
    REG32,
    SEGMENT_PREFIXES,
    SEGMENT_REGS,
    THREE_BYTE_IMM8,
    TWO_BYTE,
    OpcodeEntry,
)

__all__ = [
    "DecodeError",
    "Instruction",
    "MemoryOperand",
    "Prefixes",
    "decode",
    "decode_or_raise",
    "iter_decode",
    "MAX_INSN_LENGTH",
    "operand_code_size",
]

MAX_INSN_LENGTH = 15

#: Instructions that accept LOCK when their destination is memory (SDM vol. 2,
#: LOCK).  Anything else with F0 is #UD.
LOCKABLE = frozenset({"add", "adc", "and", "btc", "btr", "bts", "cmpxchg", "?cmpxchg8b",
                      "dec", "inc", "neg", "not", "or", "sbb", "sub", "xor", "xadd", "xchg"})

#: Mnemonic spelled differently when the operand-size prefix selects 16 bits
#: (capstone spelling).
_WORD_SPELLING = {
    "movsd": "movsw", "cmpsd": "cmpsw", "stosd": "stosw", "lodsd": "lodsw",
    "scasd": "scasw", "insd": "insw", "outsd": "outsw", "cwde": "cbw", "cdq": "cwd",
    "pushal": "pushaw", "popal": "popaw", "pushfd": "pushf", "popfd": "popf",
    "iretd": "iret",
}

#: F3 turns these into different instructions of the same length.
_F3_SPELLING = {(0x90, "nop"): "pause", (0x0FBC, "bsf"): "tzcnt", (0x0FBD, "bsr"): "lzcnt"}

#: Group slots whose register form (mod == 3) is a different instruction:
#: (opcode, mod == 3, /reg) -> entry.  TSX xabort/xbegin, and the 0F 01
#: system forms (xgetbv, xend, ...) that are ModRM-only.
_REGISTER_FORM_SPECIALS = {
    (0xC6, True, 7): OpcodeEntry("?xabort", ("Eb", "Ib")),
    (0xC7, True, 7): OpcodeEntry("?xbegin", ("Ex", "Jz")),
    **{(0x0F01, True, r): OpcodeEntry("?system", ("Ed",)) for r in range(8)},
}

_SIZE_LETTERS = {"b": 1, "w": 2, "d": 4, "q": 8}

#: 16-bit ModRM r/m -> (base, index); rm=6 with mod=0 is a bare disp16.
_MODRM16 = (("bx", "si"), ("bx", "di"), ("bp", "si"), ("bp", "di"),
            ("si", None), ("di", None), ("bp", None), ("bx", None))


class DecodeError(Exception):
    """Why an instruction could not be decoded (returned, not raised, by decode)."""

    def __init__(self, reason: str, address: int = 0, raw: bytes = b""):
        super().__init__(reason)
        self.reason = reason
        self.address = address
        self.raw = bytes(raw)

    def __repr__(self) -> str:
        return f"DecodeError({self.reason!r} at {self.address:#x}: {self.raw.hex(' ')})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, DecodeError) and self.reason == other.reason
                and self.address == other.address and self.raw == other.raw)

    def __hash__(self) -> int:
        return hash((self.reason, self.address, self.raw))


@dataclass(frozen=True)
class Prefixes:
    segment_override: str | None = None  # 'es','cs','ss','ds','fs','gs'
    operand_size_override: bool = False  # 66
    address_size_override: bool = False  # 67
    lock: bool = False                   # F0
    rep: bool = False                    # F3 (rep / repe / repz)
    repne: bool = False                  # F2
    count: int = 0                       # number of prefix bytes


@dataclass(frozen=True)
class MemoryOperand:
    """An effective address: ``segment:[base + index*scale + displacement]``.

    ``segment`` is the segment actually used: the override if there is one,
    else the architectural default (ss for esp/ebp-based addresses, es for a
    string destination, ds otherwise).
    """

    segment: str
    base: str | None
    index: str | None
    scale: int
    displacement: int  # signed 32-bit (signed 16-bit with 16-bit addressing)
    address_size: int = 32
    segment_overridden: bool = False

    def offset(self, read_reg: Callable[[str], int]) -> int:
        """The offset within the segment, computed with ``read_reg(name)``.

        Names are 32-bit registers for 32-bit addressing; for 16-bit
        addressing the 16-bit halves are taken from the 32-bit registers.
        """
        mask = 0xFFFFFFFF if self.address_size == 32 else 0xFFFF
        value = self.displacement
        if self.base is not None:
            value += _read_gpr(read_reg, self.base)
        if self.index is not None:
            value += _read_gpr(read_reg, self.index) * self.scale
        return value & mask


def _read_gpr(read_reg: Callable[[str], int], name: str) -> int:
    if name in REG16:
        return read_reg(REG32[REG16.index(name)]) & 0xFFFF
    return read_reg(name) & 0xFFFFFFFF


@dataclass(frozen=True)
class Instruction:
    address: int
    length: int
    raw: bytes
    prefixes: Prefixes
    opcode: int             # 0x8b, 0x0fb6, 0x0f38xx
    mnemonic: str           # lowercase, capstone spelling, no rep/lock prefix
    operands: tuple[str, ...]  # operand codes from the opcode table ("Ev,Gv")
    operand_size: int       # bytes: 1, 2 or 4
    memory: MemoryOperand | None
    memory_size: int | None  # bytes accessed at ``memory`` (None: no access/unknown)
    modrm: int | None = None
    sib: int | None = None
    reg: str | None = None       # register named by ModRM.reg / opcode bits / fixed acc.
    rm_reg: str | None = None    # register named by ModRM.rm when mod == 3
    immediate: int | None = None  # value as used: zero- or sign-extended per table, masked
    immediate2: int | None = None  # second immediate (enter's imm8, far pointer selector)
    branch_target: int | None = None
    memory2: MemoryOperand | None = None  # es:[edi] of movs/cmps
    length_only: bool = False   # decoded for length/EA only; no semantics

    @property
    def modrm_mod(self) -> int | None:
        return None if self.modrm is None else self.modrm >> 6

    @property
    def modrm_reg(self) -> int | None:
        return None if self.modrm is None else (self.modrm >> 3) & 7

    @property
    def modrm_rm(self) -> int | None:
        return None if self.modrm is None else self.modrm & 7

    @property
    def segment_override(self) -> str | None:
        return self.prefixes.segment_override

    @property
    def opcode_bytes(self) -> bytes:
        if self.opcode > 0xFFFF:
            return self.opcode.to_bytes(3, "big")
        if self.opcode > 0xFF:
            return self.opcode.to_bytes(2, "big")
        return bytes([self.opcode])

    @property
    def condition(self) -> str | None:
        """Condition-code suffix for jcc/setcc/cmovcc, else None."""
        op = self.opcode
        if 0x70 <= op <= 0x7F or 0x0F80 <= op <= 0x0F8F or 0x0F40 <= op <= 0x0F4F \
                or 0x0F90 <= op <= 0x0F9F:
            return CONDITION_CODES[op & 0xF]
        return None

    @property
    def is_string(self) -> bool:
        return any(o[0] in "XY" for o in self.operands)


class _Reader:
    """Byte cursor that turns running off the end into a DecodeError."""

    __slots__ = ("code", "pos", "address")

    def __init__(self, code: bytes, address: int):
        self.code = code
        self.pos = 0
        self.address = address

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > MAX_INSN_LENGTH:
            raise DecodeError("instruction longer than 15 bytes (#GP)", self.address,
                              self.code[:MAX_INSN_LENGTH])
        if self.pos + n > len(self.code):
            raise DecodeError(f"truncated: {what} needs {n} byte(s) at +{self.pos}",
                              self.address, self.code)

    def peek(self, what: str) -> int:
        self._need(1, what)
        return self.code[self.pos]

    def u(self, n: int, what: str) -> int:
        self._need(n, what)
        v = int.from_bytes(self.code[self.pos:self.pos + n], "little")
        self.pos += n
        return v


def _sext(value: int, nbytes: int) -> int:
    bits = nbytes * 8
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def operand_code_size(code: str, osz: int) -> int | None:
    """Bytes named by an operand code's size letter ('Eb' -> 1, 'Ev' -> osz)."""
    letter = code[-1] if len(code) > 1 else ""
    if letter in ("v", "z"):
        return osz
    if letter == "p":
        return osz + 2
    return _SIZE_LETTERS.get(letter)


def _operand_size(entry: OpcodeEntry, osz: int) -> int:
    for op in entry.operands:
        if op == "AL":
            return 1
        if op == "eAX":
            return osz
        if op[0] in "EGZOXY" and len(op) == 2:
            size = operand_code_size(op, osz)
            if size in (1, 2, 4):
                return size
    for op in entry.operands:
        if op[0] == "I" and op != "Ibs":
            size = operand_code_size(op, osz)
            if size in (1, 2, 4):
                return size
    return osz


def _reg_name(num: int, size: int | None) -> str:
    if size == 1:
        return REG8[num]
    if size == 2:
        return REG16[num]
    return REG32[num]


def decode(code: bytes, address: int = 0) -> Instruction | DecodeError:
    """Decode one instruction from ``code`` (at most 15 bytes are looked at)."""
    try:
        return _decode(bytes(code[:MAX_INSN_LENGTH + 1]), address)
    except DecodeError as err:
        return err


def decode_or_raise(code: bytes, address: int = 0) -> Instruction:
    result = decode(code, address)
    if isinstance(result, DecodeError):
        raise result
    return result


def iter_decode(code: bytes, address: int = 0):
    """Linear sweep: yield (offset, Instruction | DecodeError); skip 1 byte on error."""
    off = 0
    while off < len(code):
        result = decode(code[off:off + MAX_INSN_LENGTH], address + off)
        yield off, result
        off += 1 if isinstance(result, DecodeError) else result.length


def _decode(code: bytes, address: int) -> Instruction:
    rd = _Reader(code, address)

    # 1. Prefixes (legacy groups 1-4; the last segment override wins).
    seg = None
    opsz = adsz = lock = rep = repne = False
    while True:
        b = rd.peek("prefix/opcode")
        if b not in PREFIX_BYTES:
            break
        rd.pos += 1
        if b in SEGMENT_PREFIXES:
            seg = SEGMENT_PREFIXES[b]
        elif b == 0x66:
            opsz = True
        elif b == 0x67:
            adsz = True
        elif b == 0xF0:
            lock = True
        elif b == 0xF3:
            rep, repne = True, False
        elif b == 0xF2:
            repne, rep = True, False
    prefixes = Prefixes(seg, opsz, adsz, lock, rep, repne, rd.pos)
    osz = 2 if opsz else 4

    # 2. Opcode -> table entry (groups resolved through ModRM.reg).
    b = rd.u(1, "opcode")
    if b == 0x0F:
        b2 = rd.u(1, "two-byte opcode")
        if b2 in THREE_BYTE_IMM8:
            b3 = rd.u(1, "three-byte opcode")
            opcode = (0x0F << 16) | (b2 << 8) | b3
            entry = OpcodeEntry("?sse", ("Ex", "Gx", "Ib") if THREE_BYTE_IMM8[b2] else ("Ex", "Gx"))
        else:
            opcode = 0x0F00 | b2
            entry = TWO_BYTE.get(b2)
    else:
        opcode = b
        entry = ONE_BYTE.get(b)
    if entry is None and opcode in GROUPS:
        modrm_byte = rd.peek("ModRM")
        slot = (modrm_byte >> 3) & 7
        entry = _REGISTER_FORM_SPECIALS.get((opcode, modrm_byte >> 6 == 3, slot)) \
            or GROUPS[opcode][slot]
        if entry is None:
            raise DecodeError(f"invalid opcode {opcode:#x} /{slot} (#UD)", address, code)
    if entry is None:
        raise DecodeError(f"unsupported opcode {opcode:#x}", address, code)

    # 3. ModRM / SIB / displacement.
    modrm = sib = None
    memory = None
    rm_reg = None
    memory2 = None
    if entry.has_modrm:
        modrm = rd.u(1, "ModRM")
        mod, rm = modrm >> 6, modrm & 7
        if mod == 3:
            if entry.memory_only:
                raise DecodeError(f"{entry.mnemonic.lstrip('?')} needs a memory operand (#UD)",
                                  address, code)
            rm_op = entry.rm_operand
            rm_reg = _reg_name(rm, operand_code_size(rm_op, osz) if rm_op else osz)
        elif adsz:
            base, index = _MODRM16[rm]
            if mod == 0 and rm == 6:
                base, disp = None, _sext(rd.u(2, "disp16"), 2)
            elif mod == 0:
                disp = 0
            else:
                disp = _sext(rd.u(mod, "displacement"), mod)  # mod1: 1 byte, mod2: 2 bytes
            default = "ss" if base == "bp" else "ds"
            memory = MemoryOperand(seg or default, base, index, 1, disp, 16, seg is not None)
        else:
            index, scale = None, 1
            base: str | None
            if rm == 4:
                sib = rd.u(1, "SIB")
                scale = 1 << (sib >> 6)
                idx = (sib >> 3) & 7
                index = None if idx == 4 else REG32[idx]
                if index is None:
                    scale = 1
                base_num = sib & 7
                base = None if (base_num == 5 and mod == 0) else REG32[base_num]
            else:
                base = None if (rm == 5 and mod == 0) else REG32[rm]
            if mod == 1:
                disp = _sext(rd.u(1, "disp8"), 1)
            elif mod == 2 or base is None:
                disp = _sext(rd.u(4, "disp32"), 4)
            else:
                disp = 0
            default = "ss" if base in ("esp", "ebp") else "ds"
            memory = MemoryOperand(seg or default, base, index, scale, disp, 32, seg is not None)

    # 4. Register operand, immediates, moffs, branch targets.
    operand_size = _operand_size(entry, osz)
    reg = None
    imm = imm2 = None
    target = None
    for op in entry.operands:
        kind = op[0]
        if op == "AL":
            reg = reg or "al"
        elif op == "eAX":
            reg = reg or _reg_name(0, osz)
        elif kind == "G":
            reg = _reg_name((modrm >> 3) & 7, operand_code_size(op, osz))
        elif op == "Sw":
            num = (modrm >> 3) & 7
            if num >= len(SEGMENT_REGS):
                raise DecodeError(f"invalid segment register {num} (#UD)", address, code)
            reg = SEGMENT_REGS[num]
        elif kind == "Z":
            reg = _reg_name(opcode & 7, operand_code_size(op, osz))
        elif op == "Ibs":
            imm = _sext(rd.u(1, "imm8"), 1) & ((1 << (8 * operand_size)) - 1)
        elif kind == "I":
            n = operand_code_size(op, osz)
            value = rd.u(n, f"imm{8 * n}")
            if imm is None:
                imm = value
            else:
                imm2 = value
        elif kind == "J":
            n = operand_code_size(op, osz)
            imm = _sext(rd.u(n, f"rel{8 * n}"), n)
        elif kind == "O":
            n = 2 if adsz else 4
            disp = rd.u(n, "moffs")
            memory = MemoryOperand(seg or "ds", None, None, 1, _sext(disp, n),
                                   16 if adsz else 32, seg is not None)
        elif op == "Ap":
            imm = rd.u(osz, "far offset")
            imm2 = rd.u(2, "far selector")
        elif kind in "XY":
            si, di = ("si", "di") if adsz else ("esi", "edi")
            operand = (MemoryOperand(seg or "ds", si, None, 1, 0, 16 if adsz else 32, seg is not None)
                       if kind == "X" else
                       MemoryOperand("es", di, None, 1, 0, 16 if adsz else 32, False))
            if memory is None:
                memory = operand
            else:
                memory2 = operand
    # movs/cmps: keep the (overridable) source in .memory, es:[edi] in .memory2.
    if memory2 is not None and memory.segment == "es" and memory.base in ("edi", "di") \
            and not memory.segment_overridden and entry.operands[0][0] == "Y":
        memory, memory2 = memory2, memory

    length = rd.pos
    if kind_is_branch(entry) and imm is not None:
        mask = 0xFFFF if osz == 2 else 0xFFFFFFFF
        target = (address + length + imm) & mask

    mem_code = entry.memory_operand
    memory_size = operand_code_size(mem_code, osz) if (mem_code and memory is not None) else None
    if entry.mnemonic == "lea" or entry.mnemonic in ("nop", "?hint_nop"):
        memory_size = None  # computes an address / hint: no memory access

    mnemonic = entry.mnemonic
    if opsz and mnemonic in _WORD_SPELLING:
        mnemonic = _WORD_SPELLING[mnemonic]
    if rep and (opcode, mnemonic) in _F3_SPELLING:
        mnemonic = _F3_SPELLING[(opcode, mnemonic)]

    if lock:
        first = entry.operands[0] if entry.operands else ""
        if mnemonic not in LOCKABLE or memory is None or first[0:1] not in ("E", "M"):
            raise DecodeError(f"lock prefix on {mnemonic.lstrip('?')} without a memory "
                              f"destination (#UD)", address, code)

    return Instruction(
        address=address,
        length=length,
        raw=code[:length],
        prefixes=prefixes,
        opcode=opcode,
        mnemonic=mnemonic,
        operands=entry.operands,
        operand_size=operand_size,
        memory=memory,
        memory_size=memory_size,
        modrm=modrm,
        sib=sib,
        reg=reg,
        rm_reg=rm_reg,
        immediate=imm,
        immediate2=imm2,
        branch_target=target,
        memory2=memory2,
        length_only=entry.length_only,
    )


def kind_is_branch(entry: OpcodeEntry) -> bool:
    return any(op[0] == "J" for op in entry.operands)
