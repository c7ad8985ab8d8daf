"""The machine layer: fs/gs enforcement before commit, exits, counters.

Guest code is assembled with keystone and run in ring 3 on a real VCpu.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keystone import KS_ARCH_X86, KS_MODE_32, Ks

from tlslab.machine import fastpath, layout
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from tlslab.machine.vcpu import ExitReason, VCpu
from tlslab.x86 import xen
from tlslab.x86.descriptor import SegmentDescriptor

KS = Ks(KS_ARCH_X86, KS_MODE_32)
CODE = 0x0804_8000
DATA = 0x0810_0000
TCB = DATA + 0x840  # deliberately not page aligned, like glibc's TCB
STACK_TOP = layout.STACK_TOP
GS_SELECTOR = (layout.GDT_ENTRY_TLS_MIN << 3) | 3

PROLOGUE = f"mov eax, {GS_SELECTOR}; mov gs, ax; "


def make_vcpu(body: str, desc: SegmentDescriptor | None = None, checks: bool = True,
              code_prot: int = PROT_READ | PROT_EXEC, code_size: int = 0x1000, **vcpu_options) -> VCpu:
    code = bytes(KS.asm(PROLOGUE + body + "; mov eax, 1; int 0x80", CODE)[0])
    v = VCpu(checks=checks, **vcpu_options)
    v.mem.map(CODE, code_size, code_prot)
    v.mem.write(CODE, code)
    v.mem.map(DATA, 0x2000, PROT_READ | PROT_WRITE)
    v.mem.map(STACK_TOP - 0x10000, 0x10000, PROT_READ | PROT_WRITE)
    v.set_descriptor(layout.GDT_ENTRY_TLS_MIN, desc or SegmentDescriptor.flat_user_data(TCB))
    v.enter_user_mode(CODE, STACK_TOP - 0x100)
    return v


def truncated() -> SegmentDescriptor:
    return xen.truncate(SegmentDescriptor.flat_user_data(TCB), "nonpae")


def test_allowed_gs_accesses_run_and_are_counted():
    v = make_vcpu("mov dword ptr gs:[0x10], 0x1234; mov ebx, dword ptr gs:[0x10]; mov ecx, dword ptr gs:[-0x20]")
    v.mem.write_u32(TCB - 0x20, 0xCAFE)
    e = v.run()
    assert e.reason is ExitReason.SYSCALL
    assert v.regs.get("ebx") == 0x1234
    assert v.regs.get("ecx") == 0xCAFE
    assert v.mem.read_u32(TCB + 0x10) == 0x1234  # the window aliases the real TCB
    gs = v.segment_counters()["gs"]
    assert (gs.accesses, gs.positive, gs.negative, gs.sign_changes) == (3, 2, 1, 1)
    assert {s.min_offset for s in v.site_counters()} == {0x10, -0x20}


@pytest.mark.parametrize(
    "insn, write",
    [
        ("mov ebx, dword ptr gs:[-0x20]", False),
        ("mov dword ptr gs:[-0x20], ebx", True),
        ("add dword ptr gs:[-0x20], 5", False),
        ("inc dword ptr gs:[-0x20]", False),
        ("pop dword ptr gs:[-0x20]", True),
        ("push dword ptr gs:[-0x20]", False),
        ("xchg dword ptr gs:[-0x20], ebx", False),
        ("mov byte ptr gs:[-0x1], 7", True),
    ],
)
def test_violation_stops_before_commit(insn, write):
    v = make_vcpu(f"mov ebx, 0x77; {insn}; mov ecx, 9", truncated())
    v.mem.write_u32(TCB - 0x20, 0x11111111)
    v.mem.write_u32(STACK_TOP - 0x100, 0xAAAAAAAA)
    e = v.run()
    assert e.reason is ExitReason.SEGMENT_VIOLATION
    vio = e.violation
    assert vio.segment == "gs"
    assert vio.offset == (0xFFFFFFFF if "gs:[-0x1]" in insn else 0xFFFFFFE0)
    assert vio.size == (1 if "byte" in insn else 4)
    assert vio.write is write
    assert vio.linear == (TCB + vio.offset) & 0xFFFFFFFF
    # nothing of the instruction happened
    assert v.mem.read_u32(TCB - 0x20) == 0x11111111
    assert v.regs.get("ebx") == 0x77
    assert v.regs.get("ecx") == 0
    assert v.regs.get("esp") == STACK_TOP - 0x100          # push/pop did not move the stack
    assert v.mem.read_u32(STACK_TOP - 0x104) == 0 and v.mem.read_u32(STACK_TOP - 0x100) == 0xAAAAAAAA
    code = v.mem.read(vio.eip, 8)
    assert code[0] == 0x65  # EIP is the faulting gs-prefixed instruction


def test_restart_after_descriptor_change_completes_instruction():
    v = make_vcpu("mov ebx, dword ptr gs:[-0x20]; mov ecx, dword ptr gs:[0x4]", truncated())
    v.mem.write_u32(TCB - 0x20, 0xBEEF)
    v.mem.write_u32(TCB + 4, 0xF00D)
    e = v.run()
    assert e.reason is ExitReason.SEGMENT_VIOLATION
    flipped = xen.flip(e.violation.descriptor, e.violation.offset, "nonpae")
    v.set_descriptor(layout.GDT_ENTRY_TLS_MIN, flipped)
    e = v.run()
    assert e.reason is ExitReason.SEGMENT_VIOLATION and e.violation.offset == 4
    v.set_descriptor(layout.GDT_ENTRY_TLS_MIN, xen.flip(e.violation.descriptor, 4, "nonpae"))
    assert v.run().reason is ExitReason.SYSCALL
    assert (v.regs.get("ebx"), v.regs.get("ecx")) == (0xBEEF, 0xF00D)


def test_plain_access_to_hypervisor_hole_is_a_fault():
    v = make_vcpu("mov ebx, dword ptr [0xFC000100]")
    e = v.run()
    assert e.reason is ExitReason.PAGE_FAULT
    assert e.page_fault.linear == 0xFC000100


def test_gs_access_beyond_user_space_is_a_fault_even_if_segment_allows():
    v = make_vcpu(f"mov ebx, dword ptr gs:[{0xFC000000 - TCB:#x}]")
    e = v.run()
    assert e.reason is ExitReason.PAGE_FAULT
    assert e.page_fault.linear == 0xFC000000


def test_instruction_count_is_exact_and_deterministic():
    body = "; ".join(["add ebx, 1"] * 37)
    counts = set()
    for _ in range(2):
        v = make_vcpu(body)
        assert v.run().reason is ExitReason.SYSCALL
        counts.add(v.counters.instructions)
    # prologue 2 + body 37 + epilogue 2 (mov eax; int 0x80)
    assert counts == {41}


@pytest.mark.parametrize("counter", ["inline", "hook"])
def test_instruction_count_is_exact_over_more_blocks_than_the_block_front_holds(counter, monkeypatch):
    """The block hook keeps counts in a small two-way front (_fastpath.c) over a large table: 1,500
    distinct blocks run three times collide and evict there, and the count must stay exact. Unicorn's
    inline counter (tlslab's build) takes each block's count from the translator instead: exact too."""
    if counter == "inline" and fastpath.INLINE_COUNTER is None:
        pytest.skip("this Unicorn has no inline block counter (tests/test_block_counter.py says why)")
    if counter == "hook":
        monkeypatch.setattr(fastpath, "INLINE_COUNTER", None)
    blocks, rounds = 1500, 3
    lines = [f"mov ecx, {rounds}", "top:"]
    expected_loop = 0
    for i in range(blocks):
        adds = 1 + i % 3
        lines += ["add ebx, 1"] * adds + [f"jmp b{i}", f"b{i}:"]
        expected_loop += adds + 1
    lines += ["dec ecx", "jnz top", "mov eax, 1", "int 0x80"]
    base = 0x00400000
    code = bytes(KS.asm("; ".join(lines), base)[0])
    v = VCpu()
    v.mem.map(base, (len(code) + 0xFFF) & ~0xFFF, PROT_READ | PROT_EXEC)
    v.mem.write(base, code)
    v.mem.map(STACK_TOP - 0x10000, 0x10000, PROT_READ | PROT_WRITE)
    v.enter_user_mode(base, STACK_TOP - 0x100)
    assert v.run().reason is ExitReason.SYSCALL
    assert v.regs.get("ebx") == rounds * sum(1 + i % 3 for i in range(blocks))
    assert v.counters.instructions == 1 + rounds * (expected_loop + 2) + 2
    if counter == "hook":
        assert v._fast.header.block_misses >= blocks  # every distinct block was counted by Python once


def test_instruction_count_excludes_faulting_and_later_instructions():
    v = make_vcpu("add ebx, 1; add ebx, 1; mov ecx, dword ptr gs:[-4]; add ebx, 1", truncated())
    assert v.run().reason is ExitReason.SEGMENT_VIOLATION
    assert v.counters.instructions == 4  # mov eax, mov gs, add, add


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(min_value=-0x800, max_value=0x7FC), size=st.sampled_from([1, 2, 4]),
       expand_down=st.booleans())
def test_window_verdicts_match_tlslab_x86(offset, size, expand_down):
    """Whatever the descriptor, the machine refuses exactly what tlslab.x86 refuses."""
    from tlslab.x86.segcheck import check_data_access

    desc = truncated()
    if expand_down:
        desc = xen.flip(desc, 0xFFFFFFF0, "nonpae")
    ptr = {1: "byte", 2: "word", 4: "dword"}[size]
    reg = {1: "bl", 2: "bx", 4: "ebx"}[size]
    v = make_vcpu(f"mov {reg}, {ptr} ptr gs:[{offset}]", desc)
    e = v.run()
    expected = check_data_access(desc, offset & 0xFFFFFFFF, size, False).allowed
    assert (e.reason is ExitReason.SYSCALL) == expected
    if not expected:
        assert e.reason is ExitReason.SEGMENT_VIOLATION
        assert e.violation.offset == offset & 0xFFFFFFFF and e.violation.size == size


@pytest.mark.parametrize("real", [0xFFFF0000, 0xFC000000, 0xC0000000, 0x7FFF0000])
def test_gs_access_to_kernel_or_hole_through_slot6_never_reads_hypervisor_pages(real):
    """Untruncated %gs (native) aimed at kernel/hole space lands next to the GDT page in
    Unicorn's space; it must fault, not read the hypervisor's pages."""
    v = make_vcpu(f"mov ebx, dword ptr gs:[{(real - TCB) & 0xFFFFFFFF:#x}]")
    e = v.run()
    assert e.reason is ExitReason.PAGE_FAULT
    assert e.page_fault.linear == real
    assert v.regs.get("ebx") == 0


def test_plain_write_to_hypervisor_pages_is_refused_and_reads_of_gdt_allowed():
    v = make_vcpu(f"mov ebx, dword ptr [{layout.GDT_BASE + 8 * layout.GDT_ENTRY_USER_DS:#x}]")
    assert v.run().reason is ExitReason.SYSCALL  # Xen maps the GDT read-only into the guest
    v = make_vcpu(f"mov dword ptr [{layout.GDT_BASE + 8 * layout.GDT_ENTRY_TLS_MIN:#x}], 0")
    gdt = bytes(v.uc.mem_read(layout.GDT_BASE, 8 * layout.GDT_ENTRIES))
    e = v.run()
    assert e.reason is ExitReason.PAGE_FAULT
    assert e.page_fault.linear == layout.GDT_BASE + 8 * layout.GDT_ENTRY_TLS_MIN and e.page_fault.write
    # the GDT is intact, byte for byte, and its TLS entry is a present ring-3 data segment
    assert bytes(v.uc.mem_read(layout.GDT_BASE, 8 * layout.GDT_ENTRIES)) == gdt
    tls = int.from_bytes(gdt[8 * layout.GDT_ENTRY_TLS_MIN:8 * layout.GDT_ENTRY_TLS_MIN + 8], "little")
    assert (tls >> 40) & 0xF0 == 0xF0     # P=1, DPL=3, S=1


@pytest.mark.parametrize("checks, count", [(True, True), (False, True), (False, False)])
def test_a_spinning_guest_stops_at_the_wall_clock_limit(checks, count):
    import time

    v = make_vcpu("spin: jmp spin", checks=checks, count_instructions=count, timeout_seconds=0.3)
    t0 = time.monotonic()
    e = v.run()
    elapsed = time.monotonic() - t0
    assert e.reason is ExitReason.TIMEOUT
    assert "0.3 s" in e.message
    assert 0.3 <= elapsed < 5.0
    assert CODE <= e.eip < CODE + 0x100


def test_the_limit_is_for_the_whole_run_not_per_exit():
    """A guest that loops on system calls returns to the layer above all the time; it still times out."""
    import time

    v = make_vcpu("again: mov eax, 20; int 0x80; jmp again", timeout_seconds=0.3)
    t0 = time.monotonic()
    exits = 0
    while time.monotonic() - t0 < 10.0:  # a broken limit fails the test instead of hanging it
        e = v.run()
        if e.reason is not ExitReason.SYSCALL:
            break
        exits += 1
        v.regs.set("eax", 1)
    assert e.reason is ExitReason.TIMEOUT
    assert exits > 100
    assert time.monotonic() - t0 < 5.0


@pytest.mark.parametrize(
    "insn, write",
    [
        ("mov dword ptr gs:[0x10], 0x5555", True),
        ("add dword ptr gs:[0x10], 5", True),       # read-modify-write: refused at the read, as a write
        ("mov dword ptr gs:[0x7be], 0x5555", True),  # straddles a writable page and a read-only one
    ],
)
def test_gs_writes_respect_the_guest_page_rights(insn, write):
    """Aliases are mapped with no permissions; the fast path applies the guest's own rights (mprotect)."""
    v = make_vcpu(f"{insn}; mov ecx, 9")
    ro_page = (TCB + 0x10) & ~0xFFF if "0x10]" in insn else DATA + 0x1000
    v.mem.protect(ro_page, 0x1000, PROT_READ)
    before = v.mem.read(DATA, 0x2000)
    e = v.run()
    assert e.reason is ExitReason.PAGE_FAULT, e
    assert e.page_fault.write is write and e.page_fault.via_segment == "gs"
    assert "page not writable" in e.message
    assert v.mem.read(DATA, 0x2000) == before   # nothing of it committed
    assert v.regs.get("ecx") != 9
    # reads of the read-only page through %gs still work
    v2 = make_vcpu("mov ebx, dword ptr gs:[0x10]")
    v2.mem.write_u32(TCB + 0x10, 0xABCD)
    v2.mem.protect((TCB + 0x10) & ~0xFFF, 0x1000, PROT_READ)
    assert v2.run().reason is ExitReason.SYSCALL and v2.regs.get("ebx") == 0xABCD


@pytest.mark.parametrize("address", [layout.ENTRY_STACK - 4, layout.ENTRY_STUB, layout.GDT_BASE + layout.PAGE_SIZE])
def test_hypervisor_pages_the_host_read_stay_closed_to_the_guest(address):
    """Entering ring 3 reads the entry stack and stub for the host; the guest may not read them after
    (a TLB entry left by the host's read would skip the protection hook: the vCPU flushes it)."""
    v = make_vcpu(f"mov ebx, dword ptr [{address:#x}]")
    e = v.run()
    assert e.reason is ExitReason.PAGE_FAULT and e.page_fault.linear == address
    assert v.regs.get("ebx") == 0


@pytest.mark.parametrize("target", [layout.GDT_BASE, layout.ENTRY_STUB])
def test_the_guest_cannot_execute_hypervisor_pages(target):
    v = make_vcpu(f"mov eax, {target:#x}; jmp eax")
    e = v.run()
    assert e.reason is ExitReason.PAGE_FAULT and e.page_fault.fetch and e.page_fault.linear == target


def test_a_window_access_allowed_once_is_judged_again_every_time():
    """Aliases are MMIO: no TLB entry lets a later access through unjudged (a RAM alias would)."""
    v = make_vcpu("mov ebx, dword ptr gs:[-0x20]")
    assert v.run().reason is ExitReason.SYSCALL            # flat: allowed (and Unicorn has read the page)
    v.set_descriptor(layout.GDT_ENTRY_TLS_MIN, truncated())
    v.regs.set("eip", CODE)
    e = v.run()
    assert e.reason is ExitReason.SEGMENT_VIOLATION and e.violation.offset == (-0x20) & 0xFFFFFFFF


@pytest.mark.parametrize("insn", ["mov dword ptr gs:[0x11], 0x12345678", "mov word ptr gs:[0x13], 0x1234",
                                  "add dword ptr gs:[0x11], 1", "mov ebx, dword ptr gs:[0x11]"])
def test_an_unaligned_window_access_is_one_access(insn):
    """Unicorn retries an unaligned MMIO store byte by byte and asks the protection hook for each byte:
    the statistics still count one access (found by review)."""
    v = make_vcpu(insn)
    assert v.run().reason is ExitReason.SYSCALL
    assert v.segment_counters()["gs"].accesses == 1
    assert [s.accesses for s in v.site_counters()] == [1]


def test_a_program_starts_with_the_linux_fpu_state():
    """x87 control word 0x037f (double-extended precision, exceptions masked), an empty register stack
    and MXCSR 0x1f80, as Linux starts every image: Unicorn's own start state (control word 0) would
    make a save/restore of the control word switch doubles to single precision."""
    body = (f"fnstcw word ptr [{DATA}]; fnstsw word ptr [{DATA + 2}]; stmxcsr dword ptr [{DATA + 4}]; "
            f"fld1; fld1; fadd st(0), st(1); fstp qword ptr [{DATA + 8}]; fstp st(0)")
    v = make_vcpu(body)
    assert v.run().reason is ExitReason.SYSCALL
    raw = v.mem.read(DATA, 16)
    assert int.from_bytes(raw[0:2], "little") == 0x037F
    assert int.from_bytes(raw[2:4], "little") == 0   # no exception flags, TOP 0: the stack was empty
    assert int.from_bytes(raw[4:8], "little") == 0x1F80
    assert struct.unpack("<d", raw[8:16]) == (2.0,)


@pytest.mark.parametrize("body, vector", [("ud2", 6), ("xor ecx, ecx; div ecx", 0), ("int3", 3)])
def test_cpu_exceptions_exit_with_their_vector(body, vector):
    """#UD, #DE and int3 stop the run with the vector the kernel turns into a signal (SIGILL, SIGFPE,
    SIGTRAP): an invalid instruction is reported by Unicorn's INSN_INVALID hook, whose callback
    takes (uc, user_data) -- with a one-argument callback the hook failed silently."""
    v = make_vcpu("nop; " + body)
    e = v.run()
    assert e.reason is ExitReason.EXCEPTION and e.vector == vector, e
