"""Where a cell runs: the backends a benchmark knows, as objects instead of string tests.

A backend measures one cell in a worker (``measure``), may say why this host
cannot run it at all (``unavailable``), and says whether its cells must run one
at a time after the parallel pool is gone (``serial``: the hw backend pins the
tracer and the guest to one CPU, and its measurement is a wall time). The
registry itself is built by the runner (``tlslab.bench.runner.BACKENDS``),
which owns the model's measurement; records name their backend
(``backend_name``; old records name none: the model's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backend:
    name: str
    serial: bool
    measure: Callable[[object], dict]
    unavailable: Callable[[], str | None]
    description: str


MODEL_NAME = "unicorn"


def backend_name(record_or_cell) -> str:
    """The backend a record or cell names (old records name none: the model's)."""
    name = record_or_cell.get("backend") if isinstance(record_or_cell, dict) else record_or_cell.backend
    return name or MODEL_NAME
