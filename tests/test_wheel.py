"""tlslab as an ordinary package: a built wheel, installed into a fresh virtualenv, runs from any directory.

The wheel is built from this checkout (``pip wheel --no-deps --no-build-isolation``: no network), installed
with ``--no-deps`` into a fresh venv whose dependencies come from this interpreter's site-packages (a
``.pth`` line, so no download either), and then ``tlslab run lsr`` and a tiny ``tlslab bench`` run from an
unrelated temporary directory. Nothing may be written into the installed package (caches go to
``$TLSLAB_CACHE``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from benchkit import ROOT, TINY
from conftest import unavailable
from tlslab.hw.build import package_files as supervisor_files

pytestmark = pytest.mark.slow

DEPS = ("unicorn", "capstone", "keystone", "elftools", "matplotlib", "rich")

TINY_SPEC = f"""
name = "wheel"
strategies = ["native", "emulate"]
variants = ["default"]
cost_profile = "nominal"
timeout_seconds = 60
[[guest]]
name = "lsr"
trees = ["{TINY}"]
[[guest]]
name = "canary"
args = ["3"]
"""


def _dep_dirs() -> list[str]:
    dirs = []
    for name in DEPS:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        top = Path(spec.origin).resolve().parent.parent
        if str(top) not in dirs:
            dirs.append(str(top))
    return dirs


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    for mod in ("setuptools", "wheel"):
        if importlib.util.find_spec(mod) is None:
            unavailable(f"{mod} is not installed (pip install -e '.[test]' brings it)")
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    cp = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                         "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    (whl,) = dist.glob("tlslab-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for needed in ("tlslab/_guests/manifest.json", "tlslab/_guests/bin/lsr", "tlslab/_guests/bin/lsr.dyn",
                   "tlslab/_guests/rootfs.lock.json", "tlslab/_guests/debian.lock.json",
                   "tlslab/_guests/src/lsr.c", "tlslab/_guests/boot/rc", "tlslab/bench/default.toml",
                   "tlslab/machine/_fastpath.c", "tlslab/x86/_core.c", "tlslab/x86/_core.h",
                   "tlslab/hypervisor/profiles/xen-2004.json",
                   # the supervisor is built from these on first use: every source file and header,
                   # its own and the x86 core's
                   *(f"tlslab/{name}" for name in supervisor_files())):
        assert needed in names, needed
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies from this interpreter (plain path lines: .pth files there, e.g. an editable
    # tlslab's finder, are not processed, so the venv's own tlslab is the one imported)
    Path(site, "zz_tlslab_test_deps.pth").write_text("\n".join(_dep_dirs()) + "\n")
    cp = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                         "--no-index", str(whl)], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    return env_dir


def _package_files(env_dir: Path) -> set[str]:
    pkg = next(env_dir.glob("lib/python*/site-packages/tlslab"))
    return {str(p.relative_to(pkg)) for p in pkg.rglob("*") if "__pycache__" not in p.parts}


def _tlslab(env_dir: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLSLAB_GUESTS_DIR", "PYTHONPATH"))}
    env.update({"TLSLAB_CACHE": str(cwd / "cache"), "COLUMNS": "160"})
    return subprocess.run([str(env_dir / "bin" / "tlslab"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_the_installed_tlslab_is_the_wheels(installed, tmp_path):
    cp = subprocess.run([str(installed / "bin" / "python"), "-c",
                         "import tlslab, tlslab.artifacts as a, tlslab.experiment as e; "
                         "print(tlslab.__file__); print(a.guests_dir()); print(a.checkout_root()); "
                         "print(e.host_directory('guests/boot'))"],
                        cwd=tmp_path, capture_output=True, text=True, check=True)
    where, guests, checkout, boot = cp.stdout.split("\n")[:4]
    assert where.startswith(str(installed)), where
    assert guests.startswith(str(installed)) and guests.endswith("tlslab/_guests")
    assert checkout == "None"
    assert boot.startswith(str(installed)) and Path(boot, "rc").is_file()


def test_run_lsr_from_an_unrelated_directory(installed, tmp_path):
    before = _package_files(installed)
    cp = _tlslab(installed, tmp_path, "run", "lsr", "--json")
    assert cp.returncode == 0, cp.stderr
    rec = json.loads(cp.stdout)
    assert rec["status"] == 0
    cp = _tlslab(installed, tmp_path, "guests")
    assert cp.returncode == 0 and "lsr.nosegneg" in cp.stdout, cp.stderr
    cp = _tlslab(installed, tmp_path, "bench", "--list")     # the default spec, bundled
    assert cp.returncode == 0 and "keir" in cp.stdout, cp.stderr
    assert (tmp_path / "cache").is_dir()                       # the compiled fast path went to the cache
    assert _package_files(installed) == before                 # nothing written into site-packages


def test_tiny_bench_from_an_unrelated_directory(installed, tmp_path):
    before = _package_files(installed)
    (tmp_path / "tiny.toml").write_text(TINY_SPEC)
    cp = _tlslab(installed, tmp_path, "bench", "--no-progress", "tiny.toml", "--out", "res", "--jobs", "2")
    assert cp.returncode == 0, cp.stderr
    (run,) = [p for p in (tmp_path / "res").iterdir() if (p / "run.json").is_file()]
    recs = [json.loads(line) for line in (run / "cells.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {r["outcome"] for r in recs} == {"ok"}, [r.get("reason") for r in recs]
    assert all(r["guest"]["path"].startswith(str(installed)) for r in recs)
    assert recs[0]["meta"]["git_commit"] == "unknown"          # no checkout to ask
    assert _package_files(installed) == before


def test_bench_on_a_scheduler_and_workers_started_from_the_wheel(installed, tmp_path):
    """The README's recipe on one machine: `dask scheduler`, `dask worker` (each in its own directory and
    cache: nothing shared but the network) and `tlslab bench --cluster ADDRESS`, all from the installed wheel."""
    import signal
    import time

    if importlib.util.find_spec("distributed") is None:
        unavailable("tlslab[cluster] (dask[distributed]) is not installed")
    py = str(installed / "bin" / "python")
    procs = []
    sched_file = tmp_path / "scheduler.json"
    try:
        for name, argv in (("scheduler", ["distributed.cli.dask_scheduler", "--port", "0"]),
                           ("worker", ["distributed.cli.dask_worker", "--nworkers", "2", "--nthreads", "1"])):
            where = tmp_path / name
            where.mkdir()
            env = {**os.environ, "TLSLAB_CACHE": str(where / "cache")}
            env.pop("TLSLAB_GUESTS_DIR", None)
            procs.append(subprocess.Popen([py, "-m", *argv, "--scheduler-file", str(sched_file), "--no-dashboard"],
                                          cwd=where, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            deadline = time.monotonic() + 60
            while name == "scheduler" and not (sched_file.is_file() and sched_file.read_text().strip()):
                assert time.monotonic() < deadline, "the scheduler did not start"
                time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        driver = tmp_path / "driver"
        driver.mkdir()
        (driver / "tiny.toml").write_text(TINY_SPEC)
        cp = _tlslab(installed, driver, "bench", "--no-progress", "tiny.toml", "--out", "res", "--cluster", address)
        assert cp.returncode == 0, cp.stderr
        (run,) = [p for p in (driver / "res").iterdir() if (p / "run.json").is_file()]
        recs = [json.loads(line) for line in (run / "cells.jsonl").read_text().splitlines()]
        assert len(recs) == 4 and {r["outcome"] for r in recs} == {"ok"}, [r.get("reason") for r in recs]
        assert all(r["worker"]["address"] and r["schema"] == 2 for r in recs)
        assert all(r["guest"]["path"].startswith(str(installed)) for r in recs)     # the worker's own package
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
