#!/usr/bin/env python3
"""Does the bench runner scale? The same cells with 1 worker, then with 2 (target speed-up >= 1.8).

By default a fixed representative subset of the bundled default matrix: every
guest and every strategy in the registry, default build, lsr on its small tree
only (the lsr [4k] cells and the nosegneg build are left out to keep this
benchmark to a few minutes). ``--full`` runs the whole default matrix twice.

The speed-up is only meaningful on an otherwise idle machine: the load average
before and after each pass is printed next to the times.

    python benchmarks/matrix_scaling.py [--full] [--jobs 1,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tlslab.bench import runner  # noqa: E402
from tlslab.bench.spec import load_spec  # noqa: E402


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def subset(cells):
    return [c for c in cells if c.spec.variant == "default" and c.spec.tree != "4k"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the whole default matrix (about 2 x 10 minutes)")
    ap.add_argument("--jobs", default="1,2", help="worker counts to compare (default 1,2)")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()

    spec = load_spec()
    cells = spec.cells()
    chosen = cells if args.full else subset(cells)
    runnable = [c for c in chosen if not c.skip]
    what = "the FULL default matrix" if args.full else (
        f"a fixed representative SUBSET of the default matrix ({len(chosen)} of {len(cells)} cells: default build, "
        "lsr on the small tree only; the full matrix takes about 10 minutes per pass)")
    print(f"matrix_scaling: {what}; {len(runnable)} runnable cells; host has {os.cpu_count()} CPUs", flush=True)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="tlslab-scaling-"))
    times, cpus = {}, {}
    for jobs in [int(j) for j in args.jobs.split(",")]:
        load0 = os.getloadavg()
        run, _ = runner.start_run(spec, out, jobs, ["benchmarks/matrix_scaling.py", f"--jobs={jobs}"], cells=chosen)
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        written = runner.execute_run(run, chosen, jobs)
        elapsed = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0          # the workers are all reaped when execute_run returns
        load1 = os.getloadavg()
        failed = sum(1 for r in written if r.get("outcome") == "failed")
        times[jobs] = elapsed
        cpus[jobs] = cpu
        print(f"  jobs={jobs}: {elapsed:7.1f} s wall for {len(written)} cells ({failed} failed); workers used "
              f"{cpu:.1f} CPU-s = {cpu / (elapsed * jobs):.0%} of {jobs} core(s); load average before "
              f"{load0[0]:.2f}, after {load1[0]:.2f}; run {run.path}", flush=True)
    if 1 in times and len(times) > 1:
        for jobs, t in times.items():
            if jobs != 1:
                speedup = times[1] / t
                verdict = "meets" if speedup >= 1.8 else "MISSES"
                print(f"speed-up with {jobs} workers: {speedup:.2f}x ({verdict} the >= 1.8 target)")
                # on a shared machine the workers do not get whole cores; the CPU-normalised figure says whether
                # the runner itself (scheduling, spawning, writing) scales
                if cpus.get(1) and cpus.get(jobs):
                    share1 = cpus[1] / times[1]
                    sharej = cpus[jobs] / (times[jobs] * jobs)
                    print(f"  CPU share obtained: {share1:.0%} (1 worker) vs {sharej:.0%} per worker ({jobs} workers); "
                          f"speed-up normalised to whole cores: {speedup * share1 / sharej:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
