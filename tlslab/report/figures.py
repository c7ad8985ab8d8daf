"""Figures of a bench run (matplotlib, Agg backend), each saved as PNG and SVG.

* ``overhead``  -- modelled time of each strategy relative to native, grouped
  bars per workload, one panel per build; Keir Fraser's 2004 ratios as the
  first, hatched group for reference; crashes marked with an x.
* ``faults``    -- #GP faults per 1,000 guest instructions (log scale).
* ``timeline``  -- cumulative faults against guest instructions for emulate
  and flip on the same guest (lsr, keir -- Keir's own ``ls -R /usr/lib`` --
  when the run has it, the workload with the largest flip/emulate ratio and
  the one with the smallest). Source: the compact timeline every
  bench cell stores (``record["timeline"]``: cumulative faults at 201 evenly
  spaced instruction counts, recorded by the trace proxy from the exact
  instruction count at each trap).
* ``coverage``  -- share of faults (and sites) each 2004 decoder could
  handle, per workload (default build): emulate.c against the faults of the
  full ``emulate`` cell, seg_fixup.c and fixup.c against those of
  ``flip-full``.

Colours: the Okabe-Ito palette (colour-blind safe), plus hatching, so that no
information is carried by colour alone.
"""

from __future__ import annotations

import math

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tlslab.bench.summary import KEIR_RATIOS, Summary, is_keir_benchmark  # noqa: E402
from tlslab.inspect.trace import HISTORICAL  # noqa: E402
from tlslab.record import MEASURED, Outcome

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000", "#999999"]
HATCHES = ["", "//", "..", "xx", "\\\\", "oo", "++", "--", "**"]
FIGURES = ("overhead", "faults", "timeline", "coverage")

plt.rcParams.update({
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.axisbelow": True,
    "svg.fonttype": "none",
    "svg.hashsalt": "tlslab",     # deterministic SVG ids
})


#: strategy families share a hue family (Okabe-Ito); the 2004-faithful variants are hatched
FAMILY_STYLES = {
    "native": ("#000000", ""),
    "emulate": ("#0072B2", ""),
    "emulate-2004": ("#56B4E9", "//"),
    "flip": ("#E69F00", "//"),
    "flip-full": ("#D55E00", ""),
    "flip-fs": ("#F0E442", ".."),
    "rewrite": ("#009E73", ""),
    "rewrite-2004": ("#CC79A7", "//"),
    "online-site": ("#BBBBBB", ".."),
    "online-rate": ("#777777", "xx"),
    "online-probe": ("#882255", ""),
    "online-lookahead": ("#44AA99", "\\\\"),
}


def strategy_styles(strategies: list[str]) -> dict[str, dict]:
    out = {}
    spare = [c for c in OKABE_ITO if c not in {v[0] for v in FAMILY_STYLES.values()}] + ["#999999"]
    for i, s in enumerate(strategies):
        color, hatch = FAMILY_STYLES.get(s, (spare[i % len(spare)], HATCHES[i % len(HATCHES)]))
        out[s] = {"color": color, "hatch": hatch}
    return out


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        paths.append(p)
    plt.close(fig)
    return paths


def _variants(summary: Summary) -> list[str]:
    out = []
    for r in summary.rows:
        if r["variant"] not in out:
            out.append(r["variant"])
    return out


def _rows(summary: Summary, variant: str) -> list[dict]:
    return [r for r in summary.rows if r["variant"] == variant
            and any(c.get("outcome") in MEASURED for c in r["cells"].values())]


VARIANT_NOTES = {
    "nosegneg": " (-mno-tls-direct-seg-refs for our code; glibc as Debian built it)",
    "dyn": " (our code dynamically linked: the pinned root's ld.so and libc.so.6)",
}


def _short_name(row: dict) -> str:
    name = row["workload"]
    if row["hv_profile"] != "nonpae":
        name += f" [{row['hv_profile']}]"
    return name.replace(" [", "\n[", 1) if len(name) > 12 else name


# --------------------------------------------------------------------------- overhead / faults

def _grouped(summary: Summary, metric: str, out: Path, name: str, title: str, ylabel: str, log: bool,
             keir: bool) -> list[Path]:
    strategies = [s for s in summary.strategies if s != "native"] if metric == "ratio" else \
        [s for s in summary.strategies if s != "native"]
    styles = strategy_styles(summary.strategies)
    variants = [v for v in _variants(summary) if _rows(summary, v)] or ["default"]
    ngroups = max([len(_rows(summary, v)) for v in variants] + [1]) + (1 if keir else 0)
    width_in = min(24.0, max(10.0, 0.9 + ngroups * (0.15 * len(strategies) + 0.3)))
    fig, axes = plt.subplots(len(variants), 1, figsize=(width_in, 4.2 * len(variants) + 0.8), squeeze=False)
    bar_w = 0.8 / max(1, len(strategies))
    ymax_all = 1.0
    for ax, variant in zip(axes[:, 0], variants):
        rows = _rows(summary, variant)
        labels = []
        groups = []
        if keir and variant == variants[0]:
            labels.append("Keir 2004\nls -R /usr/lib")
            groups.append({s: {"outcome": Outcome.OK, "ratio": KEIR_RATIOS[s]} for s in strategies if s in KEIR_RATIOS})
        for r in rows:
            labels.append(_short_name(r) + ("\n(fit target)" if r["fit_target"] else "")
                          + ("\nDebian ls -R" if r.get("keir") else ""))
            groups.append(r["cells"])
        values = [v.get(metric) for g in groups for v in g.values() if isinstance(v, dict) and v.get(metric)]
        ymax = max(values + [1.0])
        ymax_all = max(ymax_all, ymax)
        for gi, cells in enumerate(groups):
            for si, s in enumerate(strategies):
                x = gi - 0.4 + bar_w * (si + 0.5)
                c = cells.get(s) if isinstance(cells, dict) else None
                st = styles[s]
                is_keir = keir and gi == 0 and variant == variants[0]
                if not c:
                    continue
                o = c.get("outcome")
                v = c.get(metric)
                if o == Outcome.OK and v is not None and (v > 0 or not log):
                    ax.bar(x, v, bar_w, color=st["color"], hatch=("//" if is_keir else st["hatch"]),
                           edgecolor="#333333" if not is_keir else "white", linewidth=0.4,
                           alpha=0.55 if is_keir else 1.0)
                    text = f"{v:.2f}" if metric == "ratio" else _fmt_small(v)
                    differs = c.get("output_matches") is False
                    if differs:
                        text += " *"
                    ax.annotate(text, (x, v), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize=6.5, rotation=90,
                                color="#B00020" if differs else "#222222",
                                fontweight="bold" if differs else "normal")
                elif o == Outcome.OK and v == 0 and log:
                    ax.annotate("0", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize=6.5, color="#555555", xycoords=("data", "axes fraction"))
                elif o in (Outcome.GUEST_CRASH, Outcome.FAILED):
                    ax.annotate("x", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                                fontsize=10, fontweight="bold", color="#D55E00" if o == Outcome.GUEST_CRASH else "#000000",
                                xycoords=("data", "axes fraction"))
        if metric == "ratio":
            ax.axhline(1.0, color="#333333", linewidth=1.0, linestyle="--")
            ax.annotate("native = 1", (-0.58, 1.0), xytext=(0, 0), textcoords="offset points", ha="left",
                        va="center", fontsize=8, color="#333333",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "#999999", "lw": 0.5})
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel(ylabel)
        note = VARIANT_NOTES.get(variant, "")
        if variant == "default" and any(r.get("keir") for r in rows):
            note = " (keir: Debian's own ls and glibc from the pinned root)"
        ax.set_title(f"{variant} build{note}", fontsize=10, fontweight="normal", loc="left")
        if log:
            ax.set_yscale("log")
        ax.grid(axis="x", visible=False)
    for ax in axes[:, 0]:
        if log:
            lows = [v.get(metric) for r in summary.rows for v in r["cells"].values()
                    if v.get(metric) and v.get("outcome") == Outcome.OK]
            ax.set_ylim(max(min(lows + [1.0]) / 2, 1e-3), ymax_all * 3)
        else:
            ax.set_ylim(0, ymax_all * 1.18)
    handles = [Patch(facecolor=styles[s]["color"], hatch=styles[s]["hatch"], edgecolor="#333333", label=s)
               for s in strategies]
    handles.append(plt.Line2D([], [], marker="x", color="#D55E00", linestyle="", markersize=8,
                              label="guest crashed (strategy refused a fault)"))
    if any(c.get("output_matches") is False for r in summary.rows for c in r["cells"].values()):
        handles.append(plt.Line2D([], [], marker="$*$", color="#B00020", linestyle="", markersize=7,
                                  label="output differs from native (hazard)"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), frameon=False,
               bbox_to_anchor=(0.5, 1.0 - 0.02 / len(variants)), fontsize=9)
    fig.suptitle(title, y=1.0 + 0.05 / len(variants), fontsize=13, fontweight="bold")
    fig.text(0.01, -0.01, _profile_caption(summary), fontsize=8, color="#444444", ha="left", va="top", wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.07 / len(variants)))
    return _save(fig, out, name)


def _fmt_small(v: float) -> str:
    if v >= 10:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    return f"{v:.2g}"


def _profile_caption(summary: Summary) -> str:
    text = summary.choice.note
    return "\n".join(_wrap(text, 170))


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def overhead_figure(summary: Summary, out: Path) -> list[Path]:
    fitted = " (FITTED profile)" if summary.choice.fitted else ""
    return _grouped(summary, "ratio", out, "overhead",
                    f"Modelled time relative to native, per strategy{fitted}: today's version of Keir's 2004 table",
                    "modelled time / native  (x)", log=False, keir=True)


def faults_figure(summary: Summary, out: Path) -> list[Path]:
    return _grouped(summary, "faults_per_k", out, "faults",
                    "#GP faults per 1,000 guest instructions (log scale; emulate faults on every -ve access, "
                    "flip on every change of sign)", "faults / 1,000 instructions", log=True, keir=False)


# --------------------------------------------------------------------------- timeline

def _timeline_candidates(records: list[dict]) -> list[tuple[str, dict, dict]]:
    by: dict[tuple, dict] = {}
    for r in records:
        s = r["spec"]
        if s["variant"] != "default" or s["profile"] != "nonpae" or r.get("outcome") != Outcome.OK:
            continue
        if s["strategy"] in ("emulate", "flip") and r.get("timeline"):
            by.setdefault(r["workload"], {})[s["strategy"]] = r
    out = []
    for workload, d in by.items():
        if "emulate" in d and "flip" in d and d["emulate"]["timeline"]["faults"]:
            out.append((workload, d["emulate"], d["flip"]))
    return out


def pick_timelines(records: list[dict], n: int = 4) -> list[tuple[str, dict, dict]]:
    cands = _timeline_candidates(records)
    if not cands:
        return []

    def ratio(c):
        return c[2]["timeline"]["faults"] / max(1, c[1]["timeline"]["faults"])

    chosen = []
    lsr = [c for c in cands if c[0].startswith("lsr")]
    if lsr:  # the biggest lsr tree: the ls -R workload
        chosen.append(max(lsr, key=lambda c: c[1]["timeline"]["total_instructions"]))
    keir = [c for c in cands if is_keir_benchmark(c[1]["spec"])]
    if keir:  # Keir's own command (ls -R /usr/lib of the pinned root)
        chosen.append(keir[0])
    rest = [c for c in cands if c not in chosen]
    if rest:
        chosen.append(max(rest, key=ratio))
    rest = [c for c in cands if c not in chosen]
    if rest:
        chosen.append(min(rest, key=ratio))
    return chosen[:n]


def timeline_figure(summary: Summary, records: list[dict], out: Path) -> list[Path]:
    chosen = pick_timelines(records)
    styles = strategy_styles(summary.strategies)
    n = max(1, len(chosen))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.4), squeeze=False)
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "no workload with ok emulate and flip cells (default build)", ha="center")
    for ax, (workload, em, fl) in zip(axes[0], chosen):
        for strat, rec in (("emulate", em), ("flip", fl)):
            t = rec["timeline"]
            xs = [x / 1e6 for x in t["instructions"]]
            ax.plot(xs, t["cumulative_faults"], color=styles[strat]["color"], linewidth=2.2,
                    linestyle="-" if strat == "emulate" else "--", label=f"{strat}: {t['faults']:,} faults")
            ax.annotate(f"{t['faults']:,}", (xs[-1], t["cumulative_faults"][-1]), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=9, color=styles[strat]["color"],
                        fontweight="bold")
        ratio = fl["timeline"]["faults"] / max(1, em["timeline"]["faults"])
        ax.set_title(f"{workload}: flip/emulate = {ratio:.2f}", fontsize=11)
        ax.set_xlabel("guest instructions retired (millions)")
        ax.set_ylabel("faults so far (cumulative)")
        ax.legend(loc="upper left", frameon=False, fontsize=9)
        ax.margins(x=0.12)
    fig.suptitle("When the faults happen: emulate (one fault per -ve access) vs flip (one per change of sign), "
                 "default build", fontsize=12, fontweight="bold")
    fig.text(0.01, -0.02, "Keir Fraser (2004): flipping faults \"nearly twice as often\" as emulation on ls -R. "
                          "The ratio is a measured outcome of the workload, not a tuned one.",
             fontsize=8, color="#444444")
    fig.tight_layout()
    return _save(fig, out, "timeline")


# --------------------------------------------------------------------------- coverage

def coverage_data(records: list[dict]) -> list[dict]:
    """Per workload (default build, nonpae): per 2004 decoder, faults/sites handled."""
    by: dict[str, dict] = {}
    order: list[str] = []
    for r in records:
        s = r["spec"]
        if s["variant"] != "default" or s["profile"] != "nonpae" or r.get("outcome") != Outcome.OK:
            continue
        if s["strategy"] in ("emulate", "flip-full") and r.get("fault_sites") is not None:
            if r["workload"] not in by:
                order.append(r["workload"])
            by.setdefault(r["workload"], {})[s["strategy"]] = r
    out = []
    for workload in order:
        d = by[workload]
        row = {"workload": workload, "decoders": {}}
        for label, (full, _pred, source) in HISTORICAL.items():
            rec = d.get(full)
            if rec is None:
                continue
            sites = rec["fault_sites"]
            total = sum(x["violations"] for x in sites)
            bad = [x for x in sites if not x["coverage"][label][0]]
            row["decoders"][label] = {
                "source": source, "faces": full, "sites": len(sites), "faults": total,
                "unhandled_sites": len(bad), "unhandled_faults": sum(x["violations"] for x in bad),
                "handled_share": (1 - sum(x["violations"] for x in bad) / total) if total else 1.0,
                "reasons": sorted({x["coverage"][label][1] for x in bad}),
                "examples": [{"symbol": x["symbol"], "instruction": x["instruction"], "faults": x["violations"],
                              "why": x["coverage"][label][1]} for x in bad[:5]],
            }
        if row["decoders"]:
            out.append(row)
    return out


def coverage_figure(records: list[dict], out: Path) -> list[Path]:
    data = coverage_data(records)
    labels = list(HISTORICAL)
    family = {"emulate-2004": "emulate-2004", "flip (seg_fixup)": "flip", "rewrite-2004 (fixup.c)": "rewrite-2004"}
    colours = {lab: FAMILY_STYLES.get(family.get(lab, ""), (OKABE_ITO[i], ""))[0] for i, lab in enumerate(labels)}
    hatches = {lab: FAMILY_STYLES.get(family.get(lab, ""), ("", "//"))[1] for lab in labels}
    n = max(1, len(data))
    fig, ax = plt.subplots(figsize=(11, 0.55 * n * len(labels) / 2 + 1.6))
    h = 0.8 / len(labels)
    for wi, row in enumerate(data):
        for li, lab in enumerate(labels):
            d = row["decoders"].get(lab)
            if not d:
                continue
            y = wi - 0.4 + h * (li + 0.5)
            share = 100 * d["handled_share"]
            ax.barh(y, share, h * 0.92, color=colours[lab], hatch=hatches[lab], edgecolor="#333333", linewidth=0.4)
            ax.barh(y, 100 - share, h * 0.92, left=share, color="#eeeeee", edgecolor="#bbbbbb", linewidth=0.4)
            pct = "100%" if not d["unhandled_faults"] else (
                f"{min(share, 99.99):.2f}%" if share >= 99.5 else f"{share:.0f}%")
            ax.annotate(f"{pct}  ({d['sites'] - d['unhandled_sites']}/{d['sites']} sites)",
                        (101, y), va="center", fontsize=7.5, annotation_clip=False)
    ax.set_yticks(range(len(data)))
    ax.set_yticklabels([r["workload"] for r in data], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("faults at sites the 2004 decoder can handle (%)")
    ax.grid(axis="y", visible=False)
    handles = [Patch(facecolor=colours[lab], hatch=hatches[lab], edgecolor="#333333",
                     label=f"{lab} -- {HISTORICAL[lab][2]}") for lab in labels]
    handles.append(Patch(facecolor="#eeeeee", edgecolor="#bbbbbb",
                         label="faults it cannot handle (the first one kills the guest: SIGSEGV)"))
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, frameon=False, fontsize=8.5)
    fig.suptitle("Coverage of the 2004 decoders on today's glibc (default build): share of faults they could "
                 "handle", fontsize=12, fontweight="bold", x=0.01, ha="left")
    fig.tight_layout()
    return _save(fig, out, "coverage")


# --------------------------------------------------------------------------- hw: model vs this CPU

HW_MARKERS = {"native": "o", "emulate": "s", "flip": "^"}
HW_MORE_MARKERS = ("D", "v", "P", "X", "h", "<")   # the other strategies a spec's [hw] asks for, in cell order


def hw_strategies(rows: list[dict]) -> dict[str, str]:
    """strategy -> marker for the hw rows: native, emulate, flip first, then the others (online-patch in the
    default matrix) in the order their cells appear."""
    present = list(dict.fromkeys(r["strategy"] for r in rows))
    ordered = [s for s in HW_MARKERS if s in present] + [s for s in present if s not in HW_MARKERS]
    more = iter(HW_MORE_MARKERS * (1 + len(ordered) // len(HW_MORE_MARKERS)))
    return {s: HW_MARKERS.get(s) or next(more) for s in ordered}


def hw_figure(summary: Summary, out: Path) -> list[Path]:
    """Three panels: modelled (measured hw-* profile) against measured ms, log-log with y = x; the
    prediction error per cell; overhead relative to native measured / modelled / FITTED xen-2004."""
    hw = summary.hw or {}
    rows = [r for r in hw.get("rows", []) if r.get("measured_ms") is not None]
    markers = hw_strategies(rows)
    styles = strategy_styles(list(markers) or ["native", "emulate", "flip"])
    prof, fit = hw.get("profile") or "hw profile", hw.get("fitted") or "fitted profile"
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.6), gridspec_kw={"width_ratios": [1.0, 1.25, 1.25]})
    if not rows:
        reason = (hw.get("skipped") or [{}])[0].get("reason") or "no hw cell finished"
        for ax in axes:
            ax.axis("off")
        axes[1].text(0.5, 0.5, "\n".join(_wrap(f"no hw measurements: {reason}", 60)), ha="center", va="center")
        fig.suptitle("Model vs this CPU (hw backend)", fontsize=13, fontweight="bold")
        return _save(fig, out, "hw")
    workloads = list(dict.fromkeys(f"{r['workload']} ({r['variant']})" if r["variant"] != "default" else r["workload"]
                                   for r in rows))

    def wl(r):
        return f"{r['workload']} ({r['variant']})" if r["variant"] != "default" else r["workload"]

    # 1: scatter
    ax = axes[0]
    pts = [r for r in rows if r.get("modelled_ms")]
    lo = min([r["measured_ms"] for r in pts] + [r["modelled_ms"] for r in pts] + [1.0]) / 1.6
    hi = max([r["measured_ms"] for r in pts] + [r["modelled_ms"] for r in pts] + [1.0]) * 1.6
    ax.plot([lo, hi], [lo, hi], color="#333333", linewidth=1, linestyle="--", label="modelled = measured")
    ax.fill_between([lo, hi], [lo / 1.25, hi / 1.25], [lo * 1.25, hi * 1.25], color="#999999", alpha=0.15,
                    label="within 25%")
    for r in pts:
        bad = r.get("faults_equal") is False or r.get("sites_equal") is False
        ax.scatter(r["measured_ms"], r["modelled_ms"], marker=markers.get(r["strategy"], "o"), s=46,
                   color=styles.get(r["strategy"], {"color": "#999999"})["color"],
                   edgecolor="#B00020" if bad else "#222222", linewidth=2.0 if bad else 0.5, zorder=3)
        ax.annotate(wl(r).replace("lsr ", ""), (r["measured_ms"], r["modelled_ms"]), xytext=(4, -3),
                    textcoords="offset points", fontsize=6.5, color="#444444")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured on this CPU (ms, median traced run)")
    ax.set_ylabel(f"modelled with {prof} (ms, model's counters)")
    ax.set_title(f"{prof} (measured profile) vs measured", fontsize=11)
    handles = [plt.Line2D([], [], marker=m, color=styles[s]["color"], linestyle="", markersize=7, label=s)
               for s, m in markers.items()]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], loc="upper left", frameon=False, fontsize=8)

    # 2: error bars
    ax = axes[1]
    strategies = list(markers)
    bar_w = 0.8 / max(1, len(strategies))
    for wi, w in enumerate(workloads):
        for si, strat in enumerate(strategies):
            r = next((x for x in rows if wl(x) == w and x["strategy"] == strat), None)
            if r is None or r.get("error_pct") is None:
                continue
            x = wi - 0.4 + bar_w * (si + 0.5)
            st = styles[strat]
            ax.bar(x, r["error_pct"], bar_w, color=st["color"], hatch=st["hatch"], edgecolor="#333333",
                   linewidth=0.4)
            ax.annotate(f"{r['error_pct']:+.0f}%", (x, r["error_pct"]), xytext=(0, 2 if r["error_pct"] >= 0 else -9),
                        textcoords="offset points", ha="center", fontsize=6.5)
            if r.get("faults_equal") is False or r.get("sites_equal") is False:
                ax.annotate("FAULTS\nDIFFER", (x, 0), xytext=(0, 12), textcoords="offset points", ha="center",
                            fontsize=7, color="#B00020", fontweight="bold")
    ax.axhline(0, color="#333333", linewidth=1)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, fontsize=8, rotation=20 if len(workloads) > 3 else 0,
                       ha="right" if len(workloads) > 3 else "center")
    ax.set_ylabel("prediction error (%)  = (modelled - measured) / measured")
    med = hw.get("median_abs_error_pct")
    ax.set_title(f"prediction error of {prof}" + (f" (median |error| {med:.0f}%)" if med is not None else ""),
                 fontsize=11)
    ax.grid(axis="x", visible=False)
    ax.legend(handles=[Patch(facecolor=styles[s]["color"], hatch=styles[s]["hatch"], edgecolor="#333333", label=s)
                       for s in strategies], loc="best", frameon=False, fontsize=8)

    # 3: overhead relative to native
    ax = axes[2]
    kinds = [("measured_ratio", "measured on this CPU", "#000000", ""),
             ("modelled_ratio", f"{prof} (measured profile)", "#56B4E9", ""),
             ("fitted_ratio", f"{fit} (FITTED, 2004 Xen)", "#CC79A7", "//")]
    faulting = [s for s in strategies if s != "native"]
    groups = [(w, s) for w in workloads for s in faulting
              if any(wl(x) == w and x["strategy"] == s and x.get("measured_ratio") for x in rows)]
    bw = 0.8 / len(kinds)
    for gi, (w, strat) in enumerate(groups):
        r = next(x for x in rows if wl(x) == w and x["strategy"] == strat)
        for ki, (key, _label, color, hatch) in enumerate(kinds):
            v = r.get(key)
            if v:
                ax.bar(gi - 0.4 + bw * (ki + 0.5), v, bw, color=color, hatch=hatch, edgecolor="#333333",
                       linewidth=0.4, alpha=0.85)
    ax.set_yscale("log")
    ax.axhline(1.0, color="#333333", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{w} {s}" for w, s in groups], fontsize=7.5, rotation=35, ha="right")
    ax.set_ylabel("time / native time of the same backend (x, log)")
    ax.set_title("overhead relative to native", fontsize=11)
    ax.grid(axis="x", visible=False)
    ax.legend(handles=[Patch(facecolor=c, hatch=h, edgecolor="#333333", label=lab) for _k, lab, c, h in kinds],
              loc="upper left", frameon=False, fontsize=8)
    fig.suptitle("Model vs this CPU: the model's counters priced with the measured hw profile, against the traced "
                 "runs' measured time", fontsize=12, fontweight="bold")
    prov = hw.get("profile_provenance") or ""
    fig.text(0.01, -0.01, "\n".join(_wrap(prov + ". " + hw_fitted_note(hw), 200)), fontsize=8, color="#444444",
             ha="left", va="top")
    fig.tight_layout()
    return _save(fig, out, "hw")


def hw_fitted_note(hw: dict) -> str:
    fit = hw.get("fitted_label")
    if not fit:
        return ""
    return (f"{fit}: FITTED to Keir Fraser's 2004 times on one workload; it prices the same counters for Xen in "
            "2004 and is shown only as overhead relative to native, never against this CPU's times")


def online_figure(summary: Summary, out: Path) -> list[Path]:
    """Each fault-driven policy's fault-handling time over the offline bound, per workload (log scale)."""
    on = summary.online
    rows = on["rows"]
    policies = on["policies"]
    styles = strategy_styles(policies)
    labels = [r["workload"] + ("" if r["variant"] == "default" else f" ({r['variant']})") for r in rows]
    fig, ax = plt.subplots(figsize=(min(18, max(10, 0.14 * len(rows) * len(policies))), 6.2))
    width = 0.8 / len(policies)
    values = [r["cells"].get(n, {}).get("vs_bound") for r in rows for n in policies]
    # a patching policy goes below the emulate/flip bound: the axis starts a decade under the lowest bar
    # (a bar of exactly 0, no fault at all, sits on the axis)
    positive = [v for v in values if v]
    floor = 10.0 ** math.floor(math.log10(min([*positive, 1.0]) * 0.9))
    for i, name in enumerate(policies):
        xs, ys = [], []
        for j, r in enumerate(rows):
            v = r["cells"].get(name, {}).get("vs_bound")
            if v is not None:
                xs.append(j + (i - (len(policies) - 1) / 2) * width)
                ys.append(max(v, floor) - floor)
        ax.bar(xs, ys, width, bottom=floor, label=name, color=styles[name]["color"], hatch=styles[name]["hatch"],
               edgecolor="#333333", linewidth=0.4)
    ax.set_ylim(bottom=floor)
    ax.axhline(1.0, color="#333333", linewidth=1, linestyle="--")
    ax.axhline(1.1, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("fault-handling time / offline bound  (x, log)")
    ax.set_title("\n".join(_wrap(f"Every policy against the offline-optimal emulate/flip hybrid (1.0 = the bound, "
                                  f"dotted: +10%; a policy that patches code can go below it), under {on['label']}",
                                  110)), fontsize=11)
    ax.legend(fontsize=8, ncol=len(policies))
    fig.tight_layout()
    return _save(fig, out, "online")


def all_figures(summary: Summary, records: list[dict], out: Path) -> dict[str, list[Path]]:
    out.mkdir(parents=True, exist_ok=True)
    figs = {
        "overhead": overhead_figure(summary, out),
        "faults": faults_figure(summary, out),
        "timeline": timeline_figure(summary, records, out),
        "coverage": coverage_figure(records, out),
    }
    if summary.hw:
        figs["hw"] = hw_figure(summary, out)
    if summary.online:
        figs["online"] = online_figure(summary, out)
    return figs
