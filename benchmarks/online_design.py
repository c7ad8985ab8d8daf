"""Online rules compared by replay on the default matrix's workloads: the design studies of issue 15.

    .venv/bin/python benchmarks/online_design.py [--workloads lsr keir ...] [--boot] [--json FILE]

Each workload of the bench's default matrix (its native cells; boot only with
``--boot``: half a million accesses over 553 processes) is recorded once with
every fs/gs access (tlslab.inspect.replay; cached under
``$TLSLAB_CACHE/replay``), and its native run gives the %gs sign runs that the
bench's offline bound and run-length oracle are priced on. Every rule below is
then replayed over the recording, deciding with hw-vm's and then xen-2004's
prices, and priced under the same profile, relative to the bound:

* the shipped strategies (online-site, online-rate, online-probe) and the two
  2004 mechanisms as rules: these replays take exactly the real runs' traps,
  emulations and writes (tests/test_replay.py), so their columns are the
  bench's figures;
* online-rate with its gaps counted in full, not up to its cap: what the cap
  (which lets the ptrace supervisor count gaps by single-stepping) costs;
* online-probe with another re-probe factor (4, 16, never): sensitivity;
* online-probe probing a site only at its second fault ("ski rental": the
  first fault of every site is emulated unprobed);
* online-probe sharing what it learns across sites: a site met for the
  first time takes the remaining run last learnt at any site for the same
  %gs offset (the same thread variable) instead of a probe;
* a **last-value oracle** (not online: it is told, at each fault, the true
  remaining run of the previous fault at the same site, for free, and flips
  above the threshold): how far per-site estimation could go if learning cost
  nothing. Where it is no better than online-probe, estimating run lengths
  per site is not what is missing.

Per profile it prints the table (with each workload's negative %gs accesses
per site that makes them: how often a rule meets each site it could learn
about) and, per rule, on how many workloads it is at
most min(emulate, flip) and within 10 % of the bound: the two acceptance marks.
These are design aids from replays, not bench results; xen-2004 is FITTED.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tlslab.analysis import hybrid  # noqa: E402
from tlslab.artifacts import sha256_file, user_cache_dir  # noqa: E402
from tlslab.bench.spec import load_spec  # noqa: E402
from tlslab.experiment import make_domain  # noqa: E402
from tlslab.hypervisor import costmodel  # noqa: E402
from tlslab.hypervisor.strategies import STRATEGIES, online_names  # noqa: E402
from tlslab.hypervisor.strategies.online import (  # noqa: E402
    OnlineStrategy,
    PriceOptions,
    ProbeStrategy,
    RateStrategy,
    is_probe_descriptor,
)
from tlslab.inspect.replay import EmulateRule, FlipRule, record_accesses, replay, replaying  # noqa: E402

PROFILES = ("hw-vm", "xen-2004")
CACHE_FORMAT = 3


def source_digest() -> str:
    """A hash of tlslab's sources: a recording depends on the kernel, loader and emulator that made it."""
    h = hashlib.sha256()
    root = HERE.parent / "tlslab"
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".c", ".h")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


class RateUncapped(RateStrategy):
    """online-rate with every gap counted in full (the rule before its cap; a hypervisor with a
    retired-instruction counter could run it, tlslab's ptrace supervisor cannot afford to)."""

    name = "rate, gaps uncapped"
    gap_cap = 1 << 62


class ReprobeEvery4(ProbeStrategy):
    name = "probe, re-probe x4"
    reprobe_factor = 4


class ReprobeEvery16(ProbeStrategy):
    name = "probe, re-probe x16"
    reprobe_factor = 16


class NeverReprobe(ProbeStrategy):
    name = "probe, never re-probe"
    reprobe_factor = 1 << 62


class SkiRental(ProbeStrategy):
    """online-probe, but a site's first fault is emulated without a probe (it may never come back)."""

    name = "probe from a site's 2nd fault"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.met: set = set()

    def decide(self, trap, insn, sign):
        v = trap.violation
        site = (v.eip, sign)
        if not is_probe_descriptor(v.descriptor) and site not in self.met:
            self.met.add(site)
            if site not in self.estimate:
                self._previous = v.eip
                return self.emulate(trap, insn)
        return super().decide(trap, insn, sign)


class OffsetPrior(ProbeStrategy):
    """online-probe, but a site met for the first time borrows, instead of a probe, the remaining run last
    learnt at any site for the same %gs offset (the same thread variable); it is probed at its second fault.
    Tests whether learning can be shared across sites, for programs that meet each site only a few times."""

    name = "probe, offset prior"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.by_offset: dict = {}
        self.met: set = set()

    def decide(self, trap, insn, sign):
        v = trap.violation
        site, variable = (v.eip, sign), (v.offset, sign)
        if not is_probe_descriptor(v.descriptor) and site not in self.met:
            self.met.add(site)
            if site not in self.estimate and variable in self.by_offset:
                self._previous = v.eip
                return self.flip(trap) if self.by_offset[variable] > self.threshold else self.emulate(trap, insn)
        return super().decide(trap, insn, sign)

    def _start_probe(self, trap, insn, sign, key, where):
        return super()._start_probe(trap, insn, sign, (*key, (trap.violation.offset, sign)), where)

    def _in_probe(self, trap, insn, sign, key, probe, where):
        return super()._in_probe(trap, insn, sign, (*key, (trap.violation.offset, sign)), probe, where)

    def _learn(self, keys) -> None:
        n = len(keys)
        for i in range(n - 1, -1, -1):   # as online-probe: a variable seen twice keeps its first remainder
            self.by_offset[keys[i][2]] = n - i
        super()._learn([k[:2] for k in keys])


def remaining_runs(trace) -> list[int]:
    """Per access, the length of the same-sign %gs run it starts in its address space's slot (a kernel
    event on that space's slots, a reload or a carry at a switch, ends a run)."""
    after_event: set[int] = set()     # accesses that are their space's first after a kernel event
    pending: set[int] = set()
    events = iter(trace.events)
    event = next(events, None)
    for i in range(len(trace)):
        while event is not None and event[0] <= i:
            pending.add(event[2])
            event = next(events, None)
        if trace.space[i] in pending:
            pending.discard(trace.space[i])
            after_event.add(i)
    rem = [0] * len(trace)
    after: dict = {}
    for i in range(len(trace) - 1, -1, -1):
        if trace.segment[i] != 1:
            continue
        slot = (trace.space[i], trace.selector[i])
        sign = trace.offset[i] >> 31
        j = after.get(slot)
        rem[i] = rem[j] + 1 if j is not None and trace.offset[j] >> 31 == sign and j not in after_event else 1
        after[slot] = i
    return rem


def last_value_oracle(truth: list[int]):
    class LastValueOracle(OnlineStrategy):
        """Not online: knows each fault's true remaining run after the fact; decides by the site's last one."""

        name = "last-value oracle (offline)"
        online = False

        def __init__(self, options=None) -> None:
            super().__init__(options)
            self.last: dict = {}

        def decide(self, trap, insn, sign):
            v = trap.violation
            site = (v.eip, sign)
            estimate = self.last.get(site)
            self.last[site] = truth[trap.domain.access_index]
            if estimate is not None and estimate > self.threshold:
                return self.flip(trap)
            return self.emulate(trap, insn)
    return LastValueOracle


def rules(trace) -> list[type]:
    shipped = [STRATEGIES[n] for n in online_names()     # patching and lookahead read guest code
               if not STRATEGIES[n].patches_code and not STRATEGIES[n].reads_guest_memory]
    return [EmulateRule, FlipRule, *shipped, RateUncapped, ReprobeEvery4, ReprobeEvery16, NeverReprobe, SkiRental,
            OffsetPrior, last_value_oracle(remaining_runs(trace))]


def recorded(cell, fresh: bool):
    """(trace, native sign runs, note) for a native cell, from the cache when it holds this guest's."""
    domain, guest = make_domain(cell.spec, trace_signs=True)
    native = domain.run()
    runs, dropped = domain.sign_runs("gs")
    if not native.ok or dropped:
        return None, None, "the native run failed or its sign trace overflowed"
    negative = domain.counters()["segments"]["gs"]["negative"]
    key = f"{cell.id}-{sha256_file(guest.path)[:16]}-{source_digest()}-{CACHE_FORMAT}"
    path = user_cache_dir() / "replay" / f"{key}.pkl.gz"
    if path.exists() and not fresh:
        with gzip.open(path, "rb") as f:
            trace = pickle.load(f)
        if trace.negative_gs_accesses() == negative:    # else stale (a root or rc script changed): record again
            return trace, runs, "cached"
    trace, result = record_accesses(cell.spec)
    if not result.ok or result.stdout != native.stdout or trace.negative_gs_accesses() != negative:
        return None, None, "the recording run did not reproduce native's output and accesses"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wb") as f:
        pickle.dump(trace, f)
    os.replace(tmp, path)
    return trace, runs, "recorded"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="*", default=[], help="only workloads whose name contains one of these")
    ap.add_argument("--boot", action="store_true", help="include the boot workload (long to record)")
    ap.add_argument("--fresh", action="store_true", help="record again even where the cache has a recording")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    cells = [c for c in load_spec(None).cells() if c.spec.strategy == "native" and c.backend == "unicorn"]
    results = []
    for cell in cells:
        key = f"{cell.workload} ({cell.spec.variant})"
        if cell.skip or (args.workloads and not any(w in key for w in args.workloads)):
            continue
        if cell.spec.args[-1:] == ("/data/rc",) and not args.boot:
            continue
        started = time.monotonic()
        trace, runs, note = recorded(cell, args.fresh)
        if trace is None:
            print(f"{key}: skipped, {note}", file=sys.stderr)
            continue
        negative_sites = {trace.eip[i] for i in range(len(trace))
                          if trace.segment[i] == 1 and trace.offset[i] & 0x8000_0000}
        row = {"workload": key, "accesses": len(trace), "negative": trace.negative_gs_accesses(),
               "negative_sites": len(negative_sites), "by_profile": {}}
        for prices in PROFILES:
            profile = costmodel.get_profile(prices)
            e, f = costmodel.fault_prices(profile)
            bound = hybrid.optimal_over(runs, e, f).cost_ns
            figures = {"bound_ns": bound, "run-length oracle": hybrid.run_oracle_over(runs, e, f).cost_ns / bound}
            for rule in rules(trace):
                r = replay(trace, replaying(rule)(PriceOptions(prices)))
                figures[rule.name] = r.fault_ns(profile) / bound
            row["by_profile"][prices] = figures
        results.append(row)
        print(f"{key}: {len(trace):,} accesses, {note}, {time.monotonic() - started:.1f} s", file=sys.stderr)

    if not results:
        print("no workload matched", file=sys.stderr)
        return 2
    for prices in PROFILES:
        report(prices, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"schema": "tlslab.online-design/1", "rows": results}, indent=1))
    return 0


def report(prices: str, results: list[dict]) -> None:
    names = [n for n in results[0]["by_profile"][prices] if n not in ("bound_ns", EmulateRule.name, FlipRule.name)]
    fitted = " (FITTED profile)" if costmodel.get_profile(prices).kind == "fitted" else ""
    print(f"\nfault-handling time / offline bound, deciding and priced with {prices}{fitted} (replays)")
    short = {n: n.replace("online-", "").replace("probe, ", "p ").replace("re-probe ", "re")
             .replace("probe from a site's 2nd fault", "p 2nd").replace("p offset prior", "p offset").replace("last-value oracle (offline)", "last*")
             .replace("run-length oracle", "oracle*").replace("rate, gaps uncapped", "rate inf")[:9] for n in names}
    print(f"{'workload':34} {'-ve/site':>8} {'emul':>6} {'flip':>6} " + " ".join(f"{short[n]:>9}" for n in names))
    tally = {n: [0, 0] for n in names}
    for row in results:
        fig = row["by_profile"][prices]
        best_pure = min(fig[EmulateRule.name], fig[FlipRule.name])
        cells = []
        for n in names:
            at_most, near = fig[n] <= best_pure * (1 + 1e-9), fig[n] <= 1.10
            tally[n][0] += at_most
            tally[n][1] += near
            cells.append(f"{fig[n]:7.2f}{'*' if at_most else ' '}{'+' if near else ' '}")
        per_site = row["negative"] / max(1, row["negative_sites"])
        print(f"{row['workload'][:34]:34} {per_site:8.1f} {fig[EmulateRule.name]:6.2f} {fig[FlipRule.name]:6.2f} "
              + " ".join(cells))
    print("-ve/site: negative %gs accesses per site that makes them (each faults once under emulate: how often a "
          "rule meets each site it could learn)")
    print("*: at most min(emulate, flip); +: within 10 % of the bound; oracle* and last* are not online")
    for n in names:
        print(f"  {n}: at most min(emulate, flip) on {tally[n][0]} of {len(results)}, "
              f"within 10 % of the bound on {tally[n][1]} of {len(results)}")


if __name__ == "__main__":
    sys.exit(main())
