"""Which instructions the historical (2004) implementations could handle.

Each predicate answers ``(handled, reason)`` for one instruction, given as
raw bytes or a decoded :class:`~tlslab.x86.decode.Instruction`.  They model
the *decoders* of the original code (our own code; the facts below were read
from the sources):

* ``emulate_2004_handles`` -- Xen ``xen/arch/x86/x86_32/emulate.c``
  (Keir Fraser, 2004), ``gpf_emulate_4gb``: scans at most four leading bytes
  for prefixes; LOCK (F0), REP/REPNE (F3/F2) and address-size (67) are
  refused ("Unhandleable prefix byte"), operand size (66) and any segment
  override are accepted.  Opcodes: mov 88/89/8A/8B, C6 /0, C7 /0; cmp
  38/39/3A/3B and 80/81/83 /7.  ``decode_effective_address`` refuses a SIB
  byte ("FIXME: Add decoding for the SIB byte") and mod == 3.  At run time it
  also requires a truncated 4 GB segment, a negative offset (top nibble 0xF:
  :func:`emulate_2004_offset_ok`) and a linear address below the hypervisor
  ("DISALLOWING UNSAFE ACCESS") -- those are the caller's checks.
  Bugs visible in that source (reported, not reproduced here): for 0x39
  (``cmp r/m32, r32``) the operand-order test is ``b == 0x38``, so the flags
  are those of ``cmp r32, r/m32`` (inverted); for ``66 83 /7`` EIP is advanced
  twice (once in the 16-bit branch, once after it).

* ``seg_fixup_decodes`` -- Xen ``xen/arch/x86/x86_32/seg_fixup.c``,
  ``gpf_emulate_4gb`` (the flip strategy): prefix scan up to 15 bytes, where
  67 and the cs/ds/es/fs/ss overrides fail ("Unhandled prefix"), 66/F0/F2/F3
  are skipped and 65 is *required* ("Only instructions with GS override").
  Then a 256-entry table (``insn_decode``) says whether the opcode is known,
  has ModRM, and its immediate size.  The original table (still so in the
  Xen 3.x tree we read, whose code is otherwise the same) knows, with ModRM:
  the ALU r/m forms 00-03, 08-0B, 10-13, 18-1B, 20-23, 28-2B, 30-33, 38-3B;
  69, 6B; 80-8E (not 8F); C0, C1, C6, C7; D0-D3; FE, FF; and without ModRM
  the moffs forms A0-A3.  No 0F two-byte opcodes, no F6/F7, and a SIB byte
  is refused ("FIXME: Add decoding for the SIB byte").  A later revision
  (``variant="later"``) added SIB decoding, a two-byte table, x87 escapes,
  F6/F7 and 8F, and marked 8D (lea) invalid.  Note: the vector-15
  notification's error code is the length *through the displacement*; the
  immediate is not counted (see :func:`seg_fixup_notify_length`).

* ``fixup_2004_handles`` -- XenLinux ``arch/xen/i386/kernel/fixup.c``
  (``do_fixup_4gb_segment``, the rewrite strategy): the *first* byte must be
  65 ("No GS override, or not a MOV"), the second byte an opcode in the
  ``handleable_code`` bitmap: 80-83, 89, 8B, C7; ModRM must be ``(reg)``
  (mod 0, rm != 4, 5) or ``disp8(reg)`` (mod 1, rm != 4) -- "We don't grok
  SIB bytes", "Unhandleable disp32 EA", "Unhandleable Mod value".  The
  following instructions that get relocated are sized by a second table
  (:func:`fixup_2004_following_length`).
"""

from __future__ import annotations

from .decode import DecodeError, Instruction, decode

__all__ = [
    "emulate_2004_handles",
    "emulate_2004_offset_ok",
    "seg_fixup_decodes",
    "seg_fixup_notify_length",
    "fixup_2004_handles",
    "fixup_2004_following_length",
]

Verdict = tuple[bool, str]


def _raw(insn: Instruction | bytes | bytearray) -> bytes:
    return bytes(insn.raw if isinstance(insn, Instruction) else insn)


def _decoded(insn: Instruction | bytes | bytearray) -> Instruction | DecodeError:
    return insn if isinstance(insn, Instruction) else decode(bytes(insn))


# --------------------------------------------------------------------------
# Xen emulate.c (2004)

#: opcode -> required ModRM.reg (None: any), per emulate.c's switch.
EMULATE_2004_OPCODES: dict[int, int | None] = {
    0x88: None, 0x89: None, 0x8A: None, 0x8B: None,  # mov r/m <-> r
    0xC6: 0, 0xC7: 0,                                # mov r/m, imm
    0x38: None, 0x39: None, 0x3A: None, 0x3B: None,  # cmp r/m, r / r, r/m
    0x80: 7, 0x81: 7, 0x83: 7,                       # cmp r/m, imm
}
_EMULATE_REFUSED_PREFIXES = {0xF0: "lock", 0xF2: "repne", 0xF3: "rep", 0x67: "address-size"}
_EMULATE_ACCEPTED_PREFIXES = {0x66, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65}
_EMULATE_PREFIX_WINDOW = 4  # for (i = 0; i < 4; i++): at most 3 prefixes + opcode


def emulate_2004_handles(insn: Instruction | bytes) -> Verdict:
    """Would Xen's 2004 emulate.c decode and emulate this instruction?"""
    raw = _raw(insn)
    i = 0
    while i < len(raw) and raw[i] in _EMULATE_ACCEPTED_PREFIXES | set(_EMULATE_REFUSED_PREFIXES):
        if raw[i] in _EMULATE_REFUSED_PREFIXES:
            return False, f"{_EMULATE_REFUSED_PREFIXES[raw[i]]} prefix ({raw[i]:02x}) refused"
        i += 1
    if i >= _EMULATE_PREFIX_WINDOW:
        return False, "more than 3 prefix bytes (prefix scan covers 4 bytes)"
    if i + 1 >= len(raw):
        return False, "truncated instruction"
    opcode, modrm = raw[i], raw[i + 1]
    if opcode not in EMULATE_2004_OPCODES:
        return False, f"opcode {opcode:02x} not emulated"
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        return False, "not a memory operand"
    if rm == 4:
        return False, "SIB addressing not decoded"
    wanted = EMULATE_2004_OPCODES[opcode]
    if wanted is not None and reg != wanted:
        return False, f"opcode {opcode:02x} /{reg} not emulated (only /{wanted})"
    return True, "ok"


def emulate_2004_offset_ok(offset: int) -> bool:
    """emulate.c only emulated -ve offsets: ``(offset & 0xf0000000) == 0xf0000000``."""
    return (offset & 0xF0000000) == 0xF0000000


# --------------------------------------------------------------------------
# Xen seg_fixup.c (flip)



def _seg_fixup_table(later: bool) -> dict[int, tuple[bool, int]]:
    """opcode -> (has ModRM, immediate bytes) for the one-byte table."""
    t: dict[int, tuple[bool, int]] = {}
    for row in (0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38):
        for op in range(row, row + 4):
            t[op] = (True, 0)
    t[0x69], t[0x6B] = (True, 4), (True, 1)
    t[0x80], t[0x81], t[0x82], t[0x83] = (True, 1), (True, 4), (True, 1), (True, 1)
    for op in range(0x84, 0x8F):
        t[op] = (True, 0)
    for op in (0xA0, 0xA1, 0xA2, 0xA3):
        t[op] = (False, 4)  # moffs32 (the '4' is the offset, not an immediate)
    t[0xC0], t[0xC1], t[0xC6], t[0xC7] = (True, 1), (True, 1), (True, 1), (True, 4)
    for op in (0xD0, 0xD1, 0xD2, 0xD3, 0xFE, 0xFF):
        t[op] = (True, 0)
    if later:
        del t[0x8D]                      # "X|M": lea never touches memory
        t[0x8F] = (True, 0)
        t[0xF6], t[0xF7] = (True, 0), (True, 0)
    return t


#: Later revision only: two-byte opcodes with ModRM (0F xx), from its
#: ``twobyte_decode`` table (0F A4/AC/BA carry an imm8).
_SEG_FIXUP_LATER_TWO_BYTE = (
    {0x18} | set(range(0x40, 0x50)) | set(range(0x90, 0xA0))
    | {0xA3, 0xA4, 0xA5, 0xA6, 0xAB, 0xAC, 0xAD, 0xAF, 0xB3, 0xB6, 0xB7, 0xBA, 0xBB, 0xBC,
       0xBD, 0xBE, 0xBF, 0xC0, 0xC1, 0xC3, 0xC7})
#: Later revision only: x87 escapes D8-DF by ModRM.reg that were refused.
_SEG_FIXUP_LATER_X87_REFUSED = {(0xD9, 1), (0xDB, 1), (0xDB, 4), (0xDB, 6), (0xDD, 5), (0xDF, 1)}

_SEG_FIXUP_TABLES = {"2004": _seg_fixup_table(False), "later": _seg_fixup_table(True)}
_SEG_FIXUP_BAD_PREFIXES = {0x67: "address-size", 0x2E: "cs", 0x3E: "ds", 0x26: "es",
                           0x64: "fs", 0x36: "ss"}
_SEG_FIXUP_SKIPPED_PREFIXES = {0x66, 0xF0, 0xF2, 0xF3}


def _seg_fixup_scan(raw: bytes, variant: str) -> tuple[bool, str, int]:
    """Run the seg_fixup decoder; returns (ok, reason, bytes through displacement)."""
    if variant not in _SEG_FIXUP_TABLES:
        raise ValueError(f"variant must be one of {sorted(_SEG_FIXUP_TABLES)}")
    later = variant == "later"
    gs = False
    pos = 0
    while True:
        if pos >= 15:
            return False, "too many prefixes for a legal instruction", 0
        if pos >= len(raw):
            return False, "truncated instruction", 0
        b = raw[pos]
        if b in _SEG_FIXUP_BAD_PREFIXES:
            return False, f"unhandled prefix {b:02x} ({_SEG_FIXUP_BAD_PREFIXES[b]})", 0
        if b == 0x65:
            gs = True
        elif b not in _SEG_FIXUP_SKIPPED_PREFIXES:
            break
        pos += 1
    if not gs:
        return False, "only instructions with a GS override", 0
    pos += 1
    if b == 0x0F:
        if not later:
            return False, "two-byte opcode 0f not in the decode table", 0
        if pos >= len(raw):
            return False, "truncated instruction", 0
        b2 = raw[pos]
        pos += 1
        if b2 not in _SEG_FIXUP_LATER_TWO_BYTE:
            return False, f"unsupported opcode 0f {b2:02x}", 0
        has_modrm = True
    elif later and 0xD8 <= b <= 0xDF:
        if pos >= len(raw):
            return False, "truncated instruction", 0
        if (b, (raw[pos] >> 3) & 7) in _SEG_FIXUP_LATER_X87_REFUSED:
            return False, f"unsupported x87 opcode {b:02x} /{(raw[pos] >> 3) & 7}", 0
        has_modrm = True
    else:
        entry = _SEG_FIXUP_TABLES[variant].get(b)
        if entry is None:
            return False, f"unsupported opcode {b:02x}", 0
        has_modrm, suffix = entry
        if not has_modrm:  # must be a moffs32 form
            if pos + 4 > len(raw):
                return False, "truncated instruction", 0
            return True, "ok", pos + 4
    if pos >= len(raw):
        return False, "truncated instruction", 0
    modrm = raw[pos]
    pos += 1
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return False, "not a memory operand", 0
    if rm == 4:
        if not later:
            return False, "SIB addressing not decoded", 0
        if pos >= len(raw):
            return False, "truncated instruction", 0
        sib = raw[pos]
        pos += 1
        rm = sib & 7
    pos += {0: 4 if rm == 5 else 0, 1: 1, 2: 4}[mod]
    if pos > len(raw):
        return False, "truncated instruction", 0
    return True, "ok", pos


def seg_fixup_decodes(insn: Instruction | bytes, variant: str = "2004") -> Verdict:
    """Would Xen's seg_fixup.c (flip) decode this instruction's offset?"""
    ok, reason, _ = _seg_fixup_scan(_raw(insn), variant)
    return ok, reason


def seg_fixup_notify_length(insn: Instruction | bytes, variant: str = "2004") -> int | None:
    """Error code of the vector-15 notification (``pb - eip``), or None.

    It counts prefixes, opcode, ModRM, SIB and displacement but **not** an
    immediate, so for ``65 83 /0 ib`` or ``65 c7 /0 id`` it is shorter than
    the instruction -- XenLinux fixup.c took it as the instruction length.
    """
    ok, _, length = _seg_fixup_scan(_raw(insn), variant)
    return length if ok else None


# --------------------------------------------------------------------------
# XenLinux fixup.c (rewrite)

FIXUP_2004_OPCODES = frozenset({0x80, 0x81, 0x82, 0x83, 0x89, 0x8B, 0xC7})


def fixup_2004_handles(insn: Instruction | bytes) -> Verdict:
    """Would XenLinux's 2004 fixup.c patch this faulting instruction?"""
    raw = _raw(insn)
    if len(raw) < 3:
        return False, "truncated instruction"
    if raw[0] != 0x65:
        return False, "first byte is not a GS override"
    if raw[1] not in FIXUP_2004_OPCODES:
        return False, f"opcode {raw[1]:02x} not handled (80-83, 89, 8b, c7 only)"
    mod, rm = raw[2] >> 6, raw[2] & 7
    if mod == 3:
        return False, "not a memory operand"
    if rm == 4:
        return False, "SIB addressing not handled"
    if mod == 0 and rm == 5:
        return False, "bare disp32 address not handled"
    if mod == 2:
        return False, "disp32(reg) address not handled"
    return True, "ok"


def _fixup_following_table() -> dict[int, tuple[bool, int]]:
    """fixup.c ``insn_decode``: opcode -> (has ModRM, immediate bytes); prefixes apart."""
    t: dict[int, tuple[bool, int]] = {}
    for row in (0x00, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38):
        for op in range(row, row + 4):
            t[op] = (True, 0)
        t[row + 4], t[row + 5] = (False, 1), (False, 4)
    for op in (0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F):
        t[op] = (False, 0)
    for op in range(0x40, 0x60):
        t[op] = (False, 0)
    t[0x60], t[0x61], t[0x62], t[0x63] = (False, 0), (False, 0), (True, 0), (True, 0)
    t[0x68], t[0x69], t[0x6A], t[0x6B] = (False, 4), (True, 4), (False, 1), (True, 1)
    for op in range(0x6C, 0x70):
        t[op] = (False, 0)
    for op in range(0x70, 0x80):
        t[op] = (False, 1)
    t[0x80], t[0x81], t[0x82], t[0x83] = (True, 1), (True, 4), (True, 1), (True, 1)
    for op in range(0x84, 0x90):
        t[op] = (True, 0)
    for op in range(0x90, 0xA0):
        if op != 0x9A:
            t[op] = (False, 0)
    t[0xA0], t[0xA1], t[0xA2], t[0xA3] = (False, 1), (False, 4), (False, 1), (False, 4)
    for op in range(0xA4, 0xB0):
        t[op] = (False, 0)
    t[0xA8], t[0xA9] = (False, 1), (False, 4)
    for op in range(0xB0, 0xB8):
        t[op] = (False, 1)
    for op in range(0xB8, 0xC0):
        t[op] = (False, 4)
    t[0xC0], t[0xC1], t[0xC3], t[0xC6], t[0xC7] = (True, 1), (True, 1), (False, 0), (True, 1), (True, 4)
    t[0xD0], t[0xD1], t[0xD2], t[0xD3] = (True, 0), (True, 0), (True, 0), (True, 0)
    t[0xD4], t[0xD5] = (False, 1), (False, 1)
    t[0xE9], t[0xEB] = (False, 4), (False, 1)
    t[0xF4], t[0xF5], t[0xF6], t[0xF7] = (False, 0), (False, 0), (True, 1), (True, 4)
    for op in range(0xF8, 0xFE):
        t[op] = (False, 0)
    t[0xFE], t[0xFF] = (True, 0), (True, 0)
    return t


_FIXUP_FOLLOWING = _fixup_following_table()
_FIXUP_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0xF0, 0xF2, 0xF3}  # not 66/67!


def fixup_2004_following_length(code: bytes) -> int | None:
    """Length fixup.c's ``get_insn_len`` gives an instruction it relocates, or
    None ("Could not decode following instruction").

    Faithful to its table, including its blind spots: no 0F opcodes, no
    66/67 prefixes, no E8 call, no C2/C9/CC..., and A0/A2 given a 1-byte
    offset and F6/F7 always an immediate (wrong for /2-/7) -- so the length can
    be wrong; compare with :func:`tlslab.x86.decode.decode`.
    """
    pos = 0
    while pos < 4 and pos < len(code) and code[pos] in _FIXUP_PREFIXES:
        pos += 1
    if pos >= 4 or pos >= len(code):  # its scan stops after 4 bytes, on a prefix
        return None
    entry = _FIXUP_FOLLOWING.get(code[pos])
    if entry is None:
        return None
    has_modrm, imm = entry
    if has_modrm:
        pos += 1
        if pos >= len(code):
            return None
        modrm = code[pos]
        mod, rm = modrm >> 6, modrm & 7
        if mod != 3:
            if rm == 4:
                pos += 1
            pos += {0: 4 if rm == 5 else 0, 1: 1, 2: 4}[mod]
    return pos + 1 + imm
