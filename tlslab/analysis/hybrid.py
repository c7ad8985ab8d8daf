"""How well could *any* fault-driven policy do? Emulate vs flip vs the best hybrid.

After a #GP on a truncated segment a hypervisor can emulate the access (the
segment stays as it is, the next access of the same sign faults again) or flip
the segment (this access and the following ones of the same sign run free,
the next one of the other sign faults). Given the exact sequence of signs of
the guest's %gs offsets (a run-length list from a native run) and the price
of each action, dynamic programming over the two segment states gives the
cheapest possible sequence of decisions -- an offline optimum no policy that
only emulates and flips can beat (a policy that also rewrites code, such as
online-patch, can: a patched site never faults again). Pure emulate, pure flip and an online predictor are priced on the
same sequence; pure emulate and pure flip are also cross-checked against the
trap counts those strategies really take.

State "up" (truncated expand-up) admits offsets >= 0; "down" (expand-down)
admits negative ones. Xen starts every segment "up".

A 0 in a run list is a break: another thread ran on that address space, and
the slot may have been rewritten (XenLinux rewrites a TLS slot at a switch
when the threads' descriptors differ) or carried over. The offline bound
relaxes every break and the start of every address space after the first to
"either state, free": a relaxation, so it stays a bound no real emulate/flip
policy beats.
The pure policies follow the model (a break leaves the slot truncated, "up").
"""

from __future__ import annotations

from dataclasses import dataclass


def negative_gs_sites(sites) -> tuple[int, int]:
    """(negative %gs accesses, sites making them) from a run's per-site counters (``RunResult.sites``).

    Under a truncated segment each negative access faults, so their ratio is how often a fault-driven
    rule meets each site it could learn about; the bound's faults over the sites, how many decisions
    there are per site to repay learning it.
    """
    negative = [site["negative"] for site in sites or () if site.get("segment") == "gs" and site.get("negative")]
    return sum(negative), len(negative)


def describe_sites(negative_accesses: int, negative_sites: int, bound_faults: int) -> str:
    """The figures of :func:`negative_gs_sites` with the bound's faults, in words (summary, report, hybrid)."""
    return (f"{negative_accesses:,} negative %gs accesses at {negative_sites:,} sites "
            f"({negative_accesses / negative_sites:,.1f} per site; the bound's {bound_faults:,} faults, "
            f"{bound_faults / negative_sites:,.1f} per site)")


@dataclass(frozen=True)
class PolicyCost:
    policy: str
    emulations: int
    flips: int
    cost_ns: float

    @property
    def faults(self) -> int:
        return self.emulations + self.flips


def pure_emulate(runs: list[int], emulate_ns: float, flip_ns: float) -> PolicyCost:
    n = sum(-r for r in runs if r < 0)   # every negative access faults once; breaks change nothing
    return PolicyCost("emulate (always)", n, 0, n * emulate_ns)


def pure_flip(runs: list[int], emulate_ns: float, flip_ns: float) -> PolicyCost:
    flips, up = 0, True
    for r in runs:
        if r == 0:
            up = True
            continue
        if (r > 0) != up:
            flips += 1
            up = r > 0
    return PolicyCost("flip (always)", 0, flips, flips * flip_ns)


def predictive(runs: list[int], emulate_ns: float, flip_ns: float) -> PolicyCost:
    """Online: on a fault, flip iff the previous run of this sign was long enough to pay for it."""
    last = {True: 1, False: 1}
    up, emulations, flips = True, 0, 0
    for r in runs:
        if r == 0:
            up = True
            continue
        positive = r > 0
        length = abs(r)
        if positive != up:
            if last[positive] * emulate_ns > flip_ns:
                flips += 1
                up = positive
            else:
                emulations += length
        last[positive] = length
    return PolicyCost("predictive (online)", emulations, flips, emulations * emulate_ns + flips * flip_ns)


def optimal(runs: list[int], emulate_ns: float, flip_ns: float, start_free: bool = False) -> PolicyCost:
    """Offline optimum over fault-driven decisions (one flip or all-emulate per wrong-state run).

    ``start_free``: the segment may start in either state (an address space
    forked from another one, see the module docstring).
    """
    inf = float("inf")
    # state -> (cost, emulations, flips)
    up, down = (0.0, 0, 0), ((0.0, 0, 0) if start_free else (inf, 0, 0))
    for r in runs:
        if r == 0:
            up = down = min(up, down)
            continue
        length = abs(r)
        if r > 0:
            stay_up = up
            flip_up = (down[0] + flip_ns, down[1], down[2] + 1)
            new_up = min(stay_up, flip_up)
            new_down = (down[0] + length * emulate_ns, down[1] + length, down[2])
        else:
            stay_down = down
            flip_down = (up[0] + flip_ns, up[1], up[2] + 1)
            new_down = min(stay_down, flip_down)
            new_up = (up[0] + length * emulate_ns, up[1] + length, up[2])
        up, down = new_up, new_down
    best = min(up, down)
    return PolicyCost("optimal hybrid (offline bound)", best[1], best[2], best[0])


def run_oracle(runs: list[int], emulate_ns: float, flip_ns: float) -> PolicyCost:
    """Offline, but only one run deep: at each wrong-state run it knows that run's length, nothing after it.

    It flips where the run is longer than ``2 * flip_ns / emulate_ns`` accesses and
    emulates the run otherwise: the threshold rule online-probe approximates
    (docs/online-strategies.md), given each run's exact length. Its distance to
    ``optimal`` is what that rule leaves on the table however well run lengths
    are learnt (the optimum may depend on runs further ahead). It is not a
    bound on online rules: one that decides differently (online-site, say)
    can do better. A break leaves the slot "up", as for the pure policies.
    """
    threshold = 2 * flip_ns / emulate_ns if emulate_ns > 0 else float("inf")   # free emulation: never flip
    up, emulations, flips = True, 0, 0
    for r in runs:
        if r == 0:
            up = True
            continue
        if (r > 0) != up:
            if abs(r) > threshold:
                flips += 1
                up = r > 0
            else:
                emulations += abs(r)
    return PolicyCost("run-length oracle (one run deep)", emulations, flips,
                      emulations * emulate_ns + flips * flip_ns)


POLICIES = (pure_emulate, pure_flip, predictive, run_oracle, optimal)


def compare(runs: list[int], emulate_ns: float, flip_ns: float) -> list[PolicyCost]:
    return [policy(runs, emulate_ns, flip_ns) for policy in POLICIES]


def _over(traces: list[list[int]], one, name: str) -> PolicyCost:
    """The sum of ``one(i, runs)`` over every address space's trace."""
    emulations = flips = 0
    cost = 0.0
    for i, runs in enumerate(traces):
        c = one(i, runs)
        emulations, flips, cost = emulations + c.emulations, flips + c.flips, cost + c.cost_ns
    return PolicyCost(name, emulations, flips, cost)


def optimal_over(traces: list[list[int]], emulate_ns: float, flip_ns: float) -> PolicyCost:
    """The offline bound of a whole run: every address space's trace, the first one starting "up"."""
    return _over(traces, lambda i, runs: optimal(runs, emulate_ns, flip_ns, start_free=i > 0),
                 "optimal hybrid (offline bound)")


def run_oracle_over(traces: list[list[int]], emulate_ns: float, flip_ns: float) -> PolicyCost:
    """``run_oracle`` over every address space's trace (each one starting "up")."""
    return _over(traces, lambda i, runs: run_oracle(runs, emulate_ns, flip_ns), "run-length oracle (one run deep)")
