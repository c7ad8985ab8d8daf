"""The real CPU is the oracle for tlslab.x86.segcheck and the Xen descriptor policy.

tests/oracle/probe.c is a 32-bit process that installs each descriptor (with
set_thread_area, or modify_ldt for shapes the TLS slots refuse), loads it into
%fs, performs one 1/2/4-byte read or write through %fs:(reg), and reports
whether it faulted and where: at the selector load, at the access (#GP), or in
paging (#PF: the segment check passed). Thousands of cases go through a
handful of probe runs; every one must agree with ``check_data_access``,
including *where* it faults: NOT_PRESENT/NOT_DATA at the load, other reasons
at the access.

Without gcc -m32 or 32-bit execution the tests skip; with CI=true they fail.
"""

from __future__ import annotations

import collections
import os
import platform
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import unavailable
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tlslab.x86 import (
    PROFILES,
    AccessFault,
    SegmentDescriptor,
    UserDesc,
    check_data_access,
    flip,
    truncate,
)

pytestmark = pytest.mark.oracle

PROBE_SOURCE = Path(__file__).parent / "oracle" / "probe.c"
REGION_SIZE = 4 << 20  # the probe's own mmap region; must match probe.c
U32 = 0xFFFF_FFFF
MIN_COMPARED = 2000
LOAD_FAULTS = {AccessFault.NOT_PRESENT, AccessFault.NOT_DATA}


def _unavailable(reason: str) -> None:
    unavailable(f"hardware oracle unavailable: {reason}")


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> Path:
    """The probe, compiled once per session (``gcc -m32 -static -O1``)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        _unavailable(f"host is {platform.machine()}, not x86")
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable("no gcc on PATH")
    exe = tmp_path_factory.mktemp("oracle") / "probe"
    build = subprocess.run(
        [gcc, "-m32", "-static", "-O1", "-Wall", "-o", str(exe), str(PROBE_SOURCE)],
        capture_output=True, text=True, timeout=120,
    )
    if build.returncode != 0:
        last = (build.stderr.strip().splitlines() or ["?"])[-1]
        _unavailable(f"gcc -m32 -static failed (is gcc-multilib installed?): {last}")
    try:
        smoke = subprocess.run([str(exe)], input="", capture_output=True, text=True, timeout=30)
    except OSError as exc:
        _unavailable(f"cannot execute a 32-bit x86 binary: {exc}")
    if smoke.returncode != 0 or not smoke.stdout.startswith("region "):
        _unavailable(f"probe did not start (exit {smoke.returncode}): {smoke.stderr.strip()}")
    return exe


# ---------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One probe input line: a struct user_desc request plus one access."""

    mode: str  # "t": set_thread_area (GDT TLS slot), "l": modify_ldt
    contents: int
    limit_in_pages: bool
    seg_32bit: bool
    read_exec_only: bool
    not_present: bool
    limit: int  # raw 20-bit field
    base_kind: str  # "r": land base+offset inside the probe's region, "a": absolute base
    base: int  # landing position ("r") or absolute base ("a")
    offset: int
    size: int
    write: bool

    def line(self) -> str:
        flags = (self.contents, self.limit_in_pages, self.seg_32bit, self.read_exec_only,
                 self.not_present)
        return (f"{self.mode} " + " ".join(str(int(f)) for f in flags)
                + f" {self.limit:#x} {self.base_kind} {self.base:#x} {self.offset:#x}"
                f" {self.size} {int(self.write)}")

    def descriptor(self, base: int) -> SegmentDescriptor:
        """What Linux installs for this request, at the base the probe used."""
        return UserDesc(
            base_addr=base, limit=self.limit, seg_32bit=self.seg_32bit,
            contents=self.contents, read_exec_only=self.read_exec_only,
            limit_in_pages=self.limit_in_pages, seg_not_present=self.not_present,
        ).to_descriptor()

    @classmethod
    def of(cls, desc: SegmentDescriptor, offset: int, size: int, mode: str = "t") -> Case:
        """A read through an absolute-base descriptor (for Xen-derived limits)."""
        ud = UserDesc.from_descriptor(desc)
        return cls(mode, ud.contents, ud.limit_in_pages, ud.seg_32bit, ud.read_exec_only,
                   ud.seg_not_present, ud.limit, "a", desc.base, offset, size, False)


@dataclass
class Tally:
    compared: int = 0
    rejected: int = 0
    verdicts: collections.Counter = None  # model verdict -> count
    hardware: collections.Counter = None  # probe outcome -> count
    rejected_modes: collections.Counter = None  # "t"/"l" -> cases the kernel refused
    disagreements: list = None

    def __post_init__(self):
        self.verdicts = collections.Counter()
        self.hardware = collections.Counter()
        self.rejected_modes = collections.Counter()
        self.disagreements = []

    def line(self) -> str:
        faults = sum(n for v, n in self.verdicts.items() if v != "allowed")
        return (f"{self.compared} cases compared with the CPU "
                f"({self.compared - faults} allowed, {faults} faulting), "
                f"{len(self.disagreements)} disagreements, "
                f"{self.rejected} rejected by the kernel (not compared)")


def run_probe(probe: Path, cases: list[Case]) -> list[list[str]]:
    """Run one batch through one probe process; one parsed output line per case."""
    proc = subprocess.run([str(probe)], input="".join(c.line() + "\n" for c in cases),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"probe failed (exit {proc.returncode}): {proc.stderr}"
    lines = proc.stdout.splitlines()
    assert lines and lines[0].startswith("region "), proc.stdout[:200]
    results = [line.split() for line in lines[1:]]
    assert len(results) == len(cases), f"{len(cases)} cases in, {len(results)} lines out"
    return results


def compare(cases: list[Case], results: list[list[str]], tally: Tally | None = None) -> Tally:
    tally = tally or Tally()
    for case, result in zip(cases, results):
        kind = result[0]
        tally.hardware[kind] += 1
        if kind == "rejected":
            tally.rejected += 1
            tally.rejected_modes[case.mode] += 1
            continue
        if kind not in ("ok", "pf", "gp", "load"):
            tally.disagreements.append((case.line(), " ".join(result), "unexpected probe outcome"))
            continue
        base = int(result[1], 16)
        verdict = check_data_access(case.descriptor(base), case.offset, case.size, case.write)
        tally.compared += 1
        tally.verdicts[verdict.reason.name if verdict.reason else "allowed"] += 1
        if verdict.allowed:
            expected = {"ok"} if case.base_kind == "r" else {"ok", "pf"}
        else:
            expected = {"load"} if verdict.reason in LOAD_FAULTS else {"gp"}
        if kind not in expected:
            tally.disagreements.append((case.line(), " ".join(result), verdict.message))
    return tally


def assert_agrees(tally: Tally) -> None:
    shown = "\n".join(f"  {c}  ->  cpu: {r}; model: {m}" for c, r, m in tally.disagreements[:20])
    assert not tally.disagreements, f"{tally.line()}; first ones:\n{shown}"


# --------------------------------------------------------- case corpus
def _edge_offsets(desc: SegmentDescriptor) -> list[int]:
    """Offsets next to every boundary the check cares about, plus wrap-around."""
    points = {0, desc.effective_limit, desc.effective_limit + 1, desc.upper_bound,
              desc.upper_bound + 1, 0xFFFF, 0x10000, 0x7FFF_FFFF, U32}
    return sorted({p + d for p in points for d in range(-4, 4) if 0 <= p + d <= U32})


TLS_LIMITS = {
    True: [0, 1, 0xF, 0x7FFFF, 0xF57FF, 0xFBFFF, 0xFFFFE, 0xFFFFF],  # page-granular
    False: [0, 1, 3, 0xFFF, 0xFFFF, 0x10000, 0x12345, 0xFFFFF],  # byte-granular
}
ABSOLUTE_BASES = [0, 0x1000, 0x0804_8000, 0x8000_0000, 0xF7F0_0000, 0xFBFF_F000, 0xFFFF_F000]


def _cases_for(rng: random.Random, mode: str, shape: dict, per_shape: int) -> list[Case]:
    probe_desc = UserDesc(base_addr=0, limit=shape["limit"], seg_32bit=shape["seg_32bit"],
                          contents=shape["contents"], limit_in_pages=shape["limit_in_pages"],
                          read_exec_only=shape["read_exec_only"]).to_descriptor()
    offsets = _edge_offsets(probe_desc)
    cases = []
    for _ in range(per_shape):
        offset = rng.choice(offsets) if rng.random() < 0.9 else rng.randrange(U32 + 1)
        size = rng.choice((1, 2, 4))
        write = rng.random() < 0.4
        if not write and rng.random() < 0.25:  # absolute base: exercises #PF vs #GP
            base_kind, base = "a", rng.choice(ABSOLUTE_BASES + [rng.randrange(U32 + 1)])
        else:
            base_kind, base = "r", rng.randrange(0x1000, REGION_SIZE - 0x1000)
        cases.append(Case(mode, shape["contents"], shape["limit_in_pages"], shape["seg_32bit"],
                          shape["read_exec_only"], shape.get("not_present", False),
                          shape["limit"], base_kind, base, offset, size, write))
    return cases


def corpus(seed: int = 2004) -> list[Case]:
    """Deterministic cases: every TLS data shape at every edge, LDT shapes, 16-bit."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for pages, limits in TLS_LIMITS.items():
        for limit in limits:
            for contents in (0, 1):  # expand-up, expand-down data
                for reo in (False, True):
                    shape = dict(contents=contents, limit_in_pages=pages, seg_32bit=True,
                                 read_exec_only=reo, limit=limit)
                    cases += _cases_for(rng, "t", shape, 40)
    # set_thread_area refuses 16-bit and code segments: count a few such rejections
    for contents, seg32 in ((0, False), (2, True)):
        cases += _cases_for(rng, "t", dict(contents=contents, limit_in_pages=True,
                                           seg_32bit=seg32, read_exec_only=False,
                                           limit=0xFFFFF), 3)
    # the LDT takes 16-bit (B=0: upper bound 0xFFFF), code and not-present segments
    for _ in range(48):
        pages = rng.random() < 0.5
        shape = dict(contents=rng.choice((0, 1, 1, 2, 3)), limit_in_pages=pages,
                     seg_32bit=rng.random() < 0.4, read_exec_only=rng.random() < 0.3,
                     limit=rng.choice(TLS_LIMITS[pages] + [rng.randrange(0x100000)]),
                     not_present=rng.random() < 0.1)
        if shape["contents"] == 3:
            shape["not_present"] = True  # Linux refuses present conforming code
        cases += _cases_for(rng, "l", shape, 30)
    return cases


GLIBC_OFFSETS = [-0x24, -0x20, -8, -4, -1, 0, 4, 8, 0xC, 0x10, 0x14, 0x18]


def xen_corpus(seed: int = 2005) -> list[Case]:
    """Descriptors as Xen would install them (truncated, flipped), at glibc's offsets."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for profile in PROFILES.values():
        hv = profile.hypervisor_start
        bases = [0x1000, 0x0804_A000, 0x0804_A123, hv - 0x1000, hv - 0x1FFF,
                 0xF7F0_0000 % hv] + [rng.randrange(0x1000, hv - 0x1000) for _ in range(12)]
        for base in bases:
            truncated = truncate(SegmentDescriptor.flat_user_data(base), profile)
            descs = [truncated]
            flipped = flip(truncated, U32 & -4, profile)
            if flipped is not None:
                descs.append(flipped)
            for desc in descs:
                edges = _edge_offsets(desc)
                for raw in GLIBC_OFFSETS + rng.sample(edges, min(10, len(edges))):
                    cases.append(Case.of(desc, raw & U32, rng.choice((1, 2, 4))))
    return cases


# ---------------------------------------------------------------- tests
def test_corpus_matches_hardware(probe, oracle_summary, record_property):
    cases = corpus() + xen_corpus()
    tally = compare(cases, run_probe(probe, cases))
    oracle_summary["edge corpus"] = tally.line()
    record_property("oracle_compared", tally.compared)
    record_property("oracle_disagreements", len(tally.disagreements))
    print(tally.line(), dict(tally.verdicts), dict(tally.hardware))
    assert_agrees(tally)
    assert tally.compared >= MIN_COMPARED, tally.line()
    # both sides of the boundary are well represented, and every reason occurs
    allowed = tally.verdicts["allowed"]
    assert 0.2 * tally.compared < allowed < 0.8 * tally.compared, tally.verdicts
    # NOT_PRESENT and NOT_DATA need the LDT (set_thread_area refuses such descriptors);
    # a kernel without modify_ldt rejects all "l" cases and we cannot demand them.
    ldt_cases = sum(c.mode == "l" for c in cases)
    ldt_available = tally.rejected_modes["l"] < ldt_cases
    for reason in AccessFault:
        if reason in LOAD_FAULTS and not ldt_available:
            continue
        assert tally.verdicts[reason.name] >= 5, (reason, tally.verdicts)
    assert tally.hardware["pf"] > 0 and tally.hardware["ok"] > 0, tally.hardware
    # most comparisons went through a real TLS slot (set_thread_area)
    tls_cases = sum(c.mode == "t" for c in cases)
    assert tls_cases - tally.rejected_modes["t"] >= MIN_COMPARED, tally.rejected_modes


def test_xen_truncation_and_flip_on_hardware(probe):
    """The thread's facts, on the real CPU: the truncated %gs faults at -4, the flip fixes it."""
    base = 0x0804_A000
    flat = SegmentDescriptor.flat_user_data(base)
    truncated = truncate(flat, "nonpae")
    flipped = flip(truncated, U32 & -4, "nonpae")
    back = flip(flipped, 0x14, "nonpae")
    cases = [Case.of(flat, U32 & -4, 4), Case.of(truncated, U32 & -4, 4),
             Case.of(flipped, U32 & -4, 4), Case.of(flipped, 0x14, 4), Case.of(back, 0x14, 4),
             Case.of(truncated, 0x14, 4)]
    outcome = [r[0] for r in run_probe(probe, cases)]
    hardware_allowed = [kind in ("ok", "pf") for kind in outcome]
    assert hardware_allowed == [True, False, True, False, True, True], outcome


@st.composite
def random_case(draw) -> Case:
    mode = draw(st.sampled_from("ttl"))
    contents = draw(st.sampled_from((0, 1) if mode == "t" else (0, 1, 2)))
    pages = draw(st.booleans())
    limit = draw(st.one_of(st.sampled_from(TLS_LIMITS[pages]), st.integers(0, 0xFFFFF)))
    offset = draw(st.one_of(
        st.integers(0, U32),
        st.integers(0, 8),
        st.integers(U32 - 8, U32),
        st.integers(-8, 8).map(lambda d: max(0, min(U32, ((limit << 12 | 0xFFF) if pages else limit) + d))),
    ))
    write = draw(st.booleans())
    return Case(mode, contents, pages, mode == "t" or draw(st.booleans()), draw(st.booleans()),
                False, limit, "r", draw(st.integers(0x1000, REGION_SIZE - 0x1000)),
                offset, draw(st.sampled_from((1, 2, 4))), write)


_random_tally = Tally()


# No shrinking: a failure already lists the disagreeing cases, and shrinking a
# 200-case batch one probe run at a time takes minutes.
@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(random_case(), min_size=150, max_size=250))
def test_random_batches_match_hardware(probe, oracle_summary, batch):
    """Hypothesis-generated batches, one probe run each."""
    results = run_probe(probe, batch)
    tally = compare(batch, results)
    compare(batch, results, _random_tally)
    oracle_summary["hypothesis batches"] = _random_tally.line()
    assert_agrees(tally)
