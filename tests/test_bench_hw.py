"""hw cells in the benchmark matrix: spec, identity, runs on this CPU, skips, resume, summary and report.

The runs on this CPU skip (with the reason) where the hw backend is unavailable
(no 32-bit exec, ptrace refused); with CI=true they must run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from benchkit import TINY, bench, records

from tlslab.bench.spec import Cell, MatrixSpec, SpecError, cell_id

HW_TOML = f"""
name = "hw-small"
strategies = ["native", "emulate", "flip", "emulate-2004"]
variants = ["default", "nosegneg"]
cost_profile = "fit"
timeout_seconds = 60
backends = ["unicorn", "hw"]
[hw]
variants = ["default"]
repeat = 2
[fit]
guest = "lsr"
tree = "{TINY}"
[[guest]]
name = "lsr"
trees = ["{TINY}"]
[[guest]]
name = "canary"
args = ["5"]
[[guest]]
name = "malloc"
args = ["100"]
backends = ["unicorn"]
"""
# per guest: 4 strategies x 2 variants model cells; hw: native/emulate/flip x default
N_MODEL, N_HW = 3 * 4 * 2, 2 * 3


def the_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if (p / "run.json").is_file()]
    return run


# --------------------------------------------------------------------------- spec and identity (no runs)

def test_hw_cells_expand_only_for_supervisor_strategies():
    spec = MatrixSpec.from_toml(HW_TOML, "hw.toml")
    cells = spec.cells()
    hw = [c for c in cells if c.backend == "hw"]
    assert len(cells) == N_MODEL + N_HW
    assert {c.spec.strategy for c in hw} == {"native", "emulate", "flip"}
    assert {c.spec.variant for c in hw} == {"default"} and {c.spec.guest for c in hw} == {"lsr", "canary"}
    assert all(c.label.endswith(" on hw") and c.options == {"repeat": 2, "cpu": 0} for c in hw)
    assert len({c.id for c in cells}) == len(cells)
    # an hw cell and the model cell of the same RunSpec differ only in the backend
    for c in hw:
        twin = next(m for m in cells if m.backend == "unicorn" and m.spec == c.spec)
        assert c.id != twin.id == cell_id(c.spec) and c.id == cell_id(c.spec, "hw")


def test_model_cell_ids_and_old_run_files_are_unchanged():
    plain = MatrixSpec.from_toml(HW_TOML.replace('backends = ["unicorn", "hw"]', ""), "plain.toml").cells()
    mixed = MatrixSpec.from_toml(HW_TOML, "hw.toml").cells()
    assert [c.id for c in plain] == [c.id for c in mixed if c.backend == "unicorn"]
    old = plain[0].to_dict()
    assert "backend" not in old                       # a model-only run.json looks as it did
    back = Cell.from_dict(old)
    assert back.backend == "unicorn" and back.id == old["id"]
    hw = next(c for c in mixed if c.backend == "hw")
    again = Cell.from_dict(json.loads(json.dumps(hw.to_dict())))
    assert again.backend == "hw" and again.id == hw.id and again.options == hw.options


@pytest.mark.parametrize("text, msg", [
    ('backends = ["hw"]\n[[guest]]\nname = "lsr"', "must include unicorn"),
    ('backends = ["qemu"]\n[[guest]]\nname = "lsr"', "unknown backend"),
    ('[hw]\nstrategies = ["rewrite"]\n[[guest]]\nname = "lsr"', "no hw implementation"),
    ('[hw]\ncpus = 1\n[[guest]]\nname = "lsr"', "unknown key"),
    ('[hw]\nrepeat = 0\n[[guest]]\nname = "lsr"', "repeat"),
])
def test_bad_hw_specs(text, msg):
    with pytest.raises(SpecError, match=msg):
        MatrixSpec.from_toml(text, "bad.toml")


def test_default_matrix_has_hw_cells():
    from tlslab.bench.spec import load_spec

    hw = [c for c in load_spec().cells() if c.backend == "hw"]
    assert {c.spec.strategy for c in hw} == {"native", "emulate", "flip", "online-patch"}
    assert {c.workload for c in hw} >= {"lsr [small]", "lsr [4k]", "keir", "boot", "threads 4 200"}
    assert {c.spec.variant for c in hw} == {"default", "dyn"}
    for workload in ("keir", "boot"):
        assert {c.spec.strategy for c in hw if c.workload == workload} == {"native", "emulate", "flip", "online-patch"}
    assert {c.spec.guest for c in hw if c.spec.variant == "dyn"} == {"lsr", "threads"}


def test_worker_records_unavailable_backend_as_skipped(monkeypatch):
    """A run that reports the backend unavailable is a skip with the reason, not a failure."""
    from tlslab.bench.runner import run_cell_safely
    from tlslab.hw import backend
    from tlslab.hw.backend import HwUnavailable

    def refuse(spec, cpu=0, timeout=None):
        raise HwUnavailable("hw backend unavailable: PTRACE_TRACEME: Operation not permitted (ptrace refused)")

    monkeypatch.setattr(backend, "run_spec", refuse)
    hw = next(c for c in MatrixSpec.from_toml(HW_TOML, "hw.toml").cells() if c.backend == "hw")
    rec = run_cell_safely(hw.to_dict())
    assert rec["outcome"] == "skipped" and "ptrace refused" in rec["reason"]


# --------------------------------------------------------------------------- runs

def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"hw backend required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def hw_ok():
    from tlslab.bench import hwcells

    hwcells._probe.cache_clear()
    why = hwcells._probe()
    if why:
        _unavailable(why)
    return True


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("hwspec") / "hw.toml"
    p.write_text(HW_TOML)
    return p


@pytest.fixture(scope="module")
def hw_run(hw_ok, spec_path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("hwrun")
    cp = bench(str(spec_path), "--out", str(out), "--jobs", "2", env={"TLSLAB_BENCH_HW_UNAVAILABLE": ""})
    assert cp.returncode == 0, cp.stderr
    return the_run(out), cp


@pytest.mark.slow
@pytest.mark.oracle
def test_hw_cells_run_and_agree_with_the_model(hw_run):
    run, cp = hw_run
    recs = records(run)
    assert len(recs) == N_MODEL + N_HW
    hw = [r for r in recs if r["backend"] == "hw"]
    model = {r["cell"]: r for r in recs if r["backend"] == "unicorn"}
    assert len(hw) == N_HW
    # the serial phase: every hw cell was recorded after every model cell
    last_model = max(r["ended"] for r in model.values())
    assert all(r["started"] >= last_model for r in hw)
    for r in hw:
        assert r["outcome"] == "ok", (r["label"], r.get("reason"))
        for key in ("tlslab_version", "git_commit", "python_version", "cpu_model", "hostname"):
            assert r["meta"][key], key
        assert r["guest"]["sha256"] and r["run_seconds"] > 0 and len(r["run_seconds_samples"]) == 2
        assert r["cpu"] == 0 and r["faults_stable"] and r["tree_order_matches"]
        twin = model[cell_id(r["spec"])]
        assert r["faults"] == twin["counters"]["strategy"]["traps"], r["label"]
        assert {s["eip"]: s["faults"] for s in r["hw_fault_sites"]} == \
            {s["eip"]: s["violations"] for s in twin["sites"] if s["violations"]}, r["label"]
        assert r["stdout"]["sha256"] == twin["stdout"]["sha256"], r["label"]
    assert "hw backend: measured on this CPU" in cp.stdout and "MODEL != HW" not in cp.stdout


@pytest.mark.slow
@pytest.mark.oracle
def test_summary_has_the_hw_table(hw_run):
    from tlslab.bench.store import RunDir
    from tlslab.bench.summary import summarize

    run, _cp = hw_run
    s = summarize(RunDir(run))
    # the model's rows are untouched by the hw cells
    assert len(s.rows) == 3 * 2 and all(c.get("outcome") != "missing" for r in s.rows for c in r["cells"].values())
    hw = s.hw
    assert hw and len(hw["rows"]) == N_HW and not hw["mismatches"] and hw["ok"] == N_HW
    for r in hw["rows"]:
        assert r["faults_equal"] and r["sites_equal"] and r["stdout_equal"] and r["status_equal"]
        if hw["profile"]:
            assert r["error_pct"] is not None and r["modelled_ms"] > 0 and r["measured_ms"] > 0
        assert r["fitted_ms"] > 0            # the run's own FITTED xen-2004 (cost_profile = "fit")
    if hw["profile"]:
        assert "consistency check" in hw["profile_provenance"] or "different machine" in hw["profile_provenance"]


@pytest.mark.slow
@pytest.mark.oracle
def test_report_renders_the_hw_table_and_figure(hw_run):
    from tlslab.cli import main

    run, _cp = hw_run
    out = run.parent / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    for ext in ("png", "svg"):
        assert (out / f"hw.{ext}").stat().st_size > 5000
    page = (out / "index.html").read_text()
    assert page.count("data:image/svg+xml;base64,") == 5
    assert 'id="hw"' in page and "Model vs this CPU" in page and "(FITTED)" in page
    assert "MODEL AND CPU DISAGREE" not in page
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["hw"]["rows"]) == N_HW
    from tlslab.report.browser import find_chromium, image_status

    chromium = find_chromium()
    if chromium:
        images = image_status(out / "index.html", chromium)
        assert len(images) == 5 and all(i["complete"] and i["width"] > 300 for i in images)


@pytest.mark.slow
@pytest.mark.oracle
def test_resume_with_mixed_backends(hw_run, tmp_path):
    """Cut a finished run back to a mix of model and hw records; --resume runs exactly the rest."""
    run, _cp = hw_run
    copy = tmp_path / run.name
    copy.mkdir()
    info = json.loads((run / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps(info))
    recs = records(run)
    keep = [r for r in recs if r["backend"] == "unicorn"][::2] + [r for r in recs if r["backend"] == "hw"][:2]
    (copy / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    cp = bench("--resume", str(copy), "--jobs", "2", env={"TLSLAB_BENCH_HW_UNAVAILABLE": ""})
    assert cp.returncode == 0, cp.stderr
    todo = len(recs) - len(keep)
    assert f"{len(keep)} of {len(recs)} cells already recorded, {todo} to run" in " ".join(cp.stderr.split())
    resumed = records(copy)
    ids = [r["cell"] for r in resumed]
    assert len(ids) == len(set(ids)) == len(recs) and set(ids) == {r["cell"] for r in recs}
    ref = {r["cell"]: r for r in recs}
    for r in resumed:
        assert r["outcome"] == ref[r["cell"]]["outcome"], r["label"]
        assert r.get("faults", r.get("counters")) == ref[r["cell"]].get("faults", ref[r["cell"]].get("counters"))
    cp = bench("--resume", str(copy))
    assert cp.returncode == 0 and "0 to run" in cp.stderr


@pytest.mark.slow
def test_forced_unavailable_hw_cells_are_skipped_not_failed(spec_path, tmp_path):
    out = tmp_path / "out"
    reason = "test: pretend this host refuses ptrace"
    cp = bench(str(spec_path), "--out", str(out), "--jobs", "2", env={"TLSLAB_BENCH_HW_UNAVAILABLE": reason})
    assert cp.returncode == 0, cp.stderr
    recs = records(the_run(out))
    hw = [r for r in recs if r["backend"] == "hw"]
    assert len(hw) == N_HW and len(recs) == N_MODEL + N_HW
    assert all(r["outcome"] == "skipped" and reason in r["reason"] and "TLSLAB_BENCH_HW_UNAVAILABLE" in r["reason"]
               for r in hw)
    assert not [r for r in recs if r["outcome"] == "failed"]
    out = " ".join(cp.stdout.split())
    assert "FAILED " not in out.replace("FAILED: the cell did not run", "")
    assert "6 hw cells skipped" in out and "6 skipped (hw)" in out


@pytest.mark.slow
@pytest.mark.oracle
def test_a_fault_count_difference_is_flagged_loudly(hw_run, tmp_path):
    """Tamper with one hw record: the summary, the text table and the report all say MODEL != HW."""
    import io

    from rich.console import Console

    from tlslab.bench.store import RunDir
    from tlslab.bench.summary import render, summarize
    from tlslab.report.build import build_report

    run, _cp = hw_run
    copy = tmp_path / run.name
    copy.mkdir()
    (copy / "run.json").write_text((run / "run.json").read_text())
    recs = records(run)
    victim = next(r for r in recs if r["backend"] == "hw" and r["spec"]["strategy"] == "flip")
    victim["faults"] += 1
    (copy / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = summarize(RunDir(copy))
    assert len(s.hw["mismatches"]) == 1 and "faults differ" in s.hw["mismatches"][0]
    buf = io.StringIO()
    render(s, Console(file=buf, width=200, color_system=None))
    assert "MODEL != HW" in buf.getvalue() and "DIFFER: FAULTS" in buf.getvalue()
    page = build_report(RunDir(copy), tmp_path / "report").read_text()
    assert "MODEL AND CPU DISAGREE" in page


# --------------------------------------------------------------------------- a program of the pinned root

ROOTED_TOML = """
name = "hw-rooted"
strategies = ["native", "emulate", "flip"]
variants = ["default"]
timeout_seconds = 120
backends = ["unicorn", "hw"]
[hw]
repeat = 2
[[guest]]
name = "/bin/ls"
rootfs = "debian"
args = ["-R", "/usr/lib/python3.11/json"]
label = "ls json"
"""


def _cell_records(cells) -> list[dict]:
    """Run ``cells`` in this process, model cells first, as the runner records them."""
    from tlslab.bench.runner import run_cell_safely

    out = []
    for c in sorted(cells, key=lambda c: c.backend == "hw"):
        rec = run_cell_safely(c.to_dict())
        out.append({"cell": c.id, "label": c.label, "workload": c.workload, "backend": c.backend,
                    "spec": c.to_dict()["spec"], "meta": {}, **rec})
    return out


@pytest.mark.oracle
def test_rooted_program_sites_compare_by_object_and_offset(hw_ok, debian_rootfs):
    """Debian's dynamic ls chrooted on this CPU: ld.so and libc land at randomised addresses (ASLR), never
    at the model's; the hw cell names its sites (object, file offset) and the model's the same way."""
    from tlslab.bench import hwcells
    from tlslab.hw.backend import ROOT_NEEDED

    if os.geteuid() != 0:
        _unavailable(ROOT_NEEDED)
    recs = _cell_records(MatrixSpec.from_toml(ROOTED_TOML, "rooted.toml").cells())
    hw = {r["spec"]["strategy"]: r for r in recs if r["backend"] == "hw"}
    model = {r["spec"]["strategy"]: r for r in recs if r["backend"] == "unicorn"}
    assert set(hw) == {"native", "emulate", "flip"}
    for strategy, r in hw.items():
        assert r["outcome"] == "ok", (r["label"], r.get("reason"))
        assert r["faults_stable"], r["faults_per_repeat"]
        assert r["tree_order_matches"] is None          # no data tree: nothing to check
        if strategy == "native":
            assert r["faults"] == 0 and r["model_objects"] == []
            continue
        assert r["faults"] > 0
        for s in r["hw_fault_sites"]:                   # every site in a file of the root, as the guest names it
            assert os.path.isfile(os.path.join(debian_rootfs, s["object"].lstrip("/"))) and s["offset"] >= 0, s
        assert "libc.so.6" in {s["object"].rsplit("/", 1)[1] for s in r["hw_fault_sites"]}
        model_eips = {s["eip"] for s in model[strategy]["sites"] if s["violations"]}
        if Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0":
            assert model_eips != {s["eip"] for s in r["hw_fault_sites"]}   # by EIP they could not be compared
    table = hwcells.comparison(recs)
    assert not table["mismatches"], table["mismatches"]
    for row in table["rows"]:
        assert row["faults_equal"] and row["sites_equal"] and row["stdout_equal"] and row["status_equal"], row
        assert row["model_sites"] == row["hw_sites"] == len(hw[row["strategy"]]["hw_fault_sites"])
    # one site moved by a byte is a difference
    bad = json.loads(json.dumps(recs))
    victim = next(r for r in bad if r["backend"] == "hw" and r["spec"]["strategy"] == "emulate")
    victim["hw_fault_sites"][0]["offset"] += 1
    (m,) = hwcells.comparison(bad)["mismatches"]
    assert "emulate" in m and "sites differ" in m
