"""Decode ahead from a faulting %gs access: how long is the same-sign run it starts, from guest code alone?

A fault-driven rule must guess whether the run of same-sign ``%gs`` accesses
that the faulting one starts is long enough to pay for a flip (``n > 2F/E``,
docs/online-strategies.md). The hypervisor does not have to guess blind: the
accesses that follow are in the guest's code, a few instructions on. Xen's
#GP handler already reads the faulting instruction from guest memory and the
registers from the trap frame (x86_emulate does both); :func:`walk` does
the same for the instructions after it, without executing anything:

* it decodes forward from the faulting instruction, following direct jumps and
  calls, both ways of every conditional branch, and ``ret`` to the address the
  stack holds (a word of guest memory, or one pushed on the way);
* it propagates constants through the registers (the fault-time values, then
  ``mov``/``lea``/``add``/``sub``/``and``/``or``/``xor``/``inc``/``dec``/
  ``push``/``pop``/``leave`` with known operands, and loads from guest memory at
  known addresses, such as a GOT slot holding a TLS offset); anything else a
  register receives is unknown;
* each ``%gs`` memory operand whose offset it can compute counts (same sign)
  or ends the path (the other sign); an operand it cannot compute, an indirect
  jump or call, a ``ret`` to an unknown address, an instruction it cannot
  decode, a loop back to an address already on the path, or the end of the
  budget (:data:`BUDGET` instructions over all paths) ends the path *unknown*;
* 16-bit stack operations and ``enter`` make the stack pointer unknown, a
  string store makes every later load unknown, and a store through a pointer
  it cannot compute is assumed not to hit a word it loads later.

The answer (:class:`Ahead`) is about the threshold ``2F/E`` the rule weighs:
``long`` when every path meets more than ``threshold`` accesses of this sign
(this one included) before anything ends it, so a flip pays for itself;
``short`` when every path reaches an access of the other sign within
``threshold`` of them, so emulating the whole run costs no more than a flip
and its flip back; ``unknown`` otherwise. A path is followed only as far as
its part of the answer needs (a path past the threshold is long; a path that
ends unknown, or a mix of long and short paths, settles the answer at once).
It is a prediction made from the code and the fault-time state, not a proof:
an interrupt, a signal or a store the walk does not see can change what runs.
A wrong prediction costs time, never correctness: the rule that uses it only
chooses between emulating and flipping, each of which is correct whatever
comes next.

This is the specification: the C walk (``_ahead.c``, :func:`tlslab.x86.core.lookahead`) must give
the same answer and the same count of decoded instructions for the same code, registers and
memory (``tests/test_ahead_differential.py``). Its name sets are compiled into the C tables
(:mod:`tlslab.x86.optable`), so the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decode import DecodeError, Instruction, MemoryOperand, decode
from .opcodes import REG8, REG16, REG32

#: instructions decoded ahead per fault, over all paths. Chosen, not fitted: a few basic blocks
#: and a call (docs/online-strategies.md gives the figures at 16 and 96 too)
BUDGET = 32
M32 = 0xFFFF_FFFF
MAX_INSN = 15

#: instructions after which the walk cannot say what runs (the decoder's spellings)
STOPS = frozenset({"hlt", "ud0", "ud2", "iretd", "int1", "int3", "into", "ljmp", "lcall", "retf", "bound",
                   "iret", "?syscall", "?sysenter", "?sysexit", "?sysret"})
ALU_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "and": lambda a, b: a & b,
        "or": lambda a, b: a | b, "xor": lambda a, b: a ^ b}
NO_REGISTER_WRITE = frozenset({"cmp", "test", "bt", "nop", "jmp", "call", "ret"})
#: registers an instruction writes without naming them as its destination
IMPLICIT_WRITES = {"mul": ("eax", "edx"), "imul": ("eax", "edx"), "div": ("eax", "edx"), "idiv": ("eax", "edx"),
             "cdq": ("edx",), "cwd": ("edx",), "cwde": ("eax",), "cbw": ("eax",), "int": ("eax",),
             "cmpxchg": ("eax",), "?cmpxchg8b": ("eax", "edx"),
             "loop": ("ecx",), "loope": ("ecx",), "loopne": ("ecx",), "jecxz": (), "popal": tuple(REG32),
             "lahf": ("eax",), "xlatb": ("eax",), "salc": ("eax",), "pushal": ("esp",), "pushfd": ("esp",),
             "popfd": ("esp",), "enter": ("esp", "ebp"),
             "pushaw": ("esp",), "popaw": tuple(REG32), "pushf": ("esp",), "popf": ("esp",)}
#: instructions whose memory operand is not an access (an address computed, a hint)
NOT_AN_ACCESS = frozenset({"lea", "nop", "?nop", "?hint_nop", "?prefetch", "?prefetchnta", "?prefetcht0",
                            "?prefetcht1", "?prefetcht2"})

LONG, SHORT, UNKNOWN = "long", "short", "unknown"


@dataclass(frozen=True)
class Ahead:
    """What decoding ahead says of the run an access starts (see the module docstring)."""

    verdict: str      # LONG, SHORT or UNKNOWN
    walked: int       # instructions decoded ahead
    reused: bool = False  # the answer of an earlier walk whose inputs all still read the same (nothing decoded)


def _full(name: str | None) -> str | None:
    if name in REG32:
        return name
    if name in REG16:
        return REG32[REG16.index(name)]
    if name in REG8:
        return REG32[REG8.index(name) & 3]
    return None


class _Inputs:
    """What the walk read of the guest, in order: registers at the fault, memory words. The specification
    of the C walker's memo (``_ahead.c``: ``memo_holds``): a later fault whose inputs all read the same
    (``still_hold``) gets the same answer; a walk that met code it could not decode (``code_missing``: it
    may be mapped later) is not kept."""

    def __init__(self, read_reg, read_word) -> None:
        self._read_reg = read_reg
        self._read_word = read_word
        self.registers: dict[str, int] = {}
        self.words: dict[int, int | None] = {}
        self.code_missing = False

    def register(self, name: str) -> int:
        if name not in self.registers:
            self.registers[name] = self._read_reg(name) & M32
        return self.registers[name]

    def word(self, address: int) -> int | None:
        if address not in self.words:
            self.words[address] = self._read_word(address)
        return self.words[address]

    def done(self) -> None:
        """Drop the readers (a memo entry must not keep a finished process's memory alive)."""
        self._read_reg = self._read_word = None

    def still_hold(self, read_reg, read_word) -> bool:
        return (all(read_reg(name) & M32 == value for name, value in self.registers.items())
                and all(read_word(address) == value for address, value in self.words.items()))


class _Path:
    """One path's state: registers written on it (None: unknown) and stack words stored on it."""

    __slots__ = ("inputs", "regs", "stored", "memory_unknown")

    def __init__(self, inputs: _Inputs, regs: dict, stored: dict, memory_unknown: bool = False) -> None:
        self.inputs, self.regs, self.stored = inputs, regs, stored
        self.memory_unknown = memory_unknown     # a store the walk cannot place happened (a string store)

    def fork(self) -> _Path:
        return _Path(self.inputs, dict(self.regs), dict(self.stored), self.memory_unknown)

    def reg(self, name: str | None) -> int | None:
        full = _full(name)
        if full is None or full != name:          # 8- and 16-bit halves are not tracked
            return None
        if full in self.regs:
            return self.regs[full]
        return self.inputs.register(full)

    def set_reg(self, name: str | None, value: int | None) -> None:
        full = _full(name)
        if full is not None:
            self.regs[full] = None if value is None or full != name else value & M32

    def address(self, mem: MemoryOperand) -> int | None:
        if mem.address_size != 32:
            return None
        value = mem.displacement
        for name, scale in ((mem.base, 1), (mem.index, mem.scale)):
            if name:
                r = self.reg(name)
                if r is None:
                    return None
                value += r * scale
        return value & M32

    def load(self, address: int) -> int | None:
        if address in self.stored:
            return self.stored[address]
        if self.memory_unknown:
            return None
        return self.inputs.word(address)

    def store(self, address: int, size: int, value: int | None) -> None:
        """A store of ``size`` bytes: every word it overlaps becomes unknown, then a 4-byte one is known."""
        for word in range(address - 3, address + size):
            self.stored[word & M32] = None
        if size == 4 and value is not None:
            self.stored[address] = value & M32

    def source(self, insn: Instruction, index: int) -> int | None:
        """The value of operand ``index`` of ``insn`` when it can be known."""
        if index >= len(insn.operands):
            return None
        kind = insn.operands[index][0]
        if kind == "I":
            return insn.immediate
        if kind in ("G", "Z") or insn.operands[index] in ("AL", "eAX"):
            return self.reg(insn.reg)
        if kind == "E":
            if insn.rm_reg:
                return self.reg(insn.rm_reg)
            if insn.memory is not None and insn.memory.segment not in ("fs", "gs") and insn.operand_size == 4:
                a = self.address(insn.memory)
                return None if a is None else self.load(a)
        return None


def _destination(insn: Instruction) -> str | None:
    """The register the first operand names (ModRM.reg, the opcode's, ModRM.rm, or the accumulator)."""
    first = insn.operands[0] if insn.operands else ""
    if first[:1] in ("G", "Z") or first in ("AL", "eAX"):
        return insn.reg
    if first[:1] == "E" and insn.rm_reg:
        return insn.rm_reg
    return None


def _apply(path: _Path, insn: Instruction) -> None:
    """``insn``'s effect on registers and stack words, as far as it can be known (else: unknown)."""
    m = insn.mnemonic
    regs = path.regs
    if m.startswith("?") and m not in NOT_AN_ACCESS:   # decoded for its length only: it may write anything
        for name in REG32:
            regs[name] = None
        return
    if insn.is_string:
        for name in ("ecx", "esi", "edi", "eax"):
            regs[name] = None
        if insn.operands and insn.operands[0][:1] == "Y":   # stos, movs: a store the walk does not place
            path.memory_unknown = True
        return
    for name in IMPLICIT_WRITES.get(m, ()):
        regs[name] = None
    dest = _destination(insn)
    if m in ("push", "pop", "leave") and insn.operand_size != 4:   # 16-bit stack operations: not followed
        regs["esp"] = None
        if m == "pop" and dest:
            path.set_reg(dest, None)
        if m == "leave":
            regs["ebp"] = None
        return
    if m == "push":
        esp = path.reg("esp")
        value = path.source(insn, 0)
        if esp is not None:
            regs["esp"] = (esp - 4) & M32
            path.store(regs["esp"], 4, value)
        return
    if m == "pop":
        esp = path.reg("esp")
        value = None
        if esp is not None:
            value = path.load(esp)
            regs["esp"] = (esp + 4) & M32
        else:
            regs["esp"] = None
        if dest:
            path.set_reg(dest, value)
        elif insn.memory is not None:                   # pop [mem]
            _memory_write(path, insn, value)
        return
    if m == "leave":
        ebp = path.reg("ebp")
        regs["esp"] = None if ebp is None else (ebp + 4) & M32
        regs["ebp"] = None if ebp is None else path.load(ebp)
        return
    if m in ("xchg", "xadd", "cmpxchg"):           # every register and word they name becomes unknown
        for name in (insn.reg, insn.rm_reg, "eax" if {"AL", "eAX"} & set(insn.operands) else None):
            if name:
                path.set_reg(name, None)
        if insn.memory is not None:
            _memory_write(path, insn, None)
        return
    if (m in NO_REGISTER_WRITE or (m in NOT_AN_ACCESS and m != "lea")
            or (insn.condition is not None and m.startswith("j"))):
        return
    if dest is None:
        if insn.memory is not None:                 # a store (or read-modify-write) to memory
            _memory_write(path, insn, path.source(insn, 1) if m == "mov" and insn.operand_size == 4 else None)
        return
    if insn.operand_size != 4:
        path.set_reg(dest, None)
        return
    if m == "mov":
        path.set_reg(dest, path.source(insn, 1))
    elif m == "lea":
        path.set_reg(dest, path.address(insn.memory) if insn.memory is not None else None)
    elif m in ALU_OPS:
        if m in ("xor", "sub") and insn.reg is not None and insn.reg == insn.rm_reg:
            path.set_reg(dest, 0)
        else:
            a, b = path.reg(dest), path.source(insn, 1)
            path.set_reg(dest, None if a is None or b is None else ALU_OPS[m](a, b))
    elif m in ("inc", "dec"):
        a = path.reg(dest)
        path.set_reg(dest, None if a is None else a + (1 if m == "inc" else -1))
    else:
        path.set_reg(dest, None)


def _memory_write(path: _Path, insn: Instruction, value: int | None) -> None:
    """``insn`` writes its memory operand: remember what it can of it (%fs/%gs stores are not the stack)."""
    if insn.memory.segment in ("fs", "gs"):
        return
    a = path.address(insn.memory)
    if a is None:
        return          # through an unknown pointer: not followed (a prediction, module docstring)
    path.store(a, insn.memory_size or insn.operand_size or 4, value)


def _gs_sign(insn: Instruction, path: _Path) -> int | None:
    """+1 / -1: the sign of ``insn``'s %gs offset; 0: it has one that cannot be computed; None: it has none
    (or its memory operand is not an access: lea, hint nops, prefetches)."""
    if insn.mnemonic in NOT_AN_ACCESS:
        return None
    for mem in (insn.memory, insn.memory2):
        if mem is not None and mem.segment == "gs":
            a = path.address(mem)
            return 0 if a is None else (-1 if a & 0x8000_0000 else 1)
    return None


def walk(code_at, read_reg, read_word, insn: Instruction, sign: int, threshold: float,
         budget: int = BUDGET) -> tuple[Ahead, _Inputs]:
    """Decode ahead from ``insn`` (the faulting access, offset of ``sign``): (answer, the inputs it read).

    ``code_at(address)``: the decoded instruction there (a DecodeError when none); ``read_reg(name)``: a
    32-bit register at the fault; ``read_word(address)``: the guest's 32-bit word there, None if unreadable.
    """
    inputs = _Inputs(read_reg, read_word)
    walked = 0
    seen_long = seen_short = False
    if insn.mnemonic in ("jmp", "call", "ret", "retf") or insn.branch_target is not None or insn.mnemonic in STOPS:
        return Ahead(UNKNOWN, 0), inputs            # the faulting instruction itself goes where the walk cannot
    first = _Path(inputs, {}, {})
    _apply(first, insn)
    pending = [((insn.address + insn.length) & M32, first, 1, set())]
    while pending:
        address, path, count, seen = pending.pop()
        end = UNKNOWN
        while True:
            if count > threshold:
                end = LONG
                break
            if walked >= budget or address in seen:
                break
            walked += 1
            seen.add(address)
            here = code_at(address)
            if isinstance(here, DecodeError):
                inputs.code_missing = True          # code that may be mapped later: not to be memoised
                break
            s = _gs_sign(here, path)
            if s is not None:
                if s == 0:
                    break
                if s != sign:
                    end = SHORT
                    break
                count += 1
            m = here.mnemonic
            after = (address + here.length) & M32
            if m in STOPS:
                break
            if m == "ret":
                esp = path.reg("esp")
                target = None if esp is None else path.load(esp)
                if target is None:
                    break
                path.regs["esp"] = (esp + 4 + (here.immediate or 0)) & M32
                address = target
                continue
            if m in ("call", "jmp"):
                if here.branch_target is None:      # indirect: where to is not known
                    break
                if m == "call":
                    esp = path.reg("esp")
                    if esp is not None:
                        path.regs["esp"] = (esp - 4) & M32
                        path.stored[path.regs["esp"]] = after
                address = here.branch_target & M32
                continue
            if here.branch_target is not None:      # conditional: both ways, the branch taken first
                _apply(path, here)
                pending.append((after, path.fork(), count, set(seen)))
                address = here.branch_target & M32
                continue
            _apply(path, here)
            address = after
        seen_long |= end == LONG
        seen_short |= end == SHORT
        if end == UNKNOWN or (seen_long and seen_short):
            return Ahead(UNKNOWN, walked), inputs
    return Ahead(LONG if seen_long else SHORT, walked), inputs
