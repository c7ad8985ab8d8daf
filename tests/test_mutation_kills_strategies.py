"""Kill tests for surviving mutants of tlslab/hypervisor/strategies (benchmarks/mutation.py, issue 17 item 6).

The strategies' counters are priced by the cost model (``descriptor_writes``
is what a flip costs Xen) and printed by ``tlslab run``; the tests so far
checked them only for flip. Here every descriptor write must be accounted for
by what the strategy says it did (each flip and each %fs-twin installation is
one write), under rewrite with its patching disabled (every fault flips) and
with patching on (one install, no flips).
"""

from __future__ import annotations

from tlslab.experiment import RunSpec, execute, make_domain


def _flips(by_kind: dict[str, int]) -> int:
    return sum(n for kind, n in by_kind.items() if kind.endswith(("to-expand-down", "to-expand-up")))


def test_rewrite_without_patching_writes_one_descriptor_per_flip_plus_the_twin():
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite", patch_policy="none"))
    r = d.run()
    flip, _ = execute(RunSpec("lsr", strategy="flip"))
    c, f = r.counters["strategy"], flip.counters["strategy"]
    assert r.ok and c["patches"] == 0
    assert c["by_kind"]["fs-twin-installed"] == 1
    assert _flips(c["by_kind"]) == c["traps"] == f["traps"] > 1000
    assert c["descriptor_writes"] == _flips(c["by_kind"]) + 1
    assert f["descriptor_writes"] == _flips(f["by_kind"]) == f["traps"]


def test_every_strategy_accounts_for_its_descriptor_writes():
    for strategy in ("native", "emulate", "flip", "flip-full", "flip-fs", "rewrite"):
        r, _ = execute(RunSpec("lsr", strategy=strategy))
        c = r.counters["strategy"]
        assert r.ok, strategy
        installs = c["by_kind"].get("fs-twin-installed", 0)
        assert c["descriptor_writes"] == _flips(c["by_kind"]) + installs, (strategy, c)
        if strategy == "emulate":
            assert c["emulated_instructions"] == c["traps"] and c["emulated_accesses"] >= c["traps"]
        else:
            assert c["emulated_instructions"] == c["emulated_accesses"] == 0, strategy


def test_patch_policy_exe_takes_exactly_the_executables_file_bytes():
    """patch_allowed (policy exe): every byte of the patch must lie in the executable's file-backed PT_LOAD bytes,
    including the first byte of a segment and excluding anything past p_filesz (the .bss)."""
    from types import SimpleNamespace

    from tlslab.hypervisor.strategies.rewrite import patch_allowed
    from tlslab.machine.memory import PROT_EXEC, PROT_READ

    region = SimpleNamespace(prot=PROT_READ | PROT_EXEC)
    seg = SimpleNamespace(vaddr=0x0804_8000, filesz=0x100, offset=0)
    domain = SimpleNamespace(vcpu=SimpleNamespace(mem=SimpleNamespace(region_at=lambda a: region)),
                             process=SimpleNamespace(interp=None, image=SimpleNamespace(segments=[seg])))
    start, end = seg.vaddr, seg.vaddr + seg.filesz
    assert patch_allowed(domain, start, 1, "auto") == (True, "ok")        # the segment's first byte
    assert patch_allowed(domain, end - 1, 1, "exe") == (True, "ok")       # its last file byte
    assert patch_allowed(domain, start, 2, "exe") == (True, "ok")
    for addr, size in ((end, 1), (end - 1, 2), (start - 1, 1), (start - 1, 2)):
        ok, why = patch_allowed(domain, addr, size, "exe")
        assert not ok and "file-backed" in why, (hex(addr), size)
    assert patch_allowed(domain, start, 1, "none") == (False, "patch policy none")
    assert patch_allowed(domain, end, 1, "all") == (True, "ok")


def test_rewrite_2004_counts_the_length_bug_exactly_where_seg_fixup_misreports_the_length():
    """fixup.c took Xen's notification length (through the displacement) as the instruction's length; the
    strategy counts "2004-length-bug" where the two differ. Re-derived here from lsr's faulting sites."""
    from tlslab.x86.coverage import fixup_2004_handles, seg_fixup_notify_length
    from tlslab.x86.decode import decode

    d, _ = make_domain(RunSpec("lsr", strategy="emulate"))
    r = d.run()
    bugged = 0
    for site in r.sites:
        if site["violations"] and site["segment"] == "gs":
            insn = decode(d.vcpu.mem.read(site["eip"], 15), site["eip"])
            if fixup_2004_handles(insn)[0] and seg_fixup_notify_length(insn) not in (None, insn.length):
                bugged += 1
    res, _ = execute(RunSpec("lsr", strategy="rewrite-2004"))
    count = res.counters["strategy"]["by_kind"].get("2004-length-bug", 0)
    assert res.ok and (count > 0) == (bugged > 0), (count, bugged)
    assert res.counters["strategy"]["by_kind"].get("stub-created", 0) > 0


def test_rewrite_2004_refuses_a_following_instruction_fixup_c_cannot_decode():
    """fixup.c's get_insn_len has no E8 (call): a site followed by a call cannot be relocated, and says so."""
    import pytest

    from tlslab.hypervisor.strategies.rewrite2004 import CannotPatch, build_stub
    from tlslab.x86.decode import decode

    eip = 0x0804_9000
    code = bytes.fromhex("65 8b 00") + bytes.fromhex("e8 00 00 00 00") + bytes(8)
    with pytest.raises(CannotPatch, match="^could not decode following instruction$"):
        build_stub(eip, code, decode(code, eip))
