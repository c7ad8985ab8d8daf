"""Keir's 2004 experiment on this host's CPU: `ls -R` under native, emulate and flip.

    .venv/bin/python benchmarks/hw_walk.py [--tree 4k] [--repeat 5] [--cpu 0] [--guest lsr]

Runs the guest (default ``lsr``, both builds) on a synthetic tree under the
hw backend, stdout to /dev/null as in Keir's `time /bin/ls -R /usr/lib
>/dev/null`, and prints median exec-to-exit times, fault counts, the
flip/emulate fault ratio and the slowdowns relative to untraced native (Keir:
emulate 300/180 = 1.67x, flip 390/180 = 2.17x; flip faults "nearly twice" as
often). Results are appended as one JSON line per run to
``results/hw_walk.jsonl`` (flushed per line, so a killed run loses nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tlslab.guests import resolve_guest  # noqa: E402
from tlslab.hw.backend import HwUnavailable, run_hw  # noqa: E402

STRATEGIES = ("untraced", "native", "emulate", "flip")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="4k")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--guest", action="append")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "hw_walk.jsonl"))
    args = ap.parse_args(argv)
    guests = args.guest or ["lsr", "lsr.nosegneg"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"{'guest':14} {'strategy':9} {'median ms':>10} {'faults':>8} {'us/fault':>9} {'x untraced':>10}")
    with open(args.out, "a") as log:
        for key in guests:
            g = resolve_guest(key)
            runs: dict[str, list] = {s: [] for s in STRATEGIES}
            for _ in range(args.repeat):
                for s in STRATEGIES:
                    try:
                        r = run_hw(g.path, [g.name, "."], strategy=s, tree=args.tree, stdout="null", cpu=args.cpu)
                    except HwUnavailable as exc:
                        print(f"hw backend unavailable: {exc}", file=sys.stderr)
                        return 1
                    rec = {"time": time.time(), "guest": key, "tree": args.tree, "strategy": s, "cpu": args.cpu,
                           "run_ns": r.summary["run_ns"], "faults": r.faults, "status": r.status,
                           "loadavg": os.getloadavg()}
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    runs[s].append(rec)
            base = statistics.median(x["run_ns"] for x in runs["untraced"])
            traced = statistics.median(x["run_ns"] for x in runs["native"])
            for s in STRATEGIES:
                t = statistics.median(x["run_ns"] for x in runs[s])
                faults = runs[s][0]["faults"]
                per = f"{(t - traced) / faults / 1000:9.2f}" if faults else f"{'-':>9}"
                print(f"{key:14} {s:9} {t / 1e6:10.2f} {faults:8d} {per} {t / base:10.2f}")
            e, f = runs["emulate"][0]["faults"], runs["flip"][0]["faults"]
            print(f"{key:14} flip/emulate faults = {f / e:.2f} (Keir 2004: 'nearly twice')" if e else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
