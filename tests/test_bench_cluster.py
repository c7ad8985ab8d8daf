"""`tlslab bench --cluster`: model cells on a Dask cluster (here a LocalCluster of 2 worker processes).

The same cells and counters as the local pool; a worker SIGKILLed in the middle of a cell gives the cell
back to the scheduler (the matrix completes, nothing lost or duplicated); a cell that kills every worker it
runs on is recorded failed with the reason; SIGKILL of the driver, then ``--resume --cluster``, finishes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_dirs

from benchkit import ROOT, TINY, bench, records

pytest.importorskip("distributed", reason="tlslab[cluster] (dask[distributed]) is not installed")
pytestmark = pytest.mark.slow

SPEC = f"""
name = "cluster"
strategies = ["native", "emulate", "flip", "emulate-2004"]
variants = ["default"]
cost_profile = "nominal"
timeout_seconds = 60
[[guest]]
name = "lsr"
trees = ["{TINY}"]
[[guest]]
name = "canary"
args = ["5"]
[[guest]]
name = "malloc"
args = ["100"]
"""
N = 12
# fewer retries than Dask's default (3): each lost worker costs a restart
FAST_FAIL = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("spec") / "cluster.toml"
    p.write_text(SPEC)
    return p


@pytest.fixture(scope="module")
def pool_run(spec_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool")
    cp = bench(str(spec_file), "--out", str(out), "--jobs", "2")
    assert cp.returncode == 0, cp.stderr
    (run,) = run_dirs(out)
    return run


def assert_same_cells(run: Path, ref: Path) -> list[dict]:
    recs = records(run)
    ids = [r["cell"] for r in recs]
    assert len(ids) == len(set(ids)) == N                       # nothing duplicated, nothing lost
    want = {r["cell"]: r for r in records(ref)}
    assert set(ids) == set(want)                                # the same cells (ids are RunSpec hashes)
    for r in recs:
        assert r["outcome"] == want[r["cell"]]["outcome"], (r["label"], r.get("reason"))
        assert r["counters"] == want[r["cell"]]["counters"], r["label"]   # deterministic guests
    return recs


def test_cluster_gives_the_local_pools_cells_and_counters(spec_file, pool_run, tmp_path):
    cp = bench(str(spec_file), "--out", str(tmp_path), "--cluster", "local:2")
    assert cp.returncode == 0, cp.stderr
    assert "model cells on local:2" in cp.stderr and "cluster local:2 (a Dask LocalCluster): 2 worker(s)" in cp.stderr
    (run,) = run_dirs(tmp_path)
    recs = assert_same_cells(run, pool_run)
    assert all(r["worker"]["address"] for r in recs)           # where each cell ran
    assert len({r["worker"]["pid"] for r in recs}) == 2         # both workers took cells
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["sessions"][0]["cluster"].startswith("local:2")


def test_a_worker_killed_mid_cell_gives_the_cell_back(spec_file, pool_run, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"TLSLAB_BENCH_INJECT": "die-once:canary 5 default flip;die-once:lsr", "TLSLAB_BENCH_INJECT_DIR": str(marks)}
    cp = bench(str(spec_file), "--out", str(tmp_path / "out"), "--cluster", "local:2", env=env)
    assert cp.returncode == 0, cp.stderr
    assert len(list(marks.iterdir())) == 5        # five cells each SIGKILLed the worker running them, once
    (run,) = run_dirs(tmp_path / "out")
    recs = assert_same_cells(run, pool_run)
    assert {r["outcome"] for r in recs if r["label"].startswith(("lsr", "canary 5 default flip"))} <= {"ok", "guest-crash"}


def test_a_cell_that_kills_every_worker_is_recorded_failed(spec_file, tmp_path):
    env = {"TLSLAB_BENCH_INJECT": "die:malloc 100 default native", **FAST_FAIL}
    cp = bench(str(spec_file), "--out", str(tmp_path), "--cluster", "local:2", env=env)
    assert cp.returncode == 0, cp.stderr
    (run,) = run_dirs(tmp_path)
    recs = records(run)
    assert len(recs) == len({r["cell"] for r in recs}) == N
    (bad,) = [r for r in recs if r["outcome"] == "failed"]
    assert bad["label"].startswith("malloc 100 default native")
    assert "worker lost" in bad["reason"] and "KilledWorker" in bad["reason"]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(x) for x in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_sigkill_of_the_driver_then_resume_on_the_cluster(spec_file, pool_run, tmp_path):
    out = tmp_path / "killed"
    out.mkdir()
    env = {**os.environ, "TLSLAB_BENCH_INJECT": "slow:default"}      # ~1 s per cell: time to kill mid-run
    proc = subprocess.Popen([sys.executable, "-m", "tlslab", "bench", "--no-progress", str(spec_file), "--out",
                             str(out), "--cluster", "local:2"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = run_dirs(out)
            if runs and (runs[0] / "cells.jsonl").exists() and (runs[0] / "cells.jsonl").read_bytes().count(b"\n") >= 3:
                break
            assert proc.poll() is None, "the run finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no cells written within 120 s")
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        # the LocalCluster's processes lose their scheduler with the driver; do not leave them to a timeout
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
    (run,) = run_dirs(out)
    done_before = len(records(run))
    assert 3 <= done_before < N
    cp = bench("--resume", str(run), "--cluster", "local:2")
    assert cp.returncode == 0, cp.stderr
    assert f"{done_before} of {N} cells already recorded" in cp.stderr
    assert_same_cells(run, pool_run)
    info = json.loads((run / "run.json").read_text())
    assert len(info["sessions"]) == 2 and info["sessions"][1]["status"] == "complete"
    assert info["sessions"][1]["cluster"].startswith("local:2")


def test_bad_cluster_arguments_are_one_line_exit_2(spec_file, tmp_path):
    for value, text in (("local:0", "local:N needs N"), ("no such host!", "scheduler address"),
                        ("tcp://127.0.0.1:9", "cannot use the Dask cluster")):
        cp = bench(str(spec_file), "--out", str(tmp_path), "--cluster", value)
        assert cp.returncode == 2, (value, cp.stderr)
        assert len(cp.stderr.strip().splitlines()) == 1 and text in cp.stderr, cp.stderr
        assert "Traceback" not in cp.stderr
    assert not list(tmp_path.iterdir())             # no run directory for a cluster that cannot be used


def test_matrix_scaling_prints_the_clusters_speed_up_next_to_the_pools(spec_file, tmp_path):
    cp = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "matrix_scaling.py"), "--spec", str(spec_file),
                         "--cluster", "local:2", "--out", str(tmp_path)], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600)
    assert cp.returncode == 0, cp.stderr
    import re

    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("model cells' speed-up"))
    assert re.search(r"cluster local:2 .*: \d+\.\d\dx \(\d+\.\d s\); local pool, 2 workers: \d+\.\d\dx", line), line
    assert "jobs=cluster" in cp.stdout and "0 failed" in cp.stdout


def _cell(guest: str, **spec):
    from tlslab.bench.spec import Cell
    from tlslab.experiment import RunSpec

    return Cell(RunSpec(guest=guest, **spec), guest)


def test_a_worker_refuses_a_guest_whose_hash_differs():
    from tlslab.bench import cluster

    cell = _cell("lsr", strategy="native")
    claim = cluster.claims(cell)
    assert claim["guest"]["kind"] == "bundled" and len(claim["guest"]["sha256"]) == 64
    assert cluster.check_claims(cell.to_dict(), claim)[1] is None
    forged = {**claim, "guest": {**claim["guest"], "sha256": "0" * 64}}
    record = cluster.remote_cell({"cell": cell.to_dict(), "claims": forged})
    assert record["outcome"] == "failed" and "refused on worker" in record["reason"]
    assert "the driver's is 0000000000000000..." in record["reason"]


def test_an_external_guest_travels_as_bytes(tmp_path, monkeypatch):
    from tlslab.bench import cluster
    from tlslab.guests import resolve_guest

    exe = tmp_path / "mylsr"
    exe.write_bytes(resolve_guest("lsr").path.read_bytes())
    cell = _cell(str(exe), strategy="native", tree=TINY)
    claim = cluster.claims(cell)
    assert claim["guest"]["kind"] == "bytes" and claim["guest"]["data"] == exe.read_bytes()
    exe.unlink()                                                # the worker has no such file
    monkeypatch.setenv("TLSLAB_CACHE", str(tmp_path / "cache"))
    record = cluster.remote_cell({"cell": cell.to_dict(), "claims": claim})
    assert record["outcome"] == "ok", record.get("reason")
    assert record["guest"]["sha256"] == claim["guest"]["sha256"]
    assert record["guest"]["path"].startswith(str(tmp_path / "cache" / "guests"))


def test_a_data_directory_is_claimed_by_its_hash():
    from tlslab.bench import cluster

    cell = _cell("lsr", strategy="native", root="guests/boot")
    claim = cluster.claims(cell)
    assert claim["root"]["name"] == "guests/boot" and len(claim["root"]["sha256"]) == 64
    assert cluster.check_claims(cell.to_dict(), claim)[1] is None
    bad = {**claim, "root": {**claim["root"], "sha256": "f" * 64}}
    assert "data directory guests/boot here hashes to" in cluster.check_claims(cell.to_dict(), bad)[1]


def test_hw_cells_stay_on_the_driver_serially(tmp_path):
    from tlslab.bench import hwcells

    why = hwcells.unavailable()
    if why:
        pytest.skip(why)
    spec = tmp_path / "hw.toml"
    spec.write_text(f"""
name = "hwmix"
strategies = ["native", "emulate"]
variants = ["default"]
cost_profile = "nominal"
timeout_seconds = 60
[hw]
strategies = ["native", "emulate"]
variants = ["default"]
repeat = 1
cpu = 0
[[guest]]
name = "lsr"
trees = ["{TINY}"]
backends = ["unicorn", "hw"]
""")
    cp = bench(str(spec), "--out", str(tmp_path / "out"), "--cluster", "local:2")
    assert cp.returncode == 0, cp.stderr
    (run,) = run_dirs(tmp_path / "out")
    recs = records(run)
    hw = {r["spec"]["strategy"]: r for r in recs if r["backend"] == "hw"}
    model = {r["spec"]["strategy"]: r for r in recs if r["backend"] == "unicorn"}
    assert set(hw) == set(model) == {"native", "emulate"}
    assert all("worker" in r for r in model.values()) and not any("worker" in r for r in hw.values())
    for s in hw:                      # the record's one faults field, filled by both backends
        assert hw[s]["outcome"] == model[s]["outcome"] == "ok"
        assert hw[s]["faults"] == model[s]["faults"], s
    assert model["emulate"]["faults"] > 0


def test_failures_on_the_cluster_are_recorded_and_the_run_goes_on(tmp_path):
    """As with the local pool: a cell that raises, an external guest that is not an ELF file (sent as bytes),
    and a hung cell (it overruns its hard deadline, kills its worker, and is recorded failed after the retries)."""
    spec = tmp_path / "fail.toml"
    notelf = tmp_path / "notelf"
    notelf.write_text("not an ELF file\n")
    spec.write_text(f"""
name = "fail"
strategies = ["native", "emulate"]
variants = ["default"]
timeout_seconds = 30
kill_after_seconds = 3
[[guest]]
name = "lsr"
trees = ["{TINY}"]
[[guest]]
name = "canary"
args = ["5"]
strategies = ["flip"]
[[guest]]
name = "{notelf}"
strategies = ["native"]
""")
    inject = "hang:lsr [" + TINY + "] default emulate nonpae;raise:canary 5 default flip"
    cp = bench(str(spec), "--out", str(tmp_path / "out"), "--cluster", "local:2",
               env={"TLSLAB_BENCH_INJECT": inject, **FAST_FAIL})
    assert cp.returncode == 0, cp.stderr
    (run,) = run_dirs(tmp_path / "out")
    recs = {(r["spec"]["guest"], r["spec"]["strategy"]): r for r in records(run)}
    assert len(recs) == 4
    assert recs[("lsr", "native")]["outcome"] == "ok"
    hung = recs[("lsr", "emulate")]
    assert hung["outcome"] == "failed" and "hard deadline of 3 s" in hung["reason"], hung["reason"]
    raised = recs[("canary", "flip")]
    assert raised["outcome"] == "failed" and "injected failure" in raised["reason"]
    assert "RuntimeError" in raised["traceback"]
    missing = recs[(str(notelf), "native")]
    assert missing["outcome"] == "failed" and "ELF" in missing["reason"]
