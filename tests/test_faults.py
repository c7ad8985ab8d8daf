"""`tlslab faults`: per-site view, fault trace (flip ping-pong), 2004 coverage."""

from __future__ import annotations

import json

import pytest

from tlslab.cli import main
from tlslab.experiment import RunSpec
from tlslab.inspect.trace import compact_timeline, traced_run

TINY = "dirs=3,files=20,symlinks=2,depth=2,seed=3"


def run_json(capsys, *argv) -> dict:
    assert main(["faults", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_flip_trace_shows_the_ping_pong(capsys):
    out = run_json(capsys, "lsr", "--strategy", "flip", "--tree", TINY, "--trace", "12", "--limit", "0")
    trace = out["trace"]
    assert len(trace) == 12 and out["faults"] > 12
    for a, b in zip(trace, trace[1:]):
        assert a["instructions"] <= b["instructions"]
        assert a["after"] == b["before"]                     # the next fault sees what this one installed
    for e in trace:
        assert e["action"] == "restart" and e["before"] != e["after"]
        neg = e["offset"] & 0x80000000
        assert ("expand-down" in e["after"]) == bool(neg)    # -ve -> expand-down, +ve -> expand-up
    sites = out["sites"]
    assert sum(s["faults"] for s in sites) == out["faults"]
    assert all(s["refused"] == 0 for s in sites)
    assert any(s["sign"] == "+" and s["faults"] for s in sites)   # flip faults on +ve accesses too
    assert all(s["instruction"] and s["symbol"] for s in sites)


def test_emulate_handles_in_place(capsys):
    out = run_json(capsys, "lsr", "--strategy", "emulate", "--tree", TINY, "--trace", "5", "--limit", "0")
    assert all(e["action"] == "resume" and e["before"] == e["after"] for e in out["trace"])
    faulting = [s for s in out["sites"] if s["faults"]]
    assert faulting and all(s["max_offset"] < 0 for s in faulting)   # only -ve accesses fault
    assert all(s["handling"].startswith("handled: emulated") for s in faulting)


def test_refused_site_is_named(capsys):
    out = run_json(capsys, "lsr", "--strategy", "emulate-2004", "--tree", TINY)
    assert out["crash"] and "walk" in out["crash"]["text"]
    refused = [s for s in out["sites"] if s["refused"]]
    assert len(refused) == 1 and "REFUSED" in refused[0]["handling"] and "a1" in refused[0]["handling"]


def test_coverage(capsys):
    out = run_json(capsys, "lsr", "--coverage", "--tree", TINY)
    d = out["decoders"]
    assert set(d) == {"emulate-2004", "flip (seg_fixup)", "rewrite-2004 (fixup.c)"}
    emu = d["emulate-2004"]
    assert emu["faces"] == "emulate" and emu["unhandled_sites"] > 0
    assert any(s["symbol"].startswith("walk") and "a1" in s["why"] for s in emu["unhandled"])
    fix = d["rewrite-2004 (fixup.c)"]
    assert fix["unhandled_sites"] > 0 and any("disp32" in s["why"] for s in fix["unhandled"])
    for v in d.values():
        assert v["unhandled_faults"] <= v["faults"]


def test_tables_render(capsys):
    assert main(["faults", "lsr", "--strategy", "flip", "--tree", TINY, "--trace", "4", "--limit", "5"]) == 0
    text = capsys.readouterr().out
    assert "descriptor before" in text and "expand-down" in text and "fs/gs sites by faults" in text


@pytest.mark.parametrize("argv, msg", [
    (["lsr", "--strategy", "nope"], "unknown strategy"),
    (["./no/such/guest"], "does not exist"),
    (["lsr", "--tree", "dirs=x"], "not an integer"),
])
def test_usage_errors(capsys, argv, msg):
    assert main(["faults", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_compact_timeline():
    t = compact_timeline([5, 10, 10, 90], 100, points=10)
    assert t["instructions"][0] == 0 and t["instructions"][-1] == 100
    assert t["cumulative_faults"][-1] == 4 and t["cumulative_faults"][1] == 3
    assert t["faults"] == 4


def test_recorder_is_transparent():
    spec = RunSpec(guest="canary", args=("3",), strategy="flip")
    from tlslab.experiment import execute

    plain, _ = execute(spec)
    traced, _g, _d, rec = traced_run(spec)
    assert traced.counters == plain.counters and traced.stdout == plain.stdout
    assert len(rec.trap_instructions) == plain.counters["strategy"]["traps"]
