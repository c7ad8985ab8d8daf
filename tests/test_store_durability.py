"""Durability of bench results, observed (issue 17, item 3).

``tlslab.bench.store`` promises: every cells.jsonl record is on disk (written
whole, then fsync'ed) before the runner counts the cell as done, a torn tail is
cut and the cut fsync'ed, and run.json is replaced atomically (temporary file
written and fsync'ed, renamed over run.json, then the directory fsync'ed so the
rename itself survives a crash). These tests record every ``os.fsync`` and
``os.replace`` the store makes, with what the file held at that moment, and
check the order; a store without its fsyncs fails them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tlslab.bench import store


@pytest.fixture
def journal(monkeypatch):
    """[(event, path, content-or-None)] of every fsync and replace, in order."""
    events: list[tuple[str, str, bytes | None]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        content = None if os.path.isdir(path) else Path(path).read_bytes()
        events.append(("fsync", path, content))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}", None))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_every_cell_record_is_fsynced_after_it_is_written(tmp_path, journal):
    path = tmp_path / store.CELLS
    w = store.CellWriter(path)
    records = [{"cell": f"c{i}", "outcome": "ok", "n": i} for i in range(3)]
    for i, rec in enumerate(records):
        before = len(journal)
        w.append(rec)
        new = journal[before:]
        # exactly one fsync per record, of cells.jsonl, holding that record complete (newline included)
        assert [(e, p) for e, p, _ in new] == [("fsync", str(path))], new
        lines = new[0][2].split(b"\n")
        assert lines[-1] == b"" and len(lines) == i + 2
        assert json.loads(lines[-2]) == rec
    w.close()
    assert [r["cell"] for r in store.read_cells(path)[0]] == ["c0", "c1", "c2"]


def test_a_torn_tail_is_cut_and_the_cut_fsynced(tmp_path, journal):
    path = tmp_path / store.CELLS
    path.write_bytes(b'{"cell":"a","outcome":"ok"}\n{"cell":"b","outc')
    w = store.CellWriter(path)
    assert journal == [("fsync", str(path), b'{"cell":"a","outcome":"ok"}\n')]
    w.append({"cell": "b", "outcome": "ok"})
    w.close()
    assert [r["cell"] for r in store.read_cells(path)[0]] == ["a", "b"]


def test_run_json_is_written_fsynced_renamed_and_its_directory_fsynced(tmp_path, journal):
    run = store.RunDir(tmp_path / "run-1")
    obj = {"spec": {"name": "x"}, "cells": ["a", "b"]}
    run.write_run(obj)
    tmp = str(run.run_path) + ".tmp"
    assert [(e, p) for e, p, _ in journal] == [
        ("fsync", tmp),                                   # the new content is on disk ...
        ("replace", f"{tmp} -> {run.run_path}"),         # ... before it replaces the old ...
        ("fsync", str(run.path)),                          # ... and the rename is made durable
    ], journal
    assert json.loads(journal[0][2]) == {**obj, "schema": store.SCHEMA_VERSION}    # every file says its schema
    assert run.read_run() == {**obj, "schema": store.SCHEMA_VERSION} and not os.path.exists(tmp)
    # replacing again: same protocol, the old run.json is never truncated in place
    journal.clear()
    run.write_run({**obj, "cells": ["a"]})
    assert [e for e, _, _ in journal] == ["fsync", "replace", "fsync"]
    assert run.read_run()["cells"] == ["a"]
