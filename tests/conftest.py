"""Shared pytest configuration. Keep it small; add fixtures others need here.

**CI and skipping (the one definition).** ``CI`` is true exactly when the
environment has ``CI=true`` (the string ``true``, nothing else: ``.ci/run``
exports it, as GitHub Actions and GitLab CI do). A test that cannot run calls
``unavailable(reason)``: it skips with the reason, but under ``CI=true`` it
fails instead, because ``.ci/run`` installs everything the suite needs
(gcc-multilib for ``gcc -m32 -static``, chromium, busybox-static:i386, the
pinned Debian i386 root) and a skip there would hide a test that never ran.
Pass ``ci_installs=False`` only for what CI cannot provide (a different
compiler than the recorded one, a kernel that refuses modify_ldt, ...).
``require_gcc32()`` is the check for ``gcc -m32 -static`` (cached).

``oracle_summary``: tests that compare tlslab with the real CPU store one line
each under their name (how many cases were compared, how many disagreed); the
lines are printed in a "hardware oracle" section at the end of every run, with
or without ``-s``.

``debian_rootfs``: the materialised pinned Debian i386 root (``tlslab.rootfs``),
built from cached .debs, never downloading (``tlslab rootfs fetch`` does that);
``unavailable`` when it is not fetched.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import tlslab  # noqa: F401  first: it points the Unicorn binding at tlslab's build before any test imports unicorn

CI = os.environ.get("CI") == "true"
GCC32 = ["gcc", "-m32", "-static"]

_ORACLE_SUMMARY = pytest.StashKey[dict]()


def unavailable(reason: str, ci_installs: bool = True):
    """Skip with ``reason``; under ``CI=true`` fail instead (unless CI cannot provide it)."""
    if CI and ci_installs:
        pytest.fail(f"CI=true, and CI provides this, yet: {reason}")
    pytest.skip(reason)


@functools.cache
def gcc32_problem() -> str | None:
    """Why ``gcc -m32 -static`` cannot build and run an i386 program here, or None."""
    if shutil.which("gcc") is None:
        return "gcc is not installed (Debian: gcc-multilib)"
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "t.c"), os.path.join(d, "t")
        Path(src).write_text("int main(void) { return 0; }\n")
        cp = subprocess.run([*GCC32, "-o", exe, src], capture_output=True, text=True)
        if cp.returncode != 0:
            return f"gcc -m32 -static does not work here (install gcc-multilib): {cp.stderr.strip()[-200:]}"
        try:
            run = subprocess.run([exe], capture_output=True, timeout=30)
        except OSError as exc:
            return f"cannot execute a 32-bit program: {exc}"
        if run.returncode != 0:
            return f"a 32-bit program exits with {run.returncode} here"
    return None


def require_gcc32() -> None:
    why = gcc32_problem()
    if why:
        unavailable(why)


def build_c_guest(source: str, out_dir, name: str) -> Path:
    """Build a static i386 guest from C ``source`` (gcc -m32 -static -O1) as ``out_dir/name``: its path."""
    require_gcc32()
    src, exe = Path(out_dir) / f"{name}.c", Path(out_dir) / name
    src.write_text(source)
    subprocess.run([*GCC32, "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    return exe


def build_test_guest(rel: str, out_dir) -> str:
    """Build the C test guest ``tests/<rel>`` (gcc -m32 -static -O1) into ``out_dir``: its path."""
    require_gcc32()
    src = Path(__file__).resolve().parent / rel
    exe = Path(out_dir) / Path(rel).stem
    subprocess.run([*GCC32, "-O1", "-o", str(exe), str(src)], check=True)
    return str(exe)


@pytest.fixture(scope="module")
def native():
    """native(guest, args=(), variant=...): a bundled guest's native run, made once per module."""
    from tlslab.experiment import RunSpec, execute

    cache = {}

    def get(guest, args=(), variant="default"):
        key = (guest, args, variant)
        if key not in cache:
            cache[key] = execute(RunSpec(guest, args=args, strategy="native", variant=variant))[0]
        return cache[key]
    return get


@pytest.fixture(scope="session")
def oracle_summary(request) -> dict[str, str]:
    return request.config.stash.setdefault(_ORACLE_SUMMARY, {})


@pytest.fixture(scope="session")
def debian_rootfs() -> Path:
    from tlslab.rootfs import RootfsUnavailable, materialise

    try:
        return materialise("debian", fetch=False)
    except RootfsUnavailable as exc:
        unavailable(f"Debian i386 root unavailable: {exc}")


@pytest.fixture(scope="module")
def hw_ok(debian_rootfs) -> Path:
    """The hw backend can run programs of the pinned root here (root, ptrace, 32-bit exec), else skip/fail."""
    from tlslab.experiment import RunSpec
    from tlslab.guests import GuestError
    from tlslab.hw import backend

    if os.geteuid() != 0:
        unavailable(backend.ROOT_NEEDED)
    try:
        backend.run_spec(RunSpec("syscalls", ("1",), strategy="native"))
    except backend.HwUnavailable as exc:
        unavailable(str(exc))
    except GuestError as exc:
        unavailable(str(exc))
    return debian_rootfs


def pytest_terminal_summary(terminalreporter, config) -> None:
    lines = config.stash.get(_ORACLE_SUMMARY, {})
    if lines:
        terminalreporter.section("hardware oracle")
        for name, line in lines.items():
            terminalreporter.write_line(f"{name}: {line}")


def run_dirs(out: Path) -> list[Path]:
    """The bench run directories under ``out`` (those with a run.json), oldest first."""
    return sorted(p for p in out.iterdir() if (p / "run.json").is_file())


def host_output(spec, why_root: str = "the host's run is jailed (uid 1000, the model's tree), which needs root") -> bytes:
    """stdout of ``spec`` run natively on this CPU, untraced, in the hw backend's jail (uid 1000, the
    model's tree and root filesystem): the oracle model runs are compared with. Skips (fails under
    CI=true) where the host cannot."""
    from tlslab.experiment import RunSpec

    try:
        from tlslab.hw.backend import HwUnavailable, run_spec
    except ImportError as exc:  # pragma: no cover
        unavailable(f"hw backend: {exc}")
    if os.geteuid() != 0:
        unavailable(why_root, ci_installs=True)
    try:
        result, _ = run_spec(RunSpec(**{**spec.to_dict(), "strategy": "untraced", "args": tuple(spec.args)}))
    except HwUnavailable as exc:
        unavailable(f"cannot run natively here: {exc}")
    assert result.status == 0, result.stderr
    return result.stdout
