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
    assert {c.spec.variant for c in cells} == {"default", "nosegneg"}
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
