"""Which segment register each memory access of an instruction goes through.

A `%gs` prefix names the segment of an instruction's *explicit* operand only.
Its implicit accesses keep theirs: the stack through %ss (push, pop, call,
ret, enter, leave, pushf, popf, pusha, popa, iret) and string destinations
through %es (movs, stos, ins, scas, cmps' second operand). The machine checks
each access against the descriptor of the register it really uses, so
``gs stosd`` with a TLS selector in %es is judged by %es, not %gs (the
adversarial test found that judging it by the prefix let a write reach the
hypervisor hole).
"""

from __future__ import annotations

from dataclasses import dataclass

from tlslab.x86.decode import DecodeError, Instruction

SEGMENT_NUMBERS = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}
SEGMENT_NAMES = {v: k for k, v in SEGMENT_NUMBERS.items()}

_STACK_WRITES = {"push", "pushal", "pushad", "pusha", "pushfd", "pushf", "pushfw", "pushw"}
_STACK_READS = {"pop", "popal", "popad", "popa", "popfd", "popf", "popfw", "popw", "ret", "retf", "leave",
                "iret", "iretd"}
_STRING = ("movs", "stos", "lods", "cmps", "scas", "ins", "outs")
# read-modify-write of the explicit operand (when it is the destination): the
# CPU checks write permission before reading, so a read-only segment faults at
# the read -- which is also where Unicorn can stop every instruction precisely
_READ_MODIFY_WRITE = {"add", "or", "adc", "sbb", "and", "sub", "xor", "inc", "dec", "neg", "not", "xchg",
                      "cmpxchg", "cmpxchg8b", "xadd", "shl", "sal", "shr", "sar", "rol", "ror", "rcl", "rcr",
                      "bts", "btr", "btc", "shld", "shrd"}


@dataclass(frozen=True)
class SegmentUsage:
    """Segment registers used: for reads, for writes, and a second read (cmps) if any."""

    prefix: str | None          # fs/gs override, for reporting and statistics
    read: str
    write: str
    second_read: str | None = None
    read_modify_write: bool = False  # the explicit operand is read, then written

    def pack(self) -> int:
        """The 16-bit form the C fast path stores per site (15 = none)."""
        prefix = SEGMENT_NUMBERS[self.prefix] if self.prefix in ("fs", "gs") else 0
        second = SEGMENT_NUMBERS[self.second_read] if self.second_read else 15
        return (prefix | SEGMENT_NUMBERS[self.read] << 4 | SEGMENT_NUMBERS[self.write] << 8 | second << 12
                | int(self.read_modify_write) << 16)


def _string_kind(mnemonic: str) -> str | None:
    for kind in _STRING:
        if mnemonic.startswith(kind):
            return kind
    return None


def segment_usage(insn: Instruction | DecodeError, prefix_fallback: str | None = None) -> SegmentUsage:
    """Segment registers of each access ``insn`` makes (``DecodeError``: the prefix, else ds)."""
    if isinstance(insn, DecodeError):
        seg = prefix_fallback or "ds"
        return SegmentUsage(prefix_fallback, seg, seg)
    prefix = insn.prefixes.segment_override
    explicit = insn.memory.segment if insn.memory is not None else (prefix or "ds")
    mnemonic = insn.mnemonic
    kind = _string_kind(mnemonic)
    if kind == "movs":
        return SegmentUsage(prefix, explicit, "es")
    if kind in ("stos", "ins"):
        return SegmentUsage(prefix, "es", "es")
    if kind == "scas":
        return SegmentUsage(prefix, "es", "es")
    if kind == "cmps":
        return SegmentUsage(prefix, explicit, explicit, second_read="es")
    if kind in ("lods", "outs"):
        return SegmentUsage(prefix, explicit, explicit)
    if mnemonic == "enter":
        return SegmentUsage(prefix, "ss", "ss")
    if mnemonic in _STACK_WRITES or mnemonic == "call":
        # push/call through memory read their operand explicitly, write the stack
        return SegmentUsage(prefix, explicit if insn.memory is not None else "ss", "ss")
    if mnemonic in _STACK_READS:
        # pop to memory reads the stack and writes its operand
        return SegmentUsage(prefix, "ss", explicit if insn.memory is not None else "ss")
    rmw = (insn.memory is not None and mnemonic.lstrip("?") in _READ_MODIFY_WRITE
           and bool(insn.operands) and insn.operands[0][:1] in ("E", "M"))
    return SegmentUsage(prefix, explicit, explicit, read_modify_write=rmw)
