"""IA-32 opcode tables for the decoder (32-bit protected mode only).

Each entry is written the way the Intel SDM opcode map (vol. 2, appendix A)
writes it: a mnemonic plus operand codes.  Everything the decoder needs --
whether a ModRM byte follows, how many immediate bytes, operand and memory
sizes -- is *derived* from those codes, so the table stays one line per
opcode and can be checked against the manual by eye.

Operand codes (SDM A.2, with two local additions):

  E?  ModRM r/m (register or memory)     G?  ModRM reg field, general register
  M?  ModRM r/m, memory only             Z?  register in opcode bits 2:0
  I?  immediate                          Ibs imm8 sign-extended to operand size
  J?  relative branch displacement       O?  moffs (absolute offset, no ModRM)
  X?  string source  seg:[esi]           Y?  string destination es:[edi]
  Ap  far pointer (ptr16:32)             Sw  segment register in ModRM reg
  AL, eAX, CL, DX, 1, and lowercase segment names (push es): fixed operands

Size letters: b=1, w=2, d=4, v=2/4 by operand-size prefix, z=2/4 (immediate
never 8 bytes), p=far pointer (6 or 4), q=8, x=unknown/vector (length-only).

Entries whose mnemonic starts with "?" are *length-only*: the decoder knows
their length and memory operand (so the rewrite strategy can relocate them and
the sweep test can validate them), but they have no semantics (x87, SSE,
system instructions).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "OpcodeEntry",
    "ONE_BYTE",
    "TWO_BYTE",
    "GROUPS",
    "PREFIX_BYTES",
    "SEGMENT_PREFIXES",
    "CONDITION_CODES",
    "REG32",
    "REG16",
    "REG8",
    "SEGMENT_REGS",
    "THREE_BYTE_IMM8",
]

REG32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
REG16 = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di")
REG8 = ("al", "cl", "dl", "bl", "ah", "ch", "dh", "bh")
SEGMENT_REGS = ("es", "cs", "ss", "ds", "fs", "gs")

SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
PREFIX_BYTES = frozenset(SEGMENT_PREFIXES) | {0x66, 0x67, 0xF0, 0xF2, 0xF3}

#: Condition-code suffixes in encoding order (tttn), capstone spelling.
CONDITION_CODES = ("o", "no", "b", "ae", "e", "ne", "be", "a",
                   "s", "ns", "p", "np", "l", "ge", "le", "g")

_MEMORY_CODES = ("E", "M", "O", "X", "Y")


@dataclass(frozen=True)
class OpcodeEntry:
    """One decodable opcode (or one /reg slot of an opcode group)."""

    mnemonic: str
    operands: tuple[str, ...]

    @property
    def length_only(self) -> bool:
        return self.mnemonic.startswith("?")

    @property
    def has_modrm(self) -> bool:
        return any(op[0] in "EGMS" for op in self.operands)

    @property
    def memory_only(self) -> bool:
        """ModRM.mod == 3 is invalid (lea, far pointers, cmpxchg8b...)."""
        return any(op[0] == "M" for op in self.operands)

    @property
    def rm_operand(self) -> str | None:
        for op in self.operands:
            if op[0] in "EM":
                return op
        return None

    @property
    def memory_operand(self) -> str | None:
        """The operand code that names memory (E/M/O/X/Y), if any."""
        for op in self.operands:
            if op[0] in _MEMORY_CODES:
                return op
        return None


def _e(mnemonic: str, operands: str = "") -> OpcodeEntry:
    return OpcodeEntry(mnemonic, tuple(o for o in operands.split(",") if o))


def _build_one_byte() -> dict[int, OpcodeEntry]:
    t: dict[int, OpcodeEntry] = {}
    # 00-3F: the eight classic ALU ops, six forms each (SDM table A-2 rows 0-3).
    for i, mn in enumerate(("add", "or", "adc", "sbb", "and", "sub", "xor", "cmp")):
        base = i * 8
        for off, ops in enumerate(("Eb,Gb", "Ev,Gv", "Gb,Eb", "Gv,Ev", "AL,Ib", "eAX,Iz")):
            t[base + off] = _e(mn, ops)
    t[0x06], t[0x07] = _e("push", "es"), _e("pop", "es")
    t[0x0E] = _e("push", "cs")
    t[0x16], t[0x17] = _e("push", "ss"), _e("pop", "ss")
    t[0x1E], t[0x1F] = _e("push", "ds"), _e("pop", "ds")
    t[0x27], t[0x2F], t[0x37], t[0x3F] = _e("daa"), _e("das"), _e("aaa"), _e("aas")
    for r in range(8):
        t[0x40 + r] = _e("inc", "Zv")
        t[0x48 + r] = _e("dec", "Zv")
        t[0x50 + r] = _e("push", "Zv")
        t[0x58 + r] = _e("pop", "Zv")
        t[0x90 + r] = _e("xchg", "Zv,eAX")
        t[0xB0 + r] = _e("mov", "Zb,Ib")
        t[0xB8 + r] = _e("mov", "Zv,Iv")
    t[0x90] = _e("nop")
    t[0x60], t[0x61] = _e("pushal"), _e("popal")
    t[0x62] = _e("bound", "Gv,Mq")
    t[0x63] = _e("arpl", "Ew,Gw")
    t[0x68] = _e("push", "Iz")
    t[0x69] = _e("imul", "Gv,Ev,Iz")
    t[0x6A] = _e("push", "Ibs")
    t[0x6B] = _e("imul", "Gv,Ev,Ibs")
    t[0x6C], t[0x6D] = _e("insb", "Yb,DX"), _e("insd", "Yz,DX")
    t[0x6E], t[0x6F] = _e("outsb", "DX,Xb"), _e("outsd", "DX,Xz")
    for cc in range(16):
        t[0x70 + cc] = _e("j" + CONDITION_CODES[cc], "Jb")
    t[0x84], t[0x85] = _e("test", "Eb,Gb"), _e("test", "Ev,Gv")
    t[0x86], t[0x87] = _e("xchg", "Eb,Gb"), _e("xchg", "Ev,Gv")
    t[0x88], t[0x89] = _e("mov", "Eb,Gb"), _e("mov", "Ev,Gv")
    t[0x8A], t[0x8B] = _e("mov", "Gb,Eb"), _e("mov", "Gv,Ev")
    t[0x8C] = _e("mov", "Ew,Sw")
    t[0x8D] = _e("lea", "Gv,M")
    t[0x8E] = _e("mov", "Sw,Ew")
    t[0x98], t[0x99] = _e("cwde"), _e("cdq")
    t[0x9A] = _e("lcall", "Ap")
    t[0x9B] = _e("wait")
    t[0x9C], t[0x9D] = _e("pushfd"), _e("popfd")
    t[0x9E], t[0x9F] = _e("sahf"), _e("lahf")
    t[0xA0], t[0xA1] = _e("mov", "AL,Ob"), _e("mov", "eAX,Ov")
    t[0xA2], t[0xA3] = _e("mov", "Ob,AL"), _e("mov", "Ov,eAX")
    t[0xA4], t[0xA5] = _e("movsb", "Yb,Xb"), _e("movsd", "Yv,Xv")
    t[0xA6], t[0xA7] = _e("cmpsb", "Xb,Yb"), _e("cmpsd", "Xv,Yv")
    t[0xA8], t[0xA9] = _e("test", "AL,Ib"), _e("test", "eAX,Iz")
    t[0xAA], t[0xAB] = _e("stosb", "Yb,AL"), _e("stosd", "Yv,eAX")
    t[0xAC], t[0xAD] = _e("lodsb", "AL,Xb"), _e("lodsd", "eAX,Xv")
    t[0xAE], t[0xAF] = _e("scasb", "AL,Yb"), _e("scasd", "eAX,Yv")
    t[0xC2], t[0xC3] = _e("ret", "Iw"), _e("ret")
    t[0xC4], t[0xC5] = _e("les", "Gv,Mp"), _e("lds", "Gv,Mp")
    t[0xC8] = _e("enter", "Iw,Ib")
    t[0xC9] = _e("leave")
    t[0xCA], t[0xCB] = _e("retf", "Iw"), _e("retf")
    t[0xCC], t[0xCD], t[0xCE], t[0xCF] = _e("int3"), _e("int", "Ib"), _e("into"), _e("iretd")
    t[0xD4], t[0xD5] = _e("aam", "Ib"), _e("aad", "Ib")
    t[0xD6], t[0xD7] = _e("salc"), _e("xlatb")
    for esc in range(0xD8, 0xE0):  # x87 escape: ModRM, never an immediate
        t[esc] = _e("?x87", "Ex")
    t[0xE0], t[0xE1], t[0xE2], t[0xE3] = (_e("loopne", "Jb"), _e("loope", "Jb"),
                                          _e("loop", "Jb"), _e("jecxz", "Jb"))
    t[0xE4], t[0xE5] = _e("in", "AL,Ib"), _e("in", "eAX,Ib")
    t[0xE6], t[0xE7] = _e("out", "Ib,AL"), _e("out", "Ib,eAX")
    t[0xE8], t[0xE9] = _e("call", "Jz"), _e("jmp", "Jz")
    t[0xEA], t[0xEB] = _e("ljmp", "Ap"), _e("jmp", "Jb")
    t[0xEC], t[0xED] = _e("in", "AL,DX"), _e("in", "eAX,DX")
    t[0xEE], t[0xEF] = _e("out", "DX,AL"), _e("out", "DX,eAX")
    t[0xF1], t[0xF4], t[0xF5] = _e("int1"), _e("hlt"), _e("cmc")
    t[0xF8], t[0xF9], t[0xFA], t[0xFB] = _e("clc"), _e("stc"), _e("cli"), _e("sti")
    t[0xFC], t[0xFD] = _e("cld"), _e("std")
    return t


def _group(*slots: str | None) -> tuple[OpcodeEntry | None, ...]:
    """Eight /reg slots, each 'mnemonic operands' or None (invalid -> #UD)."""
    out = []
    for s in slots:
        if s is None:
            out.append(None)
        else:
            mn, _, ops = s.partition(" ")
            out.append(_e(mn, ops))
    return tuple(out)


_ALU = ("add", "or", "adc", "sbb", "and", "sub", "xor", "cmp")
_SHIFT = ("rol", "ror", "rcl", "rcr", "shl", "shr", "sal", "sar")

#: Opcode groups selected by ModRM.reg (SDM table A-6).  Keys are the opcode
#: as an int (one-byte) or 0x0Fxx (two-byte).
GROUPS: dict[int, tuple[OpcodeEntry | None, ...]] = {
    0x80: _group(*(f"{m} Eb,Ib" for m in _ALU)),
    0x81: _group(*(f"{m} Ev,Iz" for m in _ALU)),
    0x82: _group(*(f"{m} Eb,Ib" for m in _ALU)),  # 80 alias, invalid in 64-bit mode
    0x83: _group(*(f"{m} Ev,Ibs" for m in _ALU)),
    0x8F: _group("pop Ev", None, None, None, None, None, None, None),
    0xC0: _group(*(f"{m} Eb,Ib" for m in _SHIFT)),
    0xC1: _group(*(f"{m} Ev,Ib" for m in _SHIFT)),
    0xC6: _group("mov Eb,Ib", None, None, None, None, None, None, None),
    0xC7: _group("mov Ev,Iz", None, None, None, None, None, None, None),
    0xD0: _group(*(f"{m} Eb,1" for m in _SHIFT)),
    0xD1: _group(*(f"{m} Ev,1" for m in _SHIFT)),
    0xD2: _group(*(f"{m} Eb,CL" for m in _SHIFT)),
    0xD3: _group(*(f"{m} Ev,CL" for m in _SHIFT)),
    0xF6: _group("test Eb,Ib", "test Eb,Ib", "not Eb", "neg Eb",
                 "mul Eb", "imul Eb", "div Eb", "idiv Eb"),
    0xF7: _group("test Ev,Iz", "test Ev,Iz", "not Ev", "neg Ev",
                 "mul Ev", "imul Ev", "div Ev", "idiv Ev"),
    0xFE: _group("inc Eb", "dec Eb", None, None, None, None, None, None),
    0xFF: _group("inc Ev", "dec Ev", "call Ev", "lcall Mp",
                 "jmp Ev", "ljmp Mp", "push Ev", None),
    0x0F00: _group("?sldt Ew", "?str Ew", "?lldt Ew", "?ltr Ew",
                   "?verr Ew", "?verw Ew", None, None),
    0x0F01: _group("?sgdt M", "?sidt M", "?lgdt M", "?lidt M",
                   "?smsw Ew", None, "?lmsw Ew", "?invlpg M"),
    0x0F18: _group("?prefetchnta M", "?prefetcht0 M", "?prefetcht1 M", "?prefetcht2 M",
                   "?nop Ev", "?nop Ev", "?nop Ev", "?nop Ev"),
    0x0FAE: _group("?fxsave Ex", "?fxrstor Ex", "?ldmxcsr Ex", "?stmxcsr Ex",
                   "?xsave Ex", "?lfence Ex", "?mfence Ex", "?sfence Ex"),
    0x0FBA: _group(None, None, None, None, "bt Ev,Ib", "bts Ev,Ib", "btr Ev,Ib", "btc Ev,Ib"),
    0x0FC7: _group(None, "?cmpxchg8b Mq", None, None, None, None, "?rdrand Ex", "?rdseed Ex"),
}


def _build_two_byte() -> dict[int, OpcodeEntry]:
    """0F xx opcodes; keys are the second byte."""
    t: dict[int, OpcodeEntry] = {}
    t[0x05], t[0x06], t[0x07] = _e("?syscall"), _e("?clts"), _e("?sysret")
    t[0x0B] = _e("ud2")
    t[0x0D] = _e("?prefetch", "M")
    for op in range(0x19, 0x20):  # hint-nop space; 0F 1F /0 is the long NOP
        t[op] = _e("nop", "Ev")
    t[0x1E] = _e("?hint_nop", "Ev")  # endbr32 = F3 0F 1E FB
    t[0x31], t[0xA2] = _e("?rdtsc"), _e("?cpuid")
    t[0x34], t[0x35] = _e("?sysenter"), _e("?sysexit")
    for cc in range(16):
        t[0x40 + cc] = _e("cmov" + CONDITION_CODES[cc], "Gv,Ev")
        t[0x80 + cc] = _e("j" + CONDITION_CODES[cc], "Jz")
        t[0x90 + cc] = _e("set" + CONDITION_CODES[cc], "Eb")
    t[0xA0], t[0xA1] = _e("push", "fs"), _e("pop", "fs")
    t[0xA8], t[0xA9] = _e("push", "gs"), _e("pop", "gs")
    t[0xA3], t[0xAB] = _e("bt", "Ev,Gv"), _e("bts", "Ev,Gv")
    t[0xB3], t[0xBB] = _e("btr", "Ev,Gv"), _e("btc", "Ev,Gv")
    t[0xA4], t[0xA5] = _e("shld", "Ev,Gv,Ib"), _e("shld", "Ev,Gv,CL")
    t[0xAC], t[0xAD] = _e("shrd", "Ev,Gv,Ib"), _e("shrd", "Ev,Gv,CL")
    t[0xAF] = _e("imul", "Gv,Ev")
    t[0xB0], t[0xB1] = _e("cmpxchg", "Eb,Gb"), _e("cmpxchg", "Ev,Gv")
    t[0xB2], t[0xB4], t[0xB5] = _e("lss", "Gv,Mp"), _e("lfs", "Gv,Mp"), _e("lgs", "Gv,Mp")
    t[0xB6], t[0xB7] = _e("movzx", "Gv,Eb"), _e("movzx", "Gv,Ew")
    t[0xBE], t[0xBF] = _e("movsx", "Gv,Eb"), _e("movsx", "Gv,Ew")
    t[0xB8] = _e("?popcnt", "Gv,Ev")
    t[0xBC], t[0xBD] = _e("bsf", "Gv,Ev"), _e("bsr", "Gv,Ev")  # tzcnt/lzcnt with F3
    t[0xC0], t[0xC1] = _e("xadd", "Eb,Gb"), _e("xadd", "Ev,Gv")
    for r in range(8):
        t[0xC8 + r] = _e("bswap", "Zd")
    # SSE/MMX: ModRM, length-only.  Immediate-carrying ones listed explicitly.
    sse_modrm = (list(range(0x10, 0x18)) + list(range(0x28, 0x30)) + list(range(0x50, 0x70))
                 + list(range(0x74, 0x78)) + list(range(0x7C, 0x80)) + [0xC3]
                 + list(range(0xD0, 0x100)))
    for op in sse_modrm:
        t[op] = _e("?sse", "Ex,Gx")
    t[0x77] = _e("?emms")
    t[0xFF] = _e("ud0", "Gd,Ed")
    for op in (0x70, 0xC2, 0xC4, 0xC5, 0xC6):
        t[op] = _e("?sse", "Ex,Gx,Ib")
    for op in (0x71, 0x72, 0x73):  # shift-by-immediate groups, register forms
        t[op] = _e("?sse", "Ex,Ib")
    return t


ONE_BYTE: dict[int, OpcodeEntry] = _build_one_byte()
TWO_BYTE: dict[int, OpcodeEntry] = _build_two_byte()

#: Three-byte maps 0F 38 xx (ModRM, no immediate) and 0F 3A xx (ModRM + imm8):
#: SSSE3/SSE4 -- decoded for length only.
THREE_BYTE_IMM8 = {0x38: False, 0x3A: True}
