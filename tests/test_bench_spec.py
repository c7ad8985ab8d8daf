"""Matrix specs, cell identity and the durable cell store (no guest runs)."""

from __future__ import annotations

import json

import pytest

from tlslab.bench.spec import DEFAULT_SPEC, MatrixSpec, SpecError, cell_id, load_spec
from tlslab.bench.store import CellWriter, RunDir, read_cells, resolve_run, StoreError
from tlslab.cli import main
from tlslab.experiment import RunSpec
from tlslab.hypervisor.strategies import STRATEGIES

SMALL = """
name = "t"
strategies = ["native", "emulate"]
variants = ["default", "nosegneg"]
[[guest]]
name = "lsr"
trees = ["small", "dirs=2,files=5,symlinks=1,depth=1"]
[[guest]]
name = "canary"
args = ["5"]
variants = ["default"]
strategies = "all"
"""


def test_expansion_and_overrides():
    spec = MatrixSpec.from_toml(SMALL, "t.toml")
    cells = spec.cells()
    lsr = [c for c in cells if c.spec.guest == "lsr"]
    canary = [c for c in cells if c.spec.guest == "canary"]
    assert len(lsr) == 2 * 2 * 2                      # trees x variants x strategies
    assert len(canary) == len(STRATEGIES)             # "all" = the registry now, one variant
    assert {c.spec.args for c in canary} == {("5",)}
    assert len({c.id for c in cells}) == len(cells)
    assert {c.workload for c in lsr} == {"lsr [small]", "lsr [dirs=2,files=5,symlinks=1,depth=1]"}


def test_cell_id_is_stable_and_spec_sensitive():
    a = RunSpec(guest="lsr", args=("x",), strategy="flip")
    assert cell_id(a) == cell_id(RunSpec(guest="lsr", args=("x",), strategy="flip"))
    assert cell_id(a) == cell_id({**a.to_dict(), "args": ["x"]})          # JSON round trip
    assert cell_id(a) != cell_id(RunSpec(guest="lsr", args=("x",), strategy="emulate"))
    assert len(cell_id(a)) == 16


@pytest.mark.parametrize("text, msg", [
    ("name='x'", "needs at least one"),
    ("bogus = 1\n[[guest]]\nname='lsr'", "unknown key"),
    ("strategies=['nope']\n[[guest]]\nname='lsr'", "unknown strategy"),
    ("variants=['weird']\n[[guest]]\nname='lsr'", "unknown variant"),
    ("[[guest]]\nname='lsr'\ntrees=['dirs=x']", "not an integer"),
    ("[[guest]]\nname='lsr'\nargs='-R'", "list of strings"),
    ("[[guest", "not valid TOML"),
    ("online_prices = 'hw-vm'\n[[guest]]\nname='lsr'", "online_prices: expected a list"),
    ("online_prices = ['no-such']\n[[guest]]\nname='lsr'", "online_prices: unknown cost profile 'no-such'"),
    ("online_prices = ['nominal']\n[[guest]]\nname='lsr'", "'nominal' does not price faults"),
])
def test_bad_specs(text, msg):
    with pytest.raises(SpecError, match=msg):
        MatrixSpec.from_toml(text, "bad.toml")


def test_bad_spec_is_a_usage_error(tmp_path, capsys):
    p = tmp_path / "bad.toml"
    p.write_text("strategies=['nope']\n[[guest]]\nname='lsr'\n")
    assert main(["bench", str(p), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown strategy 'nope'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["bench", "--out", str(tmp_path), "--resume", "nope"]) == 2
    assert main(["bench", str(p), "--resume", "x"]) == 2


def test_default_spec_covers_everything():
    spec = load_spec()
    cells = spec.cells()
    assert DEFAULT_SPEC.is_file()
    assert {c.spec.strategy for c in cells} == set(STRATEGIES)
    assert {c.spec.variant for c in cells} == {"default", "nosegneg", "dyn"}
    guests = {c.spec.guest for c in cells}
    assert {"lsr", "syscalls", "malloc", "stdio", "canary", "fs-user", "selfread", "prelink", "busybox"} <= guests
    assert {c.spec.tree for c in cells if c.spec.guest == "lsr"} == {"small", "4k"}
    busy_nosegneg = [c for c in cells if c.spec.guest == "busybox" and c.spec.variant == "nosegneg"]
    assert not busy_nosegneg


def test_store_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / "cells.jsonl"
    w = CellWriter(path)
    w.append({"cell": "a", "outcome": "ok"})
    w.append({"cell": "b", "outcome": "ok"})
    w.close()
    with open(path, "ab") as f:          # a runner killed in the middle of a write
        f.write(b'{"cell": "c", "outc')
    records, warnings = read_cells(path)
    assert [r["cell"] for r in records] == ["a", "b"]
    assert any("torn" in w for w in warnings)
    w = CellWriter(path)                 # reopening cuts the torn tail; the next record is whole
    w.append({"cell": "c", "outcome": "ok"})
    w.close()
    records, warnings = read_cells(path)
    assert [r["cell"] for r in records] == ["a", "b", "c"] and not warnings
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_resolve_run(tmp_path):
    run = RunDir(tmp_path / "r1")
    run.write_run({"run_id": "r1", "cells": []})
    assert resolve_run("r1", tmp_path).path == run.path
    assert resolve_run(str(run.path)).path == run.path
    with pytest.raises(StoreError):
        resolve_run("r2", tmp_path)


# --------------------------------------------------------------------------- root filesystems, labels, dyn

ROOTED = """
name = "rooted"
strategies = ["native", "emulate", "flip"]
variants = ["default", "nosegneg"]
[[guest]]
name = "/bin/ls"
rootfs = "debian"
args = ["-R", "/usr/lib"]
label = "keir"
[[guest]]
name = "/bin/ls"
rootfs = "debian"
args = ["-R", "/usr/lib/python3.11"]
[[guest]]
name = "lsr"
variants = ["dyn"]
trees = ["small"]
[[guest]]
name = "lsr"
rootfs = "debian"
variants = ["default"]
tree_at = "/srv"
env = ["LANG=C"]
"""


@pytest.fixture
def roots_present(monkeypatch):
    """Expansion without touching the root cache: every pinned root counts as present."""
    from tlslab.bench import spec as spec_mod

    monkeypatch.setattr(spec_mod, "_rootfs_missing", lambda name: None)


def test_rooted_programs_labels_and_dyn(roots_present):
    cells = MatrixSpec.from_toml(ROOTED, "rooted.toml").cells()
    keir = [c for c in cells if c.workload == "keir"]
    assert len(keir) == 3                                        # one build: the root's own
    for c in keir:
        assert c.spec.guest == "/bin/ls" and c.spec.rootfs == "debian" and c.spec.variant == "default"
        assert c.spec.args == ("-R", "/usr/lib") and c.spec.tree is None and c.skip is None
    assert keir[0].label == "keir default native nonpae"
    unlabelled = {c.workload for c in cells if c.spec.args == ("-R", "/usr/lib/python3.11")}
    assert unlabelled == {"/bin/ls -R /usr/lib/python3.11 [debian]"}
    dyn = [c for c in cells if c.spec.variant == "dyn"]
    assert len(dyn) == 3 and all(c.spec.rootfs is None and c.spec.tree == "small" for c in dyn)
    assert {c.workload for c in dyn} == {"lsr [small]"}          # same row name; the build is a column
    mounted = [c for c in cells if c.spec.guest == "lsr" and c.spec.rootfs]
    assert {(c.spec.tree_at, c.spec.env, c.spec.tree) for c in mounted} == {("/srv", ("LANG=C",), "small")}
    assert len({c.id for c in cells}) == len(cells) == 12


def test_rooted_cells_are_skipped_when_the_root_is_absent(monkeypatch):
    from tlslab.bench import spec as spec_mod

    monkeypatch.setattr(spec_mod, "_rootfs_missing",
                        lambda name: f"root filesystem {name} unavailable here: not fetched; run `tlslab rootfs fetch`")
    cells = MatrixSpec.from_toml(ROOTED, "rooted.toml").cells()
    for c in cells:
        needs_root = bool(c.spec.rootfs) or c.spec.variant == "dyn"
        assert bool(c.skip) == needs_root, c.label
        if needs_root:
            assert "tlslab rootfs fetch" in c.skip


def test_a_root_lost_after_expansion_is_a_skip_not_a_failure(monkeypatch):
    """The worker's RootfsUnavailable (the root went away after expansion) is recorded as skipped."""
    import tlslab.rootfs
    from tlslab.bench.runner import run_cell_safely
    from tlslab.bench.spec import Cell

    def gone(name="debian", fetch=True, cache_dir=None):
        raise tlslab.rootfs.RootfsUnavailable(f"root {name!r} is not fetched; run `tlslab rootfs fetch`")

    monkeypatch.setattr(tlslab.rootfs, "materialise", gone)
    cell = Cell(RunSpec(guest="/bin/ls", args=("-R", "/usr/lib"), rootfs="debian", tree=None, strategy="flip"), "keir")
    rec = run_cell_safely(cell.to_dict())
    assert rec["outcome"] == "skipped" and "tlslab rootfs fetch" in rec["reason"]


@pytest.mark.parametrize("euid", [0, 1000])
def test_hw_cells_of_rooted_programs_need_root(roots_present, monkeypatch, euid):
    """The hw backend runs programs of a root filesystem chrooted: without root their hw cells are skipped."""
    import os

    monkeypatch.setattr(os, "geteuid", lambda: euid)
    text = ROOTED.replace('label = "keir"', 'label = "keir"\nbackends = ["unicorn", "hw"]')
    hw = [c for c in MatrixSpec.from_toml(text, "rooted.toml").cells() if c.backend == "hw"]
    assert {c.spec.strategy for c in hw} == {"native", "emulate", "flip"}
    for c in hw:
        assert (c.skip is None) == (euid == 0), c.skip
        assert euid == 0 or "needs root" in c.skip


# Ids of cells of results/reference (made before root filesystems, dyn builds and the auto patch policy
# existed): the same cells of the default matrix must keep them, or --resume and comparisons break.
REFERENCE_IDS = {
    "lsr [small] default native nonpae": "9c0d427a16408828",
    "lsr [small] default native nonpae on hw": "3ca5f1cb06d02eba",
    "lsr [small] default emulate nonpae": "488ca412cb46c0be",
}


def test_existing_cell_ids_are_stable():
    import pathlib

    cells = {c.label: c for c in load_spec().cells()}
    for label, cid in REFERENCE_IDS.items():
        assert cells[label].id == cid, label
    ref = pathlib.Path(__file__).resolve().parent.parent / "results" / "reference" / "run" / "run.json"
    if ref.is_file():       # every cell of the reference run that the default matrix still has
        recorded = {c["label"]: c["id"] for c in json.loads(ref.read_text())["cells"]}
        common = set(recorded) & set(cells)
        assert len(common) >= 100
        assert {k: cells[k].id for k in common} == {k: recorded[k] for k in common}
        rewrite = [k for k in common if " rewrite " in k]
        assert rewrite        # patch_policy auto == exe for static guests: same id as when exe was the default


def test_new_runspec_fields_enter_the_id_only_when_set():
    base = RunSpec(guest="lsr", strategy="flip")
    d = base.to_dict()
    old = {k: v for k, v in d.items() if k not in ("rootfs", "tree_at", "env")}
    old["patch_policy"] = "exe"
    assert cell_id(base) == cell_id(old) == cell_id({**d, "env": []})
    assert cell_id(RunSpec(guest="lsr", strategy="flip", rootfs="debian")) != cell_id(base)
    assert cell_id(RunSpec(guest="lsr", strategy="flip", env=("A=1",))) != cell_id(base)
    assert cell_id(RunSpec(guest="lsr", strategy="flip", tree_at="/srv")) != cell_id(base)
    dyn = RunSpec(guest="lsr", strategy="rewrite", variant="dyn")          # auto = lib there, not exe
    assert cell_id(dyn) != cell_id(RunSpec(guest="lsr", strategy="rewrite", variant="dyn", patch_policy="exe"))


@pytest.mark.parametrize("guest, msg", [
    ('name="/bin/ls"\nrootfs="nosuch"', "unknown root filesystem 'nosuch'"),
    ('name="/bin/ls"\nrootfs=3', "rootfs must be the name of a pinned root"),
    ('name="/bin/ls"\nrootfs="debian"\nlabel=5', "label must be a non-empty string"),
    ('name="/bin/ls"\nrootfs="debian"\nvariants=["nosegneg"]', "only its packaged build"),
    ('name="/bin/ls"\nrootfs="debian"\nenv=["NOEQUALS"]', "KEY=VALUE"),
    ('name="/bin/ls"\nrootfs="debian"\ntree_at="data"', "tree_at must be an absolute path"),
    ('name="/bin/ls"\nrootfs="debian"\ntrees=[3]', "trees must be a list of strings"),
    ('name="lsr"\ntrees=[]', "needs rootfs"),
    ('name="lsr"\ntree_at="/srv"', "tree_at needs rootfs"),
    ("name=7", "name must be a non-empty string"),
])
def test_bad_rooted_specs(guest, msg):
    with pytest.raises(SpecError, match=msg) as info:
        MatrixSpec.from_toml(f"[[guest]]\n{guest}\n", "bad.toml")
    assert "\n" not in str(info.value)


def test_relative_name_with_rootfs_is_a_bundled_guest(roots_present):
    cells = MatrixSpec.from_toml('variants=["dyn"]\nstrategies=["flip"]\n[[guest]]\nname="lsr"\nrootfs="debian"\n',
                                 "t.toml").cells()
    assert [(c.spec.guest, c.spec.rootfs, c.spec.tree, c.workload) for c in cells] == \
        [("lsr", "debian", "small", "lsr [small]")]


def test_default_spec_has_keir_and_lsr_dyn(roots_present):
    cells = load_spec().cells()
    keir = [c for c in cells if c.workload == "keir"]
    # every strategy but flip-full and flip-fs (equal to flip on keir)
    assert {c.spec.strategy for c in keir} == set(STRATEGIES) - {"flip-full", "flip-fs"}
    online = [c for c in cells if getattr(STRATEGIES[c.spec.strategy], "online", False) and c.backend == "unicorn"]
    # they decide with the matrix's profile, and once more with the measured hw-vm prices (online_prices)
    assert online and {c.spec.prices for c in online} == {"xen-2004", "hw-vm"}
    assert sum(c.spec.prices == "xen-2004" for c in online) == sum(c.spec.prices == "hw-vm" for c in online)
    # on the CPU (online-patch's hw cells) with the matrix's profile only: their times are measured, not priced
    hw_online = [c for c in cells if getattr(STRATEGIES[c.spec.strategy], "online", False) and c.backend == "hw"]
    assert hw_online and {c.spec.prices for c in hw_online} == {"xen-2004"}
    assert all(c.spec.guest == "/bin/ls" and c.spec.rootfs == "debian" and c.spec.args[0] == "-R" for c in keir)
    assert {c.spec.variant for c in cells if c.spec.guest == "lsr"} == {"default", "nosegneg", "dyn"}


def test_backends_are_one_registry():
    """The spec's backend names and the runner's backend objects are the same set (no string tests)."""
    from tlslab.bench import spec
    from tlslab.bench.runner import BACKENDS

    assert set(spec.BACKENDS) == set(BACKENDS)
    assert [n for n, b in BACKENDS.items() if b.serial] == ["hw"] and BACKENDS["unicorn"].unavailable() is None


def test_online_prices_give_online_strategies_a_cell_per_extra_profile():
    text = """
cost_profile = "xen-2004"
online_prices = ["xen-2004", "hw-vm", "hw-vm"]
strategies = ["native", "emulate", "online-probe", "online-site"]
variants = ["default"]
[[guest]]
name = "canary"
args = ["5"]
"""
    spec = MatrixSpec.from_toml(text, "t.toml")
    assert spec.online_extra_prices() == ["hw-vm"]      # the main prices (cost_profile) and repeats drop out
    cells = spec.cells()
    by = {(c.spec.strategy, c.spec.prices) for c in cells}
    assert {("online-probe", "xen-2004"), ("online-probe", "hw-vm"), ("online-site", "xen-2004"),
            ("online-site", "hw-vm")} <= by
    assert sum(1 for c in cells if c.spec.strategy in ("native", "emulate")) == 2   # the others: one cell each
    assert len(cells) == 6 and len({c.id for c in cells}) == 6 and len({c.label for c in cells}) == 6
    assert {c.label for c in cells if c.spec.strategy == "online-probe"} == {
        "canary 5 default online-probe nonpae prices=xen-2004", "canary 5 default online-probe nonpae prices=hw-vm"}
    plain = MatrixSpec.from_toml(text.replace('online_prices = ["xen-2004", "hw-vm", "hw-vm"]', ""), "t.toml")
    assert plain.online_extra_prices() == [] and len(plain.cells()) == 4
