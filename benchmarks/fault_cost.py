"""Per-fault overhead of emulate and flip, model (Unicorn) and hw (ptrace supervisor), side by side.

    .venv/bin/python benchmarks/fault_cost.py [--rounds 3] [--tree 4k] [--cpu 0]

Issue 14 sets targets in microseconds per fault; this is the baseline they are
measured against. Workload: lsr on the synthetic tree (``RunSpec("lsr",
strategy=..., tree="4k")``, stdout to /dev/null). Each round runs, for each
backend, native then emulate then flip, so drift hits all alike:

  per-fault overhead = (wall of the strategy run - wall of the native run) / faults

computed per round and reported as the median of the rounds. "model" is the
default, where the access hook settles emulate and flip faults itself
(tlslab/machine/settle.py); "model-python" takes every fault through the
Python strategy (``Domain(settle=False)``), the path before. Model wall time is
the run loop (``RunResult.wall_seconds``, ELF load excluded), faults are the
strategy's #GP traps; hw wall time is exec to reaped (``HwResult.run_seconds``),
faults the supervisor's count. Each round also times machine_speed.py's
checks-on vs plain-Unicorn runs (its ``one_run``, reused; which runs first
alternates by round) for instructions per second; machine_speed.py is the
fuller measurement. The load average is printed before and after: on a busy
host the figures are not baselines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from machine_speed import one_run  # noqa: E402

from tlslab.experiment import RunSpec, make_domain  # noqa: E402
from tlslab.guests import resolve_guest  # noqa: E402
from tlslab.hw.backend import HwError, run_spec  # noqa: E402

STRATEGIES = ("native", "emulate", "flip")


def model_run(strategy: str, tree: str, settle: bool = True) -> tuple[float, int]:
    """(run-loop seconds, #GP traps) of one model run (``settle=False``: every fault through Python)."""
    domain, _ = make_domain(RunSpec("lsr", strategy=strategy, tree=tree, stdout="null"), settle=settle)
    result = domain.run()
    assert result.ok and result.status == 0, f"model {strategy}: lsr exited {result.status} {result.crash}"
    return result.wall_seconds, int(result.counters["strategy"]["traps"])


def hw_run(strategy: str, tree: str, cpu: int) -> tuple[float, int]:
    """(exec-to-reaped seconds, faults) of one hw run; HwError (HwUnavailable included) if it cannot run."""
    result, _ = run_spec(RunSpec("lsr", strategy=strategy, tree=tree, stdout="null"), cpu=cpu)
    if not result.ok or result.status != 0:
        raise HwError(f"{strategy}: lsr exited {result.status} signal {result.signal} ({result.stopped})")
    return result.run_seconds, result.faults


def per_fault_us(rounds: list[dict[str, tuple[float, int]]], strategy: str) -> tuple[float, int]:
    """Median over rounds of (strategy wall - native wall) / faults, in us; and the faults of the last round."""
    values = [(r[strategy][0] - r["native"][0]) / r[strategy][1] * 1e6 for r in rounds]
    return statistics.median(values), rounds[-1][strategy][1]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds (median reported)")
    ap.add_argument("--tree", default="4k", help="synthetic tree (default 4k)")
    ap.add_argument("--cpu", type=int, default=0, help="hw backend: CPU to pin tracer and guest to")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"commit: {commit}")
    print(f"workload: lsr on the {args.tree} tree, stdout /dev/null, median of {args.rounds} rounds")
    print(f"loadavg before: {loadavg()}")
    lsr = str(resolve_guest("lsr").path)

    model_run("native", args.tree)   # warm: fast-path build, page cache
    hw_reason = None
    try:
        hw_run("native", args.tree, args.cpu)
    except HwError as exc:
        hw_reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    model_rounds, python_rounds, hw_rounds, ips_on, ips_off = [], [], [], [], []
    for round_ in range(args.rounds):
        model_rounds.append({s: model_run(s, args.tree) for s in STRATEGIES})
        python_rounds.append({s: model_run(s, args.tree, settle=False) for s in STRATEGIES})
        if hw_reason is None:
            try:
                hw_rounds.append({s: hw_run(s, args.tree, args.cpu) for s in STRATEGIES})
            except HwError as exc:
                hw_reason = str(exc).splitlines()[0]
        # the first run after the hw runs starts with colder caches: alternate which one it is
        if round_ % 2:
            t_off, _, _ = one_run(lsr, args.tree, False)
            t_on, instructions, _ = one_run(lsr, args.tree, True)
        else:
            t_on, instructions, _ = one_run(lsr, args.tree, True)
            t_off, _, _ = one_run(lsr, args.tree, False)
        ips_on.append(instructions / t_on)
        ips_off.append(instructions / t_off)

    for backend, rounds in (("model", model_rounds), ("model-python", python_rounds), ("hw", hw_rounds)):
        if backend == "hw" and hw_reason is not None:
            for s in STRATEGIES[1:]:
                print(f"hw {s} unavailable: {hw_reason}")
            continue
        native_ms = statistics.median(r["native"][0] for r in rounds) * 1000
        print(f"{backend} native wall ms: {native_ms:.1f}")
        for s in STRATEGIES[1:]:
            us, faults = per_fault_us(rounds, s)
            wall_ms = statistics.median(r[s][0] for r in rounds) * 1000
            print(f"{backend} {s} wall ms: {wall_ms:.1f} faults: {faults}")
            print(f"{backend} {s} per-fault us: {us:.1f}")
    on, off = statistics.median(ips_on), statistics.median(ips_off)
    print(f"model checks on M instructions/s: {on / 1e6:.2f}")
    print(f"plain unicorn M instructions/s: {off / 1e6:.2f}")
    print(f"ratio checks on / plain: {on / off:.2f}")
    print(f"loadavg after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
