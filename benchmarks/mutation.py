"""Mutation testing of tlslab's core (issue 17, item 6): a small AST-based mutator.

Not part of ``make test``. See benchmarks/MUTATION.md for figures and survivors.

    .venv/bin/python benchmarks/mutation.py --seed 17 --max 40          # a sample
    .venv/bin/python benchmarks/mutation.py --list                       # enumerate only
    .venv/bin/python benchmarks/mutation.py --only store:123:CMP:0 ...   # re-run given mutants

Operators (one mutant per site):

* ``CMP``   a comparison operator flipped: ``<`` -> ``<=``, ``<=`` -> ``<``, ``>`` -> ``>=``,
  ``>=`` -> ``>`` (the boundary), ``==`` -> ``!=``, ``!=`` -> ``==``
* ``INT``   off by one on an integer constant: ``n`` -> ``n + 1``
* ``NEGIF`` an ``if`` condition negated: ``if c:`` -> ``if not (c):``
* ``BOOL``  ``and`` <-> ``or``
* ``RET``   ``return X`` -> ``return None`` (X not already None / a bare return)
* ``DEL``   a statement that is a bare call (``os.fsync(fd)``, ``c.count("x")``) -> ``pass``

Targets (groups, ``--max`` applies to each): ``x86`` = tlslab/x86/*.py, ``strategies`` =
tlslab/hypervisor/strategies/*.py, ``store`` = tlslab/bench/store.py, ``linux`` =
tlslab/linux/structs.py + tlslab/linux/syscalls_*.py. Docstrings, f-string internals,
``__all__``, ``if TYPE_CHECKING`` blocks and ``__repr__`` bodies are not mutated.

How a mutant is judged: the repository's tree at ``--rev`` (default HEAD, via ``git
archive``: other people's uncommitted edits in /work/main are not tested) plus the
untracked build outputs the tests need (guests/build) and this tool's own kill tests
(tests/test_mutation_kills_*.py) is copied once into a scratch directory (never
/work/main); each mutant rewrites one file there, runs the module's tests with
``/work/main/.venv/bin/python -m pytest -x -q`` (PYTHONPATH = the copy, no bytecode
written, cache provider off), then the file is restored. Outcomes:

* ``killed``    pytest exited non-zero (a failing test, an import/collection error) or
                the run exceeded its timeout (a timeout counts as killed and is listed as such;
                the timeout is ``--timeout`` or 1.5 x the group's traced coverage run, whichever
                is longer, so an unmutated run always fits)
* ``survived``  pytest exited 0
* equivalent, by one of two documented rules (reported separately, never dropped):
  - ``unreachable``: no line of the mutated span ran during a line-coverage run of
    the same tests on the unmutated copy (our own ``sys.settrace`` collector, which
    also follows forked workers and ``python`` subprocesses via a sitecustomize on
    PYTHONPATH). Such a mutant cannot change any outcome of those tests; it is a gap
    in what the tests execute, so every one is listed with ``--show-unreachable``
    and the count is printed next to the score.
  - ``allow-listed``: ``ALLOW`` below, hand-reviewed, one reason each.

Test selection per group (``tests_for``; every module of a group gets the group's
tests): a fixed list per group (the strategy and x86 suites named in issue 17) plus
every test file (or test helper package under tests/, then every test importing that
helper) whose text names one of the group's modules (if it runs in <= 20 s), minus ``EXCLUDED_TESTS`` (minutes
per run, root/network, whole-CLI runs) and two 2-minute tests of test_processes; run
fastest first so that ``-x`` stops early. Slow-marked tests do run, test_security's
adversarial run with TLSLAB_ADVERSARY_N=2000 (its default 10,000 takes 30 s).

Sampling is deterministic: mutants are enumerated in file/line order, shuffled with
``random.Random(seed)`` per group and cut to ``--max``. ``--jobs`` (default 1) scratch
copies run in parallel.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"

GROUPS: dict[str, list[str]] = {
    "x86": ["tlslab/x86/*.py"],
    "strategies": ["tlslab/hypervisor/strategies/*.py"],
    "store": ["tlslab/bench/store.py"],
    "linux": ["tlslab/linux/structs.py", "tlslab/linux/syscalls_*.py"],
}
# the fixed part of the group -> tests mapping (issue 17's list, per group)
FIXED_TESTS: dict[str, list[str]] = {
    "x86": ["test_segcheck.py", "test_descriptor.py", "test_semantics.py", "test_decode.py", "test_xen_policy.py",
            "test_coverage2004.py", "test_emulate_refusals.py", "test_oracle.py", "test_machine.py",
            "test_rewrite2004.py", "test_strategies.py", "test_security.py"],
    "strategies": ["test_strategies.py", "test_strategy_template.py", "test_security.py", "test_emulate_refusals.py",
                   "test_xen_policy.py", "test_rewrite.py", "test_rewrite2004.py", "test_segcheck.py",
                   "test_semantics.py", "test_machine.py", "test_hazards.py"],
    "store": ["test_store_durability.py", "test_bench.py", "test_bench_spec.py"],
    "linux": ["test_linux_syscalls.py", "test_syscall_fields.py", "test_linux_vfs.py", "test_linux_e2e.py",
              "test_processes.py"],
}
# test files never selected: too slow for a per-mutant run (minutes), needing root or the network, or
# exercising the modules only through whole CLI runs; they stay in the suite, only this tool skips them
EXCLUDED_TESTS = {"test_cli_fuzz.py", "test_cli_hardening.py", "test_bench_hw.py", "test_hw_processes.py",
                  "test_hw_dynamic.py", "test_hw_supervisor.py", "test_hw_sigsegv.py", "test_hw_differential.py",
                  "test_guests_build.py", "test_guests_dyn.py", "test_workloads_native.py", "test_report.py",
                  "test_dynamic.py", "test_hybrid.py", "test_patches.py", "test_layers.py"}
# a test file found by the import rule joins a group only if it takes at most this long (the fixed lists can
# name slower ones)
AUTO_MAX_SECONDS = 20
# single tests deselected for the same reason (2 min each on this host)
DESELECT = ["tests/test_processes.py::test_boot_matches_the_host_and_starts_hundreds_of_processes",
            "tests/test_processes.py::test_fork_bomb_is_stopped_with_a_report"]
# the adversarial run of test_security (slow-marked, 10,000 sequences per strategy by default) runs with fewer
ENV = {"TLSLAB_ADVERSARY_N": "2000"}
# measured seconds per test file (unmutated, this host): files run fastest first, so -x stops early
SECONDS = {"test_store_durability.py": 0.5, "test_emulate_refusals.py": 0.5, "test_segcheck.py": 0.5,
           "test_descriptor.py": 0.5, "test_linux_vfs.py": 0.5, "test_linux_syscalls.py": 0.5,
           "test_bench_spec.py": 0.8, "test_xen_policy.py": 0.8, "test_strategy_template.py": 1,
           "test_syscall_fields.py": 2, "test_machine.py": 2, "test_hazards.py": 2, "test_oracle.py": 2.5,
           "test_rewrite.py": 4.5,
           "test_decode.py": 6.5, "test_security.py": 8, "test_linux_e2e.py": 9, "test_semantics.py": 10.5,
           "test_rewrite2004.py": 10.5, "test_bench.py": 17, "test_processes.py": 45, "test_strategies.py": 69}
# scratch-copy extras: untracked files the tests need
EXTRAS = ["guests/build"]

# hand-reviewed equivalent mutants: (path, scope, operator, original line, mutated line; stripped) -> reason. Keyed by text,
# not line number, so that edits elsewhere in the file do not detach an entry; a changed line drops out of the
# list (and is run again).
ALLOW: dict[tuple[str, str, str, str, str], str] = {
    ("tlslab/x86/coverage.py", "_seg_fixup_scan", "INT",
     'return False, f"unhandled prefix {b:02x} ({_SEG_FIXUP_BAD_PREFIXES[b]})", 0',
     'return False, f"unhandled prefix {b:02x} ({_SEG_FIXUP_BAD_PREFIXES[b]})", 1'):
        "_seg_fixup_scan's third element (bytes through the displacement) is read only when the first is True: "
        "seg_fixup_decodes drops it, seg_fixup_notify_length returns None for a refusal",
    ("tlslab/hypervisor/strategies/rewrite.py", "", "INT", "_SEGMENT_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65}",
     "_SEGMENT_PREFIXES = {0x26, 0x2E, 0x36, 0x3f, 0x64, 0x65}"):
        "_try_patch runs only after a %gs violation, so the instruction's last segment prefix is 65 whether or "
        "not 3E is in the set (3E last would make the access ds, which never reaches the %gs handler); 3F is "
        "not a prefix byte",
    ("tlslab/hypervisor/strategies/rewrite2004.py", "Rewrite2004Strategy", "INT", "order = 31", "order = 32"):
        "`order` only sorts the registry (strategies/__init__.py); rewrite is 30, nothing else is above 31, so "
        "32 gives the same order",
    ("tlslab/linux/syscalls_task.py", "sys_exit", "INT", "return 0", "return 1"):
        "after kernel.exit_thread the task is dead, and Process.syscall writes eax only for a runnable, live task "
        "(tlslab/linux/process.py: `if task.state == \"runnable\" and self.alive_task(task)`)",
    ("tlslab/linux/syscalls_proc.py", "", "INT", "SIGABRT, SIGKILL, SIGSEGV = 6, 9, 11",
     "SIGABRT, SIGKILL, SIGSEGV = 7, 9, 11"):
        "SIGABRT is never used in syscalls_proc.py (signals.py has its own); a dead name",
    ("tlslab/bench/store.py", "CellWriter._repair", "DEL", "f.flush()", "pass"):
        "after f.truncate(): BufferedRandom.truncate flushes itself, and nothing is written after it",
    ("tlslab/bench/store.py", "CellWriter.append", "DEL", "self._f.flush()", "pass"):
        "the file is opened with buffering=0: a raw FileIO, whose flush does nothing (the fsync after it is "
        "what matters, and test_store_durability checks it)",
    ("tlslab/bench/store.py", "write_json_atomic", "INT",
     'data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\\n").encode()',
     'data = (json.dumps(obj, indent=3, sort_keys=True, default=str) + "\\n").encode()'):
        "indentation of run.json: whitespace between JSON tokens, which every reader (json.loads) ignores",
}
SKIP_FUNCS = {"__repr__", "__str__", "__rich__"}
CMP_FLIP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
            ast.Eq: ("==", "!="), ast.NotEq: ("!=", "==")}


# ----------------------------------------------------------------------------- mutants
@dataclass
class Mutant:
    group: str
    path: str           # relative to the repository
    line: int           # first line of the mutated span (1-based)
    end_line: int
    op: str
    index: int          # n-th mutant of this op on this line
    start: int          # character offsets into the source
    end: int
    replacement: str
    scope: str = ""     # Class.function enclosing the mutant ("" at module level)
    original_line: str = ""
    mutated_line: str = ""
    outcome: str = ""   # killed / survived / timeout / unreachable / allow-listed / error
    detail: str = ""
    seconds: float = 0.0
    tests: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}:{self.op}:{self.index}"


class _Offsets:
    def __init__(self, source: str):
        self.starts = [0]
        for line in source.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))

    def __call__(self, line: int, col_byte: int, source_lines: list[str]) -> int:
        # ast columns are UTF-8 byte offsets
        text = source_lines[line - 1]
        col = len(text.encode()[:col_byte].decode(errors="replace"))
        return self.starts[line - 1] + col


def _tokens_between(source: str, start: int, end: int):
    """(string, absolute start, absolute end) of the OP/NAME tokens of source[start:end]."""
    chunk = source[start:end]
    out = []
    try:
        toks = list(tokenize.generate_tokens(io.StringIO("(" + chunk + ")").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return out
    lines = ("(" + chunk + ")").splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln))
    for t in toks:
        if t.type in (tokenize.OP, tokenize.NAME):
            a = starts[t.start[0] - 1] + t.start[1] - 1
            b = starts[t.end[0] - 1] + t.end[1] - 1
            if 0 <= a and b <= len(chunk):
                out.append((t.string, start + a, start + b))
    return out


class _Finder(ast.NodeVisitor):
    def __init__(self, group: str, path: str, source: str):
        self.group, self.path, self.source = group, path, source
        self.lines = source.splitlines(keepends=True)
        self.off = _Offsets(source)
        self.mutants: list[Mutant] = []
        self.skip_depth = 0
        self.scope: list[str] = []

    # -- helpers
    def span(self, node) -> tuple[int, int]:
        return (self.off(node.lineno, node.col_offset, self.lines),
                self.off(node.end_lineno, node.end_col_offset, self.lines))

    def add(self, node_line: int, end_line: int, op: str, start: int, end: int, replacement: str) -> None:
        if self.skip_depth:
            return
        n = sum(1 for m in self.mutants if m.line == node_line and m.op == op)
        self.mutants.append(Mutant(self.group, self.path, node_line, end_line, op, n, start, end, replacement,
                                   scope=".".join(self.scope)))

    # -- skipped regions
    def _skipping(self, node):
        self.skip_depth += 1
        self.generic_visit(node)
        self.skip_depth -= 1

    def visit_JoinedStr(self, node):  # f-strings: positions inside are unreliable on 3.11, and it is only text
        self.skip_depth += 1
        self.generic_visit(node)
        self.skip_depth -= 1

    def visit_FunctionDef(self, node):
        if node.name in SKIP_FUNCS:
            return self._skipping(node)
        # annotations and decorators: not behaviour
        for d in node.decorator_list:
            self.visit(d)
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        self.scope.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.scope.append(node.name)
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()

    def visit_AnnAssign(self, node):
        if node.value is not None:
            self.visit(node.value)

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # a docstring or a bare string
        if isinstance(node.value, ast.Call):
            a, b = self.span(node)
            self.add(node.lineno, node.end_lineno, "DEL", a, b, "pass")
        self.generic_visit(node)

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    def visit_If(self, node):
        t = node.test
        if isinstance(t, ast.Name) and t.id == "TYPE_CHECKING":
            return
        a, b = self.span(t)
        self.add(t.lineno, t.end_lineno, "NEGIF", a, b, "not (" + self.source[a:b] + ")")
        self.generic_visit(node)

    def visit_Compare(self, node):
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            flip = CMP_FLIP.get(type(op))
            if flip is None:
                continue
            _, left_end = self.span(operands[i])
            right_start, _ = self.span(operands[i + 1])
            toks = [t for t in _tokens_between(self.source, left_end, right_start) if t[0] == flip[0]]
            if len(toks) == 1:
                _, a, b = toks[0]
                line = self.source.count("\n", 0, a) + 1
                self.add(line, line, "CMP", a, b, flip[1])
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        want, other = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        # one mutant: every operator of this BoolOp swapped (kept as one edit: replace the whole span)
        a, b = self.span(node)
        pieces, pos = [], a
        ok = True
        for i in range(len(node.values) - 1):
            _, le = self.span(node.values[i])
            rs, _ = self.span(node.values[i + 1])
            toks = [t for t in _tokens_between(self.source, le, rs) if t[0] == want]
            if len(toks) != 1:
                ok = False
                break
            _, ta, tb = toks[0]
            pieces.append(self.source[pos:ta] + other)
            pos = tb
        if ok:
            pieces.append(self.source[pos:b])
            self.add(node.lineno, node.end_lineno, "BOOL", a, b, "".join(pieces))
        self.generic_visit(node)

    def visit_Return(self, node):
        v = node.value
        if v is not None and not (isinstance(v, ast.Constant) and v.value is None):
            a, b = self.span(v)
            self.add(v.lineno, v.end_lineno, "RET", a, b, "None")
        self.generic_visit(node)

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, int) and not isinstance(v, bool):
            a, b = self.span(node)
            text = self.source[a:b]
            if text.lstrip("+-").replace("_", "").strip("()").isalnum():
                rep = hex(v + 1) if text.lower().startswith("0x") else str(v + 1)
                self.add(node.lineno, node.end_lineno, "INT", a, b, rep)


def find_mutants(group: str, path: str, source: str) -> list[Mutant]:
    tree = ast.parse(source)
    finder = _Finder(group, path, source)
    # module docstring / module-level: visit statements
    for stmt in tree.body:
        finder.visit(stmt)
    out = []
    lines = source.splitlines()
    for m in finder.mutants:
        mutated = source[:m.start] + m.replacement + source[m.end:]
        if mutated == source:
            continue
        try:
            compile(mutated, path, "exec")
        except SyntaxError:
            continue
        m.original_line = lines[m.line - 1].strip()
        mlines = mutated.splitlines()
        m.mutated_line = mlines[m.line - 1].strip() if m.line - 1 < len(mlines) else ""
        out.append(m)
    return out


def target_files(root: Path, groups: list[str]) -> list[tuple[str, str]]:
    out = []
    for g in groups:
        for pattern in GROUPS[g]:
            for p in sorted(root.glob(pattern)):
                out.append((g, str(p.relative_to(root))))
    return out


def enumerate_mutants(root: Path, groups: list[str]) -> list[Mutant]:
    out = []
    for g, rel in target_files(root, groups):
        out += find_mutants(g, rel, (root / rel).read_text())
    return out


def sample(mutants: list[Mutant], seed: int, per_group: int | None) -> list[Mutant]:
    out = []
    for g in GROUPS:
        ms = [m for m in mutants if m.group == g]
        rng = random.Random(f"{seed}:{g}")
        rng.shuffle(ms)
        out += ms[:per_group] if per_group else ms
    return out


# ----------------------------------------------------------------------------- module -> tests
def tests_for(root: Path, group: str) -> list[str]:
    """The group's fixed tests, plus every test file (directly, or through a helper package under tests/) whose
    text names one of the group's modules; minus the excluded; fastest first."""
    tests = root / "tests"
    direct: set[str] = set()
    for _g, rel in target_files(root, [group]):
        mod = rel[:-3].replace("/", ".")
        if mod.endswith(".__init__"):
            mod = mod[:-len(".__init__")]
        pkg, _, name = mod.rpartition(".")
        pat = re.compile(rf"({re.escape(mod)}\b|from {re.escape(pkg)} import [^\n]*\b{re.escape(name)}\b|"
                         rf"from {re.escape(pkg)} import \([^)]*\b{re.escape(name)}\b)")
        helpers: set[str] = set()
        for p in tests.rglob("*.py"):
            if pat.search(p.read_text(errors="replace")):
                if p.parent == tests and p.name.startswith("test_"):
                    direct.add(p.name)
                elif p.parent != tests:
                    helpers.add(p.parent.name)
        for h in helpers:
            hp = re.compile(rf"^\s*(from|import) {re.escape(h)}\b", re.M)
            for p in tests.glob("test_*.py"):
                if hp.search(p.read_text(errors="replace")):
                    direct.add(p.name)
    direct = {t for t in direct if SECONDS.get(t, 5) <= AUTO_MAX_SECONDS}
    chosen = (set(FIXED_TESTS[group]) | direct) - EXCLUDED_TESTS
    chosen |= {p.name for p in tests.glob("test_mutation_kills_*.py")}
    return sorted((t for t in chosen if (tests / t).is_file()), key=lambda t: (SECONDS.get(t, 5), t))


# ----------------------------------------------------------------------------- scratch copies
def make_copy(rev: str, dest: Path, overlay_worktree: list[str]) -> None:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True,
                             check=True, timeout=120).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=120)
    for rel in EXTRAS:
        src = REPO / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, symlinks=True, dirs_exist_ok=True)
    for rel in overlay_worktree:
        src = REPO / rel
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def _env(copy: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("CI", None)   # a missing tool skips here; this tool measures the tests that can run on this host
    env.update(ENV)
    env.update(extra or {})
    return env


def run_pytest(copy: Path, tests: list[str], timeout: float, extra_env: dict[str, str] | None = None,
               extra_args: list[str] | None = None, stop_first: bool = True,
               keep_output: list | None = None) -> tuple[str, float, str]:
    """('pass'|'fail'|'timeout', seconds, tail of output). Own process group, killed whole on timeout."""
    cmd = [str(PYTHON), "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p", "no:cacheprovider",
           "--no-header", "-rfE", *[f"--deselect={d}" for d in DESELECT], *(extra_args or []),
           *[f"tests/{t}" for t in tests]]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=copy, env=_env(copy, extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    LIVE.add(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "pass" if proc.returncode == 0 else "fail"
        if proc.returncode == 5:   # nothing collected: not a kill
            status = "pass"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        status = "timeout"
    finally:
        LIVE.discard(proc)
        if proc.poll() is None:   # interrupted (SIGTERM/Ctrl-C): take the whole test run down with us
            _kill_group(proc)
        shutil.rmtree(copy / ".hypothesis", ignore_errors=True)
    text = out.decode(errors="replace")
    if keep_output is not None:
        keep_output.append(text)
    return status, time.perf_counter() - started, _failure_summary(text)


LIVE: set[subprocess.Popen] = set()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _failure_summary(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if lines:
        return "; ".join(ln[:160] for ln in lines[:3])
    tail = [ln for ln in text.splitlines() if ln.strip()]
    return tail[-1][:200] if tail else ""


# ----------------------------------------------------------------------------- line coverage
SITECUSTOMIZE = r'''
import os, sys, threading
_dir = os.environ.get("MUTATION_TRACE_OUT")
_targets = os.environ.get("MUTATION_TRACE_FILES")
if _dir and _targets:
    _want = {os.path.realpath(p): p for p in _targets.split(os.pathsep)}
    _seen = set()
    _fd = [os.open(os.path.join(_dir, "lines-%d" % os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)]
    _cache = {}

    def _rel(filename):
        r = _cache.get(filename)
        if r is None:
            r = _cache[filename] = _want.get(os.path.realpath(filename), "")
        return r

    def _local(frame, event, arg):
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in _seen:
                _seen.add(key)
                os.write(_fd[0], ("%s\t%d\n" % (_rel(key[0]), key[1])).encode())
        return _local

    def _global(frame, event, arg):
        if _rel(frame.f_code.co_filename):
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in _seen:
                _seen.add(key)
                os.write(_fd[0], ("%s\t%d\n" % (_rel(key[0]), key[1])).encode())
            return _local
        return None

    def _child():
        _fd[0] = os.open(os.path.join(_dir, "lines-%d" % os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.settrace(_global)

    os.register_at_fork(after_in_child=_child)
    sys.settrace(_global)
    threading.settrace(_global)
'''


def coverage_run(copy: Path, rels: list[str], tests: list[str], timeout: float) -> tuple[dict[str, set[int]], str, float]:
    """Lines of ``rels`` executed by ``tests`` on the unmutated copy."""
    hook = copy / ".mutation-hook"
    out = copy / ".mutation-lines"
    shutil.rmtree(hook, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    hook.mkdir()
    out.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"MUTATION_TRACE_OUT": str(out),
           "MUTATION_TRACE_FILES": os.pathsep.join(str(copy / r) for r in rels),
           "PYTHONPATH": f"{copy}{os.pathsep}{hook}"}
    status, secs, summary = run_pytest(copy, tests, timeout, extra_env=env)
    lines: dict[str, set[int]] = {r: set() for r in rels}
    for f in out.iterdir():
        for row in f.read_text().splitlines():
            path, _, n = row.partition("\t")
            if path:
                lines.setdefault(str(Path(path).relative_to(copy)), set()).add(int(n))
    shutil.rmtree(hook, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return lines, f"{status} in {secs:.0f} s ({summary})", secs


def _innermost_statements(source: str) -> dict[int, tuple[int, int]]:
    """line -> (first, last) line of the innermost statement containing it."""
    out: dict[int, tuple[int, int]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt):
            for ln in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                if ln not in out or node.lineno >= out[ln][0]:
                    out[ln] = (node.lineno, node.end_lineno or node.lineno)
    return out


def reached(m: Mutant, covered: set[int], stmt_of: dict[int, tuple[int, int]]) -> bool:
    """Did any line of the innermost statement around the mutated span run?"""
    for ln in range(m.line, m.end_line + 1):
        first, last = stmt_of.get(ln, (ln, ln))
        if any(x in covered for x in range(first, last + 1)):
            return True
    return False


# ----------------------------------------------------------------------------- planted bugs (issue 17's acceptance)
# name -> (file, exact text, replacement, test files to run, what it is)
PLANTED: dict[str, tuple[str, str, str, list[str], str]] = {
    "a-emulate-skips-unsafe": (
        "tlslab/hypervisor/strategies/emulate.py",
        """            c.count("refused-unsafe" if exc.linear is not None else "refused-segment")
            return Verdict.kill(f"DISALLOWING UNSAFE ACCESS: {exc.reason}")""",
        """            c.count("refused-unsafe" if exc.linear is not None else "refused-segment")
            domain.vcpu.regs.set("eip", (v.eip + insn.size) & 0xFFFFFFFF)   # PLANTED: skip it and go on
            domain.vcpu.retire(1)
            return Verdict.resume()""",
        ["test_emulate_refusals.py", "test_security.py", "test_strategies.py", "test_strategy_template.py"],
        "emulate, on an unsafe access, skips the instruction and resumes instead of killing the guest"),
    "b-store-no-fsync": (
        "tlslab/bench/store.py",
        """        self._f.flush()
        os.fsync(self._f.fileno())""",
        """        self._f.flush()""",
        ["test_store_durability.py", "test_bench.py"],
        "CellWriter.append without its fsync"),
    "b2-store-run-json-no-fsync": (
        "tlslab/bench/store.py",
        """    os.replace(tmp, path)
    fsync_dir(path.parent)""",
        """    os.replace(tmp, path)""",
        ["test_store_durability.py", "test_bench.py"],
        "run.json replaced without the directory fsync"),
    "c-getdents64-all-regular": (
        "tlslab/linux/syscalls_fs.py",
        "S.pack_dirent64(child.ino, pos + 1, N.DT_TYPES.get(child.fmt, 0), name)",
        "S.pack_dirent64(child.ino, pos + 1, 8, name)",   # DT_REG for every entry
        ["test_linux_syscalls.py", "test_syscall_fields.py", "test_linux_vfs.py"],
        "getdents64 reports every entry as a regular file (d_type DT_REG)"),
    "d-statx-nlink-plus-one": (
        "tlslab/linux/structs.py",
        "STATX_BASIC_STATS | STATX_MNT_ID, 4096, 0, node.nlink, node.uid,",
        "STATX_BASIC_STATS | STATX_MNT_ID, 4096, 0, node.nlink + 1, node.uid,",
        ["test_linux_syscalls.py", "test_syscall_fields.py", "test_linux_vfs.py"],
        "statx reports nlink + 1"),
}


def plant(args) -> int:
    """Plant each bug in a fresh scratch copy, run its tests (not -x: every catching test), throw the copy away."""
    base = Path(tempfile.mkdtemp(prefix="tlslab-planted-"))
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.rev], capture_output=True,
                         text=True, timeout=30).stdout.strip()
    print(f"planted bugs, rev {rev}")
    rc = 0
    try:
        for name in args.plant or list(PLANTED):
            rel, old, new, tests, what = PLANTED[name]
            copy = base / name
            make_copy(args.rev, copy, [])
            text = (copy / rel).read_text()
            if text.count(old) != 1:
                print(f"{name}: the text to replace is not in {rel} exactly once; update PLANTED")
                rc = 1
                continue
            (copy / rel).write_text(text.replace(old, new))
            status, secs, _ = run_pytest(copy, tests, args.plant_timeout, extra_args=["-rf"], stop_first=False,
                                         keep_output=(out := []))
            failed = sorted({ln.split(" ")[1] for ln in out[0].splitlines() if ln.startswith("FAILED ")})
            print(f"\n{name}: {what}\n  {rel}; ran {', '.join(tests)}: {status} in {secs:.0f} s")
            for f in failed:
                print(f"    caught by {f}")
            if not failed:
                print("    NOT CAUGHT" if status == "pass" else f"    ({status}, no FAILED line)")
                rc = 1
            shutil.rmtree(copy, ignore_errors=True)   # reverted: the copy is thrown away
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rc


# ----------------------------------------------------------------------------- the run
def apply(copy: Path, m: Mutant, original: str) -> None:
    (copy / m.path).write_text(original[:m.start] + m.replacement + original[m.end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--max", type=int, default=30, help="mutants per group (0 = all)")
    ap.add_argument("--groups", default=",".join(GROUPS), help="comma-separated: " + ",".join(GROUPS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--rev", default="HEAD", help="git revision to copy (default HEAD)")
    ap.add_argument("--only", nargs="*", help="mutant ids (path:line:OP:index) to run, ignoring sampling")
    ap.add_argument("--list", action="store_true", help="list the sampled mutants and their tests, run nothing")
    ap.add_argument("--no-coverage", action="store_true", help="run every sampled mutant (no unreachable rule)")
    ap.add_argument("--show-unreachable", action="store_true")
    ap.add_argument("--json", type=Path, help="write every mutant's outcome here")
    ap.add_argument("--rerun-survivors", type=Path, metavar="JSON",
                    help="a previous run's --json (same seed/max/rev): run only its survivors again, report all")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--plant", nargs="*", help="run the planted-bug demonstration (all, or the named ones: "
                    + ", ".join(PLANTED) + ")")
    ap.add_argument("--plant-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.plant is not None:
            return plant(args)
        return _run(args)
    finally:
        for proc in list(LIVE):
            _kill_group(proc)


def _run(args) -> int:
    groups = [g for g in args.groups.split(",") if g]

    base = Path(tempfile.mkdtemp(prefix="tlslab-mutation-"))
    overlay = [str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_mutation_kills_*.py")]
    copies = [base / f"copy{i}" for i in range(max(1, args.jobs))]
    try:
        make_copy(args.rev, copies[0], overlay)
        for c in copies[1:]:
            shutil.copytree(copies[0], c, symlinks=True)
        root = copies[0]
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.rev], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        everything = enumerate_mutants(root, groups)
        if args.only:
            want = set(args.only)
            chosen = [m for m in everything if m.id in want]
            missing = want - {m.id for m in chosen}
            if missing:
                print("unknown mutant ids: " + " ".join(sorted(missing)), file=sys.stderr)
                return 2
        else:
            chosen = sample(everything, args.seed, args.max or None)
        by_file: dict[str, list[Mutant]] = {}
        for m in chosen:
            by_file.setdefault(m.path, []).append(m)
        tests_of = {g: tests_for(root, g) for g in groups}
        for m in chosen:
            m.tests = tests_of[m.group]
        print(f"tlslab mutation run: rev {rev}, seed {args.seed}, max {args.max or 'all'} per group, "
              f"groups {','.join(groups)}, jobs {args.jobs}, timeout {args.timeout:.0f} s")
        print(f"{len(everything)} mutants in {len({m.path for m in everything})} files; {len(chosen)} sampled")
        if args.list:
            for m in chosen:
                print(f"{m.id}\t{m.mutated_line}\t{','.join(m.tests)}")
            return 0

        # coverage: one run per group, over the group's sampled files
        timeout_of = {g: args.timeout for g in groups}
        prior = None
        if args.rerun_survivors:
            # a previous --json of the same sample: keep its outcomes, run again only its survivors (now with the
            # kill tests in the copy) and whatever is new; unreachable stays unreachable (same rev, same tests)
            saved = json.loads(args.rerun_survivors.read_text())
            if isinstance(saved, list):          # the first format: the mutants only
                saved = {"mutants": saved, "timeout_of": {}}
            prior = {d["id"]: d for d in saved["mutants"]}
            timeout_of.update(saved["timeout_of"])
            for m in chosen:
                d = prior.get(m.id)
                if d and d["outcome"] not in ("survived", "allow-listed", ""):
                    m.outcome, m.detail, m.seconds = d["outcome"], d["detail"], d["seconds"]
            print(f"re-running the survivors of {args.rerun_survivors} "
                  f"({sum(1 for m in chosen if not m.outcome)} mutants)")
        if not args.no_coverage and prior is None:
            covered: dict[str, set[int]] = {}
            for g in groups:
                rels = sorted({m.path for m in chosen if m.group == g})
                if not rels:
                    continue
                ts = tests_of[g]
                lines, how, secs = coverage_run(root, rels, ts, timeout=max(args.timeout * 10, 1800))
                # a surviving mutant runs every test: the timeout must exceed the unmutated run, which the
                # traced coverage run over-estimates
                timeout_of[g] = max(args.timeout, 1.5 * secs)
                print(f"coverage of {g} ({len(rels)} file(s)) with {', '.join(ts)}: {how}; "
                      f"mutant timeout {timeout_of[g]:.0f} s")
                if not how.startswith("pass"):
                    print("  the unmutated tests do not pass: every mutant of these files would be 'killed';"
                          " stopping", file=sys.stderr)
                    return 3
                for r in rels:
                    covered[r] = lines.get(r, set())
            for rel, ms in by_file.items():
                stmt_of = _innermost_statements((root / rel).read_text())
                for m in ms:
                    if not reached(m, covered[rel], stmt_of):
                        m.outcome = "unreachable"
        for m in chosen:
            key = (m.path, m.scope, m.op, m.original_line, m.mutated_line)
            if not m.outcome and key in ALLOW:
                m.outcome, m.detail = "allow-listed", ALLOW[key]

        todo = [m for m in chosen if not m.outcome]
        originals = {rel: (root / rel).read_text() for rel in by_file}
        free = list(copies)
        started = time.perf_counter()
        done = [0]

        def work(m: Mutant) -> None:
            copy = free.pop()
            try:
                apply(copy, m, originals[m.path])
                status, m.seconds, m.detail = run_pytest(copy, m.tests, timeout_of[m.group])
                m.outcome = {"pass": "survived", "fail": "killed", "timeout": "timeout"}[status]
            finally:
                (copy / m.path).write_text(originals[m.path])
                free.append(copy)
            done[0] += 1
            print(f"[{done[0]}/{len(todo)} {time.perf_counter() - started:5.0f} s] {m.outcome:8} {m.seconds:5.1f} s "
                  f"{m.id}  {m.mutated_line[:90]}", flush=True)

        if len(copies) == 1:
            for m in todo:
                work(m)
        else:
            with ThreadPoolExecutor(max_workers=len(copies)) as pool:
                list(pool.map(work, todo))
        return report(chosen, args, timeout_of)
    finally:
        if args.keep:
            print(f"scratch kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def report(chosen: list[Mutant], args, timeout_of: dict[str, float]) -> int:
    def of(*outcomes):
        return [m for m in chosen if m.outcome in outcomes]

    killed, timeouts, survived = of("killed"), of("timeout"), of("survived")
    unreachable, allowed = of("unreachable"), of("allow-listed")
    print()
    print("per group:  group        killed  timeout  survived  unreachable  allow-listed")
    for g in GROUPS:
        gm = [m for m in chosen if m.group == g]
        if gm:
            c = {o: sum(1 for m in gm if m.outcome == o) for o in
                 ("killed", "timeout", "survived", "unreachable", "allow-listed")}
            print(f"            {g:<12} {c['killed']:6} {c['timeout']:8} {c['survived']:9} {c['unreachable']:12} "
                  f"{c['allow-listed']:13}")
    print("per operator: " + ", ".join(
        f"{op} {sum(1 for m in chosen if m.op == op and m.outcome in ('killed', 'timeout'))}/"
        f"{sum(1 for m in chosen if m.op == op and m.outcome in ('killed', 'timeout', 'survived'))}"
        for op in ("CMP", "INT", "NEGIF", "BOOL", "RET", "DEL")))
    if timeouts:
        print(f"\ntimeouts ({len(timeouts)}, counted as killed):")
        for m in timeouts:
            print(f"  {m.id}  {m.mutated_line}")
    if allowed:
        print(f"\nequivalent, allow-listed ({len(allowed)}):")
        for m in allowed:
            print(f"  {m.id}  {m.mutated_line}  -- {m.detail}")
    print(f"\nequivalent, unreachable (the mapped tests never execute the line): {len(unreachable)}")
    if args.show_unreachable:
        for m in unreachable:
            print(f"  {m.path}:{m.line}  {m.op}  {m.mutated_line}")
    print(f"\nsurvivors ({len(survived)}):")
    for m in survived:
        print(f"  {m.path}:{m.line}  {m.op}  {m.mutated_line}    [was: {m.original_line}]")
    if args.json:
        args.json.write_text(json.dumps({"timeout_of": timeout_of, "mutants": [
            {k: v for k, v in asdict(m).items() if k not in ("start", "end")} | {"id": m.id} for m in chosen]},
            indent=1))
    n = len(killed) + len(timeouts)
    total = n + len(survived)
    pct = 100.0 * n / total if total else 100.0
    print(f"(with the unreachable counted as survivors: killed {n} of {total + len(unreachable)})")
    print(f"killed {n} of {total} non-equivalent mutants ({pct:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
