"""Unicorn's inline block counter (third_party/unicorn) counts exactly what the block hook counts.

tlslab's Unicorn counts guest instructions in translated code and calls ``fp_on_block`` only at or
past ``count_limit`` (a time slice's end, a clock read); a stock Unicorn calls ``fp_on_block`` for
every block. Instruction counts are results (reported counters), inputs (the online strategies'
clock, the scheduler's time slices) and the basis of every per-instruction figure, so the two must
agree exactly. Here one cell per workload of the default bench matrix runs twice on the patched
library, once with each mechanism, and everything the run reports is compared. The cell is an
online-rate one where the workload has it: its decisions read the instruction clock at every fault,
and its faults go to Python, so runs stop in the middle of blocks and the count is corrected there.
"""

from __future__ import annotations

import os

import pytest

from tlslab.bench.spec import load_spec
from tlslab.experiment import make_domain
from tlslab.machine import fastpath

PREFERENCE = ("online-rate", "online-probe", "native")


def _one_cell_per_workload():
    by_workload: dict[tuple, list] = {}
    for cell in load_spec().cells():
        if cell.backend == "unicorn" and not cell.skip:
            s = cell.spec
            by_workload.setdefault((s.guest, s.args, s.tree, s.root, s.rootfs, s.variant), []).append(cell)
    chosen = []
    for cells in by_workload.values():
        for strategy in PREFERENCE:
            match = [c for c in cells if c.spec.strategy == strategy and c.spec.prices == "hw-vm"]
            if match:
                chosen.append(match[0])
                break
    return chosen


CELLS = _one_cell_per_workload()
PATCHED = fastpath.INLINE_COUNTER is not None


def _require_patched():
    if PATCHED:
        return
    why = ("this Unicorn has no inline block counter (uc_tlslab_inline_counter): build tlslab's with "
           "scripts/build_unicorn.py (make venv does)")
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def _observable(result) -> dict:
    return {"status": result.status, "stdout": result.stdout, "stderr": result.stderr,
            "crash": result.crash.describe() if result.crash else None,
            "counters": result.counters, "sites": result.sites}


def _run(spec, inline: bool, monkeypatch):
    monkeypatch.setattr(fastpath, "INLINE_COUNTER", fastpath.INLINE_COUNTER if inline else None)
    domain, _ = make_domain(spec)
    return domain.run()


def test_one_cell_per_workload_of_the_default_matrix():
    workloads = {c.label.split(" ")[0] for c in CELLS}
    assert {"boot", "keir", "lsr", "canary", "threads"} <= workloads, workloads
    assert len(CELLS) >= 20


def test_make_venv_built_the_patched_library():
    _require_patched()
    assert "inline block counter" in fastpath.unicorn_build()


@pytest.mark.parametrize("cell", CELLS, ids=[c.label for c in CELLS])
def test_inline_counter_counts_what_the_block_hook_counts(cell, monkeypatch):
    _require_patched()
    inline = _run(cell.spec, True, monkeypatch)
    hooked = _run(cell.spec, False, monkeypatch)
    assert inline.counters["instructions"] > 0
    assert _observable(inline) == _observable(hooked)
