"""What online-lookahead's walk may cost before it loses to the better 2004 mechanism, per bench cell.

    .venv/bin/python benchmarks/lookahead_cost.py RUN      (a `tlslab bench` run id or directory, e.g. results/reference/run)

Both cost profiles price each instruction online-lookahead decodes ahead at
``lookahead_ns`` (measured by benchmarks/lookahead_price.py; for xen-2004 a
lower bound). For each online-lookahead cell of the run this prints, under
the profile it decided with: its fault-handling time over min(emulate, flip)
with the walk free and with the walk at the profile's price, the
instructions it walked (counter ``lookahead-instructions``; reuses of a
memoised walk decode nothing and are priced apart, ``lookahead_reuse_ns``),
and the *break-even*: the price per decoded instruction at which it would
cost exactly min(emulate, flip), reuses at their price, i.e.
(min(emulate, flip) - its time without the walk - its reuses' price) /
instructions walked. Negative: it is dearer than min(emulate, flip) even
with the walk free. Figures from the run's own counters and the stored
profiles; nothing is measured here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tlslab.bench.store import StoreError, resolve_run  # noqa: E402
from tlslab.hypervisor import costmodel  # noqa: E402
from tlslab.hypervisor.strategies import is_online  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a bench run id (under results/) or run directory")
    args = ap.parse_args(argv)
    try:
        records = resolve_run(args.run).latest().values()   # the store's reader (cells.jsonl or .gz, torn lines)
    except StoreError as exc:
        print(f"lookahead_cost: {exc}", file=sys.stderr)
        return 2
    cells = {}
    for c in records:
        if c.get("backend") != "unicorn" or c.get("outcome") != "ok":
            continue
        s = c["spec"]
        prices = (s.get("prices") or "") if is_online(s["strategy"]) else ""
        cells[(c["workload"], s["variant"], s["strategy"], prices)] = c
    rows = []
    for (workload, variant, strategy, prices), c in sorted(cells.items()):
        if strategy != "online-lookahead":
            continue
        emulate, flip = cells.get((workload, variant, "emulate", "")), cells.get((workload, variant, "flip", ""))
        if emulate is None or flip is None:
            continue
        profile = costmodel.get_profile(prices)
        own = costmodel.fault_handling_ns(profile, c["counters"])
        best = min(costmodel.fault_handling_ns(profile, emulate["counters"]),
                   costmodel.fault_handling_ns(profile, flip["counters"]))
        walked = c["counters"]["strategy"]["by_kind"].get("lookahead-instructions", 0)
        faults = c["counters"]["strategy"]["traps"]
        reused = c["counters"]["strategy"]["by_kind"].get("lookahead-reused", 0)
        reuse_ns = reused * profile.lookahead_reuse_ns
        free = own - walked * profile.lookahead_ns - reuse_ns
        rows.append((workload, variant, prices, free / best, own / best, walked, walked / max(1, faults),
                     (best - free - reuse_ns) / walked if walked else float("inf")))
    if not rows:
        print("lookahead_cost: the run has no online-lookahead cell with emulate and flip beside it", file=sys.stderr)
        return 2
    print(f"{'workload':24} {'build':9} {'prices':9} {'walk free':>9} {'priced':>9} {'walked':>11} "
          f"{'per fault':>9} {'break-even ns/insn':>18}")
    for workload, variant, prices, free, priced, walked, per_fault, even in rows:
        print(f"{workload[:24]:24} {variant:9} {prices:9} {free:9.3f} {priced:9.3f} {walked:11,} {per_fault:9.1f} "
              f"{even:18.1f}")
    print("(walk free / priced: fault-handling time over min(emulate, flip); priced at each profile's lookahead_ns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
