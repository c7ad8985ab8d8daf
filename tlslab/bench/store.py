"""Durable results: ``results/<run-id>/cells.jsonl`` and ``run.json``.

* ``cells.jsonl``: one JSON object per line, one line per finished cell. A line
  is written whole with a single ``write`` of the encoded bytes, then
  ``flush`` + ``fsync`` before the runner counts the cell as done, so a killed
  runner (even SIGKILL) loses at most the cell it was writing. On open for
  appending, a torn tail (bytes after the last newline: a line that was being
  written when the process died) is cut off first, so the next record starts
  on its own line; readers skip a torn last line too.
* ``run.json``: the matrix (spec + the expanded cell list) and run metadata,
  replaced atomically (temporary file, fsync, rename, fsync of the directory).

Records of one cell can appear more than once only after ``--retry-failed``;
readers take the last record of each cell (:func:`latest_by_cell`).

Both files carry ``"schema"`` (:mod:`tlslab.record`); reading a record or a
run.json of an unknown schema raises :class:`tlslab.record.SchemaError` (one
line, exit status 2 from the CLI); records of schema 1 (no ``schema`` key,
e.g. ``results/reference/run``) are read through :func:`tlslab.record.upgrade`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tlslab.record import FINISHED, RETRYABLE, SCHEMA_KEY, SCHEMA_VERSION, check_schema, load  # noqa: F401

CELLS = "cells.jsonl"
RUN = "run.json"


class StoreError(ValueError):
    pass


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_cells(path: Path) -> tuple[list[dict], list[str]]:
    """All complete records of a cells.jsonl, and warnings about skipped lines."""
    records: list[dict] = []
    warnings: list[str] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        gz = path.with_name(path.name + ".gz")  # an archived run (results/reference/run/)
        if not gz.is_file():
            return records, warnings
        import gzip

        data = gzip.decompress(gz.read_bytes())
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" if the file ends with a newline; else a torn line
    if tail.strip():
        warnings.append(f"{path}: ignored a torn last line ({len(tail)} bytes, no newline)")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            warnings.append(f"{path}:{n}: ignored a malformed line ({exc})")
            continue
        if isinstance(rec, dict) and "cell" in rec:
            records.append(load(rec, f"{path}:{n}"))     # SchemaError on a schema this tlslab cannot read
        else:
            warnings.append(f"{path}:{n}: ignored a line that is not a cell record")
    return records, warnings


def latest_by_cell(records: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for rec in records:
        out[rec["cell"]] = rec
    return out


class CellWriter:
    """Append-only, fsync-per-record writer of cells.jsonl (single writer: the runner)."""

    def __init__(self, path: Path):
        self.path = path
        self._repair()
        self._f = open(path, "ab", buffering=0)

    def _repair(self) -> None:
        """Cut a torn tail so the next record starts at the beginning of a line."""
        try:
            with open(self.path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    keep = data.rfind(b"\n") + 1
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
        except FileNotFoundError:
            pass

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode()
        view = memoryview(line)
        while view:  # a regular file takes it in one write; loop for completeness
            n = self._f.write(view)
            view = view[n:]
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class RunDir:
    """One run's directory."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def cells_path(self) -> Path:
        return self.path / CELLS

    @property
    def run_path(self) -> Path:
        return self.path / RUN

    @property
    def id(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.run_path.is_file()

    def read_run(self) -> dict:
        try:
            info = json.loads(self.run_path.read_text())
            check_schema(info, str(self.run_path))
            return info
        except FileNotFoundError:
            raise StoreError(f"{self.path} is not a tlslab bench run (no {RUN})") from None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.run_path} is not valid JSON: {exc}") from None

    def write_run(self, obj: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_path, {**obj, SCHEMA_KEY: SCHEMA_VERSION})

    def records(self) -> tuple[list[dict], list[str]]:
        return read_cells(self.cells_path)

    def latest(self) -> dict[str, dict]:
        return latest_by_cell(self.records()[0])


def resolve_run(run: str, results_root: str | Path = "results") -> RunDir:
    """A run id (under ``results_root``) or a path to a run directory."""
    candidates = [Path(run), Path(results_root) / run]
    for c in candidates:
        if (c / RUN).is_file():
            return RunDir(c)
    raise StoreError(f"no bench run {run!r} (looked for {' and '.join(str(c / RUN) for c in candidates)})")
