"""Flat exports of a bench run: one CSV row per cell (the newest record of each cell).

``rootfs``: the pinned root filesystem a cell's program ran in (``keir``: /bin/ls of debian), empty if none.
``faults``: the record's common fault count (:mod:`tlslab.record`), filled for model and hw cells alike: the
#GP traps the model's strategy saw, or the #GP faults the CPU took under the supervisor. hw cells have no
model counters: ``hw_run_seconds`` is the median traced run time, and the modelled columns are empty.
``schema``: the record schema the row was read from (old records are read by tlslab.record.upgrade).
"""

from __future__ import annotations

import csv
import io

from tlslab.bench.spec import LATE_FIELDS
from tlslab.bench.store import RunDir
from tlslab.hypervisor import costmodel
from tlslab.hypervisor.strategies import is_online
from tlslab.record import RunRecord

BASE_COLUMNS = [
    "run_id", "cell", "backend", "workload", "guest", "variant", "args", "applet", "tree", "root", "rootfs", "strategy", "prices", "hv_profile",
    "seed", "outcome", "reason", "exit_status", "crash_eip", "crash_symbol", "crash_instruction",
    "guest_sha256", "instructions", "syscalls", "faults", "faults_per_1k_instructions", "decodes",
    "descriptor_writes", "emulated_accesses", "emulated_instructions", "patches", "notifications", "refused",
    "gs_accesses", "gs_negative", "gs_positive", "gs_sign_changes", "fs_accesses", "fs_negative", "fs_positive",
    "fs_sign_changes", "stdout_sha256", "wall_seconds", "cell_seconds", "started", "ended",
    "tlslab_version", "git_commit", "python_version", "unicorn_version", "capstone_version", "cpu_model", "hostname",
    "hw_run_seconds", "hw_run_seconds_samples", "hw_fault_sites", "hw_cpu", "schema",
]


def rows(run: RunDir) -> tuple[list[str], list[dict]]:
    info = run.read_run()
    latest = run.latest()
    order = [c["id"] for c in info.get("cells", [])]
    order += [cid for cid in latest if cid not in order]
    profiles = costmodel.available_profiles()
    prof_cols = [f"modelled_ns[{name}]" for name in profiles]
    out = []
    for cid in order:
        r = latest.get(cid)
        if r is None:
            continue
        rec = RunRecord.from_dict(r, f"{run.path}: cell {cid}")   # the typed record: outcome, faults, ...
        s = r["spec"]
        c = rec.counters or {}
        st = c.get("strategy", {})
        seg = c.get("segments", {})
        crash = r.get("crash") or {}
        meta = r.get("meta", {})
        instr = rec.instructions
        faults = rec.faults
        hw = rec.backend == "hw"
        row = {
            "run_id": r.get("run_id"), "cell": cid, "backend": r.get("backend", "unicorn"), "workload": r.get("workload"), "guest": s["guest"],
            "variant": s["variant"], "args": " ".join(s.get("args") or []), "applet": s.get("applet") or "",
            "tree": s.get("tree") or "", "root": s.get("root") or "", "rootfs": s.get("rootfs") or "",
            "strategy": s["strategy"],
            # the cost profile an online strategy decided with (a matrix may run it with several)
            "prices": (s.get("prices") or LATE_FIELDS["prices"]) if is_online(s["strategy"]) else "",
            "hv_profile": s["profile"], "seed": s.get("seed"), "outcome": rec.outcome.value,
            "reason": rec.reason or "", "exit_status": rec.status,
            "crash_eip": f"{crash['eip']:#010x}" if crash.get("eip") is not None else "",
            "crash_symbol": crash.get("symbol", ""), "crash_instruction": crash.get("instruction", ""),
            "guest_sha256": (r.get("guest") or {}).get("sha256", ""), "instructions": instr,
            "syscalls": c.get("linux", {}).get("syscalls", {}).get("total") if c else None, "faults": faults,
            "faults_per_1k_instructions": (1000.0 * faults / instr) if instr and faults is not None else None,
            "schema": rec.schema,
        }
        for k in ("decodes", "descriptor_writes", "emulated_accesses", "emulated_instructions", "patches",
                  "notifications", "refused"):
            row[k] = st.get(k)
        for sg in ("gs", "fs"):
            for k in ("accesses", "negative", "positive", "sign_changes"):
                row[f"{sg}_{k}"] = seg.get(sg, {}).get(k)
        row.update({
            "stdout_sha256": (r.get("stdout") or {}).get("sha256", ""), "wall_seconds": r.get("wall_seconds"),
            "cell_seconds": r.get("cell_seconds"), "started": r.get("started"), "ended": r.get("ended"),
        })
        for k in ("tlslab_version", "git_commit", "python_version", "unicorn_version", "capstone_version",
                  "cpu_model", "hostname"):
            row[k] = meta.get(k)
        if hw:
            row.update({"hw_run_seconds": r.get("run_seconds"),
                        "hw_run_seconds_samples": " ".join(f"{x:.6f}" for x in r.get("run_seconds_samples") or []),
                        "hw_fault_sites": len(r.get("hw_fault_sites") or []), "hw_cpu": r.get("cpu")})
        for name, p in profiles.items():
            row[f"modelled_ns[{name}]"] = costmodel.predict(p, c).total_ns if c else None
        out.append(row)
    return BASE_COLUMNS + prof_cols, out


def to_csv(run: RunDir) -> str:
    columns, data = rows(run)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for row in data:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()
