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
ns per walk, the decode cache's hit rate, and the reuses of memoised walks
with their ns each; then the two prices: all the walks' nanoseconds over all
their instructions (a weighted mean: the workloads that walk most weigh
most), and all the reuses' nanoseconds over the reuses. The measurement is
tlslab.hw.calibrate.measure_lookahead_price (``tlslab calibrate`` makes it
too, for the profile it writes). ``--write`` stores them as ``lookahead_ns``
and ``lookahead_reuse_ns`` in the bundled profiles, with what they were
measured on:

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
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tlslab.hw.calibrate import lookahead_provenance, measure_lookahead_price  # noqa: E402
from tlslab.hypervisor import costmodel  # noqa: E402
from tlslab.hypervisor.costmodel import XEN_2004_WALK_NOTE  # noqa: E402


def write_profiles(result: dict) -> None:
    price = round(result["ns_per_instruction"], 2)
    reuse_price = round(result["ns_per_reuse"], 2)
    provenance = lookahead_provenance(result)
    notes = {"hw-vm": "measured: online-lookahead's C walk timed at every fault of these runs, on this machine",
             "xen-2004": XEN_2004_WALK_NOTE}
    for name, note in notes.items():
        path = costmodel.PROFILE_DIR / f"{name}.json"
        data = json.loads(path.read_text())
        data["lookahead_ns"] = price
        data["lookahead_reuse_ns"] = reuse_price
        data.setdefault("provenance", {})["lookahead"] = {"note": note, **provenance}
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        print(f"wrote lookahead_ns = {price}, lookahead_reuse_ns = {reuse_price} to {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="store the price in the bundled hw-vm and xen-2004 profiles")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON record")
    ap.add_argument("--decoder", metavar="ELF", help="also time the C decoder alone: a linear sweep over the "
                    "ELF's .text, ten times (warm: what a decode costs without the walk and without cold caches)")
    args = ap.parse_args(argv)
    if args.decoder:
        from tlslab.linux.elf import ElfError, read_elf
        from tlslab.x86.aheadc import decode_sweep_ns

        try:
            _, elf = read_elf(args.decoder)
            section = elf.get_section_by_name(".text")
            if section is None:
                raise ElfError(f"{args.decoder}: no .text section")
            text = section.data()
        except ElfError as exc:
            print(f"lookahead_price: {exc}", file=sys.stderr)
            return 2
        decodes, ns = decode_sweep_ns(text)
        print(f"decoder alone: {decodes:,} decodes over {len(text):,} bytes of .text (x10), {ns / decodes:.1f} ns each")
    result = measure_lookahead_price()
    for line in result["skipped"]:
        print(f"skipped {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"CPU: {result['cpu']}; clock readings: {result['clock_overhead_ns']:.1f} ns a pair (subtracted)")
        print(f"{'workload':24s} {'walks':>7s} {'instr':>9s} {'ns/instr':>9s} {'ns/walk':>9s} {'decode hits':>11s} "
              f"{'reuses':>7s} {'ns/reuse':>8s}")
        for r in result["rows"]:
            looked = r["cache_hits"] + r["cache_misses"]
            print(f"{r['workload'] + ' [' + r['variant'] + ']':24s} {r['walks']:7d} {r['instructions']:9d} "
                  f"{r['ns'] / max(1, r['instructions']):9.1f} {r['ns'] / max(1, r['walks']):9.1f} "
                  f"{100 * r['cache_hits'] / max(1, looked):10.1f}% {r['reuses']:7d} "
                  f"{r['reuse_ns'] / max(1, r['reuses']):8.1f}")
        lo, hi = result["range_ns_per_instruction"]
        print(f"price: {result['ns_per_instruction']:.1f} ns per instruction decoded ahead "
              f"({result['walks']:,} walks, {result['instructions']:,} instructions; per workload {lo:.1f}-{hi:.1f}); "
              f"{result['ns_per_reuse']:.1f} ns per reuse of a memoised walk ({result['reuses']:,} reuses)")
    if args.write:
        write_profiles(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
