"""Processes and threads in the model: byte-identical to the host, deterministic, and safe.

The oracle is the host: the same programs, chrooted into the same pinned root
(as uid 1000, with the same environment and data mount), run untraced by the
hw backend's launcher; their stdout must equal the model's under every
strategy that does not refuse. Determinism: two runs, identical counters.
Safety: a thread never runs before its TLS descriptor is installed through the
policy, a CLONE_SETTLS descriptor is truncated like any other, and a fork bomb
or a child that never exits ends the run with a report.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import host_output, unavailable
from tlslab.experiment import RunSpec, make_domain
from tlslab.hypervisor.strategies import STRATEGIES
from tlslab.linux import kernel as K
from tlslab.machine import layout

BOOT = Path(__file__).resolve().parent.parent / "guests" / "boot"
XEN_NONPAE_TOP = 0xFC000000

SCRIPTS = {
    "loop-pipe": "for d in /usr/lib/python3.11/json /usr/lib/python3.11/email; do ls $d | wc -l; done",
    "pipeline": "ls /usr/lib/python3.11 | grep -c py | sed s/^/count:/",
    "substitution": 'n=$(ls /usr/lib | wc -l); x=$(echo "$n dirs" | tr a-z A-Z); echo "$x"; echo $(( n * 2 ))',
    "status": "false; echo $?; ls /nonexistent 2>&1 | sed s/:.*//; echo done",
}


def native(spec: RunSpec) -> bytes:
    return host_output(spec, "the native comparison runs chrooted, which needs root")


def model(spec: RunSpec, strategy: str):
    domain, _ = make_domain(RunSpec(**{**spec.to_dict(), "strategy": strategy, "args": tuple(spec.args)}))
    return domain.run(), domain


def _identical_under_every_strategy(spec: RunSpec, want: bytes) -> dict:
    outcomes = {}
    for strategy in STRATEGIES:
        result, _ = model(spec, strategy)
        if result.crash is not None:
            # a refusal is a named stop, never wrong output
            # emulate-2004 decodes only 2004's forms; rewrite and rewrite-2004 follow fork, exec and threads
            assert strategy == "emulate-2004", f"{strategy}: {result.crash.describe()}"
            outcomes[strategy] = "refused"
            continue
        assert result.status == 0, (strategy, result.stderr)
        assert result.stdout == want, f"{strategy}: stdout differs from the host's"
        outcomes[strategy] = result.counters["strategy"]["traps"]
    return outcomes


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_dash_scripts_match_the_host(debian_rootfs, name):
    spec = RunSpec("/bin/dash", ("-c", SCRIPTS[name]), rootfs="debian", tree=None)
    want = native(spec)
    assert want
    outcomes = _identical_under_every_strategy(spec, want)
    assert outcomes["emulate"] > 0 and outcomes["flip"] >= outcomes["emulate"] * 0.5


@pytest.mark.parametrize("build", ["threads", "threads.nosegneg", "threads.dyn"])
def test_threads_match_the_host(debian_rootfs, build):
    spec = RunSpec(build, ("4", "60"), tree="small")
    want = native(spec)
    assert b"ok" in want
    outcomes = _identical_under_every_strategy(spec, want)
    assert outcomes["native"] == 0


def test_boot_matches_the_host_and_starts_hundreds_of_processes(debian_rootfs):
    spec = RunSpec("/bin/dash", ("/data/rc",), rootfs="debian", root=str(BOOT), tree=None)
    want = native(spec)
    assert want == (BOOT / "rc.stdout").read_bytes()
    result, domain = model(spec, "flip")
    assert result.ok and result.status == 0 and result.stdout == want
    k = result.counters["kernel"]
    assert k["processes"] >= 300
    programs = {p["program"] for p in k["listing"]}
    assert {"/bin/dash", "/bin/sed", "/bin/grep"} <= programs
    assert all(p["exit_status"] is not None or p["exit_signal"] for p in k["listing"])


def test_two_runs_give_identical_counters(debian_rootfs):
    for spec in (RunSpec("threads.dyn", ("4", "40"), tree="small", strategy="flip"),
                 RunSpec("/bin/dash", ("-c", SCRIPTS["substitution"]), rootfs="debian", tree=None,
                         strategy="emulate")):
        a, _ = model(spec, spec.strategy)
        b, _ = model(spec, spec.strategy)
        assert a.ok and b.ok
        assert a.counters == b.counters and a.sites == b.sites and a.stdout == b.stdout


def test_a_thread_never_runs_before_its_truncated_descriptor(debian_rootfs, monkeypatch):
    """Every switch into a thread finds the GDT TLS slot holding the policy-shaped form of *its* TCB."""
    seen: list[tuple[int, object, object]] = []
    original = K.Kernel.switch_to

    def recording_switch(self, task):
        original(self, task)
        slot = layout.GDT_ENTRY_TLS_MIN
        seen.append((task.tid, task.tls.get(slot), task.process.vcpu.descriptors[slot]))

    monkeypatch.setattr(K.Kernel, "switch_to", recording_switch)
    result, domain = model(RunSpec("threads", ("4", "20"), tree="small"), "emulate")
    assert result.ok
    tids = {tid for tid, _, _ in seen}
    assert len(tids) >= 5  # main + 4 workers, each switched in
    for tid, requested, installed in seen:
        assert requested is not None, f"tid {tid} ran with no TLS descriptor"
        assert installed is not None and installed.base == requested.base
        # CLONE_SETTLS descriptors are truncated like set_thread_area's: below the hypervisor
        assert not installed.expand_down or installed.base < XEN_NONPAE_TOP
        assert installed.base + installed.effective_limit < XEN_NONPAE_TOP or installed.expand_down
    first_install = {}
    for tid, requested, installed in seen:
        first_install.setdefault(tid, (requested, installed))
    for tid, (requested, installed) in first_install.items():
        assert installed == domain.policy(requested), f"tid {tid}: first run with an unshaped descriptor"
    assert result.counters["kernel"]["tls_reloads"] > 0


def test_flip_pays_again_after_every_thread_switch(debian_rootfs):
    """The per-slot reload at each switch reverts flips: flip faults exceed the single-thread sign changes."""
    result, _ = model(RunSpec("threads", ("4", "40"), tree="small"), "flip")
    assert result.ok
    reloads = result.counters["kernel"]["tls_reloads"]
    assert reloads >= 4 * 40
    assert result.counters["strategy"]["traps"] >= result.counters["segments"]["gs"]["sign_changes"]


def _static(tmp_path, name: str, source: str) -> str:
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    exe = tmp_path / name
    if subprocess.run(["gcc", "-m32", "-O2", "-static", "-o", str(exe), str(src)], capture_output=True).returncode:
        unavailable("gcc -m32 -static (gcc-multilib) unavailable")
    return str(exe)


def test_fork_bomb_is_stopped_with_a_report(tmp_path, monkeypatch):
    exe = _static(tmp_path, "bomb", "#include <unistd.h>\nint main(void){for(;;) fork(); }\n")
    monkeypatch.setattr(K, "MAX_PROCESSES", 200)
    monkeypatch.setattr(K, "MAX_LIVE", 64)
    domain, _ = make_domain(RunSpec(exe, strategy="flip", tree="small", timeout_seconds=120))
    domain.kernel.max_processes, domain.kernel.max_live = 200, 64
    result = domain.run()
    assert not result.ok
    assert "fork bomb" in result.crash.reason or "every task is blocked" in result.crash.reason \
        or result.counters["kernel"]["killed_at_end"]
    k = result.counters["kernel"]
    assert k["processes"] <= 200 and all(not p.get("alive", False) for p in k["listing"])


def test_children_that_never_exit_are_killed_when_init_exits(tmp_path):
    exe = _static(tmp_path, "orphans", "#include <unistd.h>\n#include <stdio.h>\nint main(void){"
                  "for(int i=0;i<3;i++) if(fork()==0){for(;;);} puts(\"parent done\"); return 0; }\n")
    result, _ = model(RunSpec(exe, tree="small", timeout_seconds=120), "native")
    assert result.ok and result.status == 0 and result.stdout == b"parent done\n"
    k = result.counters["kernel"]
    assert len(k["killed_at_end"]) == 3 and k["end_reason"] == "init exited"


def test_a_spinning_child_does_not_hang_the_lab(tmp_path):
    exe = _static(tmp_path, "waiter", "#include <unistd.h>\n#include <sys/wait.h>\nint main(void){"
                  "if(fork()==0){for(;;);} wait(0); return 0; }\n")
    result, _ = model(RunSpec(exe, tree="small", timeout_seconds=3), "native")
    assert not result.ok and "timed out" in result.crash.reason
    assert result.counters["kernel"]["killed_at_end"]


def test_boot_faults_on_the_cpu_equal_the_model(debian_rootfs, oracle_summary):
    """Keir's "2.5 million faults to boot" question, today: the real CPU takes the model's faults.

    Equal within a handful of faults out of ~260,000 (measured: emulate 259,190 in the model, 259,191
    on the CPU; flip 320,416 vs 320,418): a flip belongs to the thread on Linux
    (ptrace rewrites the thread's own TLS array, which a forked child inherits flipped) while the model
    follows XenLinux, where a flip lives in the CPU's GDT slot and a slot is rewritten only when the
    next task's descriptor differs (README, hw backend); the host's run-to-run wobble is one fault.
    """
    try:
        from tlslab.hw.backend import HwUnavailable, run_spec
    except ImportError as exc:  # pragma: no cover
        unavailable(f"hw backend: {exc}")
    if os.geteuid() != 0:
        unavailable("the hw backend runs root-filesystem programs chrooted, which needs root")
    spec = RunSpec("/bin/dash", ("/data/rc",), rootfs="debian", root=str(BOOT), tree=None)
    for strategy, tolerance in (("emulate", 0.00002), ("flip", 0.0001)):
        try:
            hw, _ = run_spec(RunSpec(**{**spec.to_dict(), "strategy": strategy, "args": spec.args}))
        except HwUnavailable as exc:
            unavailable(f"cannot run on this CPU: {exc}")
        result, _ = model(spec, strategy)
        faults = result.counters["strategy"]["traps"]
        oracle_summary[f"boot {strategy}"] = f"model {faults:,} faults, CPU {hw.faults:,}"
        assert hw.ok and result.ok and hw.stdout == result.stdout
        assert len(hw.processes) == result.counters["kernel"]["processes"]
        assert abs(hw.faults - faults) <= tolerance * faults, (strategy, faults, hw.faults)
