"""rewrite-2004 (Xen flip + XenLinux fixup.c out-of-line patching)."""

from __future__ import annotations

import pytest

from tlslab.experiment import RunSpec, execute, make_domain
from tlslab.hypervisor.strategies.rewrite2004 import FIXUP_BUF_USER, CannotPatch, build_stub
from tlslab.machine.memory import PROT_EXEC, PROT_WRITE
from tlslab.x86.decode import decode

GUESTS = ["lsr", "canary", "malloc", "stdio", "syscalls", "selfread", "fs-user"]


@pytest.mark.parametrize("guest", GUESTS)
def test_output_identical_to_native(guest):
    nat, _ = execute(RunSpec(guest, strategy="native"))
    d, _ = make_domain(RunSpec(guest, strategy="rewrite-2004"))
    r = d.run()
    assert r.ok, r.crash
    assert (r.status, r.stdout) == (nat.status, nat.stdout)
    c = r.counters["strategy"]
    # Xen flips on every trap and notifies the guest kernel every time
    assert c["traps"] == c["descriptor_writes"] == c["notifications"]
    assert c["patches"] > 0 and c["refused"] == 0
    for eip in d.strategy.patched:
        assert d.vcpu.mem.read(eip, 3) == b"\x67\xff\x16"


def test_lsr_patched_sites_stop_faulting():
    flip, _ = execute(RunSpec("lsr", strategy="flip"))
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite-2004"))
    r = d.run()
    s = d.strategy
    c = r.counters["strategy"]
    assert c["traps"] < flip.counters["strategy"]["traps"]
    # a patched site faulted once (the fault that patched it; it is no longer a %gs site); the stubs'
    # `add %gs:0` is a +ve access, so it faults whenever an unpatched -ve site left %gs expand-down
    faults_at = {x["eip"]: x["violations"] for x in r.sites}
    for eip in s.patched:
        assert faults_at.get(eip, 0) <= 1
    stub_faults = sum(v for eip, v in faults_at.items() if eip < FIXUP_BUF_USER + 0x2000)
    assert stub_faults > 0
    # the buffer is mapped read+exec at 0x1000 and holds the stubs
    region = d.vcpu.mem.region_at(FIXUP_BUF_USER)
    assert region.prot & PROT_EXEC and not region.prot & PROT_WRITE
    assert s.fixup_idx > 0 and len(s.stubs) == c["by_kind"]["stub-created"]
    # most lsr faults are forms fixup.c never handled: they stay flips
    assert any(k.startswith("not patched: bare disp32") for k in c["by_kind"])


def test_out_of_room_falls_back_to_flip():
    nat, _ = execute(RunSpec("lsr", strategy="native"))
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite-2004"))
    d.strategy.buffer_size = 100   # room for one or two stubs
    r = d.run()
    assert r.ok and r.stdout == nat.stdout
    c = r.counters["strategy"]
    assert c["by_kind"]["out-of-room"] > 0 and c["by_kind"]["stub-created"] <= 2


def test_patch_policy_none():
    flip, _ = execute(RunSpec("lsr", strategy="flip"))
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite-2004", patch_policy="none"))
    r = d.run()
    c = r.counters["strategy"]
    assert c["patches"] == 0 and c["traps"] == flip.counters["strategy"]["traps"] == c["notifications"]


def test_stub_for_reg_reg_mov_has_no_push():
    code = bytes.fromhex("658b00") + bytes.fromhex("89c3") + bytes(20)   # mov %gs:(%eax),%eax; mov %eax,%ebx
    insn = decode(code, 0x8048000)
    stub, covered, _ = build_stub(0x8048000, code, insn)
    assert covered == 5
    # pushf; add %gs:0,%eax; popf; mov (%eax),%eax; mov %eax,%ebx; ret
    assert stub == bytes.fromhex("9c" "650305" "00000000" "9d" "8b00" "89c3" "c3")


def test_stub_relocates_short_jcc_through_return_address():
    # mov %ecx,%gs:(%edx) ; je +0x10
    code = bytes.fromhex("65890a") + bytes.fromhex("7410") + bytes(20)
    insn = decode(code, 0x8048000)
    stub, covered, _ = build_stub(0x8048000, code, insn)
    assert covered == 5
    # push %edx; pushf; add %gs:0,%edx; popf; mov %ecx,(%edx); pop %edx; je +1; ret;
    # pushf; add $0x10,4(%esp); popf; ret   (off = covered - 5 + 0x10)
    assert stub == bytes.fromhex("52" "9c" "650315" "00000000" "9d" "890a" "5a" "7401c3" "9c" "8344240410" "9d" "c3")


def test_stub_adjusts_esp_operands_and_refuses_stack_ops():
    code = bytes.fromhex("658b10") + bytes.fromhex("8b0424") + bytes(20)   # ...; mov (%esp),%eax
    stub, covered, notes = build_stub(0x8048000, code, decode(code, 0x8048000))
    assert bytes.fromhex("8b442404") in stub and covered == 6
    code = bytes.fromhex("658b10") + bytes.fromhex("5b") + bytes(20)       # ...; pop %ebx
    with pytest.raises(CannotPatch):
        build_stub(0x8048000, code, decode(code, 0x8048000))
    code = bytes.fromhex("65890b") + bytes.fromhex("83c410") + bytes(20)   # ...; add $0x10,%esp
    with pytest.raises(CannotPatch):
        build_stub(0x8048000, code, decode(code, 0x8048000))


# ------------------------------------------------------------------ processes: one buffer in every address space
SCRIPT = ("i=0; while [ $i -lt 3 ]; do i=$((i+1)); echo $i | /bin/sed s/1/one/; done | /usr/bin/sort -r; "
          "/bin/ls /usr/lib | /usr/bin/wc -l; (cd /nonexistent 2>/dev/null; echo $?); /bin/grep -c x /bin/ls")


def _dash(strategy, **options):
    d, _ = make_domain(RunSpec("/bin/dash", ("-c", SCRIPT), rootfs="debian", tree=None, strategy=strategy, **options))
    return d, d.run()


@pytest.mark.parametrize("sharing", ["shared", "private"])
def test_forks_and_execs_share_the_one_fixup_buffer(debian_rootfs, sharing):
    """Every exec'd image maps the buffer with every stub made so far, and a stub made later reaches
    every live process: patched library pages call into it from any process (fixup.c's buffer was one
    set of pages in every page directory)."""
    _, nat = _dash("native")
    d, r = _dash("rewrite-2004", page_sharing=sharing)
    assert r.ok, r.crash and r.crash.describe()
    assert (r.status, r.stdout) == (nat.status, nat.stdout)
    assert r.counters["kernel"]["processes"] >= 8
    c = r.counters["strategy"]
    assert c["patches"] > 0 and c["by_kind"]["stub-created"] == len(d.strategy.stubs)
    assert c["traps"] < _dash("flip")[1].counters["strategy"]["traps"]
    blob = bytes.fromhex(d.strategy.patch_set.out_of_line["bytes"])
    assert blob == bytes(d.strategy.buffer[:len(blob)]) and blob.strip(b"\0")
    if sharing == "shared":   # library sites patched once for everyone
        assert r.counters["page_cache"]["mapped_patches"] > 0


def test_the_buffer_is_the_hypervisors_in_every_address_space():
    """The memory system calls refuse to unmap, re-protect or map over the fixup buffer (XenLinux
    kept those pages out of the process's reach), so no guest can change its view of the one buffer
    that every new stub is written into; a fork keeps the reservation."""
    from tlslab.linux.errno import SyscallError
    from tlslab.linux.syscalls_mm import do_mmap, sys_mprotect, sys_munmap
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite-2004"))
    r = d.run()
    assert r.ok
    p = d.first_process
    assert p.reserved and p.reserved[0][:2] == (FIXUP_BUF_USER, FIXUP_BUF_USER + 0x2000)
    for call in (lambda: sys_munmap(p, FIXUP_BUF_USER, 0x1000),
                 lambda: sys_mprotect(p, FIXUP_BUF_USER, 0x2000, 7),
                 lambda: do_mmap(p, 0, 0x3000, 3, 0x32, 0xFFFFFFFF, 0)):   # MAP_PRIVATE|FIXED|ANONYMOUS at 0
        with pytest.raises(SyscallError, match="EINVAL"):
            call()
    region = p.mem.region_at(FIXUP_BUF_USER)
    assert region.name == "[fixup]" and not region.prot & PROT_WRITE
    assert p.fork_into(type(p.vcpu)()).reserved == p.reserved


def test_a_program_that_maps_the_buffers_pages_itself_is_refused(tmp_path):
    """A first image linked at 0x1000 is not overwritten by the buffer: its first fault is refused
    with the reason (native runs it)."""
    import subprocess
    from pathlib import Path

    from conftest import GCC32, require_gcc32
    require_gcc32()
    exe = tmp_path / "low"
    src = Path(__file__).resolve().parent / "rewrite" / "low_text.c"
    cp = subprocess.run([*GCC32, "-O1", "-Wl,-Ttext-segment=0x1000", "-o", str(exe), str(src)],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    nat = execute(RunSpec(str(exe), strategy="native"))[0]
    assert nat.status == 0 and nat.stdout.startswith(b"main at 0x")
    r = execute(RunSpec(str(exe), strategy="rewrite-2004"))[0]
    assert r.crash is not None and "maps the fixup buffer's pages" in r.crash.describe()
