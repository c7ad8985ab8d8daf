"""Dynamically linked programs of the pinned Debian i386 root, end to end.

The oracle is the host: the same binary, chrooted into the same materialised
root, as the same unprivileged user (uid/gid 1000, the model's), with the same
environment, must print byte-identical output. Every strategy must either give
that output or refuse at a named site (emulate-2004 meets instructions
Xen's emulate.c never decoded). Plus one-line errors for unusable programs and
libraries, names of code in shared objects, and XenLinux's patch rule on the
real libc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tlslab.experiment import RunSpec, environment, make_domain
from tlslab.hypervisor.strategies import STRATEGIES

IN_CI = os.environ.get("CI") == "true"
GUEST_UID = GUEST_GID = 1000


def _need_root_for_chroot() -> None:
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the native chroot comparison needs root (CI runs as root)")
        pytest.skip("the native chroot comparison needs root")


def native_chroot(root, argv: list[str], cwd: str = "/") -> subprocess.CompletedProcess:
    """Run ``argv`` on the host chrooted into ``root`` as the model's user and environment."""
    env = {k.decode(): v.decode() for k, _, v in (e.partition(b"=") for e in environment(RunSpec("x"), "debian"))}

    def enter():
        os.chroot(root)
        os.chdir(cwd)
        os.setgroups([])
        os.setgid(GUEST_GID)
        os.setuid(GUEST_UID)

    return subprocess.run(argv, preexec_fn=enter, env=env, capture_output=True, timeout=120)


def model(argv: list[str], strategy: str, **kw):
    spec = RunSpec(guest=argv[0], args=tuple(argv[1:]), strategy=strategy, rootfs="debian", tree=None, **kw)
    domain, _guest = make_domain(spec)
    return domain.run(), domain


# (argv, expect a non-empty stdout): small inputs, so every strategy can run each
COMMANDS = [
    ["/bin/ls", "-R", "/usr/lib/python3.11/json"],
    ["/usr/bin/find", "/usr/lib/python3.11/email", "-name", "*.py", "-size", "+8k"],
    ["/bin/grep", "-rn", "def load", "/usr/lib/python3.11/json"],
    ["/bin/sed", "-n", "s/^import \\(.*\\)/IMPORT \\1/p", "/usr/lib/python3.11/os.py"],
    ["/usr/bin/sort", "-r", "/usr/lib/python3.11/json/__init__.py"],
    ["/usr/bin/md5sum", "/bin/ls", "/usr/lib/python3.11/os.py"],
    ["/usr/bin/du", "-a", "/usr/lib/python3.11/json"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: os.path.basename(a[0]))
def test_root_programs_match_the_host_under_every_strategy(debian_rootfs, argv):
    _need_root_for_chroot()
    native = native_chroot(debian_rootfs, argv)
    assert native.returncode == 0 and native.stdout, native.stderr
    outcomes = {}
    for strategy in STRATEGIES:
        result, _ = model(argv, strategy)
        if result.crash is not None:
            # a refusal must be a named, reasoned stop, never wrong output
            assert strategy == "emulate-2004", f"{strategy}: {result.crash.describe()}"
            assert "not emulated" in result.crash.reason or "does not handle" in result.crash.reason
            outcomes[strategy] = "refused"
            continue
        assert result.status == 0, (strategy, result.stderr)
        assert result.stdout == native.stdout, f"{strategy}: stdout differs from the host's"
        assert result.stderr == native.stderr, f"{strategy}: stderr differs from the host's"
        outcomes[strategy] = "identical"
    assert sum(v == "identical" for v in outcomes.values()) >= len(STRATEGIES) - 1, outcomes


def test_keir_benchmark_full_usr_lib_matches_the_host(debian_rootfs):
    """Keir's `ls -R /usr/lib`, whole: the host's output under native, emulate and flip; flip > emulate faults."""
    _need_root_for_chroot()
    argv = ["/bin/ls", "-R", "/usr/lib"]
    native = native_chroot(debian_rootfs, argv)
    assert native.returncode == 0 and native.stdout.count(b"\n") > 5000
    traps = {}
    for strategy in ("native", "emulate", "flip"):
        result, _ = model(argv, strategy)
        assert result.ok and result.status == 0, result.crash
        assert result.stdout == native.stdout, strategy
        traps[strategy] = result.counters["strategy"]["traps"]
        negatives = result.counters["segments"]["gs"]["negative"]
        sign_changes = result.counters["segments"]["gs"]["sign_changes"]
    # emulate faults on every negative access, flip on every sign change (the model's exact rule)
    assert traps["native"] == 0
    assert traps["emulate"] > 10_000 and traps["flip"] > traps["emulate"]
    assert negatives > 0 and sign_changes > 0


def test_static_and_dynamic_builds_print_the_same(debian_rootfs):
    static, _ = make_domain(RunSpec("lsr", strategy="flip"))
    dynamic, _ = make_domain(RunSpec("lsr.dyn", strategy="flip"))
    rs, rd = static.run(), dynamic.run()
    assert rs.ok and rd.ok and rs.status == rd.status == 0
    assert rs.stdout == rd.stdout and rs.stdout
    assert dynamic.process.interp is not None and static.process.interp is None
    # the dynamic build's faults are in libc.so.6: named by object and symbol
    names = {dynamic.symbolize(s["eip"]) for s in rd.sites if s["violations"]}
    assert any(n.startswith("libc.so.6:") for n in names), sorted(names)[:5]


def test_fault_sites_are_named_by_object_and_symbol(debian_rootfs):
    result, domain = model(["/bin/ls", "-R", "/usr/lib/python3.11/json"], "emulate")
    assert result.ok
    named = [domain.symbolize(s["eip"]) for s in result.sites if s["violations"]]
    assert named and all(n.startswith("libc.so.6") for n in named)
    assert "libc.so.6:__libc_free+0x26" in named or any(n.startswith("libc.so.6:__libc_free+") for n in named)
    # every mapped object is recorded with the path ld.so opened it by
    paths = {m.path for m in domain.process.objects.mappings()}
    assert "/lib/i386-linux-gnu/libc.so.6" in paths and "/lib/ld-linux.so.2" in paths


def test_rewrite_2004_patches_only_libraries_from_lib(debian_rootfs):
    argv = ["/bin/ls", "-R", "/usr/lib/python3.11/json"]
    lib, dom_lib = model(argv, "rewrite-2004")
    exe, _ = model(argv, "rewrite-2004", patch_policy="exe")
    elsewhere, _ = model(argv, "rewrite-2004", patch_policy="lib", env=())
    assert lib.ok and exe.ok and elsewhere.ok
    patched = [p for p in dom_lib.strategy.patch_set.patches if p.kind == "call-fixup"]
    assert patched and all(p.symbol.startswith("libc.so.6") for p in patched)
    assert lib.counters["strategy"]["patches"] > 0
    assert exe.counters["strategy"]["patches"] == 0      # ls itself has no negative %gs access
    assert lib.counters["strategy"]["traps"] < exe.counters["strategy"]["traps"]


def test_prelink_hazard_on_the_real_libc(debian_rootfs):
    """A program that copies libc.so.6 writes XenLinux's patches into the copy (shared page-cache pages)."""
    argv = ["/bin/cp", "/lib/i386-linux-gnu/libc.so.6", "/data/libc.so.6"]
    spec = dict(guest=argv[0], args=tuple(argv[1:]), strategy="rewrite-2004", rootfs="debian", tree="small")
    shared, _ = make_domain(RunSpec(**spec))
    private, _ = make_domain(RunSpec(**spec, page_sharing="private"))
    rs, rp = shared.run(), private.run()
    assert rs.ok and rp.ok and rs.status == rp.status == 0
    assert any("/data/libc.so.6" in h for h in rs.counters["hazards"])
    assert rp.counters["hazards"] == []


# ------------------------------------------------------------ one-line errors

def _cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlslab", *args], capture_output=True, text=True, timeout=300, **kw)


def _assert_one_line(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for needle in needles:
        assert needle in p.stderr, p.stderr


@pytest.fixture(scope="module")
def hello(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.fail("gcc missing") if IN_CI else pytest.skip("gcc unavailable")
    d = tmp_path_factory.mktemp("dyn")
    (d / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hello");return 0;}\n')
    (d / "lib.c").write_text("int tlslab_answer(void){return 42;}\n")
    (d / "uses.c").write_text('int tlslab_answer(void);\nint main(void){return tlslab_answer() != 42;}\n')
    ok = subprocess.run(["gcc", "-m32", "-O2", "-o", d / "hello", d / "hello.c"], capture_output=True).returncode == 0
    ok = ok and subprocess.run(["gcc", "-m32", "-shared", "-fPIC", "-o", d / "libtlslabx.so", d / "lib.c"],
                               capture_output=True).returncode == 0
    ok = ok and subprocess.run(["gcc", "-m32", "-o", d / "uses", d / "uses.c", f"-L{d}", "-ltlslabx"],
                               capture_output=True).returncode == 0
    if not ok:
        pytest.fail("gcc -m32 cannot build") if IN_CI else pytest.skip("gcc -m32 (gcc-multilib) unavailable")
    return d


def test_host_built_dynamic_program_runs_with_the_roots_libc(debian_rootfs, hello):
    p = _cli("run", str(hello / "hello"), "-s", "flip", "--json")
    assert p.returncode == 0, p.stderr
    record = json.loads(p.stdout)
    assert record["stdout"] == "hello\n" and record["rootfs"] == "debian"
    assert "LC_ALL=C" in record["environment"]


def test_missing_library_is_one_line(debian_rootfs, hello):
    _assert_one_line(_cli("run", str(hello / "uses")), "libtlslabx.so", "not in the guest's root")


def test_missing_interpreter_is_one_line(debian_rootfs, hello, tmp_path):
    data = (hello / "hello").read_bytes()
    assert data.count(b"/lib/ld-linux.so.2\0") == 1
    bad = tmp_path / "badinterp"
    bad.write_bytes(data.replace(b"/lib/ld-linux.so.2\0", b"/lib/ld-nonex.so.2\0"))
    _assert_one_line(_cli("run", str(bad)), "/lib/ld-nonex.so.2")


def test_unusable_libraries_are_one_line(debian_rootfs, hello, tmp_path):
    """A truncated libc, a 64-bit one, an ARM one, found first through LD_LIBRARY_PATH in a mounted tree."""
    real = (debian_rootfs / "lib/i386-linux-gnu/libc.so.6").read_bytes()
    cases = {"truncated": real[:4096], "64-bit": real[:4] + b"\x02" + real[5:],
             "not i386": real[:18] + (40).to_bytes(2, "little") + real[20:], "not ELF": b"#!/bin/sh\n"}
    for why, content in cases.items():
        d = tmp_path / why.replace(" ", "_")
        d.mkdir()
        (d / "libc.so.6").write_bytes(content)
        p = _cli("run", str(hello / "hello"), "--root", str(d), "--env", "LD_LIBRARY_PATH=/data")
        _assert_one_line(p, "/data/libc.so.6")


def test_root_program_that_does_not_exist_is_one_line(debian_rootfs):
    _assert_one_line(_cli("run", "--rootfs", "debian", "/bin/no-such-program"), "/bin/no-such-program")
