"""Adversarial guests against the hw supervisor (tests/hw_adversary/*.c): races and remaps.

The supervisor acts on a stopped task while the guest's other tasks run on. Each program here tries to
use that window, or to change what the supervisor patched, to get an untruncated descriptor (and read
the hypervisor hole: a page the program maps at 0xFC000000, which the model environment's address
space limit would forbid, hence model_env=False) or to make the supervisor write where it should not:

* sta_entry_race: another thread rewrites set_thread_area's entry_number while the call is in
  flight (the supervisor compares every TLS entry with what it installed instead of trusting memory);
* ldt_desc_race, ldt_shared_race: another thread, or another process through a MAP_SHARED page, puts
  back the flat limit the supervisor truncated in guest memory before the kernel copies it (modify_ldt
  with another task sharing the memory is refused, EPERM);
* settls_twin_entry: CLONE_SETTLS aimed at online-patch's twin entry once the ABI is in conflict;
* far_negative: a rewritten site meets a negative offset its %fs twin rejects (restored, as in the model);
* remap_patched: the guest maps other bytes over a rewritten page (not written when restoring).

Skips (with the reason) where the host cannot run 32-bit code or ptrace is refused; with CI=true in
the environment those become failures.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import GCC32, require_gcc32
from test_hw_online import hw_ok  # noqa: F401  (the fixture: skip or fail where the hw backend cannot run)

from tlslab.hw import backend

pytestmark = pytest.mark.oracle
SOURCES = Path(__file__).resolve().parent / "hw_adversary"
PRICES = (1000.0, 1500.0)


@pytest.fixture(scope="module")
def build(hw_ok, tmp_path_factory):
    require_gcc32()
    out = tmp_path_factory.mktemp("hw_adversary")

    def make(name: str) -> Path:
        exe = out / name
        if not exe.exists():
            subprocess.run([*GCC32, "-O1", "-pthread", "-o", str(exe), str(SOURCES / f"{name}.c")], check=True,
                           capture_output=True)
        return exe
    return make


def run(exe, strategy, **kw):
    kw.setdefault("tree", None)
    prices = PRICES if strategy in backend.ONLINE else None
    return backend.run_hw(exe, strategy=strategy, prices=prices, **kw)


@pytest.mark.parametrize("strategy", ("emulate", "online-probe", "online-patch"))
def test_set_thread_area_entry_race_never_leaves_a_flat_slot(build, strategy):
    r = run(build("sta_entry_race"), strategy, cpu=None, model_env=False, timeout=120)
    assert b"HOLE REACHED" not in r.stdout, r.stdout
    assert r.ok and r.stdout == b"no hole in 2000 attempts\n", (r.stdout, r.summary.get("first_delivered"))


def test_modify_ldt_with_another_thread_is_refused(build):
    r = run(build("ldt_desc_race"), "emulate", model_env=False, timeout=120)
    assert b"HOLE REACHED" not in r.stdout, r.stdout
    assert r.ok and r.stdout == b"no hole\n"
    assert r.summary["ldt_refused"] == 5000            # every call: the flipper thread is alive throughout
    native = run(build("ldt_desc_race"), "native", model_env=False, timeout=120)
    assert native.summary["ldt_refused"] == 0          # nothing is truncated, nothing to refuse


def test_modify_ldt_from_a_shared_page_is_refused(build):
    """The request lies in a MAP_SHARED page another process writes: refused though this process has one task."""
    r = run(build("ldt_shared_race"), "emulate", model_env=False, timeout=120, cpu=None)
    assert b"HOLE REACHED" not in r.stdout, r.stdout
    assert r.ok and r.stdout == b"no hole (3000 refused)\n"
    assert r.summary["ldt_refused"] == 3000


def test_settls_into_the_twin_entry_is_truncated(build):
    r = run(build("settls_twin_entry"), "online-patch", model_env=False, timeout=60)
    assert b"HOLE REACHED" not in r.stdout, r.stdout
    assert r.signal == 11 and "DISALLOWING UNSAFE ACCESS to 0xfc000000" in r.summary["first_delivered"]


def test_a_far_negative_offset_at_a_rewritten_site_restores_it(build):
    exe = build("far_negative")
    native = run(exe, "native")
    r = run(exe, "online-patch", timeout=30)
    assert r.ok and r.stdout == native.stdout
    assert r.online["by_kind"].get("unpatched-mixed-site") == 1
    assert r.faults == r.online["patches"] + 1     # each site once, and the one %fs fault that restored it
    # (not compared with the model: its stack is below the TCB + 2 GiB, so the offset's top bit is clear)


def test_a_remapped_rewritten_page_is_not_written(build):
    exe = build("remap_patched")
    r = run(exe, "online-patch", argv=["remap_patched", "p"])
    assert r.ok and r.stdout == b"done\n", r.stdout           # no "read-only data page changed" line
    assert r.online["by_kind"].get("rewritten-site-remapped-by-the-guest") == 1
    shared = run(exe, "online-patch", argv=["remap_patched", "s"])
    native = run(exe, "native", argv=["remap_patched", "s"])
    assert shared.ok and shared.stdout == native.stdout and shared.status == native.status
