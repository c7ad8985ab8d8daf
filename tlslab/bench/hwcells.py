"""hw cells of a bench run: the same guest on this CPU under the ptrace supervisor (:mod:`tlslab.hw`).

* :func:`unavailable` -- why this host cannot run hw cells at all (None if it can): one short traced
  run of a bundled guest; ``HwUnavailable`` (no 32-bit exec, ptrace refused, no compiler) is the
  reason. ``TLSLAB_BENCH_HW_UNAVAILABLE=REASON`` forces it (tests; a machine where hw times would
  be meaningless). Such cells are recorded as *skipped*, not failed.
* :func:`measure` -- one hw cell: ``repeat`` traced runs pinned to ``cpu``; the median exec-to-exit
  time (``run_seconds``) is the measurement, every sample is kept. Fault counts and per-site
  counts must be the same in every repeat (``faults_stable``).
* :func:`comparison` -- per hw cell, the model's cell of the same spec: fault counts and sites
  (must be equal), stdout (sha256), modelled time under the measured ``hw-*`` cost profile from
  the *model's* counters against the measured time (the prediction error), and the FITTED
  xen-2004 prediction beside it.

Fault sites are compared by (object, file offset), not by EIP: the host loads ld.so and the
libraries of a dynamic program at randomised addresses on every run (ASLR), the model at its own
fixed ones. The hw side names each site from the guest's mappings at exit
(``HwResult.object_sites``); the model's cell records sites by EIP, so the hw cell also records the
model's file mappings for the same spec (``model_objects``, :func:`model_objects`), with the paths
named as the chrooted guest's /proc/PID/maps names them, and :func:`comparison` maps the model
cell's EIPs through them. A static program's mappings are its executable's PT_LOAD pages at its
link addresses on both sides (the same key for the same EIP: the comparison is the EIP one).
Records of older runs (sites by EIP only) are still compared by EIP.
"""

from __future__ import annotations

import functools
import os
import statistics

from tlslab.bench.blobs import blob
from tlslab.bench.spec import Cell, cell_id
from tlslab.record import Outcome, hw_outcome, load

FORCE_ENV = "TLSLAB_BENCH_HW_UNAVAILABLE"


def forced() -> str | None:
    reason = os.environ.get(FORCE_ENV, "").strip()
    return f"hw backend unavailable (forced by {FORCE_ENV}): {reason}" if reason else None


@functools.lru_cache(maxsize=None)
def _probe() -> str | None:
    from tlslab.guests import GuestError, resolve_guest
    from tlslab.hw.backend import HwError, HwUnavailable, run_hw

    import tempfile

    try:
        guest = resolve_guest("syscalls")
        with tempfile.TemporaryDirectory(prefix="tlslab-hw-probe-") as cwd:   # every call of it fails anyway
            run_hw(guest.path, ["syscalls", "1"], strategy="native", root=cwd, cpu=None, timeout=30)
    except HwUnavailable as exc:
        return str(exc)
    except (GuestError, HwError, OSError):
        return None     # not a host limitation: the cells run and fail with the real reason
    return None


def unavailable() -> str | None:
    """Why hw cells cannot run on this host, or None (memoised per process; the env override is not)."""
    return forced() or _probe()


def _blob(data: bytes) -> dict:
    return blob(data)


def _in_root(root: str, path: str) -> str:
    """``path`` of the guest's filesystem with every symlink resolved inside ``root``, as the chrooted
    guest's /proc/PID/maps names the file (Debian's /lib is a symlink to usr/lib)."""
    parts, out, hops = [p for p in path.split("/") if p], [], 0
    while parts:
        p = parts.pop(0)
        if p == ".":
            continue
        if p == "..":
            out = out[:-1]
            continue
        full = os.path.join(root, *out, p)
        if os.path.islink(full) and hops < 40:
            hops += 1
            target = os.readlink(full)
            if target.startswith("/"):
                out = []
            parts = [x for x in target.split("/") if x] + parts
            continue
        out.append(p)
    return "/" + "/".join(out)


@functools.lru_cache(maxsize=8)
def _model_layout(spec) -> tuple[tuple[str, int, int, int], ...]:
    from tlslab.experiment import make_domain

    domain, _guest = make_domain(spec)
    program = domain.program
    if program.rootfs is not None:   # ld.so maps the libraries while the program runs: run it
        domain.run()
    own = os.path.realpath(program.guest.path)
    bundled = not (program.rootfs and spec.guest.startswith("/"))   # a guest outside the root: exec'd by descriptor
    out = []
    for m in domain.process.objects.mappings():
        path = os.fsdecode(m.path)
        if path == program.guest_path and (program.root_dir is None or bundled):
            path = own                  # the host file the supervisor executes
        elif program.root_dir is not None:
            path = _in_root(str(program.root_dir), path)
        out.append((path, m.start, m.end, m.offset))
    return tuple(out)


def model_objects(spec) -> list[dict]:
    """The model's file mappings for ``spec`` at the guest's exit, named as the hw run names them.

    A static program's are its executable's PT_LOAD pages (the model's loader, no run needed); a
    program of a root filesystem or a dynamic one is run in the model (its layout is deterministic
    and does not depend on the strategy: run natively, once per process for the three strategies)."""
    import dataclasses

    layout = _model_layout(dataclasses.replace(spec, strategy="native"))
    return [{"path": p, "start": a, "end": b, "offset": o} for p, a, b, o in layout]


def object_key(eip: int, objects: list[dict]) -> tuple[str, int]:
    """(object path, file offset) of ``eip`` in ``objects`` (``HwResult.objects`` rows); ("?", eip) outside."""
    return next(((m["path"], eip - m["start"] + m["offset"]) for m in objects if m["start"] <= eip < m["end"]),
                ("?", eip))


def keyed_sites(sites: dict[int, int], objects: list[dict] | None) -> dict:
    """EIP -> faults as (object, offset) -> faults (``objects`` None: by EIP, for records of older runs)."""
    if objects is None:
        return dict(sites)
    out: dict = {}
    for eip, n in sites.items():
        key = object_key(eip, objects)
        out[key] = out.get(key, 0) + n
    return out


def measure(cell: Cell) -> dict:
    """Run one hw cell in this process and build its record (raises HwUnavailable / HwError / GuestError)."""
    from tlslab.experiment import resolve_program
    from tlslab.hw.backend import HwUnavailable, materialised_tree, run_spec, tree_order_matches
    from tlslab.hw.build import source_record

    why = forced()
    if why:
        raise HwUnavailable(why)
    repeat = max(1, int(cell.options.get("repeat", 3)))
    cpu = cell.options.get("cpu", 0)
    cpu = None if cpu is None or int(cpu) < 0 else int(cpu)
    runs = []
    guest = None
    for _ in range(repeat):
        r, guest = run_spec(cell.spec, cpu=cpu)
        runs.append(r)
    first = runs[0]
    sites = sorted(first.fault_sites.items())
    maps = first.objects
    # by (object, offset): the host randomises where ld.so and the libraries are loaded on every run
    stable = all(r.faults == first.faults and r.object_sites() == first.object_sites() for r in runs)
    spec = cell.spec
    rooted = resolve_program(spec).rootfs is not None
    order = None
    if not spec.root and (spec.tree or not rooted):   # the tree run_spec materialised; none: no tree, no check
        order = tree_order_matches(materialised_tree(spec.tree or "small"))
    record = {
        "backend": "hw",
        "guest": {"name": guest.name, "variant": guest.variant, "path": str(guest.path), "sha256": guest.sha256},
        "status": first.status,
        "signal": first.signal,
        "faults": first.faults,
        "faults_stable": stable,
        "faults_per_repeat": [r.faults for r in runs],
        "hw_fault_sites": [{"eip": eip, "object": key[0], "offset": key[1], "faults": n}
                           for eip, n in sites for key in [object_key(eip, maps)]],
        # the model's mappings for this spec, to name the model cell's sites the same way (none needed
        # when the CPU took no fault: a model fault then shows as a site of its own, ("?", eip))
        # (a run of many processes is compared by totals and per program: its sites belong to many images)
        "model_objects": model_objects(spec) if sites and len(first.processes or ()) <= 1 else [],
        "hw_processes": [{"program": p.get("program"), "faults": p.get("faults", 0)} for p in first.processes or ()],
        "hw_counters": first.counters(),
        "run_seconds": statistics.median(r.run_seconds for r in runs),
        "run_seconds_samples": [r.run_seconds for r in runs],
        "wall_seconds": statistics.median(r.wall_seconds for r in runs),
        "repeat": repeat,
        "cpu": first.cpu,
        "tree_order_matches": order,
        "supervisor": source_record(),
        "stdout": _blob(first.stdout),
        "stderr": _blob(first.stderr),
        "stdout_stable": all(r.stdout == first.stdout for r in runs),
        "crash": None,
    }
    bad = next((r for r in runs if not r.ok), None)
    if bad is None:
        record["outcome"] = Outcome.OK
    elif hw_outcome(bad) is Outcome.FAILED:       # its timeout
        record["outcome"] = Outcome.FAILED
        record["reason"] = f"hw run timed out after {cell.spec.timeout_seconds or 120:g} s"
    else:
        record["outcome"] = Outcome.GUEST_CRASH
        record["reason"] = (f"guest died on the CPU: status {bad.status}, signal {bad.signal}: "
                            f"{bad.summary.get('first_delivered')}")
    return record


# --------------------------------------------------------------------------- the comparison

def is_hw(rec: dict) -> bool:
    return rec.get("backend", "unicorn") == "hw"


def hw_profile(hostname: str | None = None):
    """The measured hw cost profile to price the model's counters with: ``hw-<hostname>`` if stored,
    else the first stored measured ``hw-*`` profile, else None."""
    from tlslab.hypervisor import costmodel

    profiles = costmodel.available_profiles()
    if hostname:
        import re

        name = "hw-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", hostname) or "host")
        p = profiles.get(name)
        if p is not None and p.kind == "measured":
            return p
    return next((p for n, p in profiles.items() if n.startswith("hw-") and p.kind == "measured"), None)


def fitted_profile(choice=None):
    """The FITTED profile to show beside: the summary's if it is fitted, else a stored fitted one."""
    from tlslab.hypervisor import costmodel

    if choice is not None and choice.fitted:
        return choice.profile
    return next((p for p in costmodel.available_profiles().values() if p.kind == "fitted"), None)


def _model_sites(rec: dict, hw: dict | None = None) -> dict:
    """The model cell's fault sites, keyed as hw record ``hw`` keys its own (see :func:`_hw_sites`)."""
    sites = {s["eip"]: s["violations"] for s in rec.get("sites") or [] if s.get("violations")}
    return keyed_sites(sites, hw.get("model_objects") if hw is not None and _by_object(hw) else None)


def _by_object(hw: dict) -> bool:
    return "model_objects" in hw


def _hw_sites(hw: dict) -> dict:
    """(object, offset) -> faults; EIP -> faults for records of runs made before sites had objects."""
    rows = hw.get("hw_fault_sites") or []
    if _by_object(hw):
        out: dict = {}
        for s in rows:
            key = (s["object"], s["offset"])
            out[key] = out.get(key, 0) + s["faults"]
        return out
    return {s["eip"]: s["faults"] for s in rows}


def comparison(records: list[dict], choice=None) -> dict | None:
    """The hw-vs-model table of a run (None if the run has no hw cells)."""
    from tlslab.hypervisor import costmodel

    records = [load(r) for r in records]      # any readable schema: the common faults field below
    hw_recs = [r for r in records if is_hw(r)]
    if not hw_recs:
        return None
    model = {r["cell"]: r for r in records if not is_hw(r)}
    host = next((r.get("meta", {}).get("hostname") for r in hw_recs if r.get("outcome") == Outcome.OK), None)
    prof = hw_profile(host)
    fitted = fitted_profile(choice)
    rows = []
    for h in hw_recs:
        spec = h["spec"]
        m = model.get(cell_id(spec))
        row = {"workload": h["workload"], "variant": spec["variant"], "hv_profile": spec["profile"],
               "strategy": spec["strategy"], "hw_cell": h["cell"], "model_cell": m["cell"] if m else None,
               "hw_outcome": h.get("outcome"), "model_outcome": m.get("outcome") if m else "missing",
               "reason": h.get("reason"), "label": h.get("label")}
        if h.get("outcome") == Outcome.OK:
            row.update({"hw_faults": h["faults"], "hw_sites": len(_hw_sites(h)),
                        "measured_ms": h["run_seconds"] * 1e3,
                        "measured_min_ms": min(h["run_seconds_samples"]) * 1e3,
                        "measured_max_ms": max(h["run_seconds_samples"]) * 1e3,
                        "repeat": h.get("repeat"), "cpu": h.get("cpu"), "faults_stable": h.get("faults_stable"),
                        "tree_order_matches": h.get("tree_order_matches")})
        if m is not None and m.get("outcome") == Outcome.OK and m.get("counters"):
            c = m["counters"]
            row["model_faults"] = m["faults"]           # the record's common field (tlslab.record)
            msites = _model_sites(m, h)
            row["model_sites"] = len(msites)
            if prof is not None:
                row["modelled_ms"] = costmodel.predict(prof, c).total_ns / 1e6
            if fitted is not None:
                row["fitted_ms"] = costmodel.predict(fitted, c).total_ns / 1e6
            kernel = c.get("kernel") or {}
            row["threaded"] = kernel.get("threads", 1) > kernel.get("processes", 1)
            row["processes"] = kernel.get("processes", 1)
            if h.get("outcome") == Outcome.OK:
                hsites = _hw_sites(h)
                row["faults_equal"] = row["model_faults"] == h["faults"]
                # a run of many processes: its sites belong to many program images (compared by totals)
                row["sites_equal"] = msites == hsites if row["processes"] <= 1 else None
                row["stdout_equal"] = (m.get("stdout") or {}).get("sha256") == (h.get("stdout") or {}).get("sha256")
                row["status_equal"] = m.get("status") == h.get("status")
                if "modelled_ms" in row and row["measured_ms"] > 0:
                    row["error_pct"] = 100.0 * (row["modelled_ms"] - row["measured_ms"]) / row["measured_ms"]
        rows.append(row)
    # relative to the native cell of the same workload/build: measured, modelled, FITTED
    natives = {(r["workload"], r["variant"], r["hv_profile"]): r for r in rows if r["strategy"] == "native"}
    for r in rows:
        n = natives.get((r["workload"], r["variant"], r["hv_profile"]))
        for k in ("measured_ms", "modelled_ms", "fitted_ms"):
            if n and r.get(k) is not None and n.get(k):
                r[k.replace("_ms", "_ratio")] = r[k] / n[k]
    mismatches, scheduler = [], []
    for r in rows:
        what = [k for k in ("faults_equal", "sites_equal", "stdout_equal", "status_equal", "faults_stable")
                if r.get(k) is False]
        if what and r.get("threaded") and not {"stdout_equal", "status_equal"} & set(what):
            # threads: the host's scheduler interleaves them differently from the model's (and from run
            # to run): fault counts may differ there, output may not (README, hardware backend)
            scheduler.append(f"{r['workload']} {r['variant']} {r['strategy']}: model {r.get('model_faults')}, "
                             f"hw {r.get('hw_faults')} faults (threads: the host's scheduler is not the model's)")
            continue
        if what:
            mismatches.append(f"{r['workload']} {r['variant']} {r['strategy']}: "
                              + ", ".join(w.replace("_", " ").replace("equal", "differ").replace("stable", "unstable")
                                          for w in what)
                              + (f" (model {r.get('model_faults')} faults / {r.get('model_sites')} sites, "
                                 f"hw {r.get('hw_faults')} / {r.get('hw_sites')})" if "faults_equal" in what
                                 or "sites_equal" in what else ""))
    errors = [abs(r["error_pct"]) for r in rows if r.get("error_pct") is not None]
    return {
        "profile": prof.name if prof else None,
        "profile_label": prof.label() if prof else None,
        "profile_provenance": _provenance(prof, host) if prof else None,
        "fitted": fitted.name if fitted else None,
        "fitted_label": fitted.label() if fitted else None,
        "host": host,
        "rows": rows,
        "mismatches": mismatches,
        "scheduler_differences": scheduler,
        "ok": sum(1 for r in rows if r["hw_outcome"] == Outcome.OK),
        "skipped": [r for r in rows if r["hw_outcome"] == Outcome.SKIPPED],
        "median_abs_error_pct": statistics.median(errors) if errors else None,
        "max_abs_error_pct": max(errors) if errors else None,
    }


def _calibration_load(pv: dict) -> str:
    """The load average the calibration started and ended at, from its raw file (per-fault prices measured on
    a loaded machine are inflated)."""
    import json

    from tlslab.hypervisor.costmodel import PROFILE_DIR

    try:
        raw = json.loads((PROFILE_DIR / str(pv.get("raw"))).read_text())
    except (OSError, ValueError, TypeError):
        return ""
    before, after = raw.get("loadavg_before"), raw.get("loadavg_after")
    if not before:
        return ""
    return f"; load average {before[0]:g} when it started" + (f", {after[0]:g} when it ended" if after else "")


def _provenance(prof, host: str | None) -> str:
    pv = prof.provenance or {}
    same = prof.name == f"hw-{host}" if host else None
    where = prof.name.removeprefix("hw-")
    text = (f"{prof.name} was measured by `tlslab calibrate` on host {where} at {pv.get('measured', '?')} "
            f"({', '.join(pv.get('guests', []))} on the {pv.get('tree', '?')} tree, {pv.get('repeat', '?')} repeats; "
            f"raw timings: tlslab/hypervisor/profiles/{pv.get('raw', '?')}{_calibration_load(pv)})")
    if same:
        text += (f"; the hw cells ran on the same host ({host}), so this is a consistency check of the cost "
                 "model's linearity (counters x per-event prices), not an independent validation")
    elif host:
        text += f"; the hw cells ran on host {host}: a different machine, so absolute errors include the hosts' difference"
    return text
