"""The decoder against capstone: a real static i386 glibc binary, keystone-
assembled forms under hypothesis, and the explicit failure paths."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import unavailable

import capstone  # a test dependency (pyproject [test]): never skipped
import keystone  # a test dependency (pyproject [test]): never skipped
from capstone import x86_const as X  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tlslab.x86.decode import DecodeError, Instruction, decode, iter_decode  # noqa: E402

_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
_cs.detail = True

CS_SEGMENT = {X.X86_REG_ES: "es", X.X86_REG_CS: "cs", X.X86_REG_SS: "ss",
              X.X86_REG_DS: "ds", X.X86_REG_FS: "fs", X.X86_REG_GS: "gs"}

GUEST_DIR = Path(__file__).resolve().parents[1] / "guests" / "bin"

SAMPLE_C = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
__thread int counter[4];
__thread char name[32];
int main(int argc, char **argv) {
    char buf[128];
    counter[argc & 3] += argc;
    strncpy(name, argv[0], sizeof name - 1);
    snprintf(buf, sizeof buf, "%d %s %s", argc, name, strerror(errno));
    qsort(argv, argc, sizeof *argv, (int (*)(const void *, const void *))strcmp);
    puts(buf);
    return counter[1];
}
"""


def asm(text: str) -> bytes:
    encoding, _ = _ks.asm(text, 0x1000)
    assert encoding, text
    return bytes(encoding)


def compare_with_capstone(code: bytes, address: int, ci, insn: Instruction) -> list[str]:
    """Differences between our decode and capstone's detail (empty = agree)."""
    problems = []
    if insn.length != ci.size:
        problems.append(f"length {insn.length} != {ci.size}")
    mnemonic = ci.mnemonic.split()[-1]  # drop "rep"/"lock"
    if not insn.length_only and mnemonic != insn.mnemonic:
        problems.append(f"mnemonic {insn.mnemonic} != {mnemonic}")
    memory_ops = [op for op in ci.operands if op.type == X.X86_OP_MEM]
    if memory_ops and insn.memory is None:
        problems.append("no memory operand decoded")
    if memory_ops and insn.memory is not None and not insn.is_string:
        m = memory_ops[0].mem
        theirs = (ci.reg_name(m.base) if m.base else None,
                  ci.reg_name(m.index) if m.index else None,
                  m.scale if m.index else 1, m.disp & 0xFFFFFFFF)
        ours = (insn.memory.base, insn.memory.index, insn.memory.scale,
                insn.memory.displacement & 0xFFFFFFFF)
        if insn.memory.address_size == 16:
            theirs = theirs[:3] + (theirs[3] & 0xFFFF,)
            ours = ours[:3] + (ours[3] & 0xFFFF,)
        if ours != theirs:
            problems.append(f"memory {ours} != {theirs}")
        if CS_SEGMENT.get(m.segment) != insn.prefixes.segment_override:
            problems.append(f"segment {insn.prefixes.segment_override} != "
                            f"{CS_SEGMENT.get(m.segment)}")
    if not memory_ops and insn.memory is not None and not insn.is_string \
            and insn.mnemonic not in ("nop",):
        problems.append("memory operand capstone does not see")
    return problems


# --------------------------------------------------------------------------
# Real code.

def _text_section(path: Path) -> tuple[bytes, int]:
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if elf.elfclass != 32 or elf["e_machine"] != "EM_386":
            pytest.skip(f"{path} is not an i386 ELF")
        text = elf.get_section_by_name(".text")
        return text.data(), text["sh_addr"]


@pytest.fixture(scope="module")
def static_i386_binary(tmp_path_factory) -> Path:
    binaries = sorted(p for p in GUEST_DIR.glob("*") if p.is_file()) if GUEST_DIR.is_dir() else []
    for candidate in binaries:
        with open(candidate, "rb") as f:
            head = f.read(20)
        if head[:4] == b"\x7fELF" and head[4] == 1 and head[18] == 3:  # ELFCLASS32, EM_386
            return candidate
    gcc = shutil.which("gcc")
    if gcc is None:
        unavailable("no gcc to build a static i386 binary")
    work = tmp_path_factory.mktemp("i386")
    (work / "sample.c").write_text(SAMPLE_C)
    result = subprocess.run(
        [gcc, "-m32", "-static", "-O2", "-fstack-protector-strong", "sample.c", "-o", "sample"],
        cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        unavailable(f"gcc -m32 -static unavailable: {result.stderr.strip()[:200]}")
    return work / "sample"


def test_whole_text_section_agrees_with_capstone(static_i386_binary):
    """Every instruction capstone decodes in .text: same length, mnemonic,
    segment override and memory operand -- or an explicit DecodeError."""
    code, base = _text_section(static_i386_binary)
    checked = refused = segment_prefixed = 0
    mismatches: list[str] = []
    offset = 0
    while offset < len(code):
        last = None
        for ci in _cs.disasm(code[offset:], base + offset):
            last = ci
            at = ci.address - base
            insn = decode(code[at:at + 15], ci.address)
            if isinstance(insn, DecodeError):
                refused += 1
                if any(b in (0x64, 0x65) for b in ci.prefix):
                    mismatches.append(f"{ci.address:#x} {ci.mnemonic} {ci.op_str}: "
                                      f"fs/gs instruction refused: {insn.reason}")
                continue
            checked += 1
            segment_prefixed += insn.prefixes.segment_override in ("fs", "gs")
            for problem in compare_with_capstone(code[at:at + ci.size], ci.address, ci, insn):
                mismatches.append(f"{ci.address:#x} {ci.bytes.hex()} {ci.mnemonic} "
                                  f"{ci.op_str}: {problem}")
        # capstone stops at bytes it cannot decode: step over one byte.
        offset = (last.address - base + last.size) if last is not None else offset + 1
    assert not mismatches, "\n".join(mismatches[:30])
    assert checked > 10_000 and refused < checked // 1000, (checked, refused)
    assert segment_prefixed > 100, segment_prefixed  # glibc's %gs accesses were seen


def test_linear_sweep_stays_in_step(static_i386_binary):
    """iter_decode walks .text with no DecodeError (lengths chain correctly)."""
    code, base = _text_section(static_i386_binary)
    window = code[: 64 * 1024]
    errors = [r for _, r in iter_decode(window, base) if isinstance(r, DecodeError)]
    assert len(errors) <= 2, errors[:5]


# --------------------------------------------------------------------------
# Keystone-assembled forms under hypothesis.

REG32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
REG16 = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di")
REG8 = ("al", "cl", "dl", "bl", "ah", "ch", "dh", "bh")
REGS = {1: REG8, 2: REG16, 4: REG32}
PTR = {1: "byte", 2: "word", 4: "dword"}


@st.composite
def memory_text(draw):
    seg = draw(st.sampled_from(["gs:", "fs:", "", "es:", "ss:", "cs:", "ds:"]))
    disp = draw(st.sampled_from([0]) | st.integers(-0x80, 0x7F)
                | st.integers(-0x80000000, 0x7FFFFFFF))
    form = draw(st.sampled_from(["base", "sib", "index", "disp"]))
    base = draw(st.sampled_from(REG32))
    index = draw(st.sampled_from([r for r in REG32 if r != "esp"]))
    scale = draw(st.sampled_from([1, 2, 4, 8]))
    sign = f"+ {hex(disp)}" if disp >= 0 else f"- {hex(-disp)}"
    inner = {"base": f"{base} {sign}", "sib": f"{base} + {index}*{scale} {sign}",
             "index": f"{index}*{scale} {sign}", "disp": hex(disp & 0xFFFFFFFF)}[form]
    return f"{seg}[{inner}]"


TEMPLATES = [
    "mov {r}, {m}", "mov {m}, {r}", "mov {m}, {imm}",
    "add {m}, {r}", "or {r}, {m}", "adc {m}, {imm}", "sbb {m}, {imm8}", "and {m}, {r}",
    "sub {r}, {m}", "xor {m}, {imm}", "cmp {m}, {imm8}", "cmp {r}, {m}", "test {m}, {r}",
    "test {m}, {imm}", "inc {m}", "dec {m}", "neg {m}", "not {m}", "mul {m}", "imul {m}",
    "div {m}", "idiv {m}", "xchg {m}, {r}", "cmpxchg {m}, {r}", "xadd {m}, {r}",
    "lock add {m}, {r}", "lock xadd {m}, {r}", "lock cmpxchg {m}, {r}",
    "shl {m}, 1", "sar {m}, cl", "rol {m}, {imm5}", "shr {m}, {imm5}", "rcr {m}, 1",
]
TEMPLATES_WIDE = [  # 16/32-bit only
    "movzx {r}, byte ptr {mm}", "movsx {r}, byte ptr {mm}", "imul {r}, {m}",
    "imul {r}, {m}, {imm8}", "imul {r}, {m}, {imm}", "bt {m}, {r}", "bts {m}, {imm5}",
    "btr {m}, {r}", "btc {m}, {imm5}", "cmovne {r}, {m}", "cmovl {r}, {m}", "push {m}",
    "pop {m}", "lea {r}, {mm}", "nop {m}",
]
TEMPLATES_32 = ["call {m}", "jmp {m}", "movzx {r}, word ptr {mm}", "movsx {r}, word ptr {mm}",
                "sete byte ptr {mm}", "setg byte ptr {mm}"]


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_keystone_forms_agree_with_capstone(data):
    size = data.draw(st.sampled_from([1, 2, 4]))
    pool = TEMPLATES + (TEMPLATES_WIDE if size > 1 else []) + (TEMPLATES_32 if size == 4 else [])
    template = data.draw(st.sampled_from(pool))
    mem = data.draw(memory_text())
    if template.startswith("nop") and size == 1:
        return
    text = template.format(
        r=data.draw(st.sampled_from(REGS[size])), m=f"{PTR[size]} ptr {mem}", mm=mem,
        imm=hex(data.draw(st.integers(0, (1 << (8 * size - 1)) - 1))),
        imm8=hex(data.draw(st.integers(0, 0x7F))), imm5=hex(data.draw(st.integers(0, 31))))
    try:
        code = asm(text)
    except keystone.KsError:
        return  # keystone refuses some combinations (e.g. sp as a byte register)
    ci = next(_cs.disasm(code, 0x1000), None)
    assert ci is not None and ci.size == len(code), (text, code.hex())
    insn = decode(code, 0x1000)
    assert not isinstance(insn, DecodeError), (text, code.hex(), insn)
    problems = compare_with_capstone(code, 0x1000, ci, insn)
    assert not problems, (text, code.hex(), ci.mnemonic, ci.op_str, problems)
    # And the segment field is the effective one.
    if insn.memory is not None and mem[:3] in ("gs:", "fs:"):
        assert insn.memory.segment == mem[:2]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(min_size=1, max_size=16))
def test_random_bytes_length_agrees_with_capstone(code):
    """Arbitrary bytes: whenever both decode, lengths and memory operands agree."""
    insn = decode(code, 0x1000)
    ci = next(_cs.disasm(code, 0x1000), None)
    if isinstance(insn, DecodeError) or ci is None or insn.length_only:
        return
    problems = compare_with_capstone(code, 0x1000, ci, insn)
    assert not [p for p in problems if not p.startswith("mnemonic")], \
        (code[:insn.length].hex(), ci.mnemonic, ci.op_str, problems)


# --------------------------------------------------------------------------
# Explicit examples and failure paths.

def test_gs_negative_offset_register_indirect():
    insn = decode(bytes.fromhex("65 8b 00"))  # mov %gs:(%eax),%eax
    assert insn.mnemonic == "mov" and insn.length == 3 and insn.reg == "eax"
    assert insn.memory.segment == "gs" and insn.memory.base == "eax"
    assert insn.memory.displacement == 0 and insn.memory_size == 4
    assert insn.modrm_reg == 0 and insn.modrm_mod == 0


def test_moffs_and_call_through_gs():
    insn = decode(bytes.fromhex("65 a1 e0 ff ff ff"))  # mov %gs:0xffffffe0,%eax
    assert insn.opcode == 0xA1 and insn.memory.displacement == -0x20
    assert insn.memory.base is None and insn.reg == "eax"
    call = decode(bytes.fromhex("65 ff 15 10 00 00 00"))  # call *%gs:0x10
    assert call.mnemonic == "call" and call.memory.displacement == 0x10
    assert call.memory.segment == "gs" and call.memory_size == 4


def test_default_segments():
    assert decode(asm("mov eax, [ebp - 4]")).memory.segment == "ss"
    assert decode(asm("mov eax, [esp + 4]")).memory.segment == "ss"
    assert decode(asm("mov eax, [ebx + ebp]")).memory.segment == "ds"  # base ebx
    assert decode(bytes.fromhex("8b 04 2d 00 00 00 00")).memory.segment == "ds"  # no base
    movs = decode(bytes.fromhex("65 a5"))  # movsd gs:[esi] -> es:[edi]
    assert movs.memory.segment == "gs" and movs.memory.base == "esi"
    assert movs.memory2.segment == "es" and movs.memory2.base == "edi"


def test_immediates_and_branches():
    insn = decode(bytes.fromhex("65 83 00 ff"))  # add dword gs:[eax], -1
    assert insn.immediate == 0xFFFFFFFF and insn.operand_size == 4
    insn = decode(bytes.fromhex("66 65 83 00 ff"))
    assert insn.immediate == 0xFFFF and insn.operand_size == 2
    jne = decode(bytes.fromhex("75 fe"), 0x1000)
    assert jne.branch_target == 0x1000 and jne.condition == "ne"
    jmp = decode(bytes.fromhex("e9 00 00 00 00"), 0x1000)
    assert jmp.branch_target == 0x1005
    enter = decode(bytes.fromhex("c8 10 00 01"))
    assert (enter.immediate, enter.immediate2, enter.length) == (0x10, 1, 4)


def test_sixteen_bit_addressing():
    insn = decode(bytes.fromhex("67 65 8b 40 fc"))  # mov eax, gs:[bx+si-4]
    assert insn.length == 5 and insn.memory.address_size == 16
    assert (insn.memory.base, insn.memory.index, insn.memory.displacement) == ("bx", "si", -4)
    assert decode(bytes.fromhex("67 8b 46 10")).memory.segment == "ss"  # [bp+0x10]


@pytest.mark.parametrize("hexcode,reason_part", [
    ("65", "truncated"),
    ("65 8b", "truncated: ModRM"),
    ("65 8b 80 00 00", "truncated: disp32"),
    ("8f c8", "/1"),                    # pop group only has /0
    ("ff ff", "/7"),
    ("c6 48 00 00", "/1"),
    ("8d c0", "memory operand"),        # lea eax, eax
    ("f0 01 c0", "lock"),               # lock add eax, eax
    ("f0 8b 00", "lock"),               # lock mov
    ("66" * 15 + "90", "15 bytes"),       # 16 bytes long
    ("0f 0a", "unsupported opcode 0xf0a"),
    ("8e f8", "segment register"),
])
def test_decode_errors_carry_reasons(hexcode, reason_part):
    result = decode(bytes.fromhex(hexcode))
    assert isinstance(result, DecodeError), result
    assert reason_part in result.reason, result.reason


def test_lock_with_memory_destination_is_fine():
    insn = decode(bytes.fromhex("f0 65 0f b1 0a"))  # lock cmpxchg gs:[edx], ecx
    assert insn.prefixes.lock and insn.mnemonic == "cmpxchg" and insn.reg == "ecx"


def test_glibc_faulting_forms_decode():
    for hexcode, mnemonic in [("65 8b 00", "mov"), ("65 89 10", "mov"),
                              ("65 83 00 01", "add"), ("65 80 7b 10 00", "cmp"),
                              ("65 ff 30", "push")]:
        insn = decode(bytes.fromhex(hexcode))
        assert insn.mnemonic == mnemonic and insn.length == len(bytes.fromhex(hexcode))
        assert insn.segment_override == "gs"


def test_fifteen_bytes_is_still_legal():
    insn = decode(bytes.fromhex("66" * 14 + "90"))
    assert not isinstance(insn, DecodeError) and insn.length == 15
