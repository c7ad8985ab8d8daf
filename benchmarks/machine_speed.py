"""Machine speed: lsr on a 4,000-entry tree, segment checks on vs syscalls only.

The configurations run alternately in one invocation, so machine noise hits them alike; the
figure that matters is the ratio (issue 14's target: >= 0.8; the first target, met on
2026-11-22, was 0.5).

  checks on     : every fs/gs access seen and checked before it commits, guest
                  instructions counted (the configuration every experiment uses)
  syscalls only : plain Unicorn, int 0x80 handled in Python, no window hook,
                  no instruction counting, no segment enforcement at all

Under tlslab's Unicorn (scripts/build_unicorn.py; the first line printed names the library)
instructions are counted inline, and two more kinds of run are made in the same rounds:

  checks, hook  : checks on, counting with a block hook instead, on the same library
  stock ...     : both configurations on the PyPI wheel's stock library, each in a child
                  process (the binding loads one library per process)

so the patch's gain, and the ratio against the same library and against stock Unicorn, come
from one run. The order of the configurations rotates from round to round. Guest instructions per second = instructions of the run / wall time of the run
loop (loading the ELF excluded). The instruction count comes from the checked run; the
unchecked run executes the same deterministic instruction stream.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tlslab.guests import resolve_guest
from tlslab.hypervisor.domain import run_process
from tlslab.linux.process import Process
from tlslab.linux.tree import TREE_4K, SyntheticTree, TreeSpec
from tlslab.linux.vfs import Vfs
from tlslab.machine import fastpath
from tlslab.machine.vcpu import VCpu

# the wheel's own library, found without importing the binding (which loads a library at import)
STOCK_LIBRARY = Path(importlib.util.find_spec("unicorn").submodule_search_locations[0]) / "lib"


_AS_LOADED = object()


def one_run(path: str, tree: str, checks: bool, inline=_AS_LOADED) -> tuple[float, int, bytes]:
    """One timed run; ``inline``: the counter entry to use (None: the block hook), default the library's."""
    if inline is not _AS_LOADED:
        fastpath.INLINE_COUNTER = inline
    vcpu = VCpu(checks=checks, count_instructions=checks)
    process = Process(vcpu, path, argv=["lsr", "."], vfs=Vfs.from_tree(TreeSpec.parse(tree)))
    process.load()
    started = time.perf_counter()
    status = run_process(process)
    elapsed = time.perf_counter() - started
    assert status == 0, f"lsr exited {status}"
    return elapsed, vcpu.counters.instructions, bytes(process.stdout)


def child_run(path: str, tree: str, checks: bool) -> float:
    """One timed run in a child process on the wheel's stock library (after a warm-up run there)."""
    env = {**os.environ, "LIBUNICORN_PATH": str(STOCK_LIBRARY)}
    cmd = [sys.executable, __file__, "--tree", tree, "--child", "checks" if checks else "plain"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    record = json.loads(out)
    assert "stock" in record["library"], record["library"]
    return record["seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="rounds (median reported)")
    ap.add_argument("--tree", default=TREE_4K, help="tree spec (default: the 4k tree)")
    ap.add_argument("--no-stock", action="store_true", help="skip the runs on the wheel's stock library")
    ap.add_argument("--child", choices=["plain", "checks"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = str(resolve_guest("lsr").path)
    if args.child:
        checks = args.child == "checks"
        one_run(path, args.tree, checks, fastpath.INLINE_COUNTER)   # warm caches, as the parent did
        seconds, _, _ = one_run(path, args.tree, checks, fastpath.INLINE_COUNTER)
        print(json.dumps({"seconds": seconds, "library": fastpath.unicorn_build()}))
        return 0
    entries = len(SyntheticTree(args.tree))
    inline = fastpath.INLINE_COUNTER
    local = {"checks on": (True, inline)}
    if inline is not None:
        local["checks, hook"] = (True, None)
    local["syscalls only"] = (False, None)
    stock = {}
    if inline is not None and not args.no_stock and (STOCK_LIBRARY / "libunicorn.so.2").is_file():
        stock = {"stock, checks on": True, "stock, syscalls only": False}
    times: dict[str, list[float]] = {name: [] for name in (*local, *stock)}
    instructions = None
    outputs = set()
    one_run(path, args.tree, True, inline)  # warm caches (page cache, fast-path build)
    order = list(times)
    for round_ in range(args.repeat):
        # rotate the order each round: a run right after a child process (or any other) starts with
        # colder caches, and no configuration should always be the one that does
        for name in order[round_ % len(order):] + order[:round_ % len(order)]:
            if name in stock:
                times[name].append(child_run(path, args.tree, stock[name]))
                continue
            checks, counter = local[name]
            t, n, out = one_run(path, args.tree, checks, counter)
            times[name].append(t)
            outputs.add(out)
            if checks:
                assert instructions in (None, n), "the two counters disagree"
                instructions = n
    fastpath.INLINE_COUNTER = inline
    assert len(outputs) == 1, "checked and unchecked runs printed different output"
    print(f"unicorn: {fastpath.unicorn_build()}")
    print(f"workload: lsr on a {entries}-entry synthetic tree, {instructions:,} guest instructions, "
          f"median of {args.repeat} alternating rounds")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name in ("syscalls only", *[n for n in times if n != "syscalls only"]):
        print(f"{name:21s}: {median[name] * 1000:8.1f} ms  {instructions / median[name] / 1e6:6.2f} M guest instructions/s")
    off = median["syscalls only"]
    print(f"ratio (checks on / syscalls only): {off / median['checks on']:.2f}   (issue 14 target >= 0.8)")
    if "checks, hook" in median:
        print(f"ratio (checks, hook / syscalls only): {off / median['checks, hook']:.2f}   "
              "(the same library counting with a block hook)")
    if stock:
        stock_off = median["stock, syscalls only"]
        print(f"ratio (stock: checks on / syscalls only): {stock_off / median['stock, checks on']:.2f}")
        print(f"ratio (checks on / stock syscalls only): {stock_off / median['checks on']:.2f}   "
              "(tlslab's Unicorn checking, against stock Unicorn not checking)")
    # each checked run against the unchecked run of its round: drifts of a shared machine cancel in a pair
    paired = sorted(off_t / on_t for on_t, off_t in zip(times["checks on"], times["syscalls only"]))
    print(f"paired ratios (each checked run / the unchecked run of its round): median {statistics.median(paired):.2f}, "
          f"range {paired[0]:.2f}-{paired[-1]:.2f} over {len(paired)} pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
