"""rewrite (Jakub's 65 -> 64 prefix rewrite) on real guests."""

from __future__ import annotations

import pytest

from tlslab.experiment import RunSpec, execute, make_domain
from tlslab.hypervisor.strategies import STRATEGIES, get_strategy
from tlslab.hypervisor.strategies.rewrite import FS_SELECTOR, FS_SLOT
from tlslab.machine import layout

# guests whose output must be identical to native (selfread/prelink/fs-user are hazards: test_hazards)
PLAIN = ["lsr", "canary", "malloc", "stdio", "syscalls"]


def test_registered():
    assert "rewrite" in STRATEGIES and get_strategy("rewrite").truncates


@pytest.mark.parametrize("guest", PLAIN)
def test_output_identical_and_one_trap_per_site(guest, native):
    d, _ = make_domain(RunSpec(guest, strategy="rewrite"))
    r = d.run()
    nat = native(guest)
    assert r.ok, r.crash
    assert (r.status, r.stdout) == (nat.status, nat.stdout)
    c = r.counters["strategy"]
    # every trap patched its site; each site trapped once
    assert c["traps"] == c["patches"] == c["decodes"] == len(d.strategy.patched) > 0
    assert c["refused"] == 0
    assert c["by_kind"] == {"fs-twin-installed": 1}
    assert c["descriptor_writes"] == 1
    # %gs was never flipped: it is still the truncated expand-up descriptor
    gs = d.vcpu.descriptors[layout.selector_index(d.vcpu.loaded["gs"])]
    assert not gs.expand_down
    assert d.vcpu.loaded["fs"] == FS_SELECTOR
    twin = d.vcpu.descriptors[FS_SLOT]
    assert twin.expand_down and twin.base == gs.base
    for prefix in d.strategy.patched.values():
        assert d.vcpu.mem.read(prefix, 1) == b"\x64"


def test_lsr_traps_equal_distinct_faulting_sites():
    """The emulate run's distinct -ve faulting sites are exactly the sites rewrite patches."""
    emu, _ = execute(RunSpec("lsr", strategy="emulate"))
    faulting = {s["eip"] for s in emu.sites if s["violations"]}
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite"))
    r = d.run()
    assert set(d.strategy.patched) == faulting
    assert r.counters["strategy"]["traps"] == len(faulting)
    assert emu.counters["strategy"]["traps"] > 20 * len(faulting)


def test_patched_sites_run_through_fs():
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite"))
    r = d.run()
    fs = r.counters["segments"]["fs"]
    assert fs["accesses"] > 1000 and fs["positive"] == 0   # only -ve accesses go through %fs
    assert r.counters["violations"] == {"gs": len(d.strategy.patched)}


def test_patch_policy_none_is_flip():
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite", patch_policy="none"))
    r = d.run()
    flip, _ = execute(RunSpec("lsr", strategy="flip"))
    c = r.counters["strategy"]
    assert r.ok and r.stdout == flip.stdout
    assert c["patches"] == 0 and c["traps"] == flip.counters["strategy"]["traps"]


def test_nosegneg_variant(native):
    d, _ = make_domain(RunSpec("lsr", strategy="rewrite", variant="nosegneg"))
    r = d.run()
    assert r.ok and r.stdout == native("lsr", variant="nosegneg").stdout
    assert 0 < r.counters["strategy"]["patches"] == r.counters["strategy"]["traps"]


def run_with_first_patch_undone(strategy: str):
    """lsr under a patching strategy whose first patch is undone at once, as a %fs fault at a patched
    site (a +ve offset) undoes it: (domain, result, that site's address)."""
    d, _ = make_domain(RunSpec("lsr", strategy=strategy))
    s = d.strategy
    real = s._try_patch
    victim = {}

    def patch_then_unpatch_first(domain, v, insn):
        why = real(domain, v, insn)
        if why is None and not victim:
            victim["eip"] = v.eip
            s._unpatch(domain, v.eip)
        return why

    s._try_patch = patch_then_unpatch_first
    r = d.run()
    return d, r, victim["eip"]


def test_mixed_site_is_unpatched_and_flips(native):
    """A rewritten site that meets a +ve offset is restored (64 -> 65) and is flipped from then on."""
    d, r, eip = run_with_first_patch_undone("rewrite")
    s = d.strategy
    assert r.ok and r.stdout == native("lsr").stdout
    assert eip in s.mixed and eip not in s.patched
    unpatch = [p for p in s.patch_set.patches if p.kind == "unpatch"]
    assert len(unpatch) == 1 and unpatch[0].old == "64" and unpatch[0].new == "65"
    assert d.vcpu.mem.read(unpatch[0].address, 1) == b"\x65"
    assert r.counters["strategy"]["by_kind"].get("flip-to-expand-down", 0) > 0


# ------------------------------------------------------------------ threads: the twin follows each TCB
def _switch_recorder(monkeypatch):
    """Record, after every switch, the running thread's TCB slot and the %fs twin slot."""
    from tlslab.linux import kernel as K
    seen = []
    original = K.Kernel.switch_to

    def recording(self, task):
        original(self, task)
        d = task.process.vcpu.descriptors
        seen.append((task.tid, d[layout.GDT_ENTRY_TLS_MIN], d[FS_SLOT]))

    monkeypatch.setattr(K.Kernel, "switch_to", recording)
    return seen


@pytest.mark.parametrize("build", ["threads", "threads.nosegneg"])
def test_threads_each_get_their_own_twin(build, native, monkeypatch):
    seen = _switch_recorder(monkeypatch)
    d, _ = make_domain(RunSpec(build, ("4", "30"), strategy="rewrite"))
    r = d.run()
    nat = native(build, ("4", "30"))
    assert r.ok, r.crash
    assert (r.status, r.stdout) == (nat.status, nat.stdout)
    c = r.counters["strategy"]
    assert c["traps"] == c["patches"] == len(d.strategy.patched) > 0   # one trap per site, every thread
    assert c["by_kind"]["fs-twin-switched"] > 0
    assert c["descriptor_writes"] == 1 + c["by_kind"]["fs-twin-switched"]
    assert len({tid for tid, _, _ in seen}) >= 5
    bases = set()
    for tid, gs, twin in seen:
        if twin is None:   # before the main thread installed its TCB
            continue
        assert twin.expand_down and twin.base == gs.base, f"tid {tid} ran with another thread's twin"
        bases.add(twin.base)
    assert len(bases) >= 5


def test_without_the_switch_hook_the_base_check_refuses(monkeypatch):
    """The safety net: a twin that did not follow the switch is caught at the next trap, never used."""
    from tlslab.hypervisor.strategies import rewrite as R
    monkeypatch.setattr(R.FsTwinABI, "_on_switch", lambda self, task: None)
    d, _ = make_domain(RunSpec("threads", ("4", "30"), strategy="rewrite"))
    r = d.run()
    assert r.crash is not None and "is not the %fs twin's" in r.crash.describe()


def test_a_thread_without_a_tcb_gets_an_empty_twin_and_a_refusal(monkeypatch):
    """A thread whose TLS slot holds no flat TCB: %fs cannot reach the previous thread's variables."""
    from dataclasses import replace

    from tlslab.linux import kernel as K
    original = K.Kernel.clone_thread

    def odd_tls(self, parent_task, child_stack, tls_desc):
        if tls_desc is not None:
            slot, requested = tls_desc
            tls_desc = (slot, replace(requested, limit=0xFFFF, granularity=False))  # not glibc's TCB shape
        return original(self, parent_task, child_stack, tls_desc)

    monkeypatch.setattr(K.Kernel, "clone_thread", odd_tls)
    seen = _switch_recorder(monkeypatch)
    d, _ = make_domain(RunSpec("threads", ("4", "30"), strategy="rewrite"))
    r = d.run()
    assert r.crash is not None and "holds no TCB descriptor" in r.crash.describe()
    odd = [twin for tid, gs, twin in seen if gs is not None and gs.limit == 0xFFFF]
    assert odd, "no thread with the odd descriptor ran"
    for twin in odd:
        assert twin.dc and twin.limit == 0xFFFFF and twin.granularity   # empty: no offset valid


# ------------------------------------------------------------------ processes: fork, exec, shared pages
# a subshell (fork) meets libc's chdir errno site first, then the shell itself; ls runs twice (exec)
SHARED_SCRIPT = ("(cd /nonexistent 2>/dev/null; /bin/true); cd /nonexistent 2>/dev/null; echo $?; "
                 "(/bin/ls /nonexistent 2>/dev/null); /bin/ls /nonexistent 2>/dev/null; "
                 "/bin/ls /usr/lib/i386-linux-gnu | /bin/grep -c so; echo end")


def _dash(strategy, script=SHARED_SCRIPT, **options):
    d, _ = make_domain(RunSpec("/bin/dash", ("-c", script), rootfs="debian", tree=None, strategy=strategy,
                               **options))
    return d, d.run()


@pytest.fixture(scope="module")
def dash_native(debian_rootfs):
    return _dash("native")[1]


def test_shared_patches_reach_every_process_once(dash_native):
    """Shared mode: a patch is in the file's page-cache page, so the live parent and every later exec
    see it: no page-cache byte is ever patched twice, and every trap is a site's first."""
    from collections import Counter
    d, r = _dash("rewrite", page_sharing="shared")
    assert r.ok, r.crash
    assert (r.status, r.stdout) == (dash_native.status, dash_native.stdout)
    assert r.counters["kernel"]["processes"] >= 5
    pc = d.first_process.page_cache
    c = r.counters["strategy"]
    assert c["traps"] == c["patches"] == len(pc.patches) > 0
    patched_twice = [k for k, n in Counter((p.file, p.file_offset) for p in pc.patches).items() if n > 1]
    assert patched_twice == []
    assert r.counters["page_cache"]["mapped_patches"] > 0          # execs mapped patched pages
    # each image installs its own twin at its own TCB; a forked child has its parent's (every process
    # of this script but the shell ends in an exec, so: one install per process)
    assert c["by_kind"]["fs-twin-installed"] == r.counters["kernel"]["processes"]


def test_private_patches_are_per_address_space(dash_native):
    """Private mode: each exec'd image patches its own copy (more traps), with the same output."""
    _, shared = _dash("rewrite", page_sharing="shared")
    d, r = _dash("rewrite", page_sharing="private")
    assert r.ok, r.crash
    assert (r.status, r.stdout) == (dash_native.status, dash_native.stdout)
    assert r.counters["page_cache"]["shared_patches"] == 0
    assert r.counters["page_cache"]["private_patches"] == r.counters["strategy"]["patches"]
    assert r.counters["strategy"]["traps"] > shared.counters["strategy"]["traps"]


def test_a_forked_child_keeps_the_parents_patches(debian_rootfs):
    """The shell meets its sites first, then forks subshells doing the same: under private pages each
    child's memory is a copy of the parent's patched code, so the subshells add no trap (emulate pays
    in every one)."""
    def script(n):
        return "cd /nonexistent 2>/dev/null; echo $?; for i in " + " ".join("1" * n) + \
            "; do (cd /nonexistent 2>/dev/null; echo $?); done"
    one, six = _dash("rewrite", script(1), page_sharing="private")[1], _dash("rewrite", script(6), page_sharing="private")[1]
    nat = _dash("native", script(6))[1]
    assert six.ok and six.stdout == nat.stdout and six.counters["kernel"]["processes"] == 7
    assert six.counters["strategy"]["traps"] == one.counters["strategy"]["traps"] > 0
    emu_one, emu_six = _dash("emulate", script(1))[1], _dash("emulate", script(6))[1]
    assert emu_six.counters["strategy"]["traps"] > emu_one.counters["strategy"]["traps"]


def test_new_mappings_show_shared_patches_in_order():
    """PageCache.map_file with memory: every shared patch of the file inside the mapping, in order."""
    from types import SimpleNamespace

    from tlslab.linux.pagecache import PageCache, file_key
    node = object()
    pc = PageCache()
    pc.map_file(node, [SimpleNamespace(vaddr=0x1000, filesz=0x100, offset=0x40)])
    assert pc.note_patch(0x1010, b"\x65", b"\x64", shared=True)
    assert pc.note_patch(0x1020, b"\x65", b"\x64", shared=True)
    assert pc.note_patch(0x1020, b"\x64", b"\x65", shared=True)     # un-patched: mixed
    assert not pc.note_patch(0x1030, b"\x65", b"\x64", shared=False)
    assert pc.note_patch(0x1040, b"\x65", b"\x64", shared=True)
    view = pc.fork(keep_mappings=False)
    mem = bytearray(b"\x65" * 0x400)
    mem[0x40] = 0x90                                                   # not the bytes that patch was made over
    space = SimpleNamespace(write=lambda a, b: mem.__setitem__(slice(a - 0x2000, a - 0x2000 + len(b)), b),
                            read=lambda a, n: bytes(mem[a - 0x2000:a - 0x2000 + n]))
    assert view.map_file(node, [SimpleNamespace(vaddr=0x2000, filesz=0x100, offset=0x40)], space) == 3
    assert mem[0x10] == 0x64 and mem[0x20] == 0x65 and mem[0x30] == 0x65 and mem[0x40] == 0x90
    assert view.shared_patch_at(0x2020).new == b"\x65" and view.shared_patch_at(0x2030) is None
    assert view.addresses_of(file_key(node), 0x50, 1) == [0x2010]
    assert pc.as_dict()["mapped_patches"] == 3 and pc.as_dict()["private_patches"] == 1


def test_a_static_programs_patches_stay_in_its_own_file(debian_rootfs, native):
    """The executable's patches belong to its file, not to the /proc/self/exe node every process
    shares: a static guest's rewritten sites must not be written into the programs exec'd after it."""
    from pathlib import Path
    guests = Path(__file__).resolve().parent.parent / "guests" / "bin"
    script = "/data/lsr >/dev/null; /bin/ls /data | /bin/grep -c lsr; echo rc=$?; /bin/cp /data/lsr /tmp/x; echo cp=$?"
    runs = {}
    for strategy in ("native", "rewrite"):
        d, _ = make_domain(RunSpec("/bin/dash", ("-c", script), rootfs="debian", tree=None, root=str(guests),
                                   strategy=strategy))
        runs[strategy] = (d, d.run())
    (_, nat), (d, r) = runs["native"], runs["rewrite"]
    assert r.ok and (r.status, r.stdout, r.stderr) == (nat.status, nat.stdout, nat.stderr)
    assert b"rc=0" in r.stdout and b"cp=0" in r.stdout
    files = {p.file for p in d.first_process.page_cache.patches}
    assert any(f[0] == "host" and f[1].endswith(b"/lsr") for f in files)   # lsr's own sites, by its path


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory):
    from conftest import build_test_guest
    return build_test_guest("rewrite/shared_site.c", tmp_path_factory.mktemp("rewrite"))


@pytest.mark.parametrize("sharing", ["shared", "private"])
def test_a_site_un_patched_in_one_process_is_mixed_in_all(shared_site, sharing):
    """A site rewritten by the child and un-patched by the parent (a +ve offset) is mixed for the
    child too: it flips there instead of re-patching the page and killing the parent."""
    nat = execute(RunSpec(shared_site, strategy="native"))[0]
    assert nat.status == 0 and nat.stdout == b"child: 42 42\nparent: 1 1, child exit 0\n"
    d, _ = make_domain(RunSpec(shared_site, strategy="rewrite", page_sharing=sharing))
    r = d.run()
    assert r.ok, r.crash and r.crash.describe()
    assert (r.status, r.stdout) == (nat.status, nat.stdout)
    kinds = [p.kind for p in d.strategy.patch_set.patches if "through_gs" in p.symbol]
    assert kinds[0] == "prefix-65-to-64"
    if sharing == "shared":
        assert kinds.count("prefix-65-to-64") == 1 and kinds.count("unpatch") == 1   # once, for everyone
        assert r.counters["strategy"]["by_kind"].get("flip-to-expand-down", 0) >= 1   # the child flips


def test_a_shared_patch_never_lands_in_memory_that_no_longer_maps_the_file(debian_rootfs, tmp_path):
    """brk shrinking over a MAP_FIXED file mapping unmaps it: a later shared patch of that file must
    not be written into the anonymous heap that took its place (nor fault the hypervisor)."""
    import subprocess
    from pathlib import Path

    from conftest import GCC32, require_gcc32
    require_gcc32()
    src = Path(__file__).resolve().parent / "rewrite" / "heap_over_file.c"
    tmp_path.chmod(0o755)
    subprocess.run([*GCC32, "-O1", "-o", str(tmp_path / "heap"), str(src)], check=True)
    runs = {s: execute(RunSpec("/bin/dash", ("-c", "/data/heap"), rootfs="debian", tree=None, root=str(tmp_path),
                               strategy=s))[0] for s in ("native", "rewrite")}
    assert runs["native"].stdout == b"ls exit 2, heap bytes changed: 0\n"
    r = runs["rewrite"]
    assert r.ok and (r.status, r.stdout) == (runs["native"].status, runs["native"].stdout)
    assert r.counters["strategy"]["patches"] > 0
