"""The model's process environment on the real CPU (``run_hw(model_env=True)``, the default).

Each value the supervisor makes the host give the guest as the model gives it
is checked with a small guest that prints it: the same output under the hw
backend and the Unicorn model, and the same in every hw run.

- the address space: no randomisation, a 3 GiB user space (the stack ends at
  0xC0000000, with GiBs unmapped above it as in the model). A probe built at
  test time (``gcc -m32 -static``) searches the end of its stack as gnulib's
  c-stack does (mincore, up to 4 MiB above it, halving): as many probes fail
  as in the model. The root's own grep does that search: its fault count
  equals the model's.

Skips (with the reason) where the host cannot run 32-bit code, ptrace is
refused, we are not root, or no compiler builds 32-bit static programs; with
CI=true those become failures. The root comes from the ``debian_rootfs``
fixture (skips when it is not fetched, fails under CI=true).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tlslab.experiment import RunSpec, execute
from conftest import unavailable
from tlslab.hw.backend import run_hw, run_spec

pytestmark = [pytest.mark.oracle]




STACK_END_PROBE = r"""
#include <stdio.h>
#include <stdint.h>
#include <sys/mman.h>
/* gnulib stackvma-mincore's search above the stack: find the end of the stack's
   mapping, then probe min(1024 pages, what is left below 4 GiB) above it, halving
   down to one page; count the probes that fail (ENOMEM: each an errno write) */
int main(void) {
    static unsigned char vec[1024];
    uintptr_t page = 4096, addr = (uintptr_t)__builtin_frame_address(0) & ~(page - 1), step = 1024;
    int fails = 0;
    while (addr + page != 0 && mincore((void *)(addr + page), page, vec) == 0) addr += page;
    addr += page;
    uintptr_t left = -addr / page;
    if (step > left) step = left;
    if (mincore((void *)addr, step * page, vec) < 0) fails++;
    while ((step /= 2))
        if (mincore((void *)addr, step * page, vec) < 0) fails++;
    printf("failing probes above the stack: %d\n", fails);
    fprintf(stderr, "stack ends at %#lx\n", (unsigned long)addr);
    return 0;
}
"""


@pytest.fixture(scope="module")
def stack_probe(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("gcc")
    if cc is None:
        unavailable("no gcc to build the 32-bit probe")
    d = tmp_path_factory.mktemp("model-env")
    src, exe = d / "stack_end.c", d / "stack_end"
    src.write_text(STACK_END_PROBE)
    proc = subprocess.run([cc, "-m32", "-static", "-O2", "-o", str(exe), str(src)], capture_output=True,
                          timeout=120)
    if proc.returncode != 0:
        unavailable("gcc -m32 -static cannot build the probe: "
                     + (proc.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1])
    return str(exe)


def test_stack_end_search_as_in_the_model(hw_ok, stack_probe):
    model, _ = execute(RunSpec(stack_probe, strategy="native", tree=None))
    assert model.status == 0 and model.stdout == b"failing probes above the stack: 11\n"
    runs = [run_hw(stack_probe, strategy="native", tree=None) for _ in range(3)]
    for r in runs:
        assert r.ok and r.status == 0
        assert r.stdout == model.stdout
    # no randomisation: the stack ends at the same place in every run, 3 GiB
    assert {r.stderr for r in runs} == {b"stack ends at 0xc0000000\n"}


def test_without_the_model_env_the_host_layout_shows(hw_ok, stack_probe):
    """The host's own layout (model_env=False): the stack ends a random 0..8 MiB below 4 GiB."""
    r = run_hw(stack_probe, strategy="native", tree=None, model_env=False)
    assert r.ok and r.status == 0
    assert 0x100000000 - (9 << 20) < int(r.stderr.split()[-1], 16) <= 0x100000000


@pytest.mark.parametrize("strategy", ["emulate", "flip"])
def test_grep_stack_probing_faults_equal_model(hw_ok, strategy):
    """The root's grep (gnulib c-stack: mincore below and above its stack): faults as in the model, every run."""
    spec = RunSpec("/bin/grep", ("-c", "root", "/etc/passwd"), strategy=strategy, tree=None, rootfs="debian")
    model, _ = execute(spec)
    assert model.crash is None
    faults = set()
    for _ in range(2):
        hw, _ = run_spec(spec)
        assert hw.ok and hw.stdout == model.stdout and hw.status == model.status
        faults.add(hw.faults)
    assert faults == {sum(model.counters["violations"].values())}
