"""The run record (tlslab.record): one typed, versioned shape for model and hw runs, and its readers."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from pathlib import Path

import pytest

from benchkit import ROOT, TINY
from tlslab.bench import store
from tlslab.cli import main
from tlslab.record import (
    FINISHED,
    MEASURED,
    RETRYABLE,
    SCHEMA_VERSION,
    Outcome,
    RunRecord,
    SchemaError,
    load,
    upgrade,
)

REFERENCE = ROOT / "results" / "reference" / "run"


def test_outcome_is_an_enum_written_as_the_old_strings():
    assert [o.value for o in Outcome] == ["ok", "guest-crash", "failed", "skipped"]
    assert json.dumps({"o": Outcome.GUEST_CRASH}) == '{"o": "guest-crash"}'
    assert Outcome.OK == "ok" and "failed" in RETRYABLE and set(FINISHED) == set(Outcome)
    assert MEASURED == {Outcome.OK, Outcome.GUEST_CRASH}
    with pytest.raises(SchemaError, match="unknown outcome 'fine'"):
        Outcome.parse("fine")


def test_the_same_faults_field_for_model_and_hw():
    model = RunRecord.from_dict({"outcome": "ok", "counters": {"instructions": 100, "strategy": {"traps": 7}}})
    hw = RunRecord.from_dict({"outcome": "ok", "backend": "hw", "faults": 7, "run_seconds": 0.1})
    assert model.faults == hw.faults == 7
    assert model.instructions == 100 and hw.instructions is None
    d = hw.to_dict()
    assert d["schema"] == SCHEMA_VERSION and d["outcome"] == "ok" and d["run_seconds"] == 0.1
    assert RunRecord.from_dict(d) == hw                         # round trip
    assert RunRecord.from_dict({"outcome": "skipped", "reason": "no"}).faults is None


def test_an_unknown_schema_is_refused_in_one_line():
    for bad in (3, "2", None, True):
        with pytest.raises(SchemaError, match="is not one this tlslab reads"):
            load({"cell": "x", "outcome": "ok", "schema": bad})
    assert upgrade({"cell": "x", "outcome": "ok"})["schema"] == SCHEMA_VERSION     # schema 1: no key


def _copy_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(REFERENCE, run)
    return run


def test_readers_refuse_an_unknown_schema_with_exit_2(tmp_path, capsys):
    run = _copy_run(tmp_path)
    with gzip.open(run / "cells.jsonl.gz", "ab") as f:
        f.write(b'{"cell": "0000", "outcome": "ok", "schema": 99}\n')
    for argv in (["export", str(run), "--csv"], ["report", str(run), "--out", str(tmp_path / "r")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "schema 99 is not one this tlslab reads" in err, err
    run2 = _copy_run(tmp_path / "b")
    info = json.loads((run2 / "run.json").read_text())
    (run2 / "run.json").write_text(json.dumps({**info, "schema": 7}))
    capsys.readouterr()
    assert main(["export", str(run2), "--csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.json: schema 7" in err, err


def _as_schema_1(rec: dict) -> dict:
    """A record as tlslab wrote it before the schema key: no schema, no top-level faults/instructions on
    model cells (hw cells always had faults)."""
    old = {k: v for k, v in rec.items() if k not in ("schema", "instructions")}
    if old.get("backend") != "hw":
        old.pop("faults", None)
    return old


def test_schema_1_records_are_read_by_the_compatibility_reader(tmp_path):
    """Records written before the schema (schema 1): faults filled from the old fields by upgrade()."""
    current = [json.loads(line) for line in
               gzip.decompress((REFERENCE / "cells.jsonl.gz").read_bytes()).splitlines()]
    raw = [_as_schema_1(r) for r in current]
    assert raw and all("schema" not in r for r in raw)
    path = tmp_path / "cells.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    recs, warnings = store.read_cells(path)
    assert not warnings and len(recs) == len(raw)
    for old, new in zip(raw, recs):
        assert new["schema"] == SCHEMA_VERSION
        if old.get("backend") == "hw":
            assert new["faults"] == old["faults"]
        elif old.get("counters"):
            assert new["faults"] == old["counters"]["strategy"]["traps"]


def test_the_reference_run_is_schema_2_with_one_faults_column(capsys):
    raw = [json.loads(line) for line in gzip.decompress((REFERENCE / "cells.jsonl.gz").read_bytes()).splitlines()]
    assert raw and all(r["schema"] == SCHEMA_VERSION for r in raw)
    assert main(["export", str(REFERENCE), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert "traps" not in rows[0]
    backends = {r["backend"] for r in rows}
    assert backends == {"unicorn", "hw"}
    for r in rows:                    # one faults column, filled for model and hw cells alike
        if r["outcome"] in MEASURED:
            assert r["faults"] != "", r["workload"]
    hw = [r for r in rows if r["backend"] == "hw" and r["strategy"] != "native"]
    assert any(int(r["faults"]) > 0 for r in hw)


def test_run_and_faults_json_write_the_record(capsys):
    argv = ["lsr", "--strategy", "emulate", "--tree", TINY]
    assert main(["run", *argv, "--json", "--quiet"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["schema"] == SCHEMA_VERSION and run["outcome"] == "ok" and run["backend"] == "unicorn"
    assert run["faults"] == run["counters"]["strategy"]["traps"] > 0
    assert main(["faults", *argv, "--json"]) == 0
    faults = json.loads(capsys.readouterr().out)
    assert faults["schema"] == SCHEMA_VERSION and faults["outcome"] == "ok"
    assert faults["faults"] == run["faults"] and faults["instructions"] == run["instructions"]
    assert main(["run", "lsr", "--strategy", "emulate-2004", "--tree", TINY, "--json", "--quiet"]) == 1
    crash = json.loads(capsys.readouterr().out)
    assert crash["outcome"] == "guest-crash" and crash["crash"]["symbol"] and crash["faults"] >= 1


def test_cell_ids_are_unchanged_so_old_stores_resume():
    """Cell ids are hashes of the RunSpec (bench/spec.py): the reference run's ids are recomputed unchanged."""
    from tlslab.bench.spec import Cell

    info = json.loads((REFERENCE / "run.json").read_text())
    assert info["cells"]
    for c in info["cells"]:
        assert Cell.from_dict(c).id == c["id"], c["label"]
