"""Issue 12 (7): every subcommand, driven with bad arguments, bad files and bad specs, ends cleanly.

``tlslab.cli.main(argv)`` is called in-process (stdout/stderr captured) for speed. Every generated
invocation contains at least one bad element, so it must end with exit status 1 or 2, with no
traceback and no "internal error" (a bug: exit 70), within a per-invocation bound. The examples are
deterministic (derandomised) and number at least MIN_INVOCATIONS in all.
"""

from __future__ import annotations

import io
import os
import random
import stat
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlslab.cli import main

MIN_INVOCATIONS = 2000
PER_CALL_SECONDS = 10.0
CALLS = {"n": 0, "seconds": 0.0, "slowest": (0.0, None)}

# --------------------------------------------------------------------------- bad files

FILES: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def bad_files(tmp_path_factory):
    """Random bytes, truncated ELFs (of a real guest), a 64-bit ELF, directories, symlinks (dangling,
    looping, to a directory), an unreadable file, a FIFO, /dev/null, an empty file, bad TOML/JSON."""
    from tlslab.guests import resolve_guest

    d = tmp_path_factory.mktemp("fuzzfiles")
    rng = random.Random(12)
    elf = resolve_guest("lsr").path.read_bytes()
    FILES.clear()
    for i in range(4):
        p = d / f"random{i}"
        p.write_bytes(rng.randbytes(rng.choice([1, 16, 100, 5000])))
        FILES[f"random{i}"] = p
    for cut in (4, 16, 52, 60, 200, 4096, len(elf) // 2, len(elf) - 1):
        p = d / f"trunc{cut}"
        p.write_bytes(elf[:cut])
        FILES[f"trunc{cut}"] = p
    corrupt = bytearray(elf)
    for _ in range(40):
        corrupt[rng.randrange(0, 512)] = rng.randrange(256)
    (d / "corrupt").write_bytes(bytes(corrupt))
    FILES["corrupt"] = d / "corrupt"
    FILES["elf64"] = Path("/bin/true")
    FILES["empty"] = d / "empty"
    FILES["empty"].write_bytes(b"")
    FILES["dir"] = d / "adir"
    FILES["dir"].mkdir()
    FILES["dangling"] = d / "dangling"
    os.symlink(d / "nowhere", FILES["dangling"])
    FILES["loop"] = d / "loop"
    os.symlink(d / "loop", FILES["loop"])
    FILES["todir"] = d / "todir"
    os.symlink(FILES["dir"], FILES["todir"])
    FILES["unreadable"] = d / "unreadable"
    FILES["unreadable"].write_bytes(elf[:100])
    FILES["unreadable"].chmod(0)
    FILES["fifo"] = d / "fifo"
    os.mkfifo(FILES["fifo"])
    FILES["devnull"] = Path("/dev/null")
    FILES["missing"] = d / "missing" / "file"
    FILES["badtoml"] = d / "bad.toml"
    FILES["badtoml"].write_text("[[guest\nname = ")
    FILES["binjson"] = d / "bin.json"
    FILES["binjson"].write_bytes(b"\xff\xfe{\x00")
    FILES["listjson"] = d / "list.json"
    FILES["listjson"].write_text("[1, 2, 3]")
    FILES["nul"] = Path(str(d / "x") + "\0y")
    yield
    FILES["unreadable"].chmod(stat.S_IRUSR | stat.S_IWUSR)


def bad_file() -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(FILES_KEYS)).map(lambda k: str(FILES[k]))


FILES_KEYS = ["random0", "random1", "random2", "random3", "trunc4", "trunc16", "trunc52", "trunc60", "trunc200",
              "trunc4096", "corrupt", "elf64", "empty", "dir", "dangling", "loop", "todir", "unreadable", "fifo",
              "devnull", "missing", "badtoml", "binjson", "listjson", "nul"]

# --------------------------------------------------------------------------- bad values

junk_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=30)
bad_number = st.sampled_from(["-1", "nan", "inf", "-inf", "1e400", "x", "", "0x", "99999999999999999999999",
                              "-0.5", "1_000", "½"])
bad_tree = st.one_of(
    st.sampled_from(["dirs=", "dirs=x", "dirs=-1", "depth=0", "depth=65", "dirs=100001", "files=999999999",
                     "bogus=1", "dirs=1,,dirs=2x", "max_size=99999999999", "=", ",=,", "dirs=1e3", "a" * 1500,
                     "dirs=100000,files=400000,symlinks=100"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["dirs", "files", "symlinks", "depth", "seed", "fanout"]),
              st.sampled_from(["-3", "1.5", "abc", "10" * 12, "9" * 25])),
)
unknown_option = st.sampled_from(["--bogus", "--no-such-option", "-Z", "--strategy=", "--json=1", "---"])


def opt(name: str, values) -> st.SearchStrategy[list[str]]:
    return values.map(lambda v: [name, v])


def run_like(command: str) -> st.SearchStrategy[list[str]]:
    """run / faults / hybrid: a guest (bad file, unknown name, or a good one with a bad option)."""
    good_guest = st.sampled_from(["lsr", "canary", "syscalls.nosegneg"])
    bad_guest = st.one_of(bad_file(), st.sampled_from(["no-such-guest", "lsr.bogus", "", ".", "..", "/"]))
    bad_opts = st.one_of(
        opt("--tree", bad_tree),
        opt("--timeout", bad_number.filter(lambda v: v not in ("1_000",))),
        opt("--seed", st.sampled_from(["-1", "x", "1.5", str(2**64)])),
        opt("--variant", st.sampled_from(["weird", "", "DYN"])),
        opt("--profile", st.sampled_from(["x", "PAE"])),
        opt("--root", bad_file()),
        opt("--tree-at", st.sampled_from(["relative", "", "/"])),
        opt("--env", st.sampled_from(["noequals", "=x", ""])),
        opt("--rootfs", st.sampled_from(["nosuchroot", ""])),
        opt("--strategy" if command != "hybrid" else "--cost-profile", st.sampled_from(["nope", "", "all"])),
        unknown_option.map(lambda o: [o]),
    )
    extra = {
        "run": st.one_of(opt("--backend", st.sampled_from(["qemu", ""])), opt("--stdout", st.sampled_from(["sock"])),
                         opt("--cost-profile", st.sampled_from(["nope"])), opt("--patch-policy", st.just("x"))),
        "faults": st.one_of(opt("--limit", st.sampled_from(["-1", "x", "2000000"])),
                            opt("--trace", st.sampled_from(["-5", "y"])), opt("--sort", st.just("size"))),
        "hybrid": st.one_of(opt("--emulate-ns", st.sampled_from(["-1", "nan", "0"])),
                            opt("--flip-ns", st.sampled_from(["x", "-2", "inf"]))),
    }[command]
    with_bad_guest = st.tuples(bad_guest, st.lists(st.one_of(bad_opts, extra), max_size=2)).map(
        lambda t: [command, t[0], *[x for o in t[1] for x in o]])
    with_bad_option = st.tuples(good_guest, st.lists(st.one_of(bad_opts, extra), min_size=1, max_size=3)).map(
        lambda t: [command, t[0], *[x for o in t[1] for x in o]])
    return st.one_of(with_bad_guest, with_bad_option)


def bench_like() -> st.SearchStrategy[list[str]]:
    return st.one_of(
        bad_file().map(lambda f: ["bench", f, "--list"]),
        bad_file().map(lambda f: ["bench", "--resume", f, "--out", "/nonexistent-tlslab-results"]),
        st.sampled_from(["0", "-2", "x", "99999"]).map(lambda j: ["bench", "--jobs", j, "--list"]),
        st.just(["bench", "--retry-failed", "--list"]),
        bad_file().map(lambda f: ["bench", "--cost-profile", "nope", "--list", f]),
        st.builds(lambda f: ["bench", f, "--resume", "x"], bad_file()),
        unknown_option.map(lambda o: ["bench", o]),
    )


@st.composite
def bad_spec(draw) -> str:
    """A matrix spec with at least one bad key (type, range or name), possibly beside good ones."""
    good_guest = "[[guest]]\nname = 'lsr'\n"
    value = st.sampled_from(["'x'", "-1", "0", "1.5", "true", "[]", "['nope']", "[1, 2]", "{a = 1}", "nan", "inf",
                             "1e308", "'all'", "[[]]", "''"])
    top_keys = ["strategies", "variants", "profiles", "backends", "cost_profile", "timeout_seconds",
                "kill_after_seconds", "stdout", "seed", "max_tasks_per_child", "fit", "hw", "unknown_key"]
    guest_keys = ["args", "trees", "tree", "applet", "weight", "stdout", "seed", "root", "label", "rootfs",
                  "tree_at", "env", "strategies", "variants", "profiles", "backends", "bogus"]
    kind = draw(st.integers(0, 5))
    if kind == 0:       # a bad top-level value
        k, v = draw(st.sampled_from(top_keys)), draw(value)
        return f"{k} = {v}\n{good_guest}"
    if kind == 1:       # a bad guest key
        k, v = draw(st.sampled_from(guest_keys)), draw(value)
        return f"{good_guest}{k} = {v}\n"
    if kind == 2:       # an unknown or bad guest name
        name = draw(st.sampled_from(["'no-such'", "''", "3", "'./missing'", "'lsr.bogus'", "'/abs/no/rootfs'"]))
        return f"[[guest]]\nname = {name}\n"
    if kind == 3:       # bad [hw] / [fit] tables
        table = draw(st.sampled_from(["hw", "fit"]))
        k = draw(st.sampled_from(["repeat", "cpu", "strategies", "variants", "guest", "tree", "nope"]))
        v = draw(value)
        return f"{good_guest}[{table}]\n{k} = {v}\n"
    if kind == 4:       # bad trees
        return f"{good_guest}trees = ['{draw(bad_tree)}']\n"
    return draw(st.sampled_from(["", "[[guest]]", "guest = 3", "name = 'x'", "[[guest]]\n[[guest]]\nname='lsr'",
                                 "\x00", "[[guest]]\nname = 'lsr'\ntimeout_seconds = 5"]))


def simple_commands() -> st.SearchStrategy[list[str]]:
    return st.one_of(
        st.tuples(st.sampled_from(["strategies", "version", "guests"]), junk_text.filter(lambda s: s != "--")).map(
            lambda t: [t[0], t[1] or "x"]),
        st.lists(junk_text, min_size=1, max_size=3).map(lambda a: ["check-descriptor", "g" + a[0], *a[1:]]),
        st.sampled_from([["check-descriptor", "00cff2000000ffff", "--offset", "x"],
                         ["check-descriptor", "00cff2000000ffff", "--size", "0"],
                         ["check-descriptor", "00cff2000000ffff", "--size", "65"],
                         ["check-descriptor", "ff", "ff"], ["check-descriptor", "00cff2000000ffff", "--profile", "z"],
                         ["check-descriptor", "00cff2000000ffff", "--offset", str(2**40)]]),
        st.tuples(bad_file(), st.booleans()).map(lambda t: ["export", t[0]] + (["--csv"] if t[1] else [])),
        st.tuples(bad_file(), bad_file()).map(lambda t: ["export", t[0], "--csv", "-o", t[1]]),
        bad_file().map(lambda f: ["report", f]),
        bad_file().map(lambda f: ["report", "x", "--results", f]),
        bad_file().map(lambda f: ["patch", "show", f]),
        st.tuples(bad_file(), bad_file()).map(lambda t: ["patch", "apply", t[0], t[1], "-o", "/nonexistent-d/x"]),
        bad_file().map(lambda f: ["patch", "record", f]),
        st.sampled_from([["patch", "record", "lsr", "--strategy", "flip"], ["patch", "record", "lsr", "--tree", "x=1"],
                         ["patch", "bogus"], ["costs", "bogus"], ["costs", "fit-xen-2004", "--guest", "no-such"],
                         ["costs", "fit-xen-2004", "--tree", "dirs=-1"], ["rootfs", "path", "nosuchroot"],
                         ["rootfs", "list", "nosuchroot"], ["rootfs", "fetch", "nosuchroot"], ["rootfs", "bogus"],
                         ["fetch", "no-such-package"], ["fetch", "--bogus"], ["calibrate", "--repeat", "0"],
                         ["calibrate", "--repeat", "x"], ["calibrate", "--tree", "bogus=1"],
                         ["calibrate", "--cpu", "-3"], ["calibrate", "--out-dir", "x", "--replace-bundled"]]),
        unknown_option.map(lambda o: [o]),
        junk_text.filter(lambda s: s not in ("", "--", "-h", "--help", "--version", "--debug")).map(lambda s: [s]),
    )


# --------------------------------------------------------------------------- the oracle

def invoke(argv: list[str], allowed=(1, 2)) -> None:
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="replace", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="replace", write_through=True)
    t0 = time.perf_counter()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    took = time.perf_counter() - t0
    CALLS["n"] += 1
    CALLS["seconds"] += took
    if took > CALLS["slowest"][0]:
        CALLS["slowest"] = (took, argv)
    text = out_b.getvalue().decode("utf-8", "replace") + err_b.getvalue().decode("utf-8", "replace")
    assert rc in allowed, (argv, rc, text[-2000:])
    assert "Traceback" not in text and "internal error" not in text, (argv, text[-2000:])
    assert "Exception ignored" not in text, (argv, text[-2000:])
    assert took < PER_CALL_SECONDS, (argv, took)


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@fuzz(700)
@given(st.one_of(run_like("run"), run_like("faults"), run_like("hybrid")))
def test_fuzz_guest_commands(argv):
    invoke(argv)


@fuzz(300)
@given(bench_like())
def test_fuzz_bench_arguments(argv):
    invoke(argv)


@fuzz(800)
@given(bad_spec())
def test_fuzz_bench_specs(text):
    from tlslab.bench.spec import MatrixSpec, SpecError

    path = FILES["dir"].parent / "spec.toml"
    path.write_text(text)
    try:                    # the generator makes a valid spec now and then (args = []): --list, exit 0
        MatrixSpec.from_toml(text, "x")
        allowed = (0,)
    except SpecError:
        allowed = (2,)
    invoke(["bench", str(path), "--out", str(FILES["dir"].parent / "results"), "--list"], allowed)
    assert not (FILES["dir"].parent / "results").exists()


@fuzz(1000)
@given(simple_commands())
def test_fuzz_every_other_subcommand(argv):
    invoke(argv)


def test_fuzz_made_enough_invocations():
    """Runs last in this module: the examples above number at least MIN_INVOCATIONS."""
    n, secs = CALLS["n"], CALLS["seconds"]
    print(f"\nfuzz: {n} invocations in {secs:.1f} s (slowest {CALLS['slowest'][0]:.2f} s: {CALLS['slowest'][1]})",
          file=sys.stderr)
    if n == 0:
        pytest.skip("run with the fuzz tests above")
    assert n >= MIN_INVOCATIONS
    assert secs < 60
