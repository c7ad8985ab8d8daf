"""``tlslab report``: figures + HTML for one bench run."""

from __future__ import annotations

import json
from pathlib import Path

from tlslab.bench.store import RunDir
from tlslab.bench.summary import split_online_extra, summarize
from tlslab.record import SCHEMA_VERSION


def build_report(run: RunDir, out: Path, profile: str | None = None, command: str | None = None) -> Path:
    from tlslab.report import figures, html

    out.mkdir(parents=True, exist_ok=True)
    from tlslab.bench.hwcells import is_hw

    info = run.read_run()
    records = [r for r in run.latest().values() if not is_hw(r)]   # hw cells: s.hw, their own table
    records, _ = split_online_extra(records, info.get("spec", {}))   # online cells under extra prices: s.online_extra
    s = summarize(run, profile)
    figs = figures.all_figures(s, records, out)
    page = html.render_html(s, info, records, figs, command, run)
    index = out / "index.html"
    index.write_text(page)
    (out / "summary.json").write_text(json.dumps({
        "run_id": s.run_id, "cost_profile": s.choice.profile.label(), "profile_note": s.choice.note,
        "fitted": s.choice.fitted, "strategies": s.strategies, "rows": s.rows, "counts": s.counts,
        "coverage": figures.coverage_data(records),
        "hw": s.hw,
        "processes": s.processes,
        "online": s.online,
        "online_extra": s.online_extra,
        "schema": SCHEMA_VERSION,       # tlslab.record: the records' schema this summary was made with
    }, indent=2, sort_keys=True, default=str) + "\n")
    return index
