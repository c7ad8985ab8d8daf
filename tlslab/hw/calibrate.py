"""Measure what a fault costs on this host: untraced, traced-native, hw emulate, hw flip.

For each guest and repeat, the four runs are made back to back (same tree,
stdout to a regular file, tracer and guest pinned to one CPU). The per-fault
cost of a strategy in one repeat is

    (run time under the strategy - traced-native run time) / faults

so the cost of tracing itself (the seccomp stop at set_thread_area, ptrace
attach) cancels. Times are the supervisor's exec-to-exit wall times. Over the
repeats we report min / median / max, per guest and pooled over guests, plus
one unpinned run per guest and strategy (docs/measurements.md#cpu: unpinned faults cost
several times more, with high variance).

The result is a ``CostProfile`` (kind "measured", name ``hw-<host>``) in the
user's profile directory (``$TLSLAB_PROFILES`` or ``~/.config/tlslab/profiles``,
:func:`tlslab.hypervisor.costmodel.user_profile_dir`; the bundled
``tlslab/hypervisor/profiles/`` only with ``--replace-bundled``) and the raw
timings in ``raw/hw-<host>.raw.json`` beside it (a subdirectory, so the
profile loader, which reads every ``*.json`` there, never sees them). The
profile's provenance names the host and CPU model it was measured on.
Price split (a convention; only the per-fault totals are measured):
``trap_ns`` = the cheaper of the two per-fault costs (the #GP -> ptrace stop
-> resume round trip both pay), ``emulated_access_ns`` = emulate's extra per
emulated access, ``descriptor_write_ns`` = flip's extra per descriptor write;
``instruction_ns`` = untraced run time / the model's instruction count (system
calls folded in).
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tlslab.hw.backend import run_hw
from tlslab.hw.build import source_record

DEFAULT_GUESTS = ("lsr", "syscalls", "malloc", "stdio", "canary")
DEFAULT_ARGS = {"lsr": (".",), "syscalls": ("2000",)}
STRATEGIES = ("untraced", "native", "emulate", "flip")


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()) or "host"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "min": min(values), "median": statistics.median(values), "max": max(values)}


@dataclass
class CalibrationOptions:
    guests: tuple[str, ...] = DEFAULT_GUESTS
    repeat: int = 5
    cpu: int = 0
    tree: str = "small"
    unpinned: bool = True
    with_model: bool = True          # instruction counts (and fault predictions) from the Unicorn model


def _one(guest_path: str, argv: list[str], strategy: str, opts: CalibrationOptions, cpu) -> dict:
    r = run_hw(guest_path, argv, strategy=strategy, tree=opts.tree, stdout="file", cpu=cpu)
    if not r.ok or r.status != 0:
        raise RuntimeError(f"{argv[0]} {strategy}: guest failed (status {r.status}, signal {r.signal}): "
                           f"{r.summary.get('first_delivered')}")
    return {"run_ns": r.summary["run_ns"], "wall_ns": r.summary["wall_ns"], "faults": r.faults,
            "switches": r.descriptor_switches, "stdout_bytes": len(r.stdout)}


def _model_counts(name: str, args: tuple[str, ...], tree: str) -> dict:
    from tlslab.experiment import RunSpec, execute

    out = {}
    for strategy in ("native", "emulate", "flip"):
        res, _ = execute(RunSpec(name, args, strategy=strategy, tree=tree, stdout="file"))
        out[strategy] = {"instructions": res.counters["instructions"],
                         "traps": res.counters["strategy"]["traps"]}
    return out


#: the walk's price is measured on the bench's small model workloads, both builds where they have both
LOOKAHEAD_WORKLOADS = (("lsr", ()), ("syscalls", ("100",)), ("malloc", ("500",)), ("stdio", ()), ("canary", ("40",)),
                       ("fs-user", ()), ("selfread", ()), ("prelink", ()), ("threads", ("4", "50")))
LOOKAHEAD_VARIANTS = ("default", "nosegneg")


def measure_lookahead_price(workloads=LOOKAHEAD_WORKLOADS, variants=LOOKAHEAD_VARIANTS, progress=None) -> dict:
    """What online-lookahead's C walk costs on this CPU, timed at every fault where it walks.

    Each workload runs in the model under online-lookahead (hw-vm prices); every call of the walk is
    timed in C (the monotonic clock around it) at the fault that makes it, over the guest's own memory,
    with the decode cache and the walk memo as the run has left them and the CPU's caches as the
    emulator has left them (a hypervisor's #GP handler also runs cold). Nothing is repeated (a repeat
    would find everything cached). The clock's own cost (median of 1001 back-to-back reading pairs) is
    subtracted per call. Returns per-workload rows and the two prices: ns per instruction decoded
    (walks: all their nanoseconds over all their instructions; a walk that decodes nothing, at a faulting
    instruction that itself branches, adds its time and no instruction) and ns per reuse of a memoised
    walk.
    """
    from tlslab.experiment import RunSpec, make_domain
    from tlslab.guests import GuestError
    from tlslab.x86.aheadc import clock_overhead_ns

    overhead = clock_overhead_ns()
    rows, skipped = [], []
    for guest, args in workloads:
        for variant in variants:
            spec = RunSpec(guest, args=args, variant=variant, strategy="online-lookahead", prices="hw-vm")
            try:
                domain, _ = make_domain(spec)
            except GuestError as exc:            # a build this checkout lacks: measure the rest, say which
                skipped.append(f"{guest} [{variant}]: {exc}")
                continue
            la = domain.strategy.lookahead
            la.timing = True
            run = domain.run()
            if not run.ok:
                skipped.append(f"{guest} [{variant}]: the run did not finish ({run.crash})")
                continue
            kinds = run.counters["strategy"]["by_kind"]
            instructions, reuses = kinds.get("lookahead-instructions", 0), kinds.get("lookahead-reused", 0)
            hits = misses = 0
            for _, walker in list(la._walkers.values()):
                h, m = walker.cache_stats()
                hits, misses = hits + h, misses + m
            rows.append({"workload": guest, "variant": variant, "walks": la.walks - reuses, "reuses": reuses,
                         "instructions": instructions,
                         "ns": max(0.0, la.timed_ns - overhead * (la.walks - reuses)),
                         "reuse_ns": max(0.0, la.timed_reuse_ns - overhead * reuses),
                         "cache_hits": hits, "cache_misses": misses})
            if progress:
                progress(f"lookahead price: {guest} [{variant}]")
    instructions = sum(r["instructions"] for r in rows)
    reuses = sum(r["reuses"] for r in rows)
    per = [r["ns"] / r["instructions"] for r in rows if r["instructions"]]
    return {"rows": rows, "skipped": skipped, "clock_overhead_ns": overhead, "cpu": _cpu_model(),
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "walks": sum(r["walks"] for r in rows),
            "instructions": instructions, "reuses": reuses,
            "ns_per_instruction": sum(r["ns"] for r in rows) / instructions if instructions else 0.0,
            "ns_per_reuse": sum(r["reuse_ns"] for r in rows) / reuses if reuses else 0.0,
            "range_ns_per_instruction": [min(per), max(per)] if per else [0.0, 0.0]}


def lookahead_provenance(price: dict) -> dict:
    """What a profile records of a walk price measurement (no per-workload rows)."""
    return {"method": "benchmarks/lookahead_price.py (tlslab.hw.calibrate.measure_lookahead_price): the C walk "
                      "timed at every fault of model runs, clock readings subtracted",
            "cpu": price["cpu"], "measured": price["measured"], "walks": price["walks"],
            "instructions": price["instructions"], "reuses": price["reuses"],
            "range_ns_per_instruction": [round(x, 2) for x in price["range_ns_per_instruction"]],
            "clock_overhead_ns": price["clock_overhead_ns"],
            "workloads": sorted({f"{r['workload']} [{r['variant']}]" for r in price["rows"]})}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_calibration(opts: CalibrationOptions, raw_path: Path | None = None, progress=None) -> dict:
    """Measure; returns the raw record (also written to ``raw_path`` after every guest)."""
    from tlslab.guests import resolve_guest

    raw = {
        "kind": "tlslab hw calibration",
        "host": host_name(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "supervisor": source_record(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "options": {"guests": list(opts.guests), "repeat": opts.repeat, "cpu": opts.cpu, "tree": opts.tree,
                    "stdout": "file", "unpinned": opts.unpinned},
        "method": "per-fault = (strategy run_ns - traced native run_ns) / faults, paired per repeat; "
                  "run_ns = exec to exit, tracer+guest pinned to one CPU",
        "guests": {},
    }
    for key in opts.guests:
        guest = resolve_guest(key)
        args = DEFAULT_ARGS.get(guest.name, ())
        argv = [guest.name, *args]
        rec = {"path": str(guest.path), "sha256": guest.sha256, "argv": argv, "runs": {s: [] for s in STRATEGIES}}
        _one(str(guest.path), argv, "native", opts, opts.cpu)  # warm the page cache and the tree
        for rep in range(opts.repeat):
            for strategy in STRATEGIES:
                rec["runs"][strategy].append(_one(str(guest.path), argv, strategy, opts, opts.cpu))
            if progress:
                progress(f"{key}: repeat {rep + 1}/{opts.repeat}")
        if opts.unpinned:
            rec["unpinned"] = {s: _one(str(guest.path), argv, s, opts, None) for s in STRATEGIES}
        if opts.with_model:
            rec["model"] = _model_counts(key, args, opts.tree)
        rec["per_fault_ns"] = _per_fault(rec)
        raw["guests"][key] = rec
        if raw_path is not None:
            _write_atomic(raw_path, json.dumps(raw, indent=1) + "\n")
    if opts.with_model:
        raw["lookahead"] = measure_lookahead_price(progress=progress)
    raw["summary"] = summarise(raw)
    raw["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if raw_path is not None:
        _write_atomic(raw_path, json.dumps(raw, indent=1) + "\n")
    return raw


def _per_fault(rec: dict) -> dict:
    out = {}
    native = rec["runs"]["native"]
    for strategy in ("emulate", "flip"):
        costs = [(r["run_ns"] - n["run_ns"]) / r["faults"]
                 for r, n in zip(rec["runs"][strategy], native) if r["faults"]]
        out[strategy] = _stats(costs) | {"faults": rec["runs"][strategy][0]["faults"]}
    if "unpinned" in rec:
        un = rec["unpinned"]
        out["unpinned"] = {s: (un[s]["run_ns"] - un["native"]["run_ns"]) / un[s]["faults"]
                           for s in ("emulate", "flip") if un[s]["faults"]}
    out["tracing_overhead_ns"] = statistics.median(
        n["run_ns"] - u["run_ns"] for n, u in zip(native, rec["runs"]["untraced"]))
    return out


def summarise(raw: dict) -> dict:
    """Pooled per-fault costs over all guests and repeats (ns)."""
    pooled = {"emulate": [], "flip": []}
    unpinned = {"emulate": [], "flip": []}
    for rec in raw["guests"].values():
        native = rec["runs"]["native"]
        for strategy in pooled:
            pooled[strategy] += [(r["run_ns"] - n["run_ns"]) / r["faults"]
                                 for r, n in zip(rec["runs"][strategy], native) if r["faults"]]
            if "unpinned" in rec and rec["unpinned"][strategy]["faults"]:
                unpinned[strategy].append(rec["per_fault_ns"]["unpinned"][strategy])
    return {"pinned": {s: _stats(v) for s, v in pooled.items()},
            "unpinned": {s: _stats(v) for s, v in unpinned.items()}}


def make_profile(raw: dict):
    from tlslab.hypervisor.costmodel import CostProfile

    summ = raw.get("summary") or summarise(raw)
    emu = summ["pinned"]["emulate"]["median"]
    flp = summ["pinned"]["flip"]["median"]
    trap = min(emu, flp)
    instr = []
    for rec in raw["guests"].values():
        if "model" in rec:
            t = statistics.median(r["run_ns"] for r in rec["runs"]["untraced"])
            instr.append(t / rec["model"]["native"]["instructions"])
    return CostProfile(
        name=f"hw-{raw['host']}",
        kind="measured",
        description=(f"tlslab calibrate on {raw['host']} ({raw['cpu_model']}, Linux {raw['kernel']}): "
                     "real #GP faults under a ptrace supervisor, tracer and guest pinned to one CPU; "
                     "per-fault = median over guests x repeats"),
        instruction_ns=statistics.median(instr) if instr else 0.0,
        trap_ns=trap,
        emulated_access_ns=emu - trap,
        descriptor_write_ns=flp - trap,
        lookahead_ns=raw["lookahead"]["ns_per_instruction"] if "lookahead" in raw else 0.0,
        lookahead_reuse_ns=raw["lookahead"]["ns_per_reuse"] if "lookahead" in raw else 0.0,
        provenance={
            "measured": raw["started"],
            "host": raw["host"],
            "cpu_model": raw.get("cpu_model"),
            "kernel": raw.get("kernel"),
            "guests": list(raw["guests"]),
            "repeat": raw["options"]["repeat"],
            "tree": raw["options"]["tree"],
            "per_fault_ns": summ,
            "split": "trap_ns = min(emulate, flip) per-fault cost; the remainder goes to emulated_access_ns "
                     "(emulate) or descriptor_write_ns (flip); instruction_ns = untraced time / model "
                     "instructions (syscalls folded in)",
            "raw": f"raw/hw-{raw['host']}.raw.json",
            **({"lookahead": lookahead_provenance(raw["lookahead"])} if "lookahead" in raw else {}),
        },
    )


def profile_paths(host: str | None = None, out_dir: Path | None = None,
                  bundled: bool = False) -> tuple[Path, Path]:
    """Where the profile and its raw timings go: ``out_dir``, else the bundled directory if ``bundled``,
    else the user's profile directory."""
    from tlslab.hypervisor.costmodel import PROFILE_DIR, user_profile_dir

    host = host or host_name()
    base = Path(out_dir) if out_dir else (PROFILE_DIR if bundled else user_profile_dir())
    return base / f"hw-{host}.json", base / "raw" / f"hw-{host}.raw.json"
