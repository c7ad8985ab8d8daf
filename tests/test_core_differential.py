"""The C x86 core (tlslab/x86/_core.c) against tlslab.x86, its specification: exact agreement.

Every case runs both implementations on the same input and compares the
answers field by field. Generated cases (each number is what the test really
runs; the seeded loops use ``random.Random`` with a fixed seed so a failure
reproduces, the hypothesis tests are derandomized):

==============================================  ==========  ===========
what                                            hypothesis  seeded loop
==============================================  ==========  ===========
segment check vs segcheck.check_data_access          2,000       60,000
descriptor encode/decode vs SegmentDescriptor            -       10,000
flip vs xen.flip (both profiles)                     1,000       30,000
truncate vs xen.truncate                                 -       10,000
decode, grammar of prefixes/opcode/ModRM/SIB/...     1,000       50,000
decode, random byte strings                              -       20,000
emulate vs semantics.execute                          500*       30,000
==============================================  ==========  ===========

214,500 generated cases in all (* drawn from the grammar: about half are
forms the core decodes and so are emulated by both; the seeded loop counts
only those, and runs until it has 30,000). Plus every distinct fs/gs
instruction of the bundled guests (``guests/bin``, 327 forms today), decoded
through both and emulated from four random states each. The whole module
takes about 30 s on the 2-core development machine.

Agreement means: the same verdict (and fault reason) for a check; the same
descriptor or the same None for flip/truncate; for every input the C decoder
accepts, Python decodes and supports it with the same length, mnemonic,
operand and memory sizes, segment, addressing registers, displacement,
immediate, register operand and effective offset (and where Python supports
one of the core's forms, the core must accept it too); for emulation, the
same registers, EFLAGS, memory, sequence of accesses and refusal behaviour.
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlslab.x86 import core
from tlslab.x86.decode import DecodeError, decode
from tlslab.x86.descriptor import SegmentDescriptor
from tlslab.x86.opcodes import REG8, REG16, REG32
from tlslab.x86.segcheck import check_data_access
from tlslab.x86.semantics import effective_offset, execute, supported
from tlslab.x86.xen import PROFILES, expand_down_flat_limit, flip, truncate, truncated_flat_limit

GUEST_DIR = Path(__file__).resolve().parents[1] / "guests" / "bin"
U32 = 0xFFFF_FFFF
HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


# --------------------------------------------------------------------------- sources of choices
class RandomSource:
    """Choices from a seeded random.Random: fast, for the big loops."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options):
        return options[self.rng.randrange(len(options))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


class HypothesisSource:
    """The same choices drawn through hypothesis (shrinkable), for the @given tests."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options):
        return self.data.draw(st.sampled_from(options))

    def chance(self, p: float) -> bool:
        return self.data.draw(st.integers(0, 999)) < p * 1000


INTERESTING_WORDS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFF_FFFF,
                     0x8000_0000, 0x8000_0001, 0xFFFF_FFFE, 0xFFFF_FFFF, 0xFFFF_FF80, 0xFFFF_F000, 0xFFF)


def word(src) -> int:
    """A 32-bit value, edge values half of the time."""
    if src.chance(0.5):
        return src.choice(INTERESTING_WORDS)
    return src.integer(0, U32)


# --------------------------------------------------------------------------- (a) check
def descriptor(src) -> SegmentDescriptor:
    base = src.choice((0, 0, word(src), src.integer(0, 0xFFFFF) << 12))
    limit = src.choice((0xFFFFF, 0, 0xFFFF, 0xFFFFE, 0xFFF, src.integer(0, 0xFFFFF)))
    return SegmentDescriptor(
        base=base, limit=limit, accessed=src.chance(0.5), rw=src.chance(0.7), dc=src.chance(0.4),
        executable=src.chance(0.2), s=src.chance(0.9), dpl=src.integer(0, 3), present=src.chance(0.9),
        avl=src.chance(0.2), l=src.chance(0.1), db=src.chance(0.6), granularity=src.chance(0.5))


def offset_near(src, desc: SegmentDescriptor) -> int:
    """An offset around the places a check can change its mind."""
    limit = desc.effective_limit
    pivot = src.choice((0, limit, limit + 1, desc.upper_bound, U32, word(src)))
    return (pivot + src.integer(-8, 8)) & U32


def access_size(src) -> int:
    return src.choice((1, 2, 4, 4, 8, src.integer(1, 16), src.integer(1, U32)))


def assert_check_agrees(desc: SegmentDescriptor, offset: int, size: int, write: bool) -> None:
    expected = check_data_access(desc, offset, size, write)
    got = core.access_fault(desc, offset, size, write)
    assert got == expected.reason, (desc, hex(offset), size, write, expected.message, got)


def _check_case(src) -> None:
    desc = descriptor(src)
    assert_check_agrees(desc, offset_near(src, desc), access_size(src), src.chance(0.5))


@settings(max_examples=2000, **HYPOTHESIS)
@given(st.data())
def test_check_agrees_hypothesis(data):
    _check_case(HypothesisSource(data))


def test_check_agrees_seeded():
    src = RandomSource(0xC4EC)
    for _ in range(60_000):
        _check_case(src)


def test_descriptor_encoding_agrees_seeded():
    """The core's descriptor struct round-trips every 64-bit value as SegmentDescriptor does."""
    src = RandomSource(0xE4C0)
    for _ in range(10_000):
        raw = src.integer(0, (1 << 64) - 1)
        desc = SegmentDescriptor.decode(raw)
        assert core.decode_descriptor(raw) == desc, hex(raw)
        assert core.encode_descriptor(desc) == raw, hex(raw)


# --------------------------------------------------------------------------- (b) flip and truncate
PROFILE_NAMES = tuple(sorted(PROFILES))


def flip_candidate(src, profile: str) -> SegmentDescriptor:
    """Mostly what seg_fixup sees (a truncated flat segment or its twin), sometimes one field off."""
    base = src.choice((0, word(src), src.integer(0, 0xFFFFF) << 12, PROFILES[profile].hypervisor_start - 0x1000,
                       PROFILES[profile].hypervisor_start - src.integer(1, 0x2000)))
    desc = truncate(SegmentDescriptor.flat_user_data(base), profile)
    if src.chance(0.4) and desc.present and truncated_flat_limit(base, profile) is not None:
        desc = replace(desc, dc=True, limit=expand_down_flat_limit(base))
    if src.chance(0.3):
        field = src.choice(("dpl", "db", "granularity", "present", "executable", "dc", "limit", "s"))
        if field == "dpl":
            change = {"dpl": src.integer(0, 3)}
        elif field == "limit":
            change = {"limit": (desc.limit + src.choice((-1, 1, 0x100))) & 0xFFFFF}
        else:
            change = {field: not getattr(desc, field)}
        desc = replace(desc, **change)
    return desc


def _flip_case(src) -> None:
    profile = src.choice(PROFILE_NAMES)
    desc = flip_candidate(src, profile)
    offset = offset_near(src, desc) if src.chance(0.5) else (U32 + 1 - src.integer(1, 0x100)) & U32
    size = src.choice((None, 1, 2, 4, 8, src.integer(1, 0x2000)))
    expected = flip(desc, offset, profile, size=size)
    assert core.flip(desc, offset, profile, size=size) == expected, (desc, hex(offset), size, profile)


@settings(max_examples=1000, **HYPOTHESIS)
@given(st.data())
def test_flip_agrees_hypothesis(data):
    _flip_case(HypothesisSource(data))


def test_flip_agrees_seeded():
    src = RandomSource(0xF11B)
    flips = 0
    for _ in range(30_000):
        _flip_case(src)
    # the generator must reach the interesting branch, not only the None answers
    src = RandomSource(0xF11B)
    for _ in range(2_000):
        profile = src.choice(PROFILE_NAMES)
        desc = flip_candidate(src, profile)
        flips += core.flip(desc, (U32 + 1 - src.integer(1, 0x100)) & U32, profile, 4) is not None
    assert flips > 200


def test_truncate_agrees_seeded():
    src = RandomSource(0x7256)
    for _ in range(10_000):
        profile = src.choice(PROFILE_NAMES)
        desc = descriptor(src)
        assert core.truncate(desc, profile) == truncate(desc, profile), (desc, profile)


# --------------------------------------------------------------------------- (c) decode
PREFIXES = (0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E)
CORE_OPCODES = (
    [op for op in range(0x40) if op & 7 < 4]
    + [0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8B, 0x8F, 0xA0, 0xA1, 0xA2, 0xA3,
       0xC6, 0xC7, 0xF6, 0xF7, 0xFE, 0xFF, 0x0FB0, 0x0FB1, 0x0FC0, 0x0FC1, 0x0FB6, 0x0FB7, 0x0FBE, 0x0FBF])
NEIGHBOUR_OPCODES = (0x04, 0x05, 0x3C, 0x69, 0x6B, 0x8C, 0x8D, 0x8E, 0x90, 0xA4, 0xAB, 0xC0, 0xC1, 0xD1, 0xD3,
                     0x0F1F, 0x0FA3, 0x0FAF, 0x0FB8, 0x0FBA, 0x0FBC, 0x0F38, 0x0F94, 0x0F44)
#: The mnemonics of the core's forms: where Python supports one with a memory operand, so must C.
CORE_MNEMONICS = frozenset({"mov", "movzx", "movsx", "add", "or", "adc", "sbb", "and", "sub", "xor", "cmp",
                            "test", "inc", "dec", "not", "neg", "xchg", "cmpxchg", "xadd", "push", "pop",
                            "call", "jmp"})


def instruction_bytes(src) -> bytes:
    """prefixes, opcode, ModRM, SIB, displacement and immediate bytes of the forms the core knows (and neighbours)."""
    count = src.choice((0, 1, 1, 1, 2, 2, 3, 4, src.integer(5, 15)))
    prefixes = [src.choice((0x65, 0x64, 0x65, 0x64) + PREFIXES) for _ in range(count)]
    opcode = src.choice(CORE_OPCODES) if src.chance(0.9) else src.choice(NEIGHBOUR_OPCODES)
    opcode_bytes = [0x0F, opcode & 0xFF] if opcode > 0xFF else [opcode]
    mod = src.choice((0, 0, 1, 1, 2, 3))
    rm = src.choice((0, 1, 2, 3, 4, 5, 6, 7, 4, 5))
    modrm = mod << 6 | src.integer(0, 7) << 3 | rm
    sib = src.integer(0, 0xFF)
    tail = [src.choice((0x00, 0xFF, 0x80, 0x7F, src.integer(0, 0xFF))) for _ in range(8)]
    code = bytes(prefixes + opcode_bytes + [modrm, sib] + tail)
    if src.chance(0.1):
        code = code[:src.integer(0, len(code))]  # truncated: the decoder must not read past the end
    return code


def random_registers(src) -> dict[str, int]:
    regs = {name: word(src) for name in REG32}
    regs["eip"] = word(src)
    regs["eflags"] = src.integer(0, U32) if src.chance(0.5) else 0x202 | src.integer(0, 0x8D5) & 0x8D5
    return regs


def _register_name(number: int, size: int) -> str:
    return {1: REG8, 2: REG16, 4: REG32}[size][number]


def assert_decode_agrees(code: bytes, regs: dict[str, int]) -> core.CoreInstruction | None:
    """Both decoders on ``code``; returns the core's instruction when it accepted one."""
    py = decode(code, 0)
    c = core.decode(code)
    if isinstance(c, core.CoreRefusal):
        if c.reason != "unsupported":  # truncated, too long, #UD: Python must refuse too
            assert isinstance(py, DecodeError), (code.hex(), c.reason, py)
        if not isinstance(py, DecodeError) and py.mnemonic in CORE_MNEMONICS and py.memory is not None:
            ok, _ = supported(py)
            core_form = ok and "Sw" not in py.operands and not py.is_string
            assert not core_form, (code.hex(), "Python supports a core form the core refused", py.mnemonic, c.reason)
        return None
    where = (code.hex(), c)
    assert not isinstance(py, DecodeError), (where, py)
    ok, why = supported(py)
    assert ok, (where, why)
    mem = py.memory
    assert mem is not None and mem.address_size == 32, where
    assert c.raw == py.raw and c.length == py.length, (where, py.length)
    assert c.mnemonic == py.mnemonic and c.opcode == py.opcode, (where, py.mnemonic, hex(py.opcode))
    assert c.operand_size == py.operand_size and c.memory_size == py.memory_size, (where, py.operand_size,
                                                                                    py.memory_size)
    assert (c.segment, c.segment_overridden) == (mem.segment, mem.segment_overridden), (where, mem)
    assert (c.base, c.index, c.scale, c.displacement) == (mem.base, mem.index, mem.scale, mem.displacement), \
        (where, mem)
    assert c.immediate == py.immediate, (where, py.immediate)
    assert (c.lock, c.rep, c.repne, c.operand_size_override) == (
        py.prefixes.lock, py.prefixes.rep, py.prefixes.repne, py.prefixes.operand_size_override), (where, py.prefixes)
    assert (c.modrm, c.sib) == (py.modrm, py.sib), (where, py.modrm, py.sib)
    if c.form in ("mem,reg", "reg,mem"):
        assert _register_name(c.reg, c.operand_size) == py.reg, (where, py.reg)
    else:
        assert py.reg is None, (where, py.reg)
    assert core.effective_offset(c, regs) == effective_offset(py, regs.__getitem__), (where, regs)
    return c


def _decode_case(src) -> None:
    assert_decode_agrees(instruction_bytes(src), random_registers(src))


@settings(max_examples=1000, **HYPOTHESIS)
@given(st.data())
def test_decode_agrees_hypothesis(data):
    _decode_case(HypothesisSource(data))


def test_decode_agrees_seeded():
    src = RandomSource(0xDEC0)
    accepted = 0
    for _ in range(50_000):
        code, regs = instruction_bytes(src), random_registers(src)
        accepted += assert_decode_agrees(code, regs) is not None
    assert accepted > 20_000  # the grammar mostly produces forms the core decodes


def test_decode_random_bytes_seeded():
    src = RandomSource(0xB17E)
    for _ in range(20_000):
        code = bytes(src.integer(0, 0xFF) for _ in range(src.integer(0, 16)))
        assert_decode_agrees(code, random_registers(src))


def test_decode_reads_nothing_past_n():
    """Every prefix of a valid instruction is truncated (not decoded from bytes beyond n)."""
    full = bytes.fromhex("6566 c7 84 88 78563412 3412".replace(" ", ""))  # mov word gs:[eax+ecx*4+disp32], imm16
    assert isinstance(core.decode(full), core.CoreInstruction)
    for n in range(len(full)):
        assert core.decode(full[:n]) == core.CoreRefusal("truncated"), n


# --------------------------------------------------------------------------- (d) emulate
class Refused(Exception):
    """A memory access refused by the test's policy (the backend's safety check)."""


class DictCPU:
    """semantics.CPU over dicts, refusing the access numbered ``refuse_at``."""

    def __init__(self, regs: dict[str, int], memory: dict, refuse_at: int | None):
        self.regs, self.memory, self.refuse_at, self.attempts = regs, memory, refuse_at, 0

    def _attempt(self) -> None:
        self.attempts += 1
        if self.attempts - 1 == self.refuse_at:
            raise Refused

    def read_reg(self, name: str) -> int:
        return self.regs[name]

    def write_reg(self, name: str, value: int) -> None:
        self.regs[name] = value

    def read_mem(self, segment: str, offset: int, size: int) -> int:
        self._attempt()
        return sum(self.memory.get((segment, (offset + i) & U32), 0) << (8 * i) for i in range(size))

    def write_mem(self, segment: str, offset: int, size: int, value: int) -> None:
        self._attempt()
        for i in range(size):
            self.memory[(segment, (offset + i) & U32)] = (value >> (8 * i)) & 0xFF


def _place(memory: dict, segment: str, offset: int, value: int) -> None:
    for i in range(4):
        memory[(segment, (offset + i) & U32)] = (value >> (8 * i)) & 0xFF


def _emulate_case(src, code: bytes | None = None) -> bool:
    """Emulate one instruction (generated unless given) from a random state; False if the core refuses it."""
    code = instruction_bytes(src) if code is None else code
    c = core.decode(code)
    if not isinstance(c, core.CoreInstruction):
        return False
    py = decode(code, 0)
    regs = random_registers(src)
    offset = effective_offset(py, regs.__getitem__)
    memory: dict = {}
    operand = word(src)
    if c.mnemonic == "cmpxchg" and src.chance(0.5):
        operand = regs["eax"]  # the equal branch
    _place(memory, c.segment, offset, operand)
    _place(memory, "ss", regs["esp"], word(src))
    refuse_at = src.choice((None, None, None, 0, 1))

    py_regs, py_memory = dict(regs), dict(memory)
    cpu = DictCPU(py_regs, py_memory, refuse_at)
    try:
        effects = execute(py, cpu)
        py_status, py_accesses = "ok", effects.accesses
    except Refused:
        py_status, py_accesses = "refused", None

    attempts = []

    def refuse(segment, off, size, write):
        attempts.append((segment, off, size, write))
        return len(attempts) - 1 == refuse_at

    c_memory = dict(memory)
    result = core.emulate(c, regs, c_memory, refuse)
    where = (code[:c.length].hex(), c.mnemonic, regs, refuse_at)
    assert result.status == py_status, where
    assert len(attempts) == cpu.attempts, (where, attempts)
    assert result.registers == py_regs, (where, result.registers, py_regs)
    assert c_memory == py_memory, where
    if py_status == "refused":
        assert result.registers == regs and c_memory == memory, where  # a refusal changes nothing
    else:
        assert result.accesses == py_accesses, (where, result.accesses, py_accesses)
        assert c.accesses == len(py_accesses), (where, c.reads, c.writes)
        if c.only_explicit_memory:
            assert all(a.segment == c.segment and a.offset == offset for a in py_accesses), where
        else:
            assert any(a.segment == "ss" for a in py_accesses), where
    return True


@settings(max_examples=500, **HYPOTHESIS)
@given(st.data())
def test_emulate_agrees_hypothesis(data):
    _emulate_case(HypothesisSource(data))


def test_emulate_agrees_seeded():
    src = RandomSource(0xE111)
    emulated = attempts = 0
    while emulated < 30_000:  # count only inputs the core decodes: each is run through both
        emulated += _emulate_case(src)
        attempts += 1
    assert attempts < 70_000


# --------------------------------------------------------------------------- bundled guests
def _fs_gs_sites(path: Path) -> set[bytes]:
    """The bytes of every instruction with an fs or gs prefix in the ELF's executable sections (capstone sweep)."""
    from capstone import CS_ARCH_X86, CS_MODE_32, Cs
    from elftools.elf.elffile import ELFFile

    md = Cs(CS_ARCH_X86, CS_MODE_32)
    sites: set[bytes] = set()
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if elf["e_machine"] != "EM_386":
            return sites
        for sec in elf.iter_sections():
            if sec["sh_type"] != "SHT_PROGBITS" or not sec["sh_flags"] & 0x4:  # SHF_EXECINSTR
                continue
            code, off = sec.data(), 0
            while off < len(code):
                last = off
                for addr, size, _mn, _ops in md.disasm_lite(code[off:], off):
                    raw = code[addr:addr + size]
                    count = 0
                    while count < len(raw) and raw[count] in PREFIXES:
                        count += 1
                    if {0x64, 0x65} & set(raw[:count]):
                        sites.add(raw)
                    last = addr + size
                off = last if last > off else off + 1  # resynchronise after an undecodable byte
    return sites


def test_every_fs_gs_site_of_the_bundled_guests_agrees():
    """Decode (and emulate, from random states) every distinct fs/gs instruction of guests/bin through both."""
    binaries = sorted(p for p in GUEST_DIR.glob("*") if p.is_file()) if GUEST_DIR.is_dir() else []
    if not binaries:
        pytest.skip("no bundled guests (make guests)")
    sites: set[bytes] = set()
    for path in binaries:
        sites |= _fs_gs_sites(path)
    src = RandomSource(0x6E57)
    decoded = 0
    for code in sorted(sites):
        if assert_decode_agrees(code, random_registers(src)) is not None:
            decoded += 1
            for _ in range(4):
                assert _emulate_case(src, code)
    # today the core decodes every one of them (327 distinct forms in 28 binaries)
    assert len(sites) > 100 and decoded > len(sites) * 9 // 10, (len(sites), decoded)


def test_a_raising_callback_refuses_and_the_error_reaches_the_caller():
    """ctypes turns an exception in a callback into a return of 0 ("done"): the binding must not."""
    insn = core.decode(bytes.fromhex("65ff05fcffffff"))  # inc dword gs:[-4]
    regs = {"eip": 0x1000, "eflags": 0x202}

    def broken(segment, offset, size, write):
        if write:
            raise KeyError("policy bug")
        return False

    memory: dict = {}
    with pytest.raises(KeyError, match="policy bug"):
        core.emulate(insn, regs, memory, broken)
    assert memory == {}


def test_core_layout_matches_the_mirrors(monkeypatch):
    lib = core.load_library()
    core.check_layout(lib)

    class Swapped(ctypes.Structure):  # tc_regs with eip and eflags exchanged: same size, moved fields
        _fields_ = [("gpr", ctypes.c_uint32 * 8), ("eflags", ctypes.c_uint32), ("eip", ctypes.c_uint32)]

    monkeypatch.setitem(core._MIRRORS, "tc_regs", Swapped)
    with pytest.raises(core.CoreLayoutError, match="tc_regs"):
        core.check_layout(lib)


# --------------------------------------------------------------------------- the default matrix's programs
def _matrix_rows_from_a_root():
    """Native model cells of the default bench matrix whose programs come from a root filesystem (Debian's
    ls, dash, busybox and every library they load): their code is not in guests/bin."""
    from tlslab.bench.spec import load_spec

    rows = {}
    for cell in load_spec().cells():
        if cell.backend == "unicorn" and cell.spec.strategy == "native" and cell.spec.rootfs and not cell.skip:
            rows.setdefault(cell.workload, cell)
    return list(rows.values())


ROOT_ROWS = _matrix_rows_from_a_root()


@pytest.mark.parametrize("cell", ROOT_ROWS, ids=[c.workload for c in ROOT_ROWS])
def test_every_fs_gs_site_a_default_matrix_row_executes_agrees(cell):
    """Every fs/gs instruction a run of the row executes (all its processes and libraries), read from the
    file it was mapped from, decodes (and emulates, from random states) the same through both."""
    from tlslab.experiment import make_domain

    domain, _ = make_domain(cell.spec)
    result = domain.run()
    assert result.ok, result.crash
    codes = set()
    for site in result.sites:
        _symbol, code = domain.site_code(site)
        count = 0
        while count < len(code) and code[count] in PREFIXES:
            count += 1
        if {0x64, 0x65} & set(code[:count]):  # site_code reads the file the site's program mapped there;
            codes.add(code)                   # where it cannot tell which program, the bytes are not an
                                              # fs/gs instruction and are left out
    src = RandomSource(0x51735)
    decoded = 0
    for code in sorted(codes):
        insn = assert_decode_agrees(code, random_registers(src))
        if insn is not None:
            decoded += 1
            for _ in range(4):
                _emulate_case(src, code)
    assert len(codes) >= 10 and decoded == len(codes), (len(codes), decoded)
