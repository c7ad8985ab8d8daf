"""The C decoder and walk (tlslab/x86/_ahead.c) against their specification (tlslab.x86.decode, tlslab.x86.ahead).

The C side is what the online-lookahead strategy runs; the Python is what the
docs describe. They must agree exactly: the same fields for every instruction,
and the same verdict and count of decoded instructions for every walk, over
random bytes and over random programs built from the forms the walk follows
(gs accesses, constants, stack words, branches, calls and returns).
"""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from guestmem import FakeMemory

from tlslab.hypervisor.lookahead import guest_readers
from tlslab.x86 import optable
from tlslab.x86.ahead import LONG, SHORT, UNKNOWN, Ahead, walk
from tlslab.x86.aheadc import RegionWalker, c_regs, decode_full
from tlslab.x86.decode import DecodeError, decode

PREFIXES = (0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x0F)


def test_the_committed_c_tables_are_what_the_python_tables_render():
    assert optable.HEADER.read_text() == optable.render(), "run: python -m tlslab.x86.optable"


def test_a_walk_set_naming_no_mnemonic_is_refused():
    import pytest

    with pytest.raises(ValueError, match="not mnemonics"):
        optable._flags({"mov", "jmpp"}, {name: i for i, name in enumerate(optable.mnemonics())}, "test")


def _python_view(insn) -> dict:
    def mem(m):
        if m is None:
            return None
        return {"segment": m.segment, "base": m.base, "index": m.index, "scale": m.scale,
                "displacement": m.displacement, "address_size": m.address_size,
                "segment_overridden": m.segment_overridden}

    return {"length": insn.length, "opcode": insn.opcode, "mnemonic": insn.mnemonic,
            "operand_size": insn.operand_size, "memory_size": insn.memory_size, "reg": insn.reg,
            "rm_reg": insn.rm_reg, "immediate": None if insn.immediate is None else insn.immediate & 0xFFFF_FFFF,
            "immediate2": insn.immediate2, "branch_target": insn.branch_target, "memory": mem(insn.memory),
            "memory2": mem(insn.memory2), "is_string": insn.is_string}


def _agree(code: bytes, address: int) -> None:
    spec = decode(code, address)
    got = decode_full(code[:15], address)
    if isinstance(spec, DecodeError):
        assert isinstance(got, int) and got != 0, (code.hex(), spec.reason, got)
    else:
        assert got == _python_view(spec), code.hex()


def test_the_decoders_agree_on_random_bytes():
    rng = random.Random(2004)
    for _ in range(30_000):
        code = bytes(rng.choice(PREFIXES) if rng.random() < 0.15 else rng.randrange(256)
                     for _ in range(rng.randint(1, 16)))
        _agree(code, rng.randrange(1 << 32))


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=16), st.integers(min_value=0, max_value=0xFFFF_FFFF))
def test_the_decoders_agree_on_any_bytes(code, address):
    _agree(code, address)


# ------------------------------------------------------------------ the walk
PROT_R, PROT_RW, PROT_RX = 1, 3, 5
CODE, DATA, STACK, ROCODE = 0x0804_8000, 0x0805_0000, 0x0BFF_0000, 0x0806_0000
PAGE = 0x1000


def both(mem: FakeMemory, regs: dict, eip: int, sign: int, threshold: float, budget: int, below: int):
    """(Python answer, C answer) for a fault at ``eip``."""
    code_at, read_word = guest_readers(mem, below)
    insn = code_at(eip)
    if isinstance(insn, DecodeError):      # cut off by ``below``: the C walk answers unknown, having walked nothing
        spec = Ahead(UNKNOWN, 0)
    else:
        spec, _ = walk(code_at, regs.__getitem__, read_word, insn, sign, threshold, budget)
    walker = RegionWalker(((r.start, r.size, r.prot, r.host_address) for r in mem.regions()), below)
    return spec, walker.walk(c_regs(regs, eip), sign, threshold, budget)


TLS_OFFSETS = (-4, -8, -0x20, -0x1000, 0x14, 0x18, 0, 0x7FFF_FFFF)


def _program(rng: random.Random, length: int) -> bytes:
    """Random code made of the forms the walk follows, with some raw bytes in between."""
    out = bytearray()
    while len(out) < length:
        k = rng.randrange(40)
        d = rng.choice(TLS_OFFSETS) & 0xFFFF_FFFF
        word = DATA + 4 * rng.randrange(16)
        if k < 6 or k >= 34:          # a %gs access: moffs, disp32, [reg], [reg+disp8], a store
            out += rng.choice([b"\x65\xa1" + struct.pack("<I", d), b"\x65\x8b\x0d" + struct.pack("<I", d),
                               b"\x65\x8b\x03", b"\x65\x8b\x00", b"\x65\x8b\x04\x18",
                               b"\x65\x8b\x43" + bytes([rng.randrange(256)]), b"\x65\x89\x1d" + struct.pack("<I", d),
                               b"\x65\x83\x05" + struct.pack("<I", d) + b"\x01"])
        elif k < 9:        # constants into ebx/eax
            out += rng.choice([b"\xbb" + struct.pack("<I", d), b"\x8b\x1d" + struct.pack("<I", word),
                               b"\x81\xc3" + struct.pack("<I", d), b"\x43", b"\x4b", b"\x31\xc0", b"\x29\xdb",
                               b"\x8d\x83" + struct.pack("<I", d), b"\xa1" + struct.pack("<I", word),
                               b"\x05" + struct.pack("<I", d), b"\x89\xc3", b"\x93", b"\x0f\xb6\xd8"])
        elif k < 11:       # the eight ALU operations, on eax/ebx, with immediates and registers
            op, dst, src = rng.randrange(8), rng.choice((0, 3)), rng.choice((0, 3))
            out += rng.choice([bytes([0x81, 0xC0 | op << 3 | dst]) + struct.pack("<I", d),
                               bytes([0x83, 0xC0 | op << 3 | dst, rng.randrange(256)]),
                               bytes([op * 8 + 1, 0xC0 | src << 3 | dst]), bytes([op * 8 + 5]) + struct.pack("<I", d)])
        elif k < 15:       # the stack
            out += rng.choice([b"\x53", b"\x5b", b"\x50", b"\x58", b"\x55", b"\x89\xe5", b"\xc9",
                               b"\x89\x1c\x24", b"\x8b\x1c\x24", b"\x66\x50", b"\x66\x9c", b"\x9c",
                               b"\x68" + struct.pack("<I", d), b"\x6a\xfc", b"\x8f\x03", b"\xff\x33",
                               b"\xc8\x08\x00\x00", b"\x83\xec\x10", b"\x83\xc4\x08"])
        elif k < 21:       # control flow
            rel = rng.randrange(-40, 40)
            out += rng.choice([bytes([0x70 + rng.randrange(16), rel & 0xFF]), b"\xeb" + bytes([rel & 0xFF]),
                               b"\xe8" + struct.pack("<i", rel), b"\xe9" + struct.pack("<i", rel), b"\xc3",
                               b"\xc2\x04\x00", b"\xff\xd0", b"\xff\xe3", b"\xe2" + bytes([rel & 0xFF]),
                               b"\x0f\x84" + struct.pack("<i", rel), b"\xcb", b"\xcd\x80", b"\xf4"])
        elif k < 24:       # stores and string operations
            out += rng.choice([b"\x89\x1d" + struct.pack("<I", word), b"\x66\x89\x1d" + struct.pack("<I", word),
                               b"\xab", b"\xf3\xa5", b"\x87\x1d" + struct.pack("<I", word), b"\x0f\xc1\x03",
                               b"\xc7\x05" + struct.pack("<I", word) + struct.pack("<I", d)])
        elif k < 26:       # anything at all
            out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        else:              # more constants, so that addresses are often known
            out += rng.choice([b"\xbb" + struct.pack("<I", d), b"\xb8" + struct.pack("<I", d),
                               b"\x8b\x1d" + struct.pack("<I", word), b"\x8b\x03"])
    return bytes(out)


def _guest(rng: random.Random):
    code = _program(rng, rng.randint(8, 300))
    start = rng.randrange(0, max(1, min(len(code), 64)))
    fault = b"\x65\x8b\x0d" + struct.pack("<i", rng.choice([-4, -8, 0x14]))   # the faulting access
    code = code[:start] + fault + code[start:]
    data = bytearray(rng.randrange(256) for _ in range(PAGE))
    for i in range(0, PAGE, 4):   # words that are TLS offsets or code addresses (GOT slots, return addresses)
        if rng.random() < 0.5:
            data[i:i + 4] = struct.pack("<I", rng.choice([rng.choice(TLS_OFFSETS) & 0xFFFF_FFFF,
                                                          CODE + rng.randrange(len(code) + 8)]))
    stack = bytearray(PAGE * 2)
    for i in range(0, len(stack), 4):
        stack[i:i + 4] = struct.pack("<I", CODE + rng.randrange(len(code) + 8) if rng.random() < 0.7
                                     else rng.choice(TLS_OFFSETS) & 0xFFFF_FFFF)
    page = bytearray(PAGE)
    page[:len(code)] = code[:PAGE]
    regions = [(CODE, bytes(page), PROT_RX), (DATA, bytes(data), rng.choice([PROT_RW, PROT_R, 0])),
               (STACK, bytes(stack), PROT_RW), (ROCODE, bytes(page), PROT_R)]
    regs = {name: rng.choice([0, DATA + 4 * rng.randrange(64), rng.choice(TLS_OFFSETS) & 0xFFFF_FFFF,
                              rng.randrange(1 << 32)])
            for name in ("eax", "ecx", "edx", "ebx", "esi", "edi", "ebp")}
    regs["esp"] = STACK + 4 * rng.randrange(PAGE // 2)
    return FakeMemory(regions), regs, CODE + start


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1), sign=st.sampled_from([-1, 1]),
       threshold=st.sampled_from([1.0, 1.57, 2.81, 6.5]), budget=st.sampled_from([1, 4, 16, 32, 96]),
       below=st.sampled_from([1 << 32, 0xF580_0000, DATA + 0x800, CODE + 0x40]))
def test_the_walks_agree_on_random_programs(seed, sign, threshold, budget, below):
    mem, regs, eip = _guest(random.Random(seed))
    spec, native = both(mem, regs, eip, sign, threshold, budget, below)
    assert native == spec


def test_the_random_programs_reach_every_verdict():
    """The generator is not degenerate: its programs give all three answers, after walks of many lengths."""
    seen, lengths = set(), set()
    for seed in range(400):
        mem, regs, eip = _guest(random.Random(seed))
        spec, native = both(mem, regs, eip, -1, 1.57, 32, 1 << 32)
        assert native == spec
        seen.add(native.verdict)
        lengths.add(native.walked)
    assert seen == {LONG, SHORT, UNKNOWN}
    assert len(lengths) > 10


def test_the_c_walk_reads_no_word_at_or_above_the_hypervisor():
    """A GOT word that would make the run long lies across ``below``: the C walk must not read it."""
    below = DATA + PAGE - 2
    code = (b"\x65\x8b\x0d\xfc\xff\xff\xff" + b"\x8b\x43\x00" + b"\x65\x8b\x00" + b"\x65\x8b\x00"
            + b"\x65\xa1\x14\x00\x00\x00")
    data = bytearray(PAGE)
    data[PAGE - 4:] = struct.pack("<i", -16)
    mem = FakeMemory([(CODE, code.ljust(PAGE, b"\x90"), PROT_RX), (DATA, bytes(data), PROT_RW)])
    regs = dict.fromkeys(("eax", "ecx", "edx", "esi", "edi", "ebp"), 0) | {"ebx": DATA + PAGE - 4, "esp": STACK}
    spec, native = both(mem, regs, CODE, -1, 1.57, 32, below)
    assert native == spec and native.verdict == UNKNOWN
    spec, native = both(mem, regs, CODE, -1, 1.57, 32, 1 << 32)      # below it, the same word is read
    assert native == spec and native.verdict == LONG


def _arithmetic_guest(rng: random.Random):
    """Straight-line code that computes %gs offsets in registers: every ALU operation, inc/dec, lea, mov,
    push/pop and xchg on eax/ebx/ecx, with accesses through the results. A wrong value flips a sign."""
    small = (0, 1, 4, 8, 0x10, 0x20, -4 & 0xFFFF_FFFF, -8 & 0xFFFF_FFFF, -0x20 & 0xFFFF_FFFF,
             0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF)
    code = bytearray(b"\x65\x8b\x0d\xfc\xff\xff\xff")
    for _ in range(rng.randint(3, 24)):
        dst, src = rng.choice((0, 1, 3)), rng.choice((0, 1, 3))
        imm = struct.pack("<I", rng.choice(small))
        code += rng.choice([
            bytes([0x81, 0xC0 | rng.randrange(8) << 3 | dst]) + imm,
            bytes([0x83, 0xC0 | rng.randrange(8) << 3 | dst, rng.randrange(256)]),
            bytes([rng.randrange(8) * 8 + 1, 0xC0 | src << 3 | dst]),
            bytes([rng.randrange(8) * 8 + 3, 0xC0 | dst << 3 | src]),
            bytes([rng.randrange(8) * 8 + 5]) + imm,
            bytes([0x40 + dst]), bytes([0x48 + dst]), bytes([0xB8 + dst]) + imm,
            bytes([0x8D, 0x80 | dst << 3 | src]) + imm,
            bytes([0x8D, 0x04 | dst << 3, rng.randrange(4) << 6 | src << 3 | 3]),
            bytes([0x50 + src, 0x58 + dst]), bytes([0x87, 0xC0 | src << 3 | dst]),
            bytes([0xF7, 0xD8 | dst]), bytes([0xD1, 0xE0 | dst]),
            b"\x65\x8b\x13", b"\x65\x8b\x10", b"\x65\x8b\x11", b"\x65\x8b\x53" + bytes([rng.randrange(256)]),
        ])
    code += b"\x65\xa1\x14\x00\x00\x00"
    mem = FakeMemory([(CODE, bytes(code).ljust(PAGE, b"\xf4"), PROT_RX), (STACK, bytes(PAGE), PROT_RW)])
    regs = {name: rng.choice(small) for name in ("eax", "ecx", "edx", "ebx", "esi", "edi", "ebp")}
    regs["esp"] = STACK + PAGE // 2
    return mem, regs, CODE


def test_the_walks_agree_on_computed_offsets():
    verdicts = {LONG: 0, SHORT: 0, UNKNOWN: 0}
    for seed in range(3000):
        mem, regs, eip = _arithmetic_guest(random.Random(seed))
        for sign, threshold in ((-1, 2.81), (1, 1.57)):
            spec, native = both(mem, regs, eip, sign, threshold, 64, 1 << 32)
            assert native == spec, seed
            verdicts[native.verdict] += 1
    assert min(verdicts.values()) > 300, verdicts


def test_the_walks_agree_at_the_top_of_the_address_space():
    """An instruction ending exactly at 2^32 (nothing above it) decodes in both walks."""
    page = bytearray(b"\x90" * PAGE)
    page[0xFF3:0xFFA] = b"\x65\x8b\x0d" + struct.pack("<i", -4)     # the fault at 0xFFFFFFF3
    page[0xFFA:] = b"\x65\xa1" + struct.pack("<i", -8)               # 0xFFFFFFFA..0xFFFFFFFF
    spec, native = both(FakeMemory([(0xFFFF_F000, bytes(page), PROT_RX)]), {"esp": 0}, 0xFFFF_FFF3, -1, 1.0, 32,
                        1 << 32)
    assert native == spec and native.verdict == LONG


def test_a_region_table_with_a_hole_in_code_reads_nothing_there():
    """Regions need not be page-sized: code running into a gap between two is no code (no read of the gap)."""
    import ctypes

    a = ctypes.create_string_buffer(b"\x65\x8b\x0d\xfc", 4)
    b = ctypes.create_string_buffer(b"\xff\xff\xff\xf4" * 4, 16)
    walker = RegionWalker([(0x1000, 4, PROT_RX, ctypes.addressof(a)), (0x1008, 16, PROT_RX, ctypes.addressof(b))],
                          0xF580_0000)
    assert walker.walk(c_regs({}, 0x1000), -1, 2.0, 32).verdict == UNKNOWN


def test_the_memo_answers_only_for_its_own_threshold_and_budget():
    """A memoised walk is a function of the threshold and the budget too: another pair walks afresh."""
    code = (b"\x65\x8b\x0d\xfc\xff\xff\xff" + b"\x65\x8b\x0d\xf8\xff\xff\xff" * 3 + b"\x65\xa1\x14\x00\x00\x00")
    mem = FakeMemory([(CODE, code.ljust(PAGE, b"\xf4"), PROT_RX)])
    regions = [(r.start, r.size, r.prot, r.host_address) for r in mem.regions()]
    memo = RegionWalker(regions, 1 << 32, decode_cache=True, memo=True)
    regs = c_regs({"esp": STACK}, CODE)
    for threshold, budget in ((2.81, 32), (2.81, 32), (100.0, 32), (2.81, 1), (2.81, 32)):
        fresh = RegionWalker(regions, 1 << 32).walk(regs, -1, threshold, budget)
        got = memo.walk(regs, -1, threshold, budget)
        assert (got.verdict, got.walked or fresh.walked) == (fresh.verdict, fresh.walked)
    assert memo.memo_stats()[0] >= 1          # the repeated (2.81, 32) walks were reused


def test_the_memo_reuses_a_walk_exactly_when_what_it_read_still_holds():
    """The C memo against the spec's record of a walk's inputs (ahead._Inputs): after a register or a word
    changes, a walk whose inputs all still read the same is reused (when it could be kept: no code it could
    not decode, at most 16 words), and a reused answer is the one a fresh walk gives."""
    reused_seen = fresh_seen = 0
    for seed in range(400):
        rng = random.Random(seed)
        mem, regs, eip = _guest(rng)
        regions = [(r.start, r.size, r.prot, r.host_address) for r in mem.regions()]
        memo = RegionWalker(regions, 1 << 32, memo=True)
        code_at, read_word = guest_readers(mem, 1 << 32)
        insn = code_at(eip)
        _, inputs = walk(code_at, regs.__getitem__, read_word, insn, -1, 1.57, 32)
        memo.walk(c_regs(regs, eip), -1, 1.57, 32)
        if rng.random() < 0.5:                                   # change a register ...
            regs[rng.choice(("eax", "ebx", "ecx", "esi", "esp"))] ^= rng.choice((4, 0x8000_0000))
        else:                                                    # ... or a word of data or stack
            where = rng.choice((DATA, STACK)) + 4 * rng.randrange(PAGE // 4)
            mem.write(where, struct.pack("<I", rng.randrange(1 << 32)))
        again = memo.walk(c_regs(regs, eip), -1, 1.57, 32)
        fresh = RegionWalker(regions, 1 << 32).walk(c_regs(regs, eip), -1, 1.57, 32)
        keepable = not inputs.code_missing and len(inputs.words) <= 16
        if keepable and inputs.still_hold(regs.__getitem__, read_word):
            assert again.reused, seed
        if again.reused:
            assert again.verdict == fresh.verdict, seed
            reused_seen += 1
        else:
            assert again == fresh, seed
            fresh_seen += 1
    assert reused_seen > 50 and fresh_seen > 50, (reused_seen, fresh_seen)
