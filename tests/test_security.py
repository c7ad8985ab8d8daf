"""Security is part of correctness (issue #4 item 5): adversarial guests vs every strategy.

For every strategy in the registry (``tlslab.hypervisor.strategies.STRATEGIES``,
read at run time) at least 10,000 deterministic, keystone-assembled guest
sequences (tests/adversary/generator.py) run on a real Domain under both
hypervisor profiles, and an oracle that is independent of the code under test
(tests/adversary/harness.py: a whole-address-space Unicorn memory hook decoded
with capstone, a wrapper around ``GuestAccess``, and ``check_data_access`` on
the installed descriptor) asserts:

* no committed guest access and no emulated access has a real linear address
  in the hypervisor hole (or above user space, outside the blind spot that
  layout.py documents and the GDT reads _fastpath.c allows by design);
* no Python exception escapes the lab (vCPU, fast path, Linux personality,
  strategy handlers);
* every access the segment check refuses stops the vCPU before it commits,
  and every reported violation is one the check refuses (precise stops).

A named regression set of nasty cases runs first. Set TLSLAB_ADVERSARY_N to
change the count per strategy, TLSLAB_ADVERSARY_SEED the seed.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from adversary import generator as G
from adversary import harness as H

SEED = int(os.environ.get("TLSLAB_ADVERSARY_SEED", "20041012"))
N_PER_STRATEGY = int(os.environ.get("TLSLAB_ADVERSARY_N", "10000"))
PROFILES = ("nonpae", "pae")
# every counter of the harness that must stay zero, all of them asserted
MUST_BE_ZERO = ("hole", "lab_exceptions", "silent_commit", "outside_user", "spurious_violation", "emu_wrong_linear",
                "emu_beyond_request", "null_selector_commits", "exits_cap", "timeouts", "unsafe_survived",
                "commit_beyond_request")


def _explain(strategy: str, st: H.Stats) -> str:
    lines = [f"{strategy}: " + ", ".join(f"{k}={getattr(st, k)}" for k in MUST_BE_ZERO)]
    for kind, detail, listing in st.failures:
        lines += [f"--- {kind}", detail, listing]
    return "\n".join(lines)


# ------------------------------------------------------------------ regression set
@pytest.mark.parametrize("strategy", list(H.STRATEGIES))
def test_named_nasty_cases(strategy, monkeypatch):
    H.install_emulation_oracle(monkeypatch)
    cases = G.regression_cases()
    assert all(c.dropped == 0 for c in cases), "keystone refused a regression case"
    st = H.Stats()
    for profile in PROFILES:
        H.run_many(strategy, profile, cases, st)
    assert st.sequences == 2 * len(cases)
    assert st.refused > 0
    # every named case makes an access that must kill the guest, and every one of them is killed
    assert st.fatal_refusals > 0 and st.guest_faults == st.sequences, _explain(strategy, st)
    bad = {k: getattr(st, k) for k in MUST_BE_ZERO if getattr(st, k)}
    assert not bad, _explain(strategy, st)


# ------------------------------------------------------------------ the adversarial run
_SEQUENCES: list = []


def _worker(task):
    strategy, profile, lo, hi = task
    H.install_emulation_oracle()   # a forked worker: patch for good
    st = H.run_many(strategy, profile, _SEQUENCES[lo:hi])
    return strategy, profile, st


def _summary(results: dict[str, H.Stats], wall: float, gen_seconds: float) -> str:
    cols = ("sequences", "reached_handler", "accesses", "committed", "refused", "violations", "traps_handled", "emulated",
            "blind_spot", "hv_page_reads", "hole", "lab_exceptions", "silent_commit", "outside_user",
            "spurious_violation", "refused_as_page_fault", "null_selector_commits", "emu_wrong_linear",
            "emu_beyond_request", "exits_cap", "timeouts", "ping_pong", "fatal_livelock", "blind_survived", "commit_beyond_request", "fatal_refusals", "unsafe_survived", "guest_faults", "seconds")
    short = ("seqs", "faulted", "accesses", "committed", "refused", "#GP exits", "handled", "emulated", "blind", "GDT rd",
             "HOLE", "LAB EXC", "silent", "outside", "spurious", "ref.as PF", "null-sel", "emu≠lin", "emu>req",
             "exit cap", "timeout", "pingpong", "fatal-hang", "blind-ok", "beyond-req", "fatal", "UNSAFE OK", "guest flt", "cpu s")
    w = [max(len(s), 9) for s in short]
    out = [f"adversarial security run: seed {SEED}, {N_PER_STRATEGY} sequences per strategy "
           f"(half nonpae, half pae), generation {gen_seconds:.1f} s, wall {wall:.1f} s",
           "strategy      " + " ".join(s.rjust(n) for s, n in zip(short, w))]
    for name, st in results.items():
        vals = [f"{getattr(st, c):.1f}" if c == "seconds" else str(getattr(st, c)) for c in cols]
        out.append(f"{name:<13} " + " ".join(v.rjust(n) for v, n in zip(vals, w)))
    return "\n".join(out)


@pytest.mark.slow
def test_adversarial_sequences_never_reach_the_hole(capsys):
    started = time.perf_counter()
    _SEQUENCES[:] = [G.generate(SEED, i) for i in range(N_PER_STRATEGY)]
    gen_seconds = time.perf_counter() - started
    assert sum(s.dropped for s in _SEQUENCES) == 0, "keystone refused generated instructions"
    half = N_PER_STRATEGY // 2
    tasks = [(name, profile, lo, hi) for name in H.STRATEGIES
             for profile, lo, hi in (("nonpae", 0, half), ("pae", half, N_PER_STRATEGY))]
    results: dict[str, H.Stats] = {name: H.Stats() for name in H.STRATEGIES}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(2, os.cpu_count() or 1)) as pool:
        for name, _profile, st in pool.imap_unordered(_worker, tasks):
            results[name].merge(st)
    wall = time.perf_counter() - started
    table = _summary(results, wall, gen_seconds)
    with capsys.disabled():
        print("\n" + table)
    problems = []
    for name, st in results.items():
        assert st.sequences == N_PER_STRATEGY, f"{name}: {st.sequences} sequences, not {N_PER_STRATEGY}"
        # the generator is doing its job: most sequences meet a refusal under truncation
        if H.STRATEGIES[name].truncates:
            assert st.reached_handler >= st.sequences // 3, f"{name}: only {st.reached_handler} sequences faulted"
        # flip's known livelock (an instruction whose accesses straddle offset 0 under a truncated segment,
        # e.g. `lfs ecx, gs:[-4]`: no expand-up or expand-down segment admits both): rare, listed, bounded
        # (10,000 sequences, seed 20041012: flip-full 5, flip-fs 5, rewrite 4, of them 1 each on an access the
        # guest's own descriptor refuses: the guest hangs where it should die -- see fatal_livelock)
        assert st.ping_pong <= max(5, st.sequences // 500), f"{name}: {st.ping_pong} ping-pong sequences"
        assert st.fatal_livelock <= max(1, st.sequences // 5000), f"{name}: {st.fatal_livelock} fatal livelocks"
        # after a fatal refusal, the guest went on only through the documented blind spot (rewrite's %fs twin in
        # slot 7 reads [1 GiB, 2 GiB) at its 3 GiB-shifted alias; 10,000 sequences: rewrite 1)
        assert st.blind_survived <= max(1, st.sequences // 5000), f"{name}: {st.blind_survived} blind-spot survivals"
        assert name.startswith(("flip", "rewrite")) or st.ping_pong == 0, f"{name} ping-pongs"
        if any(getattr(st, k) for k in MUST_BE_ZERO):
            problems.append(_explain(name, st))
    assert not problems, table + "\n\n" + "\n\n".join(problems)
