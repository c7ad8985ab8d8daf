"""What decoding ahead of a fault costs on this CPU: online-lookahead's C walk, timed where it runs.

    .venv/bin/python benchmarks/lookahead_price.py [--write]

Runs online-lookahead (prices hw-vm) on the bench's small workloads, both
builds, in the model, and times every walk it makes at the fault where it
makes it: one walk per fault, in C (``tc_lookahead_regions_timed``, the
monotonic clock around the walk), over the guest's own memory, with the
decode cache as the run has left it and the CPU's caches as the emulator
has left them (a hypervisor's #GP handler also runs cold). Walks are not
repeated: a repetition would find everything in the caches. The clock's own
cost (the median of 1001 back-to-back reading pairs) is subtracted per walk.

Prints per workload: walks, instructions decoded ahead, ns per instruction,
ns per walk, and the decode cache's hit rate; then the price: all the walks'
nanoseconds over all their instructions (a weighted mean: the workloads that
walk most weigh most). ``--write`` stores it as ``lookahead_ns`` in the
bundled profiles, with what it was measured on:

* ``hw-vm`` (measured on this machine): the price as measured;
* ``xen-2004`` (fitted to Keir's 2004 table, which has no walk in it): the
  same price, as a *lower bound* (a 2004 CPU decoded no faster than this one);
  a conclusion that the walk does not pay holds at any higher price, and one
  that it pays does not follow from a lower bound (the docs say so).

The figures vary from run to run (machine noise, cold caches): report the
range, and compare prices measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tlslab.experiment import RunSpec, make_domain  # noqa: E402
from tlslab.hypervisor import costmodel  # noqa: E402
from tlslab.x86.aheadc import clock_overhead_ns  # noqa: E402

#: the bench's small model workloads (default.toml), both builds where they have both
WORKLOADS = [("lsr", ()), ("syscalls", ("100",)), ("malloc", ("500",)), ("stdio", ()), ("canary", ("40",)),
             ("fs-user", ()), ("selfread", ()), ("prelink", ()), ("threads", ("4", "50"))]
VARIANTS = ("default", "nosegneg")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(workloads=WORKLOADS, variants=VARIANTS) -> dict:
    overhead = clock_overhead_ns()
    rows = []
    for guest, args in workloads:
        for variant in variants:
            spec = RunSpec(guest, args=args, variant=variant, strategy="online-lookahead", prices="hw-vm")
            try:
                domain, _ = make_domain(spec)
            except Exception as exc:      # a build the checkout lacks: say so, measure the rest
                print(f"  skipped {guest} [{variant}]: {exc}", file=sys.stderr)
                continue
            la = domain.strategy.lookahead
            la.timing = True
            run = domain.run()
            if not run.ok:
                print(f"  skipped {guest} [{variant}]: the run did not finish ({run.crash})", file=sys.stderr)
                continue
            instructions = run.counters["strategy"]["by_kind"].get("lookahead-instructions", 0)
            hits = misses = 0
            for _, walker in list(la._walkers.values()):
                h, m = walker.cache_stats()
                hits, misses = hits + h, misses + m
            ns = max(0.0, la.timed_ns - overhead * la.walks)
            rows.append({"workload": guest, "variant": variant, "walks": la.walks, "instructions": instructions,
                         "ns": ns, "cache_hits": hits, "cache_misses": misses})
    total_ns = sum(r["ns"] for r in rows)
    total_instructions = sum(r["instructions"] for r in rows)
    per = [r["ns"] / r["instructions"] for r in rows if r["instructions"]]
    return {"rows": rows, "clock_overhead_ns": overhead, "total_ns": total_ns,
            "instructions": total_instructions, "walks": sum(r["walks"] for r in rows),
            "ns_per_instruction": total_ns / total_instructions if total_instructions else 0.0,
            "range_ns_per_instruction": [min(per), max(per)] if per else [0.0, 0.0],
            "cpu": cpu_name(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_profiles(result: dict) -> None:
    price = round(result["ns_per_instruction"], 2)
    provenance = {"script": "benchmarks/lookahead_price.py", "cpu": result["cpu"], "measured": result["measured"],
                  "walks": result["walks"], "instructions": result["instructions"],
                  "range_ns_per_instruction": [round(x, 2) for x in result["range_ns_per_instruction"]],
                  "clock_overhead_ns": result["clock_overhead_ns"],
                  "workloads": sorted({f"{r['workload']} [{r['variant']}]" for r in result["rows"]})}
    notes = {"hw-vm": "measured: online-lookahead's C walk timed at every fault of these runs, on this machine",
             "xen-2004": "a LOWER BOUND, not fitted: Keir's 2004 table has no walk in it; this is the price "
                         "measured on today's CPU (a 2004 CPU decoded no faster)"}
    for name, note in notes.items():
        path = costmodel.PROFILE_DIR / f"{name}.json"
        data = json.loads(path.read_text())
        data["lookahead_ns"] = price
        data.setdefault("provenance", {})["lookahead"] = {"note": note, **provenance}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote lookahead_ns = {price} to {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="store the price in the bundled hw-vm and xen-2004 profiles")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON record")
    args = ap.parse_args(argv)
    result = measure()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"CPU: {result['cpu']}; clock readings: {result['clock_overhead_ns']:.1f} ns a pair (subtracted)")
        print(f"{'workload':24s} {'walks':>7s} {'instr':>9s} {'ns/instr':>9s} {'ns/walk':>9s} {'cache hits':>10s}")
        for r in result["rows"]:
            looked = r["cache_hits"] + r["cache_misses"]
            print(f"{r['workload'] + ' [' + r['variant'] + ']':24s} {r['walks']:7d} {r['instructions']:9d} "
                  f"{r['ns'] / max(1, r['instructions']):9.1f} {r['ns'] / max(1, r['walks']):9.1f} "
                  f"{100 * r['cache_hits'] / max(1, looked):9.1f}%")
        lo, hi = result["range_ns_per_instruction"]
        print(f"price: {result['ns_per_instruction']:.1f} ns per instruction decoded ahead "
              f"({result['walks']:,} walks, {result['instructions']:,} instructions; per workload {lo:.1f}-{hi:.1f})")
    if args.write:
        write_profiles(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
