"""online-patch: rewrite's patch where its safety policy allows, online-probe's rule for every other fault."""

from __future__ import annotations

import pytest

from tlslab.experiment import RunSpec, execute, make_domain
from tlslab.hypervisor.strategies import STRATEGIES, get_strategy, is_online
from tlslab.hypervisor.strategies.rewrite import FS_SELECTOR

PLAIN = ["lsr", "canary", "malloc", "stdio", "syscalls"]
WORK = ("traps", "decodes", "descriptor_writes", "emulated_accesses", "emulated_instructions", "refused")


def test_registered_as_online_with_both_option_sets():
    assert is_online("online-patch") and STRATEGIES["online-patch"].truncates
    assert get_strategy("online-patch").page_sharing == "private"   # never changes a file by default
    s = get_strategy("online-patch", prices="xen-2004", patch_policy="lib")
    assert s.threshold == s.fallback.threshold > 0 and s.patch_policy == "lib"
    for bad in ({"patch_policy": "nosuch"}, {"page_sharing": "nosuch"}, {"prices": "nosuch"}):
        with pytest.raises(ValueError):
            get_strategy("online-patch", **bad)


@pytest.mark.parametrize("guest", PLAIN)
def test_output_identical_and_every_negative_site_patched_once(guest, native):
    """Static programs (patch policy auto = exe): every -ve site is patched at its first fault, so the run
    takes one trap per patched site plus the faults the probe rule decides (+ve offsets, sites without a
    gs prefix), and never more traps than online-probe."""
    d, _ = make_domain(RunSpec(guest, strategy="online-patch"))
    r = d.run()
    nat = native(guest)
    assert r.ok, r.crash
    assert (r.status, r.stdout) == (nat.status, nat.stdout)
    c = r.counters["strategy"]
    assert c["patches"] == len(d.strategy.patched) > 0 and c["refused"] == 0
    assert d.vcpu.loaded["fs"] == FS_SELECTOR
    for prefix in d.strategy.patched.values():
        assert d.vcpu.mem.read(prefix, 1) == b"\x64"
    probe = execute(RunSpec(guest, strategy="online-probe"))[0]
    assert c["traps"] < probe.counters["strategy"]["traps"]


def test_lsr_patches_the_sites_emulate_faults_at():
    emu, _ = execute(RunSpec("lsr", strategy="emulate"))
    faulting = {s["eip"] for s in emu.sites if s["violations"]}
    d, _ = make_domain(RunSpec("lsr", strategy="online-patch"))
    assert d.run().ok
    assert set(d.strategy.patched) == faulting


@pytest.mark.parametrize("prices", ["hw-vm", "xen-2004"])
def test_without_patching_it_is_online_probe_exactly(prices):
    """patch_policy none: every fault goes to the probe rule, so the work equals online-probe's, counter
    for counter: the fallback is online-probe, not a copy of it."""
    mine = execute(RunSpec("lsr", strategy="online-patch", prices=prices, patch_policy="none"))[0]
    probe = execute(RunSpec("lsr", strategy="online-probe", prices=prices))[0]
    a, b = mine.counters["strategy"], probe.counters["strategy"]
    assert mine.stdout == probe.stdout
    installs = a["by_kind"].get("fs-twin-installed", 0)   # the ABI is still set up (one write), unused
    assert installs <= 1
    assert {k: a[k] - installs * (k == "descriptor_writes") for k in WORK} == {k: b[k] for k in WORK}
    assert a["patches"] == 0
    for kind in ("probe", "probe-end", "probe-flip", "flip", "emulate"):
        assert a["by_kind"].get(kind, 0) == b["by_kind"].get(kind, 0), kind


def test_dynamic_program_patches_only_libraries(native, debian_rootfs):
    """lsr.dyn (auto = lib): libc's sites are patched; the executable's own -ve sites are decided by the
    probe rule (emulated or flipped), never patched."""
    d, _ = make_domain(RunSpec("lsr", strategy="online-patch", variant="dyn"))
    r = d.run()
    assert r.ok and r.stdout == native("lsr", variant="dyn").stdout
    c = r.counters["strategy"]
    assert c["patches"] > 0
    exe = d.process.exe_node()
    for eip in d.strategy.patched:
        m = d.process.objects.mapping_at(eip)
        assert m is not None and m.node is not exe and m.path.startswith("/lib")
    assert c["by_kind"].get("not patched: the executable, not a library", 0) > 0
    assert c["emulated_accesses"] + c["by_kind"].get("flip", 0) > 0


def test_mixed_site_is_restored_and_left_to_the_probe_rule(native):
    """A rewritten site whose %fs access meets a +ve offset gets its gs prefix back and is never patched
    again; the run still prints native's output."""
    from test_rewrite import run_with_first_patch_undone

    d, r, eip = run_with_first_patch_undone("online-patch")
    s = d.strategy
    assert r.ok and r.stdout == native("lsr").stdout
    assert eip in s.mixed and eip not in s.patched
    assert r.counters["strategy"]["emulated_accesses"] + r.counters["strategy"]["descriptor_writes"] > 1


def test_a_guest_taking_fs_stops_patching_instead_of_dying(native):
    """fs-user installs its own descriptor in slot 7 and loads %fs: rewrite kills it; online-patch gives
    every rewritten site its gs prefix back and decides from then on with the probe rule. The guest
    runs to the end with the same data; the one line that differs is the program's report of what %fs
    held before it loaded its own (the twin's 0x3b instead of 0): the %fs-twin ABI is visible."""
    rw, _ = execute(RunSpec("fs-user", strategy="rewrite"))
    assert not rw.ok
    d, _ = make_domain(RunSpec("fs-user", strategy="online-patch"))
    r = d.run()
    nat = native("fs-user")
    assert r.ok and r.status == nat.status == 0
    c = r.counters["strategy"]
    assert c["by_kind"]["patching-stopped: %fs not the twin's"] == 1
    assert d.strategy.patched == {} and c["patches"] > 0
    for unpatch in (p for p in d.strategy.patch_set.patches if p.kind == "unpatch"):
        assert d.vcpu.mem.read(unpatch.address, 1) == b"\x65"
    differ = [(a, b) for a, b in zip(r.stdout.splitlines(), nat.stdout.splitlines()) if a != b]
    assert differ == [(b"fs-user: GDT (set_thread_area) descriptor, %fs NOT loaded by the program",
                       b"fs-user: GDT (set_thread_area) descriptor, %fs loaded by the program")]


def test_threads_output_identical_far_fewer_faults(native):
    r, _ = execute(RunSpec("threads", args=("4", "200"), strategy="online-patch"))
    nat = native("threads", ("4", "200"))
    assert r.ok and r.stdout == nat.stdout
    probe, _ = execute(RunSpec("threads", args=("4", "200"), strategy="online-probe"))
    assert r.counters["strategy"]["traps"] * 20 < probe.counters["strategy"]["traps"]


def test_processes_patch_private_copies_and_keep_output(debian_rootfs):
    """rewrite's script of subshells (fork), execs of ls and a pipeline (tests/test_rewrite.py).
    Private pages: no patch reaches a page-cache page, every exec'd image patches its own sites (more
    patches than rewrite's shared ones, fewer faults than online-probe), output as native's."""
    from test_rewrite import _dash

    nat = _dash("native")[1]
    _, rw = _dash("rewrite")
    _, probe = _dash("online-probe")
    d, r = _dash("online-patch")
    assert r.ok, r.crash
    assert (r.status, r.stdout) == (nat.status, nat.stdout)
    assert r.counters["kernel"]["processes"] >= 5
    assert r.counters["page_cache"]["shared_patches"] == 0
    assert r.counters["strategy"]["patches"] > rw.counters["strategy"]["patches"] > 0
    assert r.counters["strategy"]["traps"] < probe.counters["strategy"]["traps"]


def test_shared_pages_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="private copies only"):
        get_strategy("online-patch", page_sharing="shared")


def test_private_patches_never_reach_a_file():
    """prelink reads its own binary with read(2) and writes a relocated copy: with online-patch's private
    patches the copy is native's; with rewrite's shared ones (XenLinux's page-cache patching) the patched
    bytes reach it, which the page cache reports as a leak."""
    args = ("/proc/self/exe", "out.bin")
    nat, _ = execute(RunSpec("prelink", args=args, strategy="native"))
    private, _ = execute(RunSpec("prelink", args=args, strategy="online-patch"))
    d, _ = make_domain(RunSpec("prelink", args=args, strategy="rewrite", page_sharing="shared"))
    shared = d.run()
    assert private.ok and private.stdout == nat.stdout and private.counters["strategy"]["patches"] > 0
    assert shared.ok and shared.stdout != nat.stdout
    assert d.strategy.hazards and shared.counters["strategy"]["by_kind"]["patched-bytes-reached-a-file"] > 0


@pytest.fixture(scope="module")
def fs_taken(tmp_path_factory):
    from conftest import build_test_guest
    return build_test_guest("rewrite/fs_taken.c", tmp_path_factory.mktemp("online_patch"))


def test_a_process_taking_fs_or_nulling_it_keeps_native_output(fs_taken):
    """After close()'s errno site is rewritten, a forked child loads its own %fs and the parent loads the
    null selector, each then running the rewritten site again. rewrite refuses and the guest dies;
    online-patch restores the sites (at the child's set_thread_area into slot 7, and at the #GP the null
    selector raises at the rewritten site) and prints native's output."""
    nat, _ = execute(RunSpec(fs_taken, strategy="native"))
    assert nat.ok and nat.stdout == b"child 45\nparent 45, child status 0\n"
    rw, _ = execute(RunSpec(fs_taken, strategy="rewrite"))
    assert not rw.ok or rw.stdout != nat.stdout
    d, _ = make_domain(RunSpec(fs_taken, strategy="online-patch"))
    r = d.run()
    assert r.ok and r.stdout == nat.stdout, (r.crash, r.stdout)
    kinds = r.counters["strategy"]["by_kind"]
    assert kinds["patching-stopped: %fs not the twin's"] == 2            # the child's space and the parent's
    assert kinds["null-%fs-at-a-rewritten-site"] == 1                   # the parent's
    assert kinds["unpatched-fs-not-the-twin"] > 0 and r.counters["strategy"]["refused"] == 0


def test_the_guest_using_the_twin_as_its_own_fs_is_refused():
    """A fault on %fs while it holds the twin, at a site never rewritten: natively the guest's %fs is null
    there, so online-patch refuses (as rewrite does) instead of emulating the access through the twin."""
    from tlslab.hypervisor.strategies.base import Action, Trap
    from tlslab.machine.vcpu import SegmentViolation

    d, _ = make_domain(RunSpec("lsr", strategy="online-patch"))
    assert d.run().ok
    s = d.strategy
    twin = d.vcpu.descriptors[7]
    v = SegmentViolation(0x1234, "fs", FS_SELECTOR, 0x10, 4, False, twin.base + 0x10, twin, "offset above an "
                         "expand-down segment")
    verdict = s.handle(Trap(v, d))
    assert verdict.action is Action.KILL
    assert "used %fs while it held the hypervisor's twin" in verdict.reason


def test_a_rewritten_byte_the_guest_changed_itself_is_forgotten_not_restored():
    """Self-modifying code: if the guest has written over a rewritten prefix, stopping patching leaves its
    byte alone (restoring it would raise PatchError in the hypervisor, or undo the guest's own write)."""
    d, _ = make_domain(RunSpec("lsr", strategy="online-patch"))
    assert d.run().ok
    s = d.strategy
    eip, prefix = next(iter(s.patched.items()))
    d.vcpu.mem.write(prefix, b"\x90")            # the guest's own write (here: by hand)
    others = [a for e, a in s.patched.items() if e != eip]
    s._stop_patching(d, "test")
    assert s.patched == {} and eip in s.mixed
    assert d.vcpu.mem.read(prefix, 1) == b"\x90"
    assert all(d.vcpu.mem.read(a, 1) == b"\x65" for a in others)
    assert d.counters()["strategy"]["by_kind"]["rewritten-byte-changed-by-the-guest"] == 1
