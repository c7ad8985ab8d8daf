"""online-patch on the CPU: the supervisor rewrites code with the model's rule (tlslab/hw/supervisor/patch.c).

tests/test_hw_online.py checks the static guests (lsr, syscalls, malloc, canary; both builds, both
price profiles) fault for fault. Here the cases where patching meets the rest of the system:

* a dynamic program: the safety policy ``auto`` is ``lib`` there (the shared objects under /lib,
  never the executable), read from /proc/PID/maps and /proc/PID/auxv on the CPU and from the model's
  VMAs in the model: the same sites refused with the same reasons, the same patches, and the
  library file in the root keeps its bytes (patches go to private copies of the pages);
* a program that loads its own %fs (fs-user): the fs-twin ABI notices it, every rewritten site gets
  its gs prefix back and patching stops, with the model's counts;
* patch policy ``none``: nothing is rewritten and every fault is online-probe's decision, as in the model;
* threads: each thread gets the twin of its own TCB and the output is native's;
* fork: a child runs its parent's rewritten code without faulting there.

Skips (with the reason) where the host cannot run 32-bit code or ptrace is refused; with CI=true in
the environment those become failures.
"""

from __future__ import annotations

import hashlib

import pytest

from conftest import build_c_guest, unavailable

from test_hw_online import hw_ok  # noqa: F401  (the fixture: skip or fail where the hw backend cannot run)
from tlslab.hw import backend
from tlslab.hw.backend import run_spec

pytestmark = pytest.mark.oracle


def both(spec):
    """The model's run, its strategy counters and the CPU's run of ``spec``."""
    from test_hw_online import model_run

    model, strategy = model_run(spec)
    hw, _guest = run_spec(spec)
    assert model.crash is None, model.crash.describe()
    assert hw.ok, f"hw run died: signal {hw.signal}: {hw.summary.get('first_delivered')}"
    assert hw.summary["delivered"] == 0
    return model, strategy.counters, hw


def test_dynamic_program_patches_only_libraries(hw_ok):
    from tlslab.experiment import RunSpec, resolve_program

    spec = RunSpec("lsr.dyn", (".",), strategy="online-patch", prices="hw-vm", stdout="pipe")
    libc = resolve_program(spec).root_dir / "lib/i386-linux-gnu/libc.so.6"
    before = hashlib.sha256(libc.read_bytes()).hexdigest()
    model, counters, hw = both(spec)
    on = hw.online
    line = f"lsr.dyn online-patch: model {counters.traps} faults {counters.by_kind} patches {counters.patches}; " \
           f"hw {hw.faults} {on['by_kind']} patches {on['patches']}"
    assert hw.stdout == model.stdout and hw.status == model.status, line
    assert hw.faults == counters.traps, line
    assert on["by_kind"] == counters.by_kind, line
    assert on["patches"] == counters.patches > 0, line
    assert counters.by_kind.get("not patched: the executable, not a library", 0) > 0, line
    assert on["descriptor_writes"] == counters.descriptor_writes, line
    assert hashlib.sha256(libc.read_bytes()).hexdigest() == before   # private copies: the file is untouched


@pytest.mark.parametrize("variant", ("default", "nosegneg"))
def test_a_guest_that_loads_its_own_fs_stops_patching(hw_ok, variant):
    from tlslab.experiment import RunSpec

    spec = RunSpec("fs-user", (), strategy="online-patch", variant=variant, prices="hw-vm", stdout="pipe")
    model, counters, hw = both(spec)
    on = hw.online
    line = f"fs-user.{variant}: model {counters.by_kind}, hw {on['by_kind']}"
    assert hw.stdout == model.stdout and hw.status == model.status, line
    assert on["by_kind"] == counters.by_kind, line
    assert on["by_kind"].get("patching-stopped: %fs not the twin's") == 1, line
    assert on["by_kind"].get("unpatched-fs-not-the-twin", 0) == on["patches"] > 0, line
    assert hw.fault_sites == {s["eip"]: s["violations"] for s in model.sites if s["violations"]}, line


def test_patch_policy_none_is_online_probe(hw_ok):
    from tlslab.experiment import RunSpec

    spec = RunSpec("lsr", (".",), strategy="online-patch", patch_policy="none", prices="xen-2004", stdout="pipe")
    model, counters, hw = both(spec)
    on = hw.online
    assert on["patches"] == counters.patches == 0
    assert on["by_kind"] == counters.by_kind and "probe" in on["by_kind"]
    assert hw.faults == counters.traps and hw.stdout == model.stdout
    probe, _ = run_spec(RunSpec("lsr", (".",), strategy="online-probe", prices="xen-2004", stdout="pipe"))
    assert probe.faults == hw.faults
    assert {k: v for k, v in on["by_kind"].items() if k not in ("fs-twin-installed", "not patched: patch policy none")} \
        == probe.online["by_kind"]


@pytest.mark.parametrize("variant", ("default", "nosegneg"))
def test_threads_get_their_own_twin(hw_ok, variant):
    from tlslab.experiment import RunSpec

    spec = RunSpec("threads", ("4", "200"), strategy="online-patch", variant=variant, prices="hw-vm", stdout="pipe")
    native, _ = run_spec(RunSpec("threads", ("4", "200"), strategy="native", variant=variant, stdout="pipe"))
    hw, _ = run_spec(spec)
    on = hw.online
    assert hw.ok and hw.summary["delivered"] == 0, hw.summary.get("first_delivered")
    assert hw.stdout == native.stdout and hw.status == native.status == 0
    assert on["by_kind"]["fs-twin-switched"] == 4      # one per thread: Linux keeps a TLS array per thread
    assert on["patches"] > 0
    # a site faults again only in a thread that met it before another thread's fault there was answered
    assert hw.faults == on["patches"] + on["by_kind"].get("faulted-before-the-patch", 0) \
        + sum(v for k, v in on["by_kind"].items() if k in ("emulate", "flip", "probe-flip", "probe-end"))


FORK_C = r"""
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
static __thread int counter;   /* a negative %gs offset in a static i386 program */
static int bump(int n) {
    for (int i = 0; i < n; i++) { counter++; __asm__ volatile("" ::: "memory"); }   /* one access per round */
    return counter;
}
int main(void) {
    bump(100);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) { printf("child %d\n", bump(1000)); return 0; }
    int status;
    waitpid(pid, &status, 0);
    printf("parent %d\n", bump(10));
    return WEXITSTATUS(status);
}
"""


def test_a_forked_child_runs_its_parent_s_patches(hw_ok, tmp_path):
    exe = build_c_guest(FORK_C, tmp_path, "fork")
    r = backend.run_hw(exe, strategy="online-patch", tree=None, prices=(1000.0, 1500.0))
    assert r.ok and r.status == 0 and r.stdout == b"child 1100\nparent 110\n"
    parent, child = r.processes[0], r.processes[1]
    # each site faults once, where it is first met: the loop's in the parent; the child, whose memory is
    # the parent's copy, patches included, meets only the sites of its own path out of fork
    assert r.online["patches"] == parent["faults"] + child["faults"] and parent["faults"] > 0
    assert child["faults"] <= 2
    emulate = backend.run_hw(exe, strategy="emulate", tree=None)
    assert emulate.processes[1]["faults"] >= 1000          # without patches the child's loop faults


@pytest.mark.slow
@pytest.mark.parametrize("label", ("keir", "boot"))
def test_keir_and_boot_patch_as_the_model_does(hw_ok, debian_rootfs, oracle_summary, label):
    """Keir's `ls -R /usr/lib` (GNU ls, dynamic: libc's sites patched, once each) and the boot (dash
    running ~550 processes: every exec'd image installs its own twin and patches its own private pages,
    every fork inherits its parent's): the model's faults, patches and twin installs, native's output.
    keir is exact; the boot's pipelines make the host's runs wobble by a few sites (measured: 11,345
    as the model in most runs, 11,347 in one; emulate wobbles by one fault: test_processes), so there
    the counts must agree within 0.05 % and each fault must still be one patch."""
    from tlslab.experiment import RunSpec
    from tlslab.guests import GuestError

    if label == "keir":
        spec = RunSpec("/bin/ls", ("-R", "/usr/lib"), rootfs="debian", strategy="online-patch", prices="xen-2004",
                       stdout="pipe")
    else:
        spec = RunSpec("/bin/dash", ("/data/rc",), rootfs="debian", root="guests/boot", strategy="online-patch",
                       prices="xen-2004", stdout="pipe")
    try:
        model, counters, hw = both(spec)
    except GuestError as exc:
        unavailable(str(exc))
    on = hw.online
    line = (f"{label} online-patch: model {counters.traps} faults, {counters.patches} patches, "
            f"{counters.by_kind.get('fs-twin-installed')} twins; hw {hw.faults}, {on['patches']}, "
            f"{on['by_kind'].get('fs-twin-installed')}, {len(hw.processes)} processes")
    assert hw.stdout == model.stdout and hw.status == model.status, line
    assert counters.traps == counters.patches > 0 and hw.faults == on["patches"], line   # a site faults once
    assert on["by_kind"].get("fs-twin-installed") == counters.by_kind.get("fs-twin-installed"), line
    if label == "keir":
        assert hw.faults == counters.traps, line
    else:
        assert len(hw.processes) == model.counters["kernel"]["processes"], line
        assert abs(hw.faults - counters.traps) <= 0.0005 * counters.traps, line
    oracle_summary[f"hw {label} online-patch"] = line + (" (equal)" if hw.faults == counters.traps
                                                         else " (within 0.05 %: the boot's wobble)")


def test_a_process_taking_fs_or_nulling_it_as_in_the_model(hw_ok, tmp_path):
    """tests/rewrite/fs_taken.c: after close()'s errno site is rewritten, a forked child installs its own
    descriptor (set_thread_area, entry -1: the first slot the guest has not requested, the twin's) and
    loads it into %fs, and the parent loads the null selector and runs the rewritten site (a #GP). Each
    address space gives its sites their gs prefix back and stops patching; the output is native's and the
    counts are the model's (but fs-twin-switched: the model's one vCPU rewrites slot 7 when it switches
    between parent and child, Linux keeps each task's TLS array)."""
    from conftest import build_test_guest
    from tlslab.experiment import RunSpec, make_domain

    exe = build_test_guest("rewrite/fs_taken.c", tmp_path)
    native = backend.run_hw(exe, strategy="native", tree=None)
    hw = backend.run_hw(exe, strategy="online-patch", tree=None, prices=(1000.0, 1500.0))
    domain, _ = make_domain(RunSpec(exe, strategy="online-patch", emulate_ns=1000.0, flip_ns=1500.0))
    model = domain.run()
    assert native.stdout == b"child 45\nparent 45, child status 0\n"
    assert hw.ok and hw.stdout == native.stdout == model.stdout and hw.status == 0
    kinds = hw.online["by_kind"]
    assert kinds["patching-stopped: %fs not the twin's"] == 2 and kinds["null-%fs-at-a-rewritten-site"] == 1
    mkinds = dict(model.counters["strategy"]["by_kind"])
    mkinds.pop("fs-twin-switched", None)
    assert kinds == mkinds
    assert hw.online["patches"] == model.counters["strategy"]["patches"] > 0
    assert hw.faults == domain.strategy.counters.traps
