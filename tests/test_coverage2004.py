"""The 2004 coverage predicates on keystone-assembled and hand-encoded forms."""

from __future__ import annotations

import pytest

import keystone  # a test dependency (pyproject [test]): never skipped

from tlslab.x86.coverage import (  # noqa: E402
    emulate_2004_handles,
    emulate_2004_offset_ok,
    fixup_2004_following_length,
    fixup_2004_handles,
    seg_fixup_decodes,
    seg_fixup_notify_length,
)
from tlslab.x86.decode import decode  # noqa: E402

_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)


def asm(text: str) -> bytes:
    encoding, _ = _ks.asm(text)
    return bytes(encoding)


# The faulting forms seen on real glibc (docs/measurements.md#faulting-forms), as glibc emits them.
GLIBC_FORMS = {
    "65 8B /r": "mov eax, dword ptr gs:[eax]",            # mov %gs:(%eax),%eax (-0x24)
    "65 89 /r": "mov dword ptr gs:[edx], ecx",             # errno store via register
    "65 83 /0": "add dword ptr gs:[eax], 1",               # counter in TLS
    "65 80 /7": "cmp byte ptr gs:[ebx + 0x10], 0",
    "65 FF /6": "push dword ptr gs:[eax]",
}


def test_glibc_forms_encode_as_named():
    for name, text in GLIBC_FORMS.items():
        code = asm(text)
        assert code[0] == 0x65 and code[1] == int(name.split()[1], 16), (name, code.hex())


@pytest.mark.parametrize("name,emulate,flip,rewrite", [
    ("65 8B /r", True, True, True),
    ("65 89 /r", True, True, True),
    ("65 83 /0", False, True, True),   # emulate.c: 83 only /7 (cmp)
    ("65 80 /7", True, True, True),
    ("65 FF /6", False, True, False),  # push: seg_fixup's table has FF; fixup.c does not
])
def test_glibc_faulting_forms(name, emulate, flip, rewrite):
    code = asm(GLIBC_FORMS[name])
    assert emulate_2004_handles(code)[0] is emulate, emulate_2004_handles(code)
    assert seg_fixup_decodes(code)[0] is flip, seg_fixup_decodes(code)
    assert fixup_2004_handles(code)[0] is rewrite, fixup_2004_handles(code)
    # Decoded Instruction objects give the same verdicts as raw bytes.
    insn = decode(code)
    assert emulate_2004_handles(insn) == emulate_2004_handles(code)
    assert fixup_2004_handles(insn) == fixup_2004_handles(code)


@pytest.mark.parametrize("text,handled,reason_part", [
    ("mov ecx, dword ptr gs:[0xffffffe0]", True, "ok"),      # 8B 0D disp32
    ("mov eax, dword ptr gs:[0xffffffe0]", False, "opcode a1"),  # moffs: not emulated
    ("mov dword ptr gs:[eax - 0x24], ebx", True, "ok"),
    ("mov byte ptr gs:[eax - 4], 7", True, "ok"),
    ("mov word ptr gs:[eax - 4], 7", True, "ok"),      # 66 accepted
    ("cmp dword ptr gs:[eax], ebx", True, "ok"),
    ("cmp ebx, dword ptr gs:[eax]", True, "ok"),
    ("cmp dword ptr gs:[eax], 0x12345", True, "ok"),
    ("cmp dword ptr gs:[eax], 1", True, "ok"),
    ("mov eax, dword ptr gs:[eax + ecx*4]", False, "SIB"),
    ("mov eax, dword ptr gs:[esp + 4]", False, "SIB"),
    ("add dword ptr gs:[eax], ebx", False, "opcode 01"),
    ("sub eax, dword ptr gs:[0x14]", False, "opcode 2b"),
    ("lock cmpxchg dword ptr gs:[eax], ebx", False, "lock"),
    ("movzx eax, byte ptr gs:[eax]", False, "opcode 0f"),
    ("add dword ptr gs:[eax], 1", False, "/0"),
    ("call dword ptr gs:[0x10]", False, "opcode ff"),
])
def test_emulate_2004(text, handled, reason_part):
    ok, reason = emulate_2004_handles(asm(text))
    assert ok is handled and reason_part in reason, (text, ok, reason)


def test_emulate_2004_refuses_rep_and_address_size():
    assert "rep" in emulate_2004_handles(bytes.fromhex("f3 65 8b 00"))[1]
    assert "address-size" in emulate_2004_handles(bytes.fromhex("67 65 8b 07"))[1]
    assert not emulate_2004_handles(bytes.fromhex("66 66 66 65 8b 00"))[0]  # >3 prefixes


def test_emulate_2004_offset_rule():
    assert emulate_2004_offset_ok(0xFFFFFFDC)
    assert emulate_2004_offset_ok(0xF0000000)
    assert not emulate_2004_offset_ok(0x14)
    assert not emulate_2004_offset_ok(0xEFFFFFFF)
    assert not emulate_2004_offset_ok(0x80000000)


@pytest.mark.parametrize("text,handled,reason_part", [
    ("call dword ptr gs:[0x10]", True, "ok"),            # FF /2, bare disp32 is fine
    ("mov eax, dword ptr gs:[0x14]", True, "ok"),          # A1 moffs
    ("sub eax, dword ptr gs:[0x14]", True, "ok"),
    ("imul eax, dword ptr gs:[eax], 3", True, "ok"),
    ("shl dword ptr gs:[eax + 8], 2", True, "ok"),
    ("mov eax, dword ptr gs:[eax + ecx*4]", False, "SIB"),
    ("movzx eax, byte ptr gs:[eax]", False, "0f"),          # no two-byte opcodes
    ("cmpxchg dword ptr gs:[eax], ebx", False, "0f"),
    ("test dword ptr gs:[eax], 1", False, "f7"),            # F6/F7 not in the table
    ("pop dword ptr gs:[eax]", False, "8f"),
    ("mov eax, dword ptr fs:[eax]", False, "fs"),
    ("mov eax, dword ptr [eax]", False, "GS override"),
])
def test_seg_fixup(text, handled, reason_part):
    ok, reason = seg_fixup_decodes(asm(text))
    assert ok is handled and reason_part in reason, (text, ok, reason)


def test_seg_fixup_later_variant_adds_sib_and_two_byte():
    assert seg_fixup_decodes(asm("mov eax, dword ptr gs:[eax + ecx*4]"), "later")[0]
    assert seg_fixup_decodes(asm("movzx eax, byte ptr gs:[eax]"), "later")[0]
    assert seg_fixup_decodes(asm("pop dword ptr gs:[eax]"), "later")[0]
    assert not seg_fixup_decodes(asm("lea eax, dword ptr gs:[eax]"), "later")[0]
    assert seg_fixup_decodes(asm("lea eax, dword ptr gs:[eax]"))[0]  # 2004 table marks 8D


def test_seg_fixup_lock_and_rep_are_skipped():
    assert seg_fixup_decodes(bytes.fromhex("f0 65 83 00 01"))[0]
    assert seg_fixup_decodes(bytes.fromhex("66 65 8b 00"))[0]
    assert not seg_fixup_decodes(bytes.fromhex("67 65 8b 07"))[0]


def test_seg_fixup_notify_length_excludes_immediate():
    code = asm("add dword ptr gs:[eax], 1")          # 65 83 00 01: 4 bytes
    assert decode(code).length == 4
    assert seg_fixup_notify_length(code) == 3        # error code stops before imm8
    code = asm("mov dword ptr gs:[eax - 0x20], 0x1234")  # 65 c7 40 e0 imm32
    assert seg_fixup_notify_length(code) == 4 and decode(code).length == 8
    assert seg_fixup_notify_length(asm("mov eax, dword ptr gs:[0x14]")) == 6
    assert seg_fixup_notify_length(asm("mov eax, dword ptr [eax]")) is None


@pytest.mark.parametrize("text,handled,reason_part", [
    ("mov eax, dword ptr gs:[eax]", True, "ok"),
    ("mov dword ptr gs:[ebx - 0x24], eax", True, "ok"),
    ("mov dword ptr gs:[eax + 4], 5", True, "ok"),           # C7 /0
    ("cmp byte ptr gs:[eax + 0x10], 0", True, "ok"),         # 80 /7
    ("sub dword ptr gs:[ecx], 0x12345", True, "ok"),         # 81
    ("mov eax, dword ptr gs:[0x14]", False, "opcode a1"),    # moffs
    ("mov ecx, dword ptr gs:[0x14]", False, "disp32"),       # 8B 0D disp32
    ("mov eax, dword ptr gs:[eax + 0x100]", False, "disp32(reg)"),
    ("mov eax, dword ptr gs:[eax + ecx*4]", False, "SIB"),
    ("mov eax, dword ptr gs:[esp]", False, "SIB"),
    ("mov al, byte ptr gs:[eax]", False, "opcode 8a"),
    ("push dword ptr gs:[eax]", False, "opcode ff"),
    ("mov ax, word ptr gs:[eax]", False, "opcode 66"),       # keystone: 65 66 8b 00
])
def test_fixup_2004(text, handled, reason_part):
    ok, reason = fixup_2004_handles(asm(text))
    assert ok is handled and reason_part in reason, (text, ok, reason)


def test_fixup_2004_needs_gs_first():
    assert "first byte" in fixup_2004_handles(bytes.fromhex("66 65 8b 00"))[1]
    assert "first byte" in fixup_2004_handles(bytes.fromhex("f0 65 83 00 01"))[1]


@pytest.mark.parametrize("text", [
    "mov dword ptr [ebp - 0xc], eax", "xor eax, eax", "jne 0x20", "jmp 0x1000",
    "push ebx", "pop esi", "mov eax, 0x12345678", "add esp, 0x10", "test eax, eax",
    "cmp byte ptr [eax + ecx*4 + 8], 0x7f", "ret", "lea eax, [ebx + 0x14]",
    "mov eax, dword ptr [0x8049000]", "imul eax, dword ptr [ebx], 0x100",
])
def test_fixup_following_length_matches_decoder(text):
    code = asm(text)
    assert fixup_2004_following_length(code) == decode(code).length


@pytest.mark.parametrize("text,why", [
    ("call 0x1000", "E8 not in its table"),
    ("movzx eax, al", "no 0F opcodes"),
    ("mov ax, bx", "66 is not a prefix in its table"),
    ("leave", "C9 not in its table"),
])
def test_fixup_following_length_blind_spots(text, why):
    assert fixup_2004_following_length(asm(text)) is None, why


def test_fixup_following_length_wrong_for_f7_not():
    code = asm("not dword ptr [eax]")  # F7 /2 has no immediate; fixup.c assumed imm32
    assert decode(code).length == 2
    assert fixup_2004_following_length(code) == 6
