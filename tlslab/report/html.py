"""One self-contained HTML page for a bench run: tables + figures.

Figures are embedded as ``data:image/svg+xml;base64`` URIs (the page needs no
other file), and also written next to it as PNG and SVG. No JavaScript, no
external fonts or styles.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from tlslab.bench.summary import (
    KEIR_RATIOS,
    SHORTFALL_NOTE,
    Summary,
    decided,
    fmt_faults,
    fmt_online,
    fmt_ratio,
    fmt_shortfall,
    fmt_tally,
)
from tlslab.report.figures import coverage_data
from tlslab.record import Outcome

CSS = """
:root { --fg:#1d1d1f; --muted:#5f6368; --line:#d9d9de; --bg:#ffffff; --band:#f6f7f9; --warn:#fff4d6; --bad:#fde8e4; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0; }
main { max-width: 1280px; margin: 0 auto; padding: 28px 32px 60px; }
h1 { font-size: 28px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 6px; }
.sub { color: var(--muted); margin: 0 0 18px; }
.note { background: var(--warn); border-left: 4px solid #E69F00; padding: 10px 14px; margin: 12px 0; border-radius: 4px; }
.ok { color: #007a5a; } .bad { color: #b3261e; font-weight: 600; } .crash { color: #a05a00; } .dim { color: var(--muted); }
table { border-collapse: collapse; margin: 10px 0 6px; font-size: 13.5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--band); font-weight: 600; position: sticky; top: 0; }
td.l, th.l { text-align: left; }
tr.keir td { font-style: italic; color: var(--muted); background: #fafafa; }
tr.fit td { background: #fffaf0; }
td.wrap { white-space: normal; max-width: 560px; text-align: left; }
table.fixed { table-layout: fixed; width: 100%; }
table.fixed td { white-space: normal; word-break: break-word; vertical-align: top; }
.scroll { overflow-x: auto; }
figure { margin: 18px 0 26px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; background: white; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; max-width: 1100px; }
code, pre { font-family: "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: var(--band); padding: 10px 12px; border-radius: 6px; overflow-x: auto; }
details { margin: 8px 0; } summary { cursor: pointer; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 6px 24px; font-size: 13.5px; }
.grid div span { color: var(--muted); }
.toc a { margin-right: 14px; }
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def data_uri(path: Path) -> str:
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _cls(cell: dict) -> str:
    return {Outcome.GUEST_CRASH: "crash", Outcome.FAILED: "bad", Outcome.SKIPPED: "dim"}.get(cell.get("outcome"), "")


def _ratio_table(s: Summary) -> str:
    st = [x for x in s.strategies if x != "native"]
    out = ['<div class="scroll"><table><tr><th class="l">workload</th><th class="l">build</th><th>native ms</th>']
    out += [f"<th>{esc(x)}</th>" for x in st] + ["<th>flip/emulate faults</th></tr>"]
    for r in s.rows:
        name = esc(r["workload"]) + (" <b>(fit target)</b>" if r["fit_target"] else "")
        if r["hv_profile"] != "nonpae":
            name += f" [{esc(r['hv_profile'])}]"
        tds = []
        for x in st:
            c = r["cells"][x]
            title = esc(c.get("reason") or "")
            tds.append(f'<td class="{_cls(c)}" title="{title}">{esc(fmt_ratio(c))}</td>')
        fr = r["flip_over_emulate_faults"]
        nat = f"{r['native_ms']:.1f}" if r["native_ms"] else esc(fmt_ratio(r["cells"].get("native", {})))
        out.append(f'<tr class="{"fit" if r["fit_target"] else ""}"><td class="l">{name}</td>'
                   f'<td class="l">{esc(r["variant"])}</td><td>{nat}</td>{"".join(tds)}'
                   f'<td>{f"{fr:.2f}" if fr is not None else "-"}</td></tr>')
    keir = "".join(f"<td>{KEIR_RATIOS[x]:.2f}x</td>" if x in KEIR_RATIOS else "<td></td>" for x in st)
    out.append(f'<tr class="keir"><td class="l">Keir Fraser 2004: ls -R /usr/lib</td><td class="l">Xen</td>'
               f'<td>180.0</td>{keir}<td>"nearly twice"</td></tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _keir_table(s: Summary) -> str:
    """Keir Fraser's 2004 row beside today's keir row(s) and the fit target: faults, ratio, modelled ms."""
    from tlslab.bench.summary import fmt_count, fmt_ms

    k = s.keir
    if not k:
        return ""
    fitted = " <b>(FITTED)</b>" if k["fitted"] else ""
    out = ['<h3 id="keir">Keir Fraser\'s benchmark, <code>ls -R /usr/lib</code>: 2004 and today</h3>',
           '<div class="scroll"><table><tr><th class="l" rowspan="2">workload</th><th class="l" rowspan="2">build</th>'
           '<th rowspan="2">instructions</th><th colspan="3">#GP faults</th>'
           f'<th colspan="3">ms: {esc(k["profile"])}{fitted}</th><th class="l" rowspan="2">what</th></tr>'
           '<tr><th>emulate</th><th>flip</th><th>flip/emulate</th><th>native</th><th>emulate</th><th>flip</th></tr>']
    k4 = k["keir_2004"]
    out.append(f'<tr class="keir"><td class="l">Keir Fraser 2004: ls -R /usr/lib</td><td class="l">Xen</td>'
               f'<td>-</td><td>-</td><td>-</td><td>"{esc(k4["flip_over_emulate"])}"</td>'
               f'<td>{k4["native_ms"]:.0f}</td><td>{k4["emulate_ms"]:.0f} ({k4["emulate_x"]:.2f}x)</td>'
               f'<td>{k4["flip_ms"]:.0f} ({k4["flip_x"]:.2f}x)</td><td class="l">measured on Xen, 2004</td></tr>')
    for r in k["rows"]:
        def ms(key, x):
            if r[key] is None:
                return esc(r["outcomes"].get(key.removesuffix("_ms"), "-"))
            return fmt_ms(r[key]) + (f" ({r[x]:.2f}x)" if r.get(x) is not None else "")

        fr = r["flip_over_emulate"]
        name = esc(r["workload"]) + (" <b>(fit target)</b>" if r["fit_target"] else "")
        out.append(f'<tr class="{"fit" if r["fit_target"] else ""}"><td class="l">{name}</td>'
                   f'<td class="l">{esc(r["variant"])}</td><td>{fmt_count(r["instructions"])}</td>'
                   f'<td>{fmt_count(r["emulate_faults"])}</td><td>{fmt_count(r["flip_faults"])}</td>'
                   f'<td>{f"{fr:.2f}" if fr is not None else "-"}</td>'
                   f'<td>{fmt_ms(r["native_ms"]) if r["native_ms"] is not None else esc(r["outcomes"]["native"])}</td>'
                   f'<td>{ms("emulate_ms", "emulate_x")}</td><td>{ms("flip_ms", "flip_x")}</td>'
                   f'<td class="wrap">{esc(r["role"])}</td></tr>')
    out.append("</table></div>")
    notes = [esc(k["note"]) + "."] + [esc(r["caption"]) + "." for r in k["rows"] if r.get("caption")]
    if k.get("skipped"):
        notes.append(f'keir cells skipped: {esc(k["skipped"])}')
    out.append('<p class="dim">' + "<br>".join(notes) + "</p>")
    return "\n".join(out)


def keir_captions(s: Summary) -> str:
    """What the keir workload is, for figure captions ('' if the run has none)."""
    if not s.keir:
        return ""
    return " ".join(r["caption"] + "." for r in s.keir["rows"] if r.get("caption"))


def _faults_table(s: Summary) -> str:
    st = [x for x in s.strategies if x != "native"]
    out = ['<div class="scroll"><table><tr><th class="l">workload</th><th class="l">build</th><th>instructions</th>']
    out += [f"<th>{esc(x)}</th>" for x in st] + ["</tr>"]
    for r in s.rows:
        instr = next((c.get("instructions") for c in r["cells"].values() if c.get("outcome") == Outcome.OK), None)
        tds = "".join(f'<td class="{_cls(r["cells"][x])}">{esc(fmt_faults(r["cells"][x]))}</td>' for x in st)
        out.append(f'<tr><td class="l">{esc(r["workload"])}</td><td class="l">{esc(r["variant"])}</td>'
                   f'<td>{f"{instr:,}" if instr else "-"}</td>{tds}</tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _profiles_table(run, s: Summary) -> str:
    """The same counters priced by every available cost profile: emulate and flip relative to native."""
    from tlslab.bench.summary import summarize
    from tlslab.hypervisor import costmodel

    names = [n for n in costmodel.available_profiles() if n != "nominal"] or ["nominal"]
    sums = {n: summarize(run, n) for n in names}
    picks = [x for x in ("emulate", "flip", "rewrite") if x in s.strategies]
    out = ['<div class="scroll"><table><tr><th class="l" rowspan="2">workload</th><th class="l" rowspan="2">build</th>']
    for n in names:
        kind = sums[n].choice.profile.kind
        out.append(f'<th colspan="{len(picks)}">{esc(n)} <span class="dim">({esc(kind)})</span></th>')
    out.append("</tr><tr>" + "".join(f"<th>{esc(x)}</th>" for _n in names for x in picks) + "</tr>")
    for i, row in enumerate(s.rows):
        tds = []
        for n in names:
            r = sums[n].rows[i]
            for x in picks:
                c = r["cells"].get(x, {})
                tds.append(f'<td class="{_cls(c)}">{esc(fmt_ratio(c))}</td>')
        out.append(f'<tr><td class="l">{esc(row["workload"])}</td><td class="l">{esc(row["variant"])}</td>'
                   f'{"".join(tds)}</tr>')
    out.append("</table></div>")
    notes = "".join(f"<li><b>{esc(n)}</b>: {esc(sums[n].choice.profile.description)}"
                    + (f" <i>fitted on {esc(sums[n].choice.profile.fitted_on)}</i>" if sums[n].choice.profile.fitted_on else "")
                    + "</li>" for n in names)
    return "\n".join(out) + f'<ul class="dim">{notes}</ul>'


def _online_section(s: Summary, figure: str) -> str:
    """Online strategies against emulate, flip and the offline bound: under the summary's cost profile (with
    the figure), then under each profile the matrix also had them decide with."""
    if not s.online and not s.online_extra:
        return ""
    out = ['<h2 id="online">Online strategies against the offline bound</h2>']
    if s.online:
        out += [_online_table(s.online), figure]
    for prices, extra in s.online_extra.items():
        out.append(f"<h3>The online strategies deciding with {esc(prices)}'s prices</h3>")
        out.append(_online_table(extra) if extra else
                   f'<p class="note">Not judged here: this machine has no cost profile {esc(repr(prices))}, or '
                   'their run has no bound under it.</p>')
    return "\n".join(out)


def _online_table(on: dict) -> str:
    """One ``online_comparison``: its table, tallies and, where no online strategy makes both marks, why."""
    out = [f'<p class="note">Fault-handling time of each policy divided by the offline-optimal emulate/flip '
           f'hybrid\'s (it knows the future, so no policy that only emulates and flips beats it; a policy that '
           f'patches code, online-patch, can: a patched site never faults again), under '
           f'{esc(on["label"] + decided(on))}. emulate and flip are the 2004 mechanisms; '
           'the online-* strategies choose per fault from what a hypervisor sees (their rules: '
           '<code>tlslab strategies</code>). *: at most min(emulate, flip). Only runs with native\'s output '
           'count.</p>',
           '<div class="scroll"><table><tr><th class="l">workload</th><th class="l">build</th><th>bound ms</th>'
           + "".join(f"<th>{esc(n)}</th>" for n in on["policies"]) + "</tr>"]
    for r in on["rows"]:
        cells = []
        for name in on["policies"]:
            text, measured = fmt_online(r["cells"].get(name))
            cells.append(f"<td>{esc(text)}</td>" if measured else f'<td class="crash">{esc(text)}</td>')
        out.append(f'<tr><td class="l">{esc(r["workload"])}</td><td class="l">{esc(r["variant"])}</td>'
                   f'<td>{r["bound_ms"]:.2f}</td>{"".join(cells)}</tr>')
    out.append("</table></div><ul>")
    for name, t in on["tally"].items():
        out.append(f"<li>{esc(fmt_tally(name, t))}</li>")
    out.append("</ul>")
    short = [r for r in on["rows"] if r.get("why")]
    if short:
        out.append(f"<p>Where no online emulate/flip rule is both at most min(emulate, flip) and within 10% of the bound, "
                   f"why ({esc(SHORTFALL_NOTE)}):</p><ul>")
        out.extend(f"<li>{esc(fmt_shortfall(r))}</li>" for r in short)
        out.append("</ul>")
    return "\n".join(out)


def _processes_table(s: Summary) -> str:
    """Workloads of many processes or threads (boot, threads): faults per run and per process, Keir's boot."""
    p = s.processes
    if not p:
        return ""
    out = ['<h3 id="processes">Many processes and threads: faults per run and per process</h3>',
           f'<p class="note">{esc(p["note"])}.</p>',
           '<div class="scroll"><table><tr><th class="l">workload</th><th class="l">build</th><th class="l">strategy</th>'
           '<th>processes</th><th>threads</th><th>faults</th><th>per process</th><th>TLS reloads</th>'
           '<th class="l">busiest processes (faults)</th></tr>',
           f'<tr class="keir"><td class="l">Keir Fraser 2004: boot a minimal Fedora Core</td><td class="l">Xen</td>'
           f'<td class="l">flip/emulate</td><td></td><td></td><td>~{p["keir_2004_boot_faults"]:,}</td><td></td><td></td>'
           '<td></td></tr>']
    for r in p["rows"]:
        busiest = ", ".join(f'{b["program"].rsplit("/", 1)[-1]} {b["faults"]:,}' for b in r["busiest"])
        out.append(f'<tr><td class="l">{esc(r["workload"])}</td><td class="l">{esc(r["variant"])}</td>'
                   f'<td class="l">{esc(r["strategy"])}</td><td>{r["processes"]:,}</td><td>{r["threads"]:,}</td>'
                   f'<td>{r["faults"]:,}</td><td>{r["faults_per_process"]:,.0f}</td><td>{r["tls_reloads"]:,}</td>'
                   f'<td class="l">{esc(busiest)}</td></tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _hw_section(s: Summary, fig: str) -> str:
    """Model vs this CPU: measured time, modelled time under the measured hw profile, error, faults."""
    from tlslab.bench.summary import HW_CAPTION, fmt_ms, fmt_pct, hw_equal_text

    hw = s.hw
    if not hw:
        return ""
    prof = esc(hw["profile"] or "no measured hw-* profile")
    fit = esc(hw["fitted"] or "no fitted profile")
    parts = ['<h2 id="hw">Model vs this CPU (hw backend)</h2>']
    if hw["mismatches"]:
        parts.append('<p class="note bad"><b>MODEL AND CPU DISAGREE.</b> ' + "<br>".join(esc(m) for m in hw["mismatches"])
                     + "</p>")
    head = ("Consistency check, not validation." if hw.get("same_machine")
            else "Measured profile from another machine (or one not known to be this one).")
    parts.append(f'<p class="note"><b>{head}</b> {esc(hw["profile_provenance"] or "")}. '
                 f'{esc(_hw_fitted_note(hw))}.</p>')
    out = ['<div class="scroll"><table><tr><th class="l" rowspan="2">workload</th><th class="l" rowspan="2">build</th>'
           '<th class="l" rowspan="2">strategy</th><th colspan="3">#GP faults</th>'
           '<th colspan="3">measured on this CPU</th>'
           f'<th colspan="3">modelled: {prof} <span class="dim">(measured)</span></th>'
           f'<th colspan="2">{fit} <b>(FITTED)</b></th></tr>'
           '<tr><th>model</th><th>hw</th><th class="l">model = hw</th>'
           '<th>ms (median)</th><th>min-max</th><th>x native</th>'
           '<th>ms</th><th>x native</th><th>error</th><th>ms</th><th>x native</th></tr>']

    def x(v):
        return f"{v:.2f}x" if v is not None else "-"

    for r in hw["rows"]:
        eq = hw_equal_text(r)
        cls = "bad" if eq.startswith("DIFFER") else ("ok" if eq == "=" else "dim")
        title = esc(r.get("reason") or "")
        if r.get("measured_ms") is not None:
            meas = (f'<td>{fmt_ms(r["measured_ms"])}</td><td class="dim">{fmt_ms(r["measured_min_ms"])}-'
                    f'{fmt_ms(r["measured_max_ms"])} ({r.get("repeat")} runs)</td><td>{x(r.get("measured_ratio"))}</td>')
        else:
            meas = f'<td colspan="3" class="dim" title="{title}">{esc(r.get("hw_outcome"))}</td>'
        err = r.get("error_pct")
        mf = f'{r["model_faults"]:,}' if r.get("model_faults") is not None else "-"
        hf = f'{r["hw_faults"]:,}' if r.get("hw_faults") is not None else "-"
        err_cls = "bad" if err is not None and abs(err) > 50 else ""
        out.append(f'<tr><td class="l">{esc(r["workload"])}</td><td class="l">{esc(r["variant"])}</td>'
                   f'<td class="l">{esc(r["strategy"])}</td><td>{mf}</td><td>{hf}</td>'
                   f'<td class="l {cls}" title="{title}">{esc(eq)}</td>{meas}'
                   f'<td>{fmt_ms(r.get("modelled_ms"))}</td><td>{x(r.get("modelled_ratio"))}</td>'
                   f'<td class="{err_cls}">{fmt_pct(err)}</td>'
                   f'<td>{fmt_ms(r.get("fitted_ms"))}</td><td>{x(r.get("fitted_ratio"))}</td></tr>')
    out.append("</table></div>")
    parts.append("\n".join(out))
    summ = ""
    if hw["median_abs_error_pct"] is not None:
        n = sum(1 for r in hw["rows"] if r.get("error_pct") is not None)
        summ = (f" Prediction error of {prof} over {n} cells: median |error| {hw['median_abs_error_pct']:.0f}%, "
                f"max {hw['max_abs_error_pct']:.0f}%.")
    parts.append(f'<p class="dim">{esc(HW_CAPTION)}{summ}</p>')
    if hw["skipped"]:
        parts.append(f'<p class="dim">{len(hw["skipped"])} hw cells skipped: {esc(hw["skipped"][0].get("reason"))}</p>')
    parts.append(fig)
    return "\n".join(parts)


def _hw_fitted_note(hw: dict) -> str:
    from tlslab.report.figures import hw_fitted_note

    return hw_fitted_note(hw)


def _crash_table(s: Summary) -> str:
    if not s.crashes:
        return "<p>No guest crashed.</p>"
    out = ['<div class="scroll"><table class="fixed"><colgroup><col style="width:25%"><col style="width:19%">'
           '<col style="width:21%"><col style="width:26%"><col style="width:9%"></colgroup>'
           '<tr><th class="l">cell</th><th class="l">crash site</th>'
           '<th class="l">instruction</th><th class="l">reason</th><th>instructions before</th></tr>']
    for r in sorted(s.crashes, key=lambda r: r["label"]):
        c = r.get("crash") or {}
        eip = c.get("eip")
        out.append(f'<tr><td class="l">{esc(r["label"])}</td>'
                   f'<td class="l"><code>{eip:#010x}</code> &lt;{esc(c.get("symbol", ""))}&gt;</td>'
                   f'<td class="l"><code>{esc(c.get("instruction", ""))}</code></td>'
                   f'<td class="wrap">{esc(c.get("reason", ""))}</td>'
                   f'<td>{r.get("counters", {}).get("instructions", 0):,}</td></tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _failure_list(s: Summary) -> str:
    parts = []
    if s.failures:
        parts.append("<h3>Failed cells (the runner could not measure them)</h3><ul>")
        for r in s.failures:
            tb = r.get("traceback")
            parts.append(f'<li><b>{esc(r["label"])}</b>: <span class="bad">{esc(r.get("reason"))}</span>'
                         + (f"<details><summary>traceback</summary><pre>{esc(tb)}</pre></details>" if tb else "")
                         + "</li>")
        parts.append("</ul>")
    if s.skipped:
        parts.append("<h3>Skipped cells</h3><ul>")
        for r in s.skipped:
            parts.append(f'<li>{esc(r["label"])}: <span class="dim">{esc(r.get("reason"))}</span></li>')
        parts.append("</ul>")
    if s.missing:
        parts.append(f'<p class="bad">{s.missing} cells have not run yet: finish with <code>tlslab bench --resume '
                     f'{esc(s.run_id)}</code>.</p>')
    return "\n".join(parts) or "<p>Every cell ran.</p>"


def _coverage_table(records: list[dict]) -> str:
    data = coverage_data(records)
    if not data:
        return "<p>No ok emulate/flip-full cells to judge the 2004 decoders on.</p>"
    labels = list(next(iter(data))["decoders"])
    out = ['<div class="scroll"><table><tr><th class="l">workload (default build)</th>']
    out += [f"<th>{esc(lab)}</th>" for lab in labels] + ['<th class="l">why not (examples)</th></tr>']
    for row in data:
        tds = []
        whys = []
        for lab in labels:
            d = row["decoders"].get(lab)
            if not d:
                tds.append("<td>-</td>")
                continue
            cls = "ok" if d["unhandled_sites"] == 0 else ("crash" if d["handled_share"] > 0.5 else "bad")
            tds.append(f'<td class="{cls}">{100 * d["handled_share"]:.0f}% of {d["faults"]:,} faults; '
                       f'{d["unhandled_sites"]} of {d["sites"]} sites not</td>')
            if d["reasons"]:
                whys.append(f"<b>{esc(lab)}</b>: " + esc("; ".join(d["reasons"][:3])))
        out.append(f'<tr><td class="l">{esc(row["workload"])}</td>{"".join(tds)}'
                   f'<td class="wrap">{"<br>".join(whys) or "-"}</td></tr>')
    out.append("</table></div>")
    return "\n".join(out)


def _meta(s: Summary, info: dict) -> str:
    m = s.meta
    items = [
        ("run", s.run_id), ("created", info.get("created", "?")), ("status", info.get("status", "?")),
        ("tlslab", f"{m.get('tlslab_version')} @ {str(m.get('git_commit'))[:12]}" + (" (dirty tree)" if m.get("git_dirty") else "")),
        ("Python", m.get("python_version")), ("unicorn", m.get("unicorn_version")),
        ("unicorn library", m.get("unicorn_library") or "not recorded"), ("capstone", m.get("capstone_version")),
        ("CPU", f"{m.get('cpu_model')} x {m.get('cpu_count')}"), ("host", m.get("hostname")),
        ("cells", ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items()))),
        ("spec", s.spec.get("source", "?")), ("jobs", info.get("jobs", "?")),
    ]
    return '<div class="grid">' + "".join(f"<div><span>{esc(k)}:</span> {esc(v)}</div>" for k, v in items) + "</div>"


CAPTIONS = {
    "overhead": "Modelled time of each strategy relative to the untruncated native run of the same guest and build "
                "(native = 1). Modelled time = counters x prices of the cost profile named below the chart; the lab's "
                "own wall time is not the quantity of interest. Hatched first group: Keir Fraser's 2004 measurement "
                "(180/300/390 ms). x: the guest crashed (the strategy refused a fault; see the crash table).",
    "faults": "#GP faults per 1,000 guest instructions. Emulation faults on every negative-offset access; flipping "
              "faults whenever consecutive %gs accesses change sign; rewriting faults once per site (then patched). "
              "Log scale.",
    "timeline": "Cumulative faults against retired guest instructions, from the exact instruction count at every "
                "trap (bench cells store 201 points of this curve). The flip/emulate ratio depends on how the "
                "workload interleaves +ve TCB fields (canary, syscall vector) with -ve TLS variables (errno, tcache).",
    "hw": "Left: the model's counters priced with the measured hw profile against the measured time of the same "
          "guest on this CPU (median of the traced runs), log-log; points on the dashed line are predicted exactly, "
          "the band is +-25%; a red edge marks a cell whose fault counts differ between model and CPU. Middle: the "
          "prediction error per cell. Right: overhead relative to native as measured, as modelled with the measured "
          "profile, and as modelled with the FITTED xen-2004 profile (Xen in 2004: a different machine and trap "
          "path, so only its ratios are shown). Where the measured profile comes from the same host and CPU model "
          "(see the note above the table), agreement checks that time is linear in the counters, it does not "
          "validate the model against an independent machine; otherwise errors include the machines' difference.",
    "coverage": "Share of the faults of today's glibc that each 2004 decoder could have handled: Xen's emulate.c "
                "against the faults of a full emulator, Xen's seg_fixup.c and XenLinux's fixup.c against those of "
                "a full-decoder flip. Every unhandled fault is a SIGSEGV for the guest.",
}


def render_html(summary: Summary, info: dict, records: list[dict], figures: dict[str, list[Path]],
                command: str | None = None, run=None) -> str:
    s = summary
    fitted_note = ""
    if s.choice.fitted:
        fitted_note = ('<p class="note"><b>Fitted cost profile.</b> ' + esc(s.choice.note) +
                       '. Judge the model on the rows it was <i>not</i> fitted on.</p>')
    else:
        fitted_note = f'<p class="note">{esc(s.choice.note)}</p>'
    figs = []
    for name in ("overhead", "faults", "timeline", "coverage", "hw"):
        paths = figures.get(name) or []
        svg = next((p for p in paths if p.suffix == ".svg"), None)
        png = next((p for p in paths if p.suffix == ".png"), None)
        if svg is None:
            continue
        links = " ".join(f'<a href="{esc(p.name)}">{esc(p.suffix[1:].upper())}</a>' for p in (png, svg) if p)
        caption = CAPTIONS[name] + (" " + keir_captions(s) if name in ("overhead", "faults", "timeline") else "")
        figs.append(f'<figure id="fig-{name}"><img alt="{esc(name)} figure" src="{data_uri(svg)}">'
                    f'<figcaption>{esc(caption.strip())} [{links}]</figcaption></figure>')
    fig_by_name = {f.split('"')[1].removeprefix("fig-"): f for f in figs}
    profile = s.choice.profile
    prices = {k: v for k, v in profile.__dict__.items() if k.endswith("_ns") and v}
    cmd = f"<pre>{esc(command)}</pre>" if command else ""
    title = f"tlslab bench report: {esc(s.spec.get('name', s.run_id))}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{CSS}</style></head>
<body><main>
<h1>{title}</h1>
<p class="sub">What Xen's truncated segment limits cost glibc's negative <code>%gs</code> offsets, per fault strategy:
real i386 glibc programs (our static and dynamic guests, Debian's own binaries) in Unicorn under a model of the hypervisor. Today's version of Keir Fraser's 2004 table
(<code>ls -R</code>: 180 ms native, 300 ms emulate, 390 ms flip).</p>
<p class="toc"><a href="#summary">summary</a>{'<a href="#keir">Keir 2004 vs today</a>' if s.keir else ''}{'<a href="#processes">processes</a>' if s.processes else ''}<a href="#fig-overhead">overhead</a><a href="#faults">faults</a>
<a href="#fig-timeline">timeline</a><a href="#coverage">2004 coverage</a><a href="#crashes">crashes</a>
<a href="#failures">failures</a>{'<a href="#online">online vs bound</a>' if s.online or s.online_extra else ''}{'<a href="#hw">model vs CPU</a>' if s.hw else ''}<a href="#run">run</a></p>
{_meta(s, info)}
{fitted_note}
<h2 id="summary">Modelled time relative to native</h2>
{_ratio_table(s)}
{_keir_table(s)}
{_processes_table(s)}
<p class="dim">crash: the strategy refused a fault and the guest got SIGSEGV (a measurement, not a runner failure);
!out: output differs from native; FAILED: see below. Cost profile: <b>{esc(profile.label())}</b>;
prices (ns): <code>{esc(json.dumps({k: round(v, 3) for k, v in prices.items()}))}</code>.</p>
{fig_by_name.get("overhead", "")}
{"<h3>The same counters under every cost profile</h3>" + _profiles_table(run, s) if run is not None else ""}
<h2 id="faults">Faults per 1,000 guest instructions</h2>
{_faults_table(s)}
{fig_by_name.get("faults", "")}
<h2>Fault timeline</h2>
{fig_by_name.get("timeline", "")}
<h2 id="coverage">Coverage of the 2004 decoders</h2>
{_coverage_table(records)}
{fig_by_name.get("coverage", "")}
{_online_section(s, fig_by_name.get("online", ""))}
{_hw_section(s, fig_by_name.get("hw", ""))}
<h2 id="crashes">Guest crashes</h2>
{_crash_table(s)}
<h2 id="failures">Failures and skipped cells</h2>
{_failure_list(s)}
<h2 id="run">Run</h2>
{cmd}
<details><summary>matrix spec</summary><pre>{esc(json.dumps(s.spec, indent=2, sort_keys=True, default=str))}</pre></details>
<details><summary>run metadata</summary><pre>{esc(json.dumps(s.meta, indent=2, sort_keys=True))}</pre></details>
</main></body></html>
"""
