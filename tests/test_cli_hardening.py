"""Issue 12: every command ends cleanly -- bad input, interrupts, hostile binaries, honest labels.

One test (or a parametrised family) per case of the issue; docs/cli.md has the rule.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GCC32, require_gcc32
from tlslab.cli import main


def tlslab(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tlslab", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def call(argv, capsys) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --------------------------------------------------------------------------- 1. one CLI rule

@pytest.mark.parametrize("argv, needle", [
    (["run", "lsr", "--bogus"], "unrecognized arguments: --bogus"),
    (["nosuch"], "invalid choice"),
    (["run", "lsr", "--timeout", "nan"], "--timeout"),
    (["run", "lsr", "--timeout", "-1"], "--timeout"),
    (["run", "lsr", "--seed", "-5"], "--seed"),
    (["run", "lsr", "--tree", "dirs=1e9"], "not an integer"),
    (["run", "lsr", "--tree", "dirs=100001"], "limit"),
    (["run", "lsr", "--root", "/nonexistent-tlslab"], "not a directory"),
    (["run", "/"], "/"),
    (["run", "/bin/true"], "ELF"),            # 64-bit
    (["run", "/etc/hostname"], ""),
    (["faults", "lsr", "--limit", "-1"], "--limit"),
    (["bench", "--jobs", "0"], "--jobs"),
    (["bench", "/nonexistent.toml"], "does not exist"),
    (["bench", "--cost-profile", "nope", "--list"], "unknown cost profile"),
    (["export", "/nonexistent-run", "--csv"], ""),
    (["report", "/nonexistent-run"], ""),
    (["calibrate", "--repeat", "0"], "--repeat"),
    (["calibrate", "--tree", "dirs=x"], "not an integer"),
    (["check-descriptor", "zz"], "hexadecimal"),
    (["patch", "show", "/nonexistent.json"], ""),
    (["hybrid", "lsr", "--emulate-ns", "-1", "--flip-ns", "1"], "--emulate-ns"),
    (["run", "lsr", "-s", "online-patch", "--page-sharing", "shared"], "private copies only"),
    (["costs", "fit-xen-2004", "--tree", "dirs=-1"], ""),
    (["strategies", "extra"], "unrecognized"),
    (["version", "--", "x"], "no arguments after --"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    rc, out, err = call(argv, capsys)
    assert rc == 2, (argv, out, err)
    line = one_line(err)
    assert needle in line
    assert line.startswith("tlslab")


def test_debug_shows_the_traceback_and_bugs_are_exit_70(capsys, monkeypatch):
    import tlslab.cli.commands.strategies as strategies

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(strategies, "run", broken)
    import tlslab.cli as cli

    monkeypatch.setattr(cli, "build_parser", _parser_with(strategies, broken))
    rc, _, err = call(["strategies"], capsys)
    assert rc == 70 and "internal error: ZeroDivisionError: boom" in one_line(err)
    rc, _, err = call(["--debug", "strategies"], capsys)
    assert rc == 70 and "Traceback" in err and "ZeroDivisionError" in err
    rc, _, err = call(["run", "lsr", "--tree", "dirs=x", "--debug"], capsys)
    assert rc == 2 and "Traceback" in err


def _parser_with(module, handler):
    from tlslab.cli import build_parser as real

    def build():
        p = real()
        sub = next(a for a in p._actions if a.dest == "command")
        sub.choices["strategies"].set_defaults(handler=handler)
        return p
    return build


def test_help_is_exit_0_and_mentions_exit_statuses(capsys):
    rc, out, _ = call(["--help"], capsys)
    assert rc == 0 and "130 interrupted" in " ".join(out.split())
    rc, out, _ = call(["run", "--help"], capsys)
    assert rc == 0 and "tlslab guests" in out and "100,000 dirs" in " ".join(out.split())


def test_guests_command_exists(capsys):
    """run --help points to `tlslab guests`: that command exists."""
    rc, out, _ = call(["guests"], capsys)
    assert rc == 0 and "lsr" in out


# --------------------------------------------------------------------------- Ctrl-C

@pytest.fixture(scope="module")
def spinner(tmp_path_factory) -> Path:
    """A static i386 program that spins without system calls after glibc's start-up."""
    require_gcc32()
    d = tmp_path_factory.mktemp("spin")
    (d / "spin.c").write_text("int main(void) { volatile unsigned x = 0; for (;;) x++; }\n")
    subprocess.run([*GCC32, "-O1", "-o", str(d / "spin"), str(d / "spin.c")], check=True)
    return d / "spin"


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal gives it. A shell without job control starts background jobs with
    SIGINT ignored, and a CLI started so rightly keeps ignoring it; these tests play the user at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(argv, wait: float, env=None) -> tuple[int, float, str]:
    p = subprocess.Popen([sys.executable, "-m", "tlslab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **(env or {})}, preexec_fn=_default_sigint)
    time.sleep(wait)
    assert p.poll() is None, p.communicate()
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"{argv}: still running 10 s after SIGINT")
    return p.returncode, time.monotonic() - t0, err.decode()


def test_ctrl_c_stops_a_guest_spinning_without_system_calls(spinner):
    rc, took, err = _interrupt(["run", str(spinner)], wait=3.0)
    assert rc == 130, err
    assert took < 1.0, f"took {took:.2f} s"
    assert "interrupted" in one_line(err)


@pytest.mark.parametrize("wait", [0.9, 1.3, 1.7, 2.1])
def test_ctrl_c_is_never_lost_in_a_callback(wait):
    """A syscall-heavy guest: the first Ctrl-C ends the run (no 'Exception ignored on calling ctypes
    callback'), whenever it arrives (start-up, loading, the run loop)."""
    rc, took, err = _interrupt(["run", "syscalls", "-q", "--", "100000000"], wait=wait)
    assert rc == 130 and took < 1.0, (rc, took, err)
    assert "Exception ignored" not in err and "Traceback" not in err
    assert "nothing was written" in one_line(err)


def test_ctrl_c_during_tree_building():
    rc, took, err = _interrupt(["run", "lsr", "-q", "--tree", "dirs=100000,files=400000,symlinks=0"], wait=1.5)
    assert rc == 130 and took < 1.0, (rc, took, err)
    one_line(err)


BENCH_SPEC = """
name = "ctrlc"
strategies = ["native", "emulate", "flip"]
variants = ["default"]
timeout_seconds = 60
[[guest]]
name = "syscalls"
args = ["3000000"]
"""


def test_ctrl_c_in_bench_says_what_was_kept_and_how_to_resume(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text(BENCH_SPEC)
    rc, took, err = _interrupt(["bench", str(spec), "--out", str(tmp_path / "r"), "-j", "1", "--no-progress"],
                               wait=4.0)
    assert rc == 130 and took < 2.0, (rc, took, err)
    last = err.strip().splitlines()[-1]
    assert "interrupted" in last and "--resume" in last and str(tmp_path / "r") in last
    assert "Traceback" not in err


# --------------------------------------------------------------------------- 2. bench specs

@pytest.mark.parametrize("text, needle", [
    ("[[guest]]\nname = 'no-such-guest'", "unknown guest"),
    ("[[guest]]\nname = './no/such/file'", "no such file"),
    ("timeout_seconds = '10'\n[[guest]]\nname = 'lsr'", "timeout_seconds must be a number"),
    ("timeout_seconds = -1\n[[guest]]\nname = 'lsr'", "timeout_seconds"),
    ("timeout_seconds = inf\n[[guest]]\nname = 'lsr'", "timeout_seconds"),
    ("seed = 1.5\n[[guest]]\nname = 'lsr'", "seed must be an integer"),
    ("seed = true\n[[guest]]\nname = 'lsr'", "seed must be an integer"),
    ("variants = 'weird'\n[[guest]]\nname = 'lsr'", "unknown variant 'weird'"),
    ("variants = []\n[[guest]]\nname = 'lsr'", "variants must not be empty"),
    ("variants = [1]\n[[guest]]\nname = 'lsr'", "variants must be a list of strings"),
    ("strategies = 3\n[[guest]]\nname = 'lsr'", "strategies must be a list of strings"),
    ("profiles = ['x']\n[[guest]]\nname = 'lsr'", "unknown hypervisor profile"),
    ("cost_profile = 'nope'\n[[guest]]\nname = 'lsr'", "cost_profile: unknown cost profile"),
    ("stdout = 'sock'\n[[guest]]\nname = 'lsr'", "stdout"),
    ("max_tasks_per_child = 0\n[[guest]]\nname = 'lsr'", "max_tasks_per_child"),
    ("fit = 3\n[[guest]]\nname = 'lsr'", "[fit] must be a table"),
    ("[fit]\nwho = 'x'\n[[guest]]\nname = 'lsr'", "[fit]: unknown key"),
    ("[hw]\nrepeat = 0\n[[guest]]\nname = 'lsr'", "[hw] repeat"),
    ("[hw]\nrepeat = 'x'\n[[guest]]\nname = 'lsr'", "[hw] repeat must be an integer"),
    ("[hw]\nstrategies = 'emulate2'\n[[guest]]\nname = 'lsr'", "emulate2"),
    ("[[guest]]\nname = 'lsr'\nweight = -1", "weight"),
    ("[[guest]]\nname = 'lsr'\nweight = 'heavy'", "weight must be a number"),
    ("[[guest]]\nname = 'lsr'\nseed = 'x'", "seed must be an integer"),
    ("[[guest]]\nname = 'lsr'\nstdout = 3", "stdout must be a"),
    ("[[guest]]\nname = 'lsr'\nroot = '/nonexistent-tlslab'", "root"),
    ("[[guest]]\nname = 'lsr'\ntrees = ['dirs=999999999']", "limit"),
    ("[[guest]]\nname = 'lsr'\nvariants = 'nosegneg'\nstrategies = ['flip', 'nope']", "unknown strategy 'nope'"),
    ("[[guest]]\nname = 'lsr'\napplet = 5", "applet must be a"),
    ("[[guest]]\nname = 'lsr'\ntree = 'small'\ntrees = ['4k']", "not both"),
    ("guest = 5", "[[guest]]"),
    ("[[guest]]\nname = 'lsr'\ntrees = ['small', '4k', 'dirs=1', 'dirs=2', 'dirs=3']\nseed = 0\n"
     "strategies = 'all'\nvariants = ['default', 'nosegneg', 'dyn']\nprofiles = ['nonpae', 'pae']\n" +
     "\n".join(f"[[guest]]\nname = 'lsr'\nargs = ['{i}']\nstrategies = 'all'\nvariants = ['default', 'nosegneg', 'dyn']\n"
               f"profiles = ['nonpae', 'pae']\ntrees = ['small', '4k', 'dirs=1', 'dirs=2', 'dirs=3', 'dirs=4', "
               f"'dirs=5', 'dirs=6', 'dirs=7', 'dirs=8', 'dirs=9', 'dirs=10', 'dirs=11', 'dirs=12']"
               for i in range(50)), "limit of 20,000"),
])
def test_bench_specs_are_checked_before_anything_runs(text, needle, tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text(text + "\n")
    rc, out, err = call(["bench", str(spec), "--out", str(tmp_path / "r")], capsys)
    assert rc == 2, (out, err)
    assert needle in one_line(err)
    assert not (tmp_path / "r").exists()         # nothing ran, nothing was written


def test_a_string_variant_is_one_variant_not_its_characters():
    from tlslab.bench.spec import MatrixSpec

    spec = MatrixSpec.from_toml("variants = 'default'\nstrategies = 'native'\n[[guest]]\nname = 'lsr'\n", "t")
    assert {c.spec.variant for c in spec.cells()} == {"default"}
    assert {c.spec.strategy for c in spec.cells()} == {"native"}


def test_a_run_in_which_every_cell_failed_exits_1(tmp_path, capsys):
    notelf = tmp_path / "notelf"
    notelf.write_text("just text\n")
    spec = tmp_path / "s.toml"
    spec.write_text(f"strategies = ['native', 'emulate']\nvariants = ['default']\n[[guest]]\nname = '{notelf}'\n")
    rc, out, err = call(["bench", str(spec), "--out", str(tmp_path / "r"), "--no-progress", "-j", "2"], capsys)
    assert rc == 1, err
    assert "every cell that ran failed" in err and "Traceback" not in out + err


# --------------------------------------------------------------------------- 3. bounded inputs

def test_tree_specs_are_bounded_and_the_limits_are_in_the_help():
    from tlslab.linux.tree import LIMITS_HELP, MAX_ENTRIES, TreeSpec, TreeSpecError

    for bad in ("dirs=100001", "files=500001", "dirs=100000,files=500000", "depth=65", "depth=0", "x" * 2000,
                "dirs=-1", "dirs=0x10", "dirs=" + "9" * 30, "max_size=99999999999"):
        with pytest.raises(TreeSpecError):
            TreeSpec.parse(bad)
    assert TreeSpec.parse("dirs=100000,files=400000,symlinks=0").entries == MAX_ENTRIES
    assert "100,000 dirs" in LIMITS_HELP


def _reference_dirs(spec: str):
    """The quadratic generator the tree module had (its directory draws), kept as the definition."""
    import posixpath
    import random

    from tlslab.linux.tree import TreeSpec, _name

    s = TreeSpec.parse(spec)
    rng = random.Random(f"tlslab-tree:{s.seed}")
    dirs = [("", 0)]
    names = {"": set()}
    subdirs = {"": 0}
    out = []
    for _ in range(s.dirs):
        candidates = [d for d in dirs if d[1] < s.depth and subdirs[d[0]] < s.fanout]
        candidates = candidates or [d for d in dirs if d[1] < s.depth]
        parent, depth = rng.choice(candidates)
        path = posixpath.join(parent, _name(rng, names[parent]))
        dirs.append((path, depth + 1))
        names[path], subdirs[path] = set(), 0
        subdirs[parent] += 1
        out.append(path)
        rng.randrange(0, 365 * 86400), rng.randrange(0, 1_000_000_000)   # the mtime draws
    return out


@pytest.mark.parametrize("spec", ["small", "4k", "dirs=200,fanout=1,depth=3", "dirs=50,fanout=0,depth=2",
                                  "dirs=300,depth=1", "dirs=120,fanout=3,depth=5,seed=7"])
def test_the_tree_generator_draws_the_same_trees_without_quadratic_time(spec):
    from tlslab.linux.tree import SyntheticTree

    got = [e.path for e in SyntheticTree(spec).entries if e.kind == "dir"]
    assert got == _reference_dirs(spec)


def test_a_big_tree_is_built_in_n_log_n():
    from tlslab.linux.tree import SyntheticTree

    t0 = time.perf_counter()
    SyntheticTree("dirs=20000,files=0,symlinks=0")      # 7 s with the quadratic generator
    assert time.perf_counter() - t0 < 2.0


def test_the_timeout_covers_building_the_filesystem(capsys, monkeypatch):
    """A tree that never finishes building (a stand-in for a huge spec) still ends at --timeout."""
    from tlslab.linux import tree

    def forever(self):
        while True:
            pass

    monkeypatch.setattr(tree.SyntheticTree, "_generate", forever)
    t0 = time.monotonic()
    rc, _, err = call(["run", "lsr", "-q", "--timeout", "0.5", "--tree", "dirs=10"], capsys)
    assert rc == 1 and time.monotonic() - t0 < 30
    assert "building the guest's filesystem" in one_line(err)


# --------------------------------------------------------------------------- 4. hw backend: hostile binaries

TOUCH64 = r"""
#include <fcntl.h>
#include <unistd.h>
int main(int argc, char **argv) { if (argc > 1) close(open(argv[1], O_CREAT | O_WRONLY, 0644)); return 0; }
"""


def test_hw_backend_refuses_a_64_bit_host_binary_and_the_host_is_unchanged(tmp_path, capsys):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    src = tmp_path / "touch64.c"
    src.write_text(TOUCH64)
    exe = tmp_path / "touch64"
    subprocess.run(["gcc", "-static", "-o", str(exe), str(src)], check=True)
    victim_dir = tmp_path / "host"
    victim_dir.mkdir()
    victim = victim_dir / "written-by-guest"
    script = tmp_path / "touch.sh"
    script.write_text(f"#!/bin/sh\ntouch {victim}\n")
    script.chmod(0o755)
    before = sorted(os.listdir(tmp_path))
    for backend in ("hw", "unicorn"):
        for guest in (exe, script):
            rc, out, err = call(["run", "--backend", backend, "-s", "emulate", str(guest), "--", str(victim)], capsys)
            assert rc == 2, (backend, guest, out, err)
            line = one_line(err)
            assert str(guest) in line or "ELF" in line
            assert not victim.exists()
    # a real subprocess too (the supervisor would be exec'd from there)
    p = tlslab("run", "--backend", "hw", str(exe), "--", str(victim))
    assert p.returncode == 2 and "ELF" in one_line(p.stderr) and not victim.exists()
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(victim_dir) == []


# --------------------------------------------------------------------------- 5. honest labels, escaping

def test_crash_reports_keep_their_operands(capsys):
    """rich reads [eax] as markup unless escaped: `mov dword ptr [eax], 1` must print as is."""
    from tlslab.cli.commands.run import print_summary
    from tlslab.hypervisor import costmodel
    from tlslab.hypervisor.domain import GuestCrash, RunResult

    counters = {"instructions": 10, "strategy": {"name": "emulate", "traps": 1}, "policy": "xen [nonpae]",
                "segments": {}, "violations": {"gs": 1}, "linux": {"syscalls": {"total": 0}}}
    crash = GuestCrash(0x8048000, "main+0x3", "mov dword ptr [eax], 1", "SIGSEGV [bold]x[/]")
    result = RunResult(None, b"", b"", crash, counters, 0.1)

    class G:
        name, variant = "g[1]", "default"

    print_summary(None, G, result, costmodel.predict(costmodel.NOMINAL, counters), costmodel.NOMINAL, 0)
    out = " ".join(capsys.readouterr().out.split())
    assert "mov dword ptr [eax], 1" in out and "[bold]x[/]" in out
    assert "g[1]" in out and "xen [nonpae]" in out


def test_every_modelled_time_names_its_profile_and_nominal_says_faults_are_unpriced(capsys):
    rc, out, _ = call(["run", "lsr", "-q", "-s", "flip"], capsys)
    text = " ".join(out.split())
    assert rc == 0 and "under nominal" in text and "faults not priced" in text and "every strategy models as native" in text
    rc, out, _ = call(["run", "lsr", "-q", "-s", "flip", "--cost-profile", "xen-2004"], capsys)
    text = " ".join(out.split())
    assert rc == 0 and "under xen-2004 (FITTED to Keir 2004 (180/300/390 ms)" in text


def test_provenance_compares_host_and_cpu_model():
    from tlslab.bench.summary import profile_origin, same_machine
    from tlslab.hypervisor.costmodel import CostProfile

    prof = CostProfile("hw-vm", "measured", "tlslab calibrate on vm (Intel Xeon, Linux 6.1): ...", trap_ns=1,
                       provenance={"host": "vm", "cpu_model": "Intel Xeon"})
    assert profile_origin(prof) == ("vm", "Intel Xeon")
    same, text = same_machine(prof, "vm", "Intel Xeon")
    assert same and "consistency check" in text
    same, text = same_machine(prof, "vm", "AMD EPYC")
    assert not same and "consistency check" not in text and "AMD EPYC" in text and "Intel Xeon" in text
    same, text = same_machine(prof, "other", "Intel Xeon")
    assert not same and "different machine" in text
    old = CostProfile("hw-vm", "measured", "tlslab calibrate on vm (Intel(R) Xeon(R) Processor, Linux 6.18): x")
    assert profile_origin(old) == ("vm", "Intel(R) Xeon(R) Processor")    # from the description


def test_calibrate_writes_the_users_directory_unless_told_to_replace_a_bundled_profile(tmp_path, monkeypatch):
    from tlslab.hw.calibrate import profile_paths
    from tlslab.hypervisor import costmodel

    monkeypatch.setenv("TLSLAB_PROFILES", str(tmp_path / "p"))
    prof, raw = profile_paths("h")
    assert prof == tmp_path / "p" / "hw-h.json" and raw == tmp_path / "p" / "raw" / "hw-h.raw.json"
    assert profile_paths("h", bundled=True)[0] == costmodel.PROFILE_DIR / "hw-h.json"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "hw-h.json").write_text(costmodel.CostProfile("hw-h", "measured", "test", trap_ns=5).to_json())
    (tmp_path / "p" / "junk.json").write_text("{not json")
    assert costmodel.available_profiles()["hw-h"].trap_ns == 5
    monkeypatch.delenv("TLSLAB_PROFILES")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert costmodel.user_profile_dir() == tmp_path / ".config" / "tlslab" / "profiles"


def test_calibrate_help_names_replace_bundled(capsys):
    rc, out, _ = call(["calibrate", "--help"], capsys)
    assert rc == 0 and "--replace-bundled" in out


# --------------------------------------------------------------------------- 6. 80 columns

def _check_80(text: str) -> None:
    for line in text.splitlines():
        assert len(line) <= 80, line
    assert "…" not in text


def test_run_and_faults_fit_80_columns():
    env = {"COLUMNS": "80"}
    p = tlslab("run", "lsr", "-q", "-s", "emulate", "--sites", "5", env=env)
    assert p.returncode == 0, p.stderr
    _check_80(p.stdout)
    p = tlslab("faults", "lsr", "-s", "flip", "--limit", "10", env=env)
    assert p.returncode == 0, p.stderr
    _check_80(p.stdout)
    assert "0x" in p.stdout


def test_bench_summary_fits_80_columns(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text("strategies = 'all'\nvariants = ['default']\n[[guest]]\nname = 'lsr'\n"
                    "trees = ['dirs=2,files=5,symlinks=1,depth=1']\nlabel = 'a rather long workload label'\n")
    rc, _, err = call(["bench", str(spec), "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert rc == 0, err
    from rich.console import Console

    from tlslab.bench import summary
    from tlslab.bench.store import resolve_run

    run = resolve_run(next((tmp_path / "r").iterdir()).name, tmp_path / "r")
    s = summary.summarize(run)
    buf = io.StringIO()
    summary.render(s, Console(file=buf, width=80, color_system=None))
    _check_80(buf.getvalue())
    assert "flip" in buf.getvalue() and "summary.txt" in buf.getvalue()
    assert json.loads((run.path / "run.json").read_text())["status"] == "complete"
