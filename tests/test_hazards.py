"""The 2004 hazards of binary rewriting: %fs users, programs reading their code, prelink."""

from __future__ import annotations

import re

import pytest

from tlslab.experiment import RunSpec, execute, make_domain


def _run(guest, strategy, args=(), **options):
    d, _ = make_domain(RunSpec(guest, args=args, strategy=strategy, **options))
    return d, d.run()


# ---------------------------------------------------------------- fs-user
def test_fs_user_is_refused_by_rewrite():
    nat, _ = execute(RunSpec("fs-user", strategy="native"))
    assert nat.ok and b"loaded by the program" in nat.stdout
    d, r = _run("fs-user", "rewrite")
    assert not r.ok
    assert "rewrite refuses: guest uses %fs itself" in r.crash.reason
    assert "slot 7" in r.crash.reason
    assert r.counters["strategy"]["refused"] == 1


@pytest.mark.parametrize("strategy", ["emulate", "flip", "rewrite-2004"])
def test_fs_user_is_fine_without_the_prefix_rewrite(strategy):
    nat, _ = execute(RunSpec("fs-user", strategy="native"))
    r, _ = execute(RunSpec("fs-user", strategy=strategy))
    assert r.ok and r.stdout == nat.stdout


# ---------------------------------------------------------------- selfread
def _checksums(out: bytes) -> list[str]:
    return re.findall(rb"fnv ([0-9a-f]{8})", out)


def _checksummed_ranges(domain) -> list[tuple[int, int]]:
    syms = domain.process.image.symbols
    probe = syms.address_of("tls_probe")
    return [(probe, probe + 56), *((syms.address_of(n), syms.address_of(n) + 64) for n in ("strerror", "malloc"))]


def _patched_bytes(domain) -> list[int]:
    return [p.address + i for p in domain.strategy.patch_set.patches if p.file_offset is not None
            for i in range(len(p.new_bytes))]


def test_selfread_sees_the_prefix_rewrite():
    nat, _ = execute(RunSpec("selfread", strategy="native"))
    d, r = _run("selfread", "rewrite")
    assert r.ok and r.counters["strategy"]["patches"] > 0
    assert r.stdout.splitlines()[0] == nat.stdout.splitlines()[0]     # same computation
    assert _checksums(r.stdout)[0] != _checksums(nat.stdout)[0]        # but tls_probe's code changed
    assert b"0 bytes 0x65" in r.stdout and b"2 bytes 0x65" in nat.stdout  # both its %gs prefixes are %fs now


def test_selfread_and_rewrite2004_see_only_what_fixup_c_patched():
    """fixup.c handles none of the forms selfread checksums (`mov %eax,%gs:-0x20` is a bare disp32):
    the checksums change exactly when a patch lies in a checksummed range -- here, never."""
    nat, _ = execute(RunSpec("selfread", strategy="native"))
    d, r = _run("selfread", "rewrite-2004")
    assert r.ok and r.counters["strategy"]["patches"] > 0
    touched = any(lo <= a < hi for a in _patched_bytes(d) for lo, hi in _checksummed_ranges(d))
    assert (_checksums(r.stdout) != _checksums(nat.stdout)) == touched
    assert not touched and r.stdout == nat.stdout


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_selfread_identical_without_rewriting(strategy):
    nat, _ = execute(RunSpec("selfread", strategy="native"))
    r, _ = execute(RunSpec("selfread", strategy=strategy))
    assert r.ok and r.stdout == nat.stdout


# ---------------------------------------------------------------- prelink
PRELINK = ("/proc/self/exe", "/out")


def _out_file(domain) -> bytes:
    return bytes(domain.process.vfs.resolve(b"/out").content())


@pytest.fixture(scope="module")
def prelink_native():
    d, _ = make_domain(RunSpec("prelink", args=PRELINK, strategy="native"))
    r = d.run()
    assert r.ok
    return r, _out_file(d)


@pytest.mark.parametrize("strategy", ["rewrite", "rewrite-2004"])
def test_prelink_shared_pages_leak_patches_into_a_file(strategy, prelink_native):
    nat, nat_file = prelink_native
    d, r = _run("prelink", strategy, PRELINK, page_sharing="shared")
    assert r.ok
    pc = d.process.page_cache
    assert pc.leaks and pc.tainted_reads > 0
    assert r.counters["strategy"]["by_kind"]["patched-bytes-reached-a-file"] == len(pc.leaks)
    assert all("patched bytes reached a file: /out.tmp" in h for h in d.strategy.hazards)
    out = _out_file(d)
    assert out != nat_file
    for leak in pc.leaks:       # the written file holds the patch bytes at the patched file offsets
        assert out[leak.file_offset:leak.file_offset + len(leak.new)] == leak.new
    assert r.stdout.splitlines()[1] != nat.stdout.splitlines()[1]       # input checksum differs


@pytest.mark.parametrize("strategy", ["rewrite", "rewrite-2004"])
def test_prelink_private_pages_leak_nothing(strategy, prelink_native):
    nat, nat_file = prelink_native
    d, r = _run("prelink", strategy, PRELINK, page_sharing="private")
    assert r.ok and r.counters["strategy"]["patches"] > 0
    pc = d.process.page_cache
    assert not pc.leaks and pc.tainted_reads == 0 and pc.private_patches > 0
    assert "patched-bytes-reached-a-file" not in r.counters["strategy"]["by_kind"]
    assert r.stdout == nat.stdout and _out_file(d) == nat_file


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_prelink_without_rewriting_is_clean(strategy, prelink_native):
    nat, nat_file = prelink_native
    d, r = _run("prelink", strategy, PRELINK)
    assert r.ok and r.stdout == nat.stdout and _out_file(d) == nat_file
    assert not d.process.page_cache.leaks
