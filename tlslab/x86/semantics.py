"""Execution semantics for one decoded instruction with a memory operand.

The emulate strategy calls :func:`execute` after a #GP: the instruction's
memory operand is accessed through the :class:`CPU` protocol, whose
``read_mem``/``write_mem`` take a *segment name and offset* -- the caller
does the segment-limit check and the linear mapping, and may raise from
either method to signal a fault.

Fault atomicity (SDM: a fault is raised before the instruction has any
effect): every supported instruction does all its memory reads first, then
at most one memory write, and only then writes registers, EFLAGS and EIP.
So an exception from ``read_mem``/``write_mem`` leaves the register state
untouched.  Repeated string instructions are the architectural exception:
registers are committed after each iteration, exactly as the hardware leaves
them when iteration *k* faults (ECX/ESI/EDI reflect *k* completed
iterations, EIP still at the instruction).

EFLAGS: CF PF AF ZF SF OF are computed exactly where Intel defines them.
Where Intel says "undefined" we reproduce what Unicorn 2.1.4 (QEMU TCG)
does, because Unicorn is our differential oracle; :func:`undefined_flags`
returns those bits so a comparison with real hardware can mask them:

  * and/or/xor/test: AF := 0.
  * shl/sal/shr/sar (count != 0): AF := 0; OF computed with the 1-bit
    formula for every count (OF = MSB(r) ^ CF for shl, MSB(a >> (n-1)) ^
    MSB(r) for shr, 0 for sar); CF for counts >= width follows the infinite-
    precision shift (shl: 0, shr: 0, sar: sign).
  * rol/ror/rcl/rcr: OF computed with the 1-bit formula for every count.
  * mul/imul: AF := 0; ZF, SF, PF from the low half of the product.
  * div/idiv: all six flags unchanged.
  * bt/bts/btr/btc: only CF written; OF SF AF PF (and ZF) unchanged.
  * Count 0 shifts/rotates leave all flags unchanged (architectural).

Assumptions (32-bit protected mode, flat 32-bit stack): the stack is
``ss:esp`` with 32-bit stack addressing; 16-bit *address size* (67 prefix)
is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from .decode import Instruction, operand_code_size
from .opcodes import REG8, REG16, REG32

__all__ = [
    "CPU",
    "MemoryAccess",
    "Effects",
    "UnsupportedInstruction",
    "DivideError",
    "execute",
    "effective_offset",
    "supported",
    "undefined_flags",
    "condition_holds",
    "CF", "PF", "AF", "ZF", "SF", "DF", "OF", "STATUS_FLAGS",
]

CF, PF, AF, ZF, SF, DF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x400, 0x800
STATUS_FLAGS = CF | PF | AF | ZF | SF | OF

_PARITY = bytes(1 if bin(i).count("1") % 2 == 0 else 0 for i in range(256))


class CPU(Protocol):
    """What the semantics need from a vCPU.  Register names are the 32-bit
    general registers, segment registers, 'eflags' and 'eip'."""

    def read_reg(self, name: str) -> int: ...
    def write_reg(self, name: str, value: int) -> None: ...
    def read_mem(self, segment: str, offset: int, size: int) -> int: ...
    def write_mem(self, segment: str, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class MemoryAccess:
    segment: str
    offset: int
    size: int
    kind: str  # "read" | "write"
    value: int


@dataclass(frozen=True)
class Effects:
    """What executing one instruction did (the strategy counts accesses)."""

    accesses: tuple[MemoryAccess, ...]
    next_eip: int
    registers: dict[str, int] = field(default_factory=dict)  # last values written
    iterations: int = 1  # string instructions: elements processed

    @property
    def reads(self) -> tuple[MemoryAccess, ...]:
        return tuple(a for a in self.accesses if a.kind == "read")

    @property
    def writes(self) -> tuple[MemoryAccess, ...]:
        return tuple(a for a in self.accesses if a.kind == "write")


class UnsupportedInstruction(Exception):
    """The instruction decodes but has no semantics here (nothing was done)."""


class DivideError(Exception):
    """#DE: divide by zero or quotient overflow (nothing was done)."""


def condition_holds(cc: str, eflags: int) -> bool:
    """Evaluate a jcc/setcc/cmovcc condition suffix against EFLAGS."""
    cf, zf = bool(eflags & CF), bool(eflags & ZF)
    sf, of, pf = bool(eflags & SF), bool(eflags & OF), bool(eflags & PF)
    base = {
        "o": of, "b": cf, "e": zf, "be": cf or zf, "s": sf, "p": pf,
        "l": sf != of, "le": zf or sf != of,
    }
    if cc in base:
        return base[cc]
    return not base[{"no": "o", "ae": "b", "ne": "e", "a": "be", "ns": "s", "np": "p",
                     "ge": "l", "g": "le"}[cc]]


# --------------------------------------------------------------------------
# Flag arithmetic.  Each returns (result, status-flag bits, bits written).

def _szp(result: int, bits: int) -> int:
    f = _PARITY[result & 0xFF] * PF
    if result == 0:
        f |= ZF
    if result >> (bits - 1):
        f |= SF
    return f


def _add(a: int, b: int, carry: int, bits: int) -> tuple[int, int, int]:
    mask = (1 << bits) - 1
    full = a + b + carry
    r = full & mask
    f = _szp(r, bits) | ((a ^ b ^ r) & AF)
    if full >> bits:
        f |= CF
    if ((a ^ r) & (b ^ r)) >> (bits - 1) & 1:
        f |= OF
    return r, f, STATUS_FLAGS


def _sub(a: int, b: int, borrow: int, bits: int) -> tuple[int, int, int]:
    mask = (1 << bits) - 1
    full = a - b - borrow
    r = full & mask
    f = _szp(r, bits) | ((a ^ b ^ r) & AF)
    if full < 0:
        f |= CF
    if ((a ^ b) & (a ^ r)) >> (bits - 1) & 1:
        f |= OF
    return r, f, STATUS_FLAGS


def _logic(r: int, bits: int) -> tuple[int, int, int]:
    return r, _szp(r, bits), STATUS_FLAGS  # CF = OF = 0; AF = 0 (undefined; QEMU: 0)


def _alu(op: str, a: int, b: int, eflags: int, bits: int) -> tuple[int, int, int]:
    carry = eflags & CF
    if op == "add":
        return _add(a, b, 0, bits)
    if op == "adc":
        return _add(a, b, carry, bits)
    if op in ("sub", "cmp"):
        return _sub(a, b, 0, bits)
    if op == "sbb":
        return _sub(a, b, carry, bits)
    if op in ("and", "test"):
        return _logic(a & b, bits)
    if op == "or":
        return _logic(a | b, bits)
    if op == "xor":
        return _logic(a ^ b, bits)
    raise AssertionError(op)


def _shift(op: str, a: int, count: int, eflags: int, bits: int) -> tuple[int, int, int]:
    """Shifts and rotates; a masked count of 0 changes nothing."""
    mask = (1 << bits) - 1
    msb = bits - 1
    count &= 0x1F
    if count == 0:
        return a, 0, 0
    if op in ("shl", "sal"):
        src1 = a << (count - 1)
        r = (src1 << 1) & mask
        cf = (src1 >> msb) & 1
        of = ((src1 ^ r) >> msb) & 1
        return r, _szp(r, bits) | cf * CF | of * OF, STATUS_FLAGS
    if op in ("shr", "sar"):
        signed = a - (1 << bits) if (op == "sar" and a >> msb) else a
        src1 = signed >> (count - 1)
        r = (src1 >> 1) & mask
        cf = src1 & 1
        of = (((src1 & mask) ^ r) >> msb) & 1
        return r, _szp(r, bits) | cf * CF | of * OF, STATUS_FLAGS
    if op in ("rol", "ror"):
        n = count % bits
        r = ((a << n) | (a >> (bits - n))) & mask if op == "rol" else \
            ((a >> n) | (a << (bits - n))) & mask
        if op == "rol":
            cf = r & 1
            of = ((r >> msb) ^ cf) & 1
        else:
            cf = (r >> msb) & 1
            of = ((r >> msb) ^ (r >> (msb - 1))) & 1
        return r, cf * CF | of * OF, CF | OF
    if op in ("rcl", "rcr"):
        n = count % (bits + 1)
        if n == 0:
            return a, 0, 0
        wide = ((eflags & CF) << bits) | a  # bits+1 wide value, CF on top
        if op == "rcl":
            wide = ((wide << n) | (wide >> (bits + 1 - n))) & ((1 << (bits + 1)) - 1)
        else:
            wide = ((wide >> n) | (wide << (bits + 1 - n))) & ((1 << (bits + 1)) - 1)
        r = wide & mask
        cf = wide >> bits
        of = ((a ^ r) >> msb) & 1
        return r, cf * CF | of * OF, CF | OF
    raise AssertionError(op)


def _sext(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def _mul_flags(low: int, overflow: bool, bits: int) -> int:
    f = _szp(low, bits)  # undefined on Intel; QEMU derives them from the low half
    if overflow:
        f |= CF | OF
    return f


_ALU_OPS = frozenset({"add", "or", "adc", "sbb", "and", "sub", "xor", "cmp"})
_SHIFT_OPS = frozenset({"rol", "ror", "rcl", "rcr", "shl", "sal", "shr", "sar"})
_BT_OPS = frozenset({"bt", "bts", "btr", "btc"})
_STRING_OPS = {"movs": "movs", "lods": "lods", "stos": "stos", "cmps": "cmps", "scas": "scas"}
_SUPPORTED = (_ALU_OPS | _SHIFT_OPS | _BT_OPS
              | {"mov", "movzx", "movsx", "test", "inc", "dec", "neg", "not", "mul", "imul",
                 "div", "idiv", "xchg", "cmpxchg", "xadd", "push", "pop", "call", "jmp",
                 "lea", "nop"})


def _string_kind(mnemonic: str) -> str | None:
    stem = mnemonic[:-1]
    return _STRING_OPS.get(stem) if mnemonic[-1:] in ("b", "w", "d") else None


def supported(insn: Instruction) -> tuple[bool, str]:
    """Whether :func:`execute` can run ``insn`` (and why not)."""
    if insn.length_only:
        return False, f"no semantics for {insn.mnemonic.lstrip('?')} (length-only entry)"
    if insn.prefixes.address_size_override:
        return False, "16-bit address size (67 prefix) not supported"
    mn = insn.mnemonic
    if mn in ("push", "pop", "call", "jmp") and insn.memory is None:
        return False, f"{mn} without a memory operand is not emulated here"
    if mn == "mov" and "Sw" in insn.operands and insn.operands[0] == "Sw":
        return False, "mov to a segment register needs a descriptor load"
    if mn in _SUPPORTED or _string_kind(mn):
        return True, "ok"
    if insn.condition is not None and mn.startswith(("set", "cmov")):
        return True, "ok"
    return False, f"no semantics for {mn}"


def undefined_flags(insn: Instruction, count: int | None = None) -> int:
    """EFLAGS bits Intel leaves undefined for this instruction (and count)."""
    mn = insn.mnemonic
    if mn in ("and", "or", "xor", "test"):
        return AF
    if mn in ("shl", "sal", "shr", "sar"):
        return AF | (OF if count is None or (count & 0x1F) > 1 else 0)
    if mn in ("rol", "ror", "rcl", "rcr"):
        return OF if count is None or (count & 0x1F) > 1 else 0
    if mn in ("mul", "imul"):
        return SF | ZF | AF | PF
    if mn in ("div", "idiv"):
        return STATUS_FLAGS
    if mn in _BT_OPS:
        return OF | SF | AF | PF
    return 0


def effective_offset(insn: Instruction, read_reg: Callable[[str], int]) -> int | None:
    """Offset of the memory operand within its segment (None if no memory)."""
    if insn.memory is None:
        return None
    return insn.memory.offset(read_reg)


# --------------------------------------------------------------------------
# The executor.

class _Exec:
    """Buffers register writes; memory goes straight to the CPU, recorded."""

    def __init__(self, insn: Instruction, cpu: CPU):
        self.insn = insn
        self.cpu = cpu
        self.pending: dict[str, int] = {}
        self.accesses: list[MemoryAccess] = []
        self.osz = insn.operand_size
        self.bits = 8 * insn.operand_size
        self._offset: int | None = None
        self.committed: dict[str, int] = {}

    # registers ------------------------------------------------------------
    def r32(self, name: str) -> int:
        if name in self.pending:
            return self.pending[name]
        return self.cpu.read_reg(name) & 0xFFFFFFFF

    def reg(self, name: str) -> int:
        if name in REG32:
            return self.r32(name)
        if name in REG16:
            return self.r32(REG32[REG16.index(name)]) & 0xFFFF
        i = REG8.index(name)
        return (self.r32(REG32[i & 3]) >> (8 if i >= 4 else 0)) & 0xFF

    def set_reg(self, name: str, value: int) -> None:
        if name in REG32 or name in ("eflags", "eip"):
            self.pending[name] = value & 0xFFFFFFFF
        elif name in REG16:
            full = REG32[REG16.index(name)]
            self.pending[full] = (self.r32(full) & 0xFFFF0000) | (value & 0xFFFF)
        else:
            i = REG8.index(name)
            full, shift = REG32[i & 3], (8 if i >= 4 else 0)
            self.pending[full] = (self.r32(full) & ~(0xFF << shift) & 0xFFFFFFFF) | \
                ((value & 0xFF) << shift)

    def commit(self) -> None:
        for name, value in self.pending.items():
            self.cpu.write_reg(name, value)
            self.committed[name] = value
        self.pending.clear()

    def set_flags(self, bits: int, written: int) -> None:
        ef = self.r32("eflags")
        self.pending["eflags"] = (ef & ~written) | (bits & written)

    # memory ---------------------------------------------------------------
    def offset(self) -> int:
        if self._offset is None:
            self._offset = self.insn.memory.offset(self.r32)
        return self._offset

    def load(self, seg: str, off: int, size: int) -> int:
        off &= 0xFFFFFFFF
        v = self.cpu.read_mem(seg, off, size) & ((1 << (8 * size)) - 1)
        self.accesses.append(MemoryAccess(seg, off, size, "read", v))
        return v

    def store(self, seg: str, off: int, size: int, value: int) -> None:
        off &= 0xFFFFFFFF
        value &= (1 << (8 * size)) - 1
        self.cpu.write_mem(seg, off, size, value)
        self.accesses.append(MemoryAccess(seg, off, size, "write", value))

    # generic operands -----------------------------------------------------
    def size_of(self, code: str) -> int:
        if code == "AL":
            return 1
        if code == "eAX":
            return self.osz
        return operand_code_size(code, self.osz) or self.osz

    def read(self, code: str) -> int:
        insn = self.insn
        if code[0] in "EO":
            if insn.memory is not None:
                return self.load(insn.memory.segment, self.offset(), self.size_of(code))
            return self.reg(insn.rm_reg)
        if code[0] == "G" or code in ("AL", "eAX"):
            return self.reg(insn.reg)
        if code[0] == "I":
            return insn.immediate
        if code == "1":
            return 1
        if code == "CL":
            return self.reg("cl")
        if code == "Sw":
            return self.cpu.read_reg(insn.reg) & 0xFFFF
        raise UnsupportedInstruction(f"operand {code} of {insn.mnemonic}")

    def write(self, code: str, value: int) -> None:
        insn = self.insn
        if code[0] in "EO":
            if insn.memory is not None:
                self.store(insn.memory.segment, self.offset(), self.size_of(code), value)
            else:
                self.set_reg(insn.rm_reg, value)
        elif code[0] == "G" or code in ("AL", "eAX"):
            self.set_reg(insn.reg, value)
        else:
            raise UnsupportedInstruction(f"write to operand {code} of {insn.mnemonic}")

    # stack -----------------------------------------------------------------
    def push(self, value: int, size: int) -> None:
        esp = (self.r32("esp") - size) & 0xFFFFFFFF
        self.store("ss", esp, size, value)
        self.set_reg("esp", esp)


def execute(insn: Instruction, cpu: CPU) -> Effects:
    """Execute ``insn`` against ``cpu``; EIP is advanced (or set for call/jmp).

    Raises :class:`UnsupportedInstruction` or :class:`DivideError` before any
    effect; exceptions raised by the CPU's memory methods propagate.
    """
    ok, why = supported(insn)
    if not ok:
        raise UnsupportedInstruction(why)
    ex = _Exec(insn, cpu)
    eip = ex.r32("eip")
    next_eip = (eip + insn.length) & 0xFFFFFFFF
    kind = _string_kind(insn.mnemonic)
    if kind is not None:
        iterations = _string(ex, kind, next_eip)
        return Effects(tuple(ex.accesses), ex.committed.get("eip", eip), dict(ex.committed),
                       iterations)
    new_eip = _HANDLERS.get(insn.mnemonic, _dispatch_other)(ex, next_eip)
    ex.set_reg("eip", next_eip if new_eip is None else new_eip)
    ex.commit()
    return Effects(tuple(ex.accesses), ex.committed["eip"], dict(ex.committed))


# --------------------------------------------------------------------------
# Handlers: return a new EIP for control transfers, else None.

def _h_mov(ex: _Exec, _next: int):
    dst, src = ex.insn.operands[:2]
    ex.write(dst, ex.read(src))


def _h_movx(ex: _Exec, _next: int):
    dst, src = ex.insn.operands
    value = ex.read(src)
    if ex.insn.mnemonic == "movsx":
        value = _sext(value, 8 * ex.size_of(src))
    ex.write(dst, value)


def _h_alu(ex: _Exec, _next: int):
    insn = ex.insn
    dst, src = insn.operands[:2]
    a, b = ex.read(dst), ex.read(src)
    r, f, w = _alu(insn.mnemonic, a, b, ex.r32("eflags"), ex.bits)
    if insn.mnemonic not in ("cmp", "test"):
        ex.write(dst, r)
    ex.set_flags(f, w)


def _h_incdec(ex: _Exec, _next: int):
    a = ex.read("E")
    fn = _add if ex.insn.mnemonic == "inc" else _sub
    r, f, _ = fn(a, 1, 0, ex.bits)
    ex.write("E", r)
    ex.set_flags(f, STATUS_FLAGS & ~CF)


def _h_neg(ex: _Exec, _next: int):
    a = ex.read("E")
    r, f, w = _sub(0, a, 0, ex.bits)
    ex.write("E", r)
    ex.set_flags(f, w)


def _h_not(ex: _Exec, _next: int):
    ex.write("E", ~ex.read("E"))


def _acc_names(size: int) -> tuple[str, str]:
    """(low, high) halves of the implicit mul/div accumulator."""
    return {1: ("al", "ah"), 2: ("ax", "dx"), 4: ("eax", "edx")}[size]


def _h_mul(ex: _Exec, _next: int):
    insn, bits = ex.insn, ex.bits
    mask = (1 << bits) - 1
    if len(insn.operands) == 1:  # F6/F7 /4 /5: accumulator * r/m
        src = ex.read(insn.operands[0])
        lo_name, hi_name = _acc_names(ex.osz)
        acc = ex.reg("al" if bits == 8 else lo_name)
        if insn.mnemonic == "mul":
            full = acc * src
            overflow = (full >> bits) != 0
        else:
            full = _sext(acc, bits) * _sext(src, bits)
            overflow = full != _sext(full & mask, bits)
        low, high = full & mask, (full >> bits) & mask
        if bits == 8:
            ex.set_reg("ax", (high << 8) | low)
        else:
            ex.set_reg(lo_name, low)
            ex.set_reg(hi_name, high)
    else:  # imul Gv, Ev[, imm]
        a = ex.read(insn.operands[1])
        b = ex.read(insn.operands[2]) if len(insn.operands) == 3 else ex.reg(insn.reg)
        full = _sext(a, bits) * _sext(b, bits)
        low = full & mask
        overflow = full != _sext(low, bits)
        ex.write(insn.operands[0], low)
    ex.set_flags(_mul_flags(low, overflow, bits), STATUS_FLAGS)


def _h_div(ex: _Exec, _next: int):
    bits = ex.bits
    mask = (1 << bits) - 1
    divisor = ex.read("E")
    lo_name, hi_name = _acc_names(ex.osz)
    if bits == 8:
        dividend = ex.reg("ax")
    else:
        dividend = (ex.reg(hi_name) << bits) | ex.reg(lo_name)
    if divisor == 0:
        raise DivideError("divide by zero")
    if ex.insn.mnemonic == "div":
        q, r = divmod(dividend, divisor)
        if q > mask:
            raise DivideError("quotient overflow")
    else:
        n, d = _sext(dividend, 2 * bits), _sext(divisor, bits)
        q = abs(n) // abs(d)
        if (n < 0) != (d < 0):
            q = -q
        r = n - q * d  # remainder has the dividend's sign
        if not -(1 << (bits - 1)) <= q < (1 << (bits - 1)):
            raise DivideError("quotient overflow")
    if bits == 8:
        ex.set_reg("ax", ((r & 0xFF) << 8) | (q & 0xFF))
    else:
        ex.set_reg(lo_name, q & mask)
        ex.set_reg(hi_name, r & mask)


def _h_xchg(ex: _Exec, _next: int):
    a, b = ex.insn.operands[:2]
    va, vb = ex.read(a), ex.read(b)
    ex.write(a, vb)
    ex.write(b, va)


def _h_cmpxchg(ex: _Exec, _next: int):
    acc_name = {1: "al", 2: "ax", 4: "eax"}[ex.osz]
    dest = ex.read("E")
    acc = ex.reg(acc_name)
    _, f, w = _sub(acc, dest, 0, ex.bits)
    if acc == dest:
        ex.write("E", ex.read("G"))
    else:
        ex.write("E", dest)  # the locked cycle always writes back (SDM CMPXCHG)
        ex.set_reg(acc_name, dest)
    ex.set_flags(f, w)


def _h_xadd(ex: _Exec, _next: int):
    dest, src = ex.read("E"), ex.read("G")
    r, f, w = _add(dest, src, 0, ex.bits)
    ex.write("E", r)
    if ex.insn.memory is not None or ex.insn.rm_reg != ex.insn.reg:
        ex.set_reg(ex.insn.reg, dest)
    ex.set_flags(f, w)


def _h_push(ex: _Exec, _next: int):
    ex.push(ex.read("E"), ex.osz)


def _h_pop(ex: _Exec, _next: int):
    esp = ex.r32("esp")
    value = ex.load("ss", esp, ex.osz)
    ex.set_reg("esp", esp + ex.osz)  # the EA is computed with the incremented ESP
    ex.write("E", value)


def _h_call(ex: _Exec, next_eip: int):
    target = ex.read("E")
    ex.push(next_eip, ex.osz)
    return target


def _h_jmp(ex: _Exec, _next: int):
    return ex.read("E")


def _h_lea(ex: _Exec, _next: int):
    ex.set_reg(ex.insn.reg, ex.offset())


def _h_nop(ex: _Exec, _next: int):
    return None


def _h_shift(ex: _Exec, _next: int):
    insn = ex.insn
    count = ex.read(insn.operands[1])
    a = ex.read(insn.operands[0])
    r, f, w = _shift(insn.mnemonic, a, count, ex.r32("eflags"), ex.bits)
    if w:  # count 0: no write at all (registers), but memory is still written
        ex.set_flags(f, w)
    ex.write(insn.operands[0], r)


def _h_bt(ex: _Exec, _next: int):
    insn, bits = ex.insn, ex.bits
    src_code = insn.operands[1]
    bit_offset = ex.read(src_code)
    seg = off = None
    if insn.memory is not None and src_code[0] == "G":
        # Register bit offset: signed, may address memory outside the operand.
        signed = _sext(bit_offset, bits)
        log2_bits = {2: 4, 4: 5}[ex.osz]
        seg, off = insn.memory.segment, ex.offset() + (signed >> log2_bits) * ex.osz
        bit = signed & (bits - 1)
        value = ex.load(seg, off, ex.osz)
    else:
        bit = bit_offset & (bits - 1)
        value = ex.read(insn.operands[0])
    cf = (value >> bit) & 1
    mn = insn.mnemonic
    if mn != "bt":
        new = {"bts": value | (1 << bit), "btr": value & ~(1 << bit),
               "btc": value ^ (1 << bit)}[mn]
        if seg is not None:
            ex.store(seg, off, ex.osz, new)
        else:
            ex.write(insn.operands[0], new)
    ex.set_flags(cf * CF, CF)


def _dispatch_other(ex: _Exec, next_eip: int):
    mn = ex.insn.mnemonic
    if mn.startswith("set"):
        ex.write("Eb", int(condition_holds(ex.insn.condition, ex.r32("eflags"))))
        return None
    if mn.startswith("cmov"):
        value = ex.read("Ev")  # the source is read (and may fault) either way
        if condition_holds(ex.insn.condition, ex.r32("eflags")):
            ex.write("Gv", value)
        return None
    raise UnsupportedInstruction(f"no semantics for {mn}")


_HANDLERS: dict[str, Callable[[_Exec, int], int | None]] = {
    "mov": _h_mov, "movzx": _h_movx, "movsx": _h_movx,
    **{op: _h_alu for op in _ALU_OPS}, "test": _h_alu,
    "inc": _h_incdec, "dec": _h_incdec, "neg": _h_neg, "not": _h_not,
    "mul": _h_mul, "imul": _h_mul, "div": _h_div, "idiv": _h_div,
    "xchg": _h_xchg, "cmpxchg": _h_cmpxchg, "xadd": _h_xadd,
    "push": _h_push, "pop": _h_pop, "call": _h_call, "jmp": _h_jmp,
    "lea": _h_lea, "nop": _h_nop,
    **{op: _h_shift for op in _SHIFT_OPS},
    **{op: _h_bt for op in _BT_OPS},
}


# --------------------------------------------------------------------------
# String instructions: source seg:[esi] (overridable), destination es:[edi].

def _string(ex: _Exec, kind: str, next_eip: int) -> int:
    insn = ex.insn
    size = insn.operand_size
    bits = 8 * size
    acc = {1: "al", 2: "ax", 4: "eax"}[size]
    src_seg = insn.prefixes.segment_override or "ds"
    repeated = insn.prefixes.rep or insn.prefixes.repne
    step = -size if ex.r32("eflags") & DF else size
    done = 0
    while True:
        if repeated and ex.r32("ecx") == 0:
            break
        esi, edi = ex.r32("esi"), ex.r32("edi")
        if kind == "movs":
            ex.store("es", edi, size, ex.load(src_seg, esi, size))
        elif kind == "stos":
            ex.store("es", edi, size, ex.reg(acc))
        elif kind == "lods":
            ex.set_reg(acc, ex.load(src_seg, esi, size))
        elif kind == "cmps":
            a = ex.load(src_seg, esi, size)
            b = ex.load("es", edi, size)
            _, f, w = _sub(a, b, 0, bits)
            ex.set_flags(f, w)
        elif kind == "scas":
            b = ex.load("es", edi, size)
            _, f, w = _sub(ex.reg(acc), b, 0, bits)
            ex.set_flags(f, w)
        if kind in ("movs", "lods", "cmps"):
            ex.set_reg("esi", esi + step)
        if kind in ("movs", "stos", "cmps", "scas"):
            ex.set_reg("edi", edi + step)
        done += 1
        if not repeated:
            break
        ex.set_reg("ecx", ex.r32("ecx") - 1)
        ex.commit()  # per-iteration architectural state (interruptible rep)
        if kind in ("cmps", "scas"):
            zf = bool(ex.r32("eflags") & ZF)
            if (insn.prefixes.rep and not zf) or (insn.prefixes.repne and zf):
                break
    ex.set_reg("eip", next_eip)
    ex.commit()
    return done
