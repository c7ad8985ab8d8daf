"""Decoding ahead from a fault (tlslab.hypervisor.lookahead): hand-assembled code with known answers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem import FakeMemory

from tlslab.hypervisor.lookahead import LONG, SHORT, UNKNOWN, Lookahead, walk
from tlslab.x86.decode import DecodeError, decode

BASE = 0x0804_8000
ESP = 0x0BFF_F000
THRESHOLD = 1.57        # hw-vm's 2F/E: a run of two accesses pays for a flip


def neg(disp=-4):                  # mov ecx, gs:[disp] (disp < 0)
    return b"\x65\x8b\x0d" + struct.pack("<i", disp)


POS = b"\x65\xa1\x14\x00\x00\x00"  # mov eax, gs:[0x14] (the stack guard: a positive offset)
RET = b"\xc3"
NOP = b"\x90"


class Guest:
    """Code at BASE, registers, and words of memory; counts what the walk reads."""

    def __init__(self, code: bytes, regs=None, words=None):
        self.code = code
        self.regs = {"eax": 0, "ebx": 0, "ecx": 0, "edx": 0, "esi": 0, "edi": 0, "ebp": 0, "esp": ESP}
        self.regs.update(regs or {})
        self.words = dict(words or {})
        self.word_reads: list[int] = []

    def code_at(self, address):
        offset = address - BASE
        if not 0 <= offset < len(self.code):
            return DecodeError(f"nothing at {address:#x}")
        return decode(self.code[offset:offset + 15], address)

    def read_reg(self, name):
        return self.regs[name]

    def read_word(self, address):
        self.word_reads.append(address)
        return self.words.get(address)

    def answer(self, sign=-1, threshold=THRESHOLD, budget=32):
        insn = self.code_at(BASE)
        return walk(self.code_at, self.read_reg, self.read_word, insn, sign, threshold, budget)[0]


def test_a_run_of_constant_negative_offsets_is_long_and_one_ended_by_a_positive_is_short():
    assert Guest(neg() + neg(-8) + NOP + POS).answer().verdict == LONG            # 2 > 1.57
    assert Guest(neg() + NOP + POS + neg()).answer().verdict == SHORT             # 1, then the other sign
    # under xen-2004's threshold (2.81) two accesses are not enough; three are
    assert Guest(neg() + neg(-8) + POS).answer(threshold=2.81).verdict == SHORT
    assert Guest(neg() + neg(-8) + neg(-12) + POS).answer(threshold=2.81).verdict == LONG


def test_a_path_that_ends_where_the_walk_cannot_see_is_unknown():
    assert Guest(neg() + RET).answer().verdict == UNKNOWN                # return address unreadable
    assert Guest(neg() + b"\xff\xe0").answer().verdict == UNKNOWN        # jmp *%eax: where to is unknown
    assert Guest(neg() + NOP * 40 + POS).answer(budget=32).verdict == UNKNOWN   # past the budget
    assert Guest(neg() + NOP * 40 + POS).answer(budget=64).verdict == SHORT
    assert Guest(neg() + b"\xeb\xfe").answer().verdict == UNKNOWN        # jmp . : a loop back on the path


def test_offsets_in_registers_are_followed_through_constants_and_memory_loads():
    # mov ebx, -8; mov eax, gs:[ebx]  -> a second negative access
    code = neg() + b"\xbb" + struct.pack("<i", -8) + b"\x65\x8b\x03" + POS
    assert Guest(code).answer().verdict == LONG
    # the offset comes from a GOT-like word: mov eax, [ebx+0x10]; mov eax, gs:[eax]
    got = 0x0805_0000
    code = neg() + b"\x8b\x43\x10" + b"\x65\x8b\x00" + POS
    assert Guest(code, regs={"ebx": got}, words={got + 0x10: (-20) & 0xFFFF_FFFF}).answer().verdict == LONG
    assert Guest(code, regs={"ebx": got}, words={got + 0x10: 0x18}).answer().verdict == SHORT
    # a register the walk cannot know (written by a load from unreadable memory): unknown
    assert Guest(code, regs={"ebx": got}).answer().verdict == UNKNOWN


def test_both_ways_of_a_conditional_branch_must_agree():
    # je over [neg(-8); jmp] to neg(-12): both ways meet a second negative access
    both_long = neg() + b"\x74\x09" + neg(-8) + b"\xeb\x07" + neg(-12) + NOP + POS
    assert Guest(both_long).answer().verdict == LONG
    # one way meets a second negative access, the other goes straight to POS: no answer
    mixed = neg() + b"\x74\x07" + neg(-8) + b"\xeb\x00" + POS
    assert Guest(mixed).answer().verdict == UNKNOWN
    both_short = neg() + b"\x74\x07" + POS + RET + POS
    assert Guest(both_short).answer().verdict == SHORT


def test_calls_and_returns_are_followed_through_the_stack():
    # call f (f: POS; ret)  -> the callee's positive access ends the run
    callee = 5 + 1          # after `call` (5 bytes) and a nop
    code = neg() + b"\xe8" + struct.pack("<i", callee - 5 + 1) + NOP + NOP + POS + RET
    assert Guest(code).answer().verdict == SHORT
    # ret to the address on the guest's stack (a word of its memory)
    caller = BASE + 0x40
    code = neg() + RET + NOP * (0x40 - 8) + neg(-8) + POS
    assert Guest(code, words={ESP: caller}).answer().verdict == LONG
    # push/pop carry a known value: push 0xfffffff0; pop edx; mov eax, gs:[edx]
    code = neg() + b"\x68" + struct.pack("<i", -16) + b"\x5a" + b"\x65\x8b\x02" + POS
    assert Guest(code).answer().verdict == LONG


class FakeVCpu:
    """What Lookahead.ahead uses of a vCPU: registers, guest memory (host buffers), the code generation."""

    def __init__(self, code: bytes, regs: dict, regions=()):
        self.mem = FakeMemory([(BASE, code.ljust(0x1000, b"\xf4"), 5), *regions])
        self.regs = {"eax": 0, "ebx": 0, "ecx": 0, "edx": 0, "esi": 0, "edi": 0, "ebp": 0, "esp": ESP} | regs
        self.code_generation = 0

    def insn(self):
        return decode(self.mem.read(BASE, 15), BASE)


@pytest.mark.parametrize("native", [True, False])
def test_never_reads_guest_memory_at_or_above_the_hypervisor(native):
    """A GOT word that makes the run long lies across the hypervisor's start, or on a page the guest cannot
    read: neither walk reads it (the answer stays unknown); below the start, readable, it is read."""
    got = 0x0805_0000
    code = neg() + b"\x8b\x43\x00" + b"\x65\x8b\x00" + POS          # mov eax, [ebx]; mov eax, gs:[eax]
    words = bytearray(0x1000)
    words[0xFFC:] = struct.pack("<i", -16)
    vcpu = FakeVCpu(code, {"ebx": got + 0xFFC}, [(got, bytes(words), 3)])
    la = Lookahead(THRESHOLD, native=native)
    assert la.ahead(vcpu, got + 0xFFE, vcpu.insn(), -1).verdict == UNKNOWN
    assert la.ahead(vcpu, 1 << 32, vcpu.insn(), -1).verdict == LONG
    vcpu.mem.protect(got, 0)                                              # PROT_NONE
    assert la.ahead(vcpu, 1 << 32, vcpu.insn(), -1).verdict == UNKNOWN


@pytest.mark.parametrize("native", [True, False])
def test_each_fault_walks_the_memory_and_registers_it_has_now(native):
    got = 0x0805_0000
    words = bytearray(0x1000)
    words[0x10:0x14] = struct.pack("<i", -20)
    vcpu = FakeVCpu(neg() + b"\x8b\x43\x10" + b"\x65\x8b\x00" + POS, {"ebx": got}, [(got, bytes(words), 3)])
    la = Lookahead(THRESHOLD, native=native)
    assert la.ahead(vcpu, 1 << 32, vcpu.insn(), -1).verdict == LONG
    vcpu.mem.write(got + 0x10, struct.pack("<I", 0x18))                  # the GOT word changed
    assert la.ahead(vcpu, 1 << 32, vcpu.insn(), -1).verdict == SHORT
    vcpu.regs["ebx"] = got + 0x100                                        # a register it reads changed
    vcpu.mem.write(got + 0x110, struct.pack("<i", -20))
    assert la.ahead(vcpu, 1 << 32, vcpu.insn(), -1).verdict == LONG
    assert la.walks == 3


def test_its_caches_do_not_keep_a_finished_address_space_alive():
    import gc
    import weakref

    for native in (True, False):
        vcpu = FakeVCpu(neg() + POS, {})
        la = Lookahead(THRESHOLD, native=native)
        la.ahead(vcpu, 1 << 32, vcpu.insn(), -1)
        gone, mem = weakref.ref(vcpu), weakref.ref(vcpu.mem)
        del vcpu
        gc.collect()
        assert gone() is None and mem() is None


def test_forms_whose_effect_is_easy_to_get_wrong():
    # the accumulator forms: add eax, imm32 (05) writes eax
    assert Guest(neg() + b"\x05\x30\x00\x00\x00" + b"\x65\x8b\x00" + POS,
                 regs={"eax": (-16) & 0xFFFF_FFFF}).answer().verdict == SHORT      # -16 + 0x30 > 0
    # mov eax, [moffs] (A1) loads eax: unknown unless the word is readable
    assert Guest(neg() + b"\xa1\x00\x00\x06\x08" + b"\x65\x8b\x00" + POS,
                 regs={"eax": (-16) & 0xFFFF_FFFF}).answer().verdict == UNKNOWN
    # xchg ecx, eax (91) swaps: eax is no longer what it was
    assert Guest(neg() + b"\x91" + b"\x65\x8b\x00" + POS,
                 regs={"eax": (-16) & 0xFFFF_FFFF, "ecx": 8}).answer().verdict == UNKNOWN
    # lea eax, gs:[-8] computes an address: not an access
    assert Guest(neg() + b"\x65\x8d\x05\xf8\xff\xff\xff" + POS).answer().verdict == SHORT
    # a faulting jump through %gs goes where the walk cannot see
    assert Guest(b"\x65\xff\x25\xf8\xff\xff\xff" + neg() + neg()).answer().verdict == UNKNOWN
    # 16-bit push moves esp by 2: the ret after it is not followed
    code = neg() + b"\x66\x50" + b"\x66\x58" + RET
    assert Guest(code, words={ESP: BASE + 0x20}).answer().verdict == UNKNOWN
    # enter makes esp and ebp unknown: the leave; ret after it is not followed
    code = neg() + b"\xc8\x10\x00\x00" + b"\xc9" + RET
    assert Guest(code, words={ESP: BASE + 0x20}).answer().verdict == UNKNOWN
    # rep stosd stores where the walk does not place it: later loads are unknown
    code = neg() + b"\xf3\xab" + b"\x8b\x43\x10" + b"\x65\x8b\x00" + POS
    assert Guest(code, regs={"ebx": 0x0805_0000},
                 words={0x0805_0010: (-20) & 0xFFFF_FFFF}).answer().verdict == UNKNOWN
    # a 2-byte store into a known word makes the whole word unknown
    code = neg() + b"\x66\x89\x43\x12" + b"\x8b\x43\x10" + b"\x65\x8b\x00" + POS
    assert Guest(code, regs={"ebx": 0x0805_0000},
                 words={0x0805_0010: (-20) & 0xFFFF_FFFF}).answer().verdict == UNKNOWN
    # retf: where it returns to is not followed
    assert Guest(neg() + b"\xcb" + neg(-8)).answer().verdict == UNKNOWN


REG = st.integers(min_value=0, max_value=0xFFFF_FFFF)


@settings(max_examples=300, deadline=None)
@given(code=st.binary(min_size=0, max_size=200), sign=st.sampled_from([-1, 1]),
       budget=st.integers(min_value=1, max_value=64), threshold=st.sampled_from([1.57, 2.81]),
       regs=st.fixed_dictionaries({r: REG for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")}),
       word=REG)
def test_any_code_gets_an_answer_within_the_budget(code, sign, budget, threshold, regs, word):
    """The walk never raises and never decodes more than its budget, whatever the bytes and registers; and
    accesses it has seen count whatever follows: three constant same-sign accesses in a row before the
    random code are a run longer than either threshold."""
    guest = Guest(neg() + code, regs=regs, words={ESP: BASE + 7, regs["ebx"] & ~3: word})
    answer, _ = walk(guest.code_at, guest.read_reg, guest.read_word, guest.code_at(BASE), sign, threshold, budget)
    assert 0 <= answer.walked <= budget
    long = Guest(neg() + neg(-8) + neg(-12) + code, regs=regs)
    answer, _ = walk(long.code_at, long.read_reg, long.read_word, long.code_at(BASE), -1, threshold, budget)
    needed = int(threshold)           # accesses after the faulting one that take the run past the threshold
    assert answer.verdict == (LONG if budget >= needed else UNKNOWN)


@pytest.mark.parametrize("threshold", [1.57, 2.81])
def test_the_faulting_access_counts_once(threshold):
    """A run of exactly one access never pays for a flip (threshold >= 1)."""
    assert Guest(neg() + POS).answer(threshold=threshold).verdict == SHORT
