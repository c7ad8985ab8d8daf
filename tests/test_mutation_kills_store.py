"""Kill tests for surviving mutants of tlslab/bench/store.py (benchmarks/mutation.py, issue 17 item 6).

``read_cells`` is what every reader of a run (summary, report, --resume) goes
through; its warnings are how a user learns that a line was dropped. These
pin what it keeps, what it drops, and what it says, line numbers included.
"""

from __future__ import annotations

import gzip
import json

from tlslab.bench import store


def _write(path, lines: list[bytes], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines) + tail)


def test_a_clean_file_reads_without_warnings(tmp_path):
    path = tmp_path / store.CELLS
    _write(path, [b'{"cell":"a","outcome":"ok"}', b"", b'{"cell":"b","outcome":"failed"}'])
    records, warnings = store.read_cells(path)
    assert [r["cell"] for r in records] == ["a", "b"]
    assert warnings == []


def test_a_torn_last_line_is_dropped_with_one_warning(tmp_path):
    path = tmp_path / store.CELLS
    _write(path, [b'{"cell":"a","outcome":"ok"}'], tail=b'{"cell":"b","ou')
    records, warnings = store.read_cells(path)
    assert [r["cell"] for r in records] == ["a"]
    assert len(warnings) == 1 and "torn last line (15 bytes" in warnings[0], warnings


def test_malformed_and_foreign_lines_are_named_by_their_line_number(tmp_path):
    path = tmp_path / store.CELLS
    _write(path, [b'{"cell":"a","outcome":"ok"}',      # 1
                  b"{not json",                         # 2
                  b'{"outcome":"ok"}',                  # 3: a dict without "cell"
                  b'["cell"]',                          # 4: "cell" in a list is not a record
                  b'"cell"',                            # 5: nor in a string
                  b'{"cell":"b","outcome":"ok"}'])      # 6
    records, warnings = store.read_cells(path)
    assert [r["cell"] for r in records] == ["a", "b"]
    assert len(warnings) == 4, warnings
    assert warnings[0].startswith(f"{path}:2: ignored a malformed line")
    assert [w.split(": ", 1)[0] for w in warnings[1:]] == [f"{path}:{n}" for n in (3, 4, 5)]
    assert all("not a cell record" in w for w in warnings[1:])


def test_an_archived_run_is_read_from_its_gz(tmp_path):
    path = tmp_path / store.CELLS
    path.with_name(store.CELLS + ".gz").write_bytes(gzip.compress(b'{"cell":"z","outcome":"ok"}\n'))
    # a schema-1 record (no "schema" key), read through tlslab.record.upgrade
    assert store.read_cells(path) == ([{"cell": "z", "outcome": "ok", "faults": None, "instructions": None,
                                        "schema": 2}], [])
    assert store.read_cells(tmp_path / "nothing.jsonl") == ([], [])


def test_latest_by_cell_takes_the_last_record(tmp_path):
    recs = [{"cell": "a", "n": 1}, {"cell": "b", "n": 2}, {"cell": "a", "n": 3}]
    assert store.latest_by_cell(recs) == {"a": {"cell": "a", "n": 3}, "b": {"cell": "b", "n": 2}}


def test_cell_writer_appends_whole_lines_after_an_intact_file(tmp_path):
    path = tmp_path / store.CELLS
    path.write_bytes(b'{"cell":"a"}\n')
    w = store.CellWriter(path)
    w.append({"cell": "b", "x": [1, 2]})
    w.close()
    assert path.read_bytes() == b'{"cell":"a"}\n{"cell":"b","x":[1,2]}\n'


def test_run_dir_round_trip_and_errors(tmp_path):
    run = store.RunDir(tmp_path / "r1")
    assert not run.exists() and run.id == "r1"
    try:
        run.read_run()
    except store.StoreError as exc:
        assert "is not a tlslab bench run" in str(exc)
    else:
        raise AssertionError("read_run of a missing run.json did not raise")
    run.write_run({"k": 1})
    assert run.exists() and run.read_run() == {"k": 1, "schema": store.SCHEMA_VERSION}
    assert json.loads(run.run_path.read_text()) == {"k": 1, "schema": store.SCHEMA_VERSION}
    w = store.CellWriter(run.cells_path)
    w.append({"cell": "a", "v": 1, "schema": 2, "faults": 3})
    w.append({"cell": "a", "v": 2, "schema": 2, "faults": 4})
    w.close()
    assert run.records() == ([{"cell": "a", "v": 1, "schema": 2, "faults": 3},
                              {"cell": "a", "v": 2, "schema": 2, "faults": 4}], [])
    assert run.latest() == {"a": {"cell": "a", "v": 2, "schema": 2, "faults": 4}}
    run.run_path.write_text("{broken")
    try:
        run.read_run()
    except store.StoreError as exc:
        assert "is not valid JSON" in str(exc)
    else:
        raise AssertionError("read_run of broken JSON did not raise")


def test_resolve_run_by_id_or_path(tmp_path):
    run = store.RunDir(tmp_path / "results" / "r7")
    run.write_run({})
    assert store.resolve_run("r7", tmp_path / "results").path == run.path
    assert store.resolve_run(str(run.path), tmp_path / "elsewhere").path == run.path
    try:
        store.resolve_run("r8", tmp_path / "results")
    except store.StoreError as exc:
        assert "no bench run 'r8'" in str(exc)
    else:
        raise AssertionError("an unknown run resolved")


def test_opening_an_intact_or_empty_file_neither_cuts_nor_syncs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(store.os, "fsync", lambda fd: calls.append(fd))
    for content in (b"", b'{"cell":"a"}\n'):
        path = tmp_path / f"c{len(content)}.jsonl"
        path.write_bytes(content)
        w = store.CellWriter(path)
        assert calls == [] and path.read_bytes() == content
        w.close()


def test_a_closed_writer_takes_no_more_records(tmp_path):
    w = store.CellWriter(tmp_path / store.CELLS)
    w.append({"cell": "a"})
    w.close()
    try:
        w.append({"cell": "b"})
    except ValueError:
        pass
    else:
        raise AssertionError("append after close() wrote")
    assert (tmp_path / store.CELLS).read_bytes() == b'{"cell":"a"}\n'
