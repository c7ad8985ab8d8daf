"""Patch sets as artefacts: record, save, load, apply statically, run the rewritten binary."""

from __future__ import annotations

import json

import pytest

from tlslab.cli import main as cli_main
from tlslab.experiment import RunSpec, execute, make_domain
from tlslab.guests import resolve_guest
from tlslab.hypervisor import patches as P
from tlslab.hypervisor.strategies.rewrite import attach_fs_abi


@pytest.fixture(scope="module")
def lsr_rewrite(tmp_path_factory):
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite"))
    r = d.run()
    assert r.ok
    path = P.save_patch_set(d, tmp_path_factory.mktemp("ps") / "lsr.default.rewrite.json", guest="lsr",
                            variant="default")
    return d, path


def test_saved_patch_set_describes_every_patch(lsr_rewrite):
    d, path = lsr_rewrite
    raw = json.loads(path.read_text())
    assert raw["format"] == P.FORMAT and raw["in_place"] and raw["abi"].startswith("fs-twin")
    ps = P.load_patch_set(path)
    assert len(ps.patches) == d.strategy.counters.patches
    elf = resolve_guest("lsr").path.read_bytes()
    for p in ps.patches:
        assert p.kind == "prefix-65-to-64" and p.old == "65" and p.new == "64"
        assert elf[p.file_offset] == 0x65                      # the file offset really holds the old byte
        assert "+" in p.symbol or p.symbol.isidentifier()
        assert "gs:" in p.instruction and p.strategy == "rewrite"
    assert [p.address for p in ps.patches] == sorted(p.address for p in ps.patches)


def test_default_path():
    assert str(P.default_patch_path("lsr", "default", "rewrite")) == "patches/lsr.default.rewrite.json"


def test_apply_verifies_old_bytes(lsr_rewrite, tmp_path):
    _, path = lsr_rewrite
    out = tmp_path / "lsr.rw"
    n = P.apply_file(path, resolve_guest("lsr").path, out)
    data, orig = out.read_bytes(), resolve_guest("lsr").path.read_bytes()
    assert n > 0 and len(data) == len(orig) and sum(a != b for a, b in zip(data, orig)) == n
    with pytest.raises(P.PatchError, match="patch set expects 65"):
        P.apply_file(path, resolve_guest("canary").path, tmp_path / "x")
    with pytest.raises(P.PatchError):       # already applied: old bytes no longer match
        P.apply_file(path, out, tmp_path / "y")


def test_cli_apply_refuses_in_one_line(lsr_rewrite, tmp_path, capsys):
    _, path = lsr_rewrite
    assert cli_main(["patch", "apply", str(path), str(resolve_guest("canary").path), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expects 65" in err


def test_rewrite2004_set_is_not_applicable_statically(tmp_path):
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite-2004"))
    assert d.run().ok
    path = P.save_patch_set(d, tmp_path / "x.json")
    ps = P.load_patch_set(path)
    assert not ps.in_place and ps.out_of_line["address"] == "0x1000" and ps.out_of_line["bytes"]
    sites = [p for p in ps.patches if p.kind == "call-fixup"]
    assert sites and all(p.new.startswith("67ff16") and p.file_offset is not None for p in sites)
    with pytest.raises(P.PatchError, match="out-of-line"):
        P.apply_file(path, resolve_guest("lsr").path, tmp_path / "lsr.x")


@pytest.mark.parametrize("strategy", ["native", "emulate", "emulate-2004", "flip", "flip-full", "rewrite",
                                      "rewrite-2004"])
def test_statically_rewritten_lsr_runs_everywhere_without_faulting(lsr_rewrite, tmp_path, strategy):
    _, path = lsr_rewrite
    binary = tmp_path / "lsr"
    P.apply_file(path, resolve_guest("lsr").path, binary)
    nat, _ = execute(RunSpec("lsr", strategy="native"))
    d, _ = make_domain(RunSpec(str(binary), strategy=strategy, applet="lsr"))
    if strategy != "rewrite":           # rewrite provides the fs-twin ABI itself
        attach_fs_abi(d)
    r = d.run()
    assert r.ok and r.stdout == nat.stdout
    assert r.counters["strategy"]["traps"] == 0      # every -ve site of this run now uses %fs
    assert r.counters["segments"]["fs"]["accesses"] > 1000


def test_statically_rewritten_lsr_needs_the_abi(lsr_rewrite, tmp_path):
    _, path = lsr_rewrite
    binary = tmp_path / "lsr"
    P.apply_file(path, resolve_guest("lsr").path, binary)
    r, _ = execute(RunSpec(str(binary), strategy="emulate", applet="lsr"))
    assert not r.ok and "fs:" in r.crash.instruction
