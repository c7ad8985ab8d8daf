"""What tlslab's Unicorn patch (third_party/unicorn) must not change: guest semantics.

Part 2 of the patch lets a page's stores take Unicorn's fast path once no translated code comes
from it, and sends them back to the slow path (where a store invalidates the code it hits) when code
is translated from the page again. The danger is stale code: a guest that rewrites instructions it
has already run must run the new ones. Part 3 memoises cpu_restore_state (the PC a hook sees, the
EIP of a refused access); the danger is a stale PC after translated code is thrown away. Each test
runs on whatever library is loaded and must hold on the stock one too; under tlslab's build the
code paths above are the ones exercised (tests/test_block_counter.py checks which is loaded).
"""

from __future__ import annotations

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_MEM_WRITE, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_REG_ESP

from test_machine import CODE, GS_SELECTOR, KS, TCB, make_vcpu
from tlslab.machine.memory import PROT_EXEC, PROT_READ, PROT_WRITE
from tlslab.machine.vcpu import ExitReason, VCpu
from tlslab.x86 import xen
from tlslab.x86.descriptor import SegmentDescriptor



def rwx_vcpu(body: str, desc: SegmentDescriptor | None = None) -> VCpu:
    """A guest whose two code pages are writable: it may rewrite itself."""
    return make_vcpu(body, desc, code_prot=PROT_READ | PROT_WRITE | PROT_EXEC, code_size=0x2000)


def run_to_exit(v: VCpu):
    e = v.run()
    assert e.reason is ExitReason.SYSCALL, e
    return e


@pytest.mark.parametrize("rounds", [1, 5, 40])
def test_a_rewritten_function_runs_its_new_code(rounds):
    """call f; bump f's immediate; call f again: each call returns the new value."""
    v = rwx_vcpu(f"""
        xor ebx, ebx
        xor ecx, ecx
    again:
        call target
        add ebx, eax
        inc dword ptr [target + 1]
        inc ecx
        cmp ecx, {rounds}
        jne again
        mov eax, 1
        int 0x80
    target:
        mov eax, 1
        ret
    """)
    run_to_exit(v)
    assert v.regs.get("ebx") == sum(range(1, rounds + 1))


def test_a_store_into_the_running_block_changes_the_next_instruction():
    """The store and the instruction it rewrites are in one translation block."""
    v = rwx_vcpu("""
        xor ebx, ebx
        mov ecx, 6
    again:
        inc dword ptr [next + 1]
    next:
        mov eax, 100
        add ebx, eax
        dec ecx
        jnz again
        mov eax, 1
        int 0x80
    """)
    run_to_exit(v)
    assert v.regs.get("ebx") == sum(range(101, 107))


def test_a_page_that_lost_its_code_and_gets_code_again_is_watched_again():
    """A function alone on its page: run it (the page has code), rewrite it (its code is thrown
    away, the page has none, its stores may leave the slow path), rewrite it again, run it (code
    again: its stores must be back on the slow path), rewrite it, run it. Every run must see the
    last rewrite."""
    target = CODE + 0x1000
    v = rwx_vcpu(f"""
        mov edx, {target}
        call edx
        mov ebx, eax
        mov dword ptr [{target + 1}], 7
        mov dword ptr [{target + 1}], 20
        call edx
        add ebx, eax
        mov dword ptr [{target + 1}], 300
        call edx
        add ebx, eax
        mov dword ptr [{target + 1}], 4000
        call edx
        add ebx, eax
        mov eax, 1
        int 0x80
    """)
    v.mem.write(target, bytes(KS.asm("mov eax, 1; ret", target)[0]))
    run_to_exit(v)
    assert v.regs.get("ebx") == 1 + 20 + 300 + 4000


@pytest.mark.parametrize("flush", ["all", "range"])
def test_refused_accesses_report_their_own_eip_after_code_is_thrown_away(flush):
    """The memo of restored PCs must not outlive the code it describes. A program runs from one
    address to a refused access; the translated code is thrown away (all of it, so the code buffer
    is reused from its start; or just that range); the same position-independent bytes run from
    another address, each run starting with an empty code buffer, so they are translated to the
    same host code at the same host addresses: a stale memo would report the first address."""
    desc = xen.truncate(SegmentDescriptor.flat_user_data(TCB), "nonpae")
    body = f"mov eax, {GS_SELECTOR}; mov gs, ax; nop; nop; mov ecx, dword ptr gs:[-0x20]; mov eax, 1; int 0x80"
    code = bytes(KS.asm(body, CODE)[0])
    access = len(KS.asm(f"mov eax, {GS_SELECTOR}; mov gs, ax; nop; nop", CODE)[0])
    v = rwx_vcpu("", desc)
    moved = CODE + 0x400
    v.mem.write(CODE, code)
    v.mem.write(moved, code)
    v.uc.ctl_flush_tb()   # both runs start with an empty code buffer (no entry stub in it)
    first = v.run()
    assert first.reason is ExitReason.SEGMENT_VIOLATION
    assert first.eip == CODE + access
    if flush == "all":
        v.uc.ctl_flush_tb()
    else:
        v.invalidate_code(CODE, 0x1000)
    v.regs.set("eip", moved)
    second = v.run()
    assert second.reason is ExitReason.SEGMENT_VIOLATION
    assert second.eip == moved + access


def test_a_write_hook_added_after_code_ran_sees_that_code_s_stores():
    """Part 2 lets stores to a page without code off Unicorn's slow path, and code translated before
    a UC_HOOK_MEM_WRITE hook existed reaches the hook only through that path: adding the hook must
    put every page back on it (the adversarial oracle adds its write hook after the guest started).
    A bare engine: a function storing to a data page is called twice (its second store may take the
    fast path), a write hook is added, and the same translated code runs again."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    code, function, data, stack = 0x100000, 0x100800, 0x205000, 0x30A000
    main = bytes(KS.asm(f"call {function}; call {function}; nop; hlt", code)[0])
    uc.mem_map(code, 0x1000, UC_PROT_ALL)
    uc.mem_map(data, 0x1000, UC_PROT_ALL)
    uc.mem_map(stack, 0x1000, UC_PROT_ALL)
    uc.mem_write(code, main)
    uc.mem_write(function, bytes(KS.asm(f"mov dword ptr [{data + 0x10}], ecx; inc ecx; ret", function)[0]))
    end = code + len(main) - 1
    uc.reg_write(UC_X86_REG_ESP, stack + 0x800)
    uc.emu_start(code, end)
    seen = []
    uc.hook_add(UC_HOOK_MEM_WRITE, lambda _uc, _kind, address, size, value, _user: seen.append(address),
                begin=data, end=data + 0xFFF)
    uc.reg_write(UC_X86_REG_ESP, stack + 0x800)
    uc.emu_start(code, end)
    assert seen == [data + 0x10, data + 0x10]
