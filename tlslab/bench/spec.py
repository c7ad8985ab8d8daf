"""Benchmark matrix specs (TOML) and their expansion into cells.

A spec names guests (each with its arguments, trees, applet), and the axes
every guest is crossed with: strategies (``"all"`` = the registry at the time
the matrix is expanded), build variants, hypervisor profiles. Example::

    name = "small"
    strategies = ["native", "emulate", "flip"]   # or "all"
    variants = ["default", "nosegneg"]
    profiles = ["nonpae"]                        # hypervisor start: nonpae | pae
    cost_profile = "xen-2004"                    # profile the summary uses ("fit": fit Keir's
                                                 # table in this run even if xen-2004 is stored)
    timeout_seconds = 120                        # per cell (the vCPU stops the guest)
    kill_after_seconds = 180                     # per cell, hard: the worker is killed
                                                 # (default: timeout * 1.25 + 30)

    [fit]                                        # if cost_profile is not a stored
    guest = "lsr"                                # profile: fit Keir's 2004 table
    tree = "4k"                                  # on this workload of the run
    variant = "default"

    [[guest]]
    name = "lsr"
    trees = ["small", "4k"]
    weight = 8                                   # relative cost: longest first

    [[guest]]
    name = "busybox"
    applet = "ls"
    args = ["-R"]
    variants = ["default"]                       # per-guest override of an axis

    [[guest]]                                    # a program of a pinned root filesystem
    name = "/bin/ls"                             # (absolute path inside the root: tlslab rootfs)
    rootfs = "debian"
    args = ["-R", "/usr/lib"]
    label = "keir"                               # the workload's name in the summary
                                                 # (default: name + args + [rootfs])

Root filesystems (``rootfs``, a name of ``guests/rootfs.lock.json``): a guest
named by an absolute path is a program of that root, run with ``/`` = the
root; it has no data tree unless ``trees`` names some (mounted at ``tree_at``,
default /data, and the working directory), and only the ``default`` build. A
bundled guest (relative name) may take ``rootfs`` too; its ``dyn`` variant
gets the ``debian`` root anyway. ``env = ["K=V", ...]`` overrides the fixed
environment. Cells whose root is not fetched here are recorded as skipped
with the reason (``tlslab rootfs fetch``), like busybox when it is not fetched.

Backends: ``backends = ["unicorn"]`` (the default: the model only) or
``["unicorn", "hw"]``, top level or per guest. ``hw`` adds, next to the model's
cells, cells that run the same guest on this CPU under the ptrace supervisor
(:mod:`tlslab.hw`), for the strategies the supervisor implements (native,
emulate, flip; other strategies get no hw cell). A ``[hw]`` table narrows and
tunes them::

    [hw]
    strategies = ["native", "emulate", "flip"]   # subset of these (default: all three)
    variants = ["default"]                       # default: every variant of the guest
    repeat = 3                                   # traced runs per cell; the median is the measurement
    cpu = 0                                      # tracer and guest pinned here

hw cells run after every model cell, one at a time (see runner.py); where the
host cannot run them (no 32-bit exec, ptrace refused) they are recorded as
skipped with the reason.

A cell is one ``RunSpec`` plus its backend; its identity is a hash of the
spec's canonical JSON (:func:`cell_id`; the backend enters the hash only when
it is not ``unicorn``, so model cells keep the ids they had before backends
existed), so the same cell has the same id in every run and a resumed run
recognises what it has already measured. RunSpec fields added since
(``rootfs``, ``tree_at``, ``env``: :data:`LATE_FIELDS`) likewise enter the
hash only when they are not at their defaults, and the ``auto`` patch policy
(the default since it exists: ``exe`` for static programs, ``lib`` for
dynamic ones) enters it as ``exe`` for cells without a root filesystem,
the default those cells' ids were made with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tlslab.experiment import DEFAULT_ROOTFS, DEFAULT_TREE_AT, RunSpec

DEFAULT_SPEC = Path(__file__).with_name("default.toml")
AXES = ("strategies", "variants", "profiles", "backends")
BACKENDS = ("unicorn", "hw")
HW_BENCH_STRATEGIES = ("native", "emulate", "flip")   # what the ptrace supervisor implements
HW_KEYS = {"strategies", "variants", "repeat", "cpu"}
#: RunSpec fields added after cell ids were first recorded, with their defaults: they enter a cell's
#: identity only when set to something else, so every earlier cell keeps its id.
LATE_FIELDS = {"rootfs": None, "tree_at": DEFAULT_TREE_AT, "env": ()}


class SpecError(ValueError):
    """A malformed matrix spec (one line)."""


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def cell_id(spec: RunSpec | dict, backend: str = "unicorn") -> str:
    """Stable identity of a cell: sha256 of the RunSpec's canonical JSON (+ the backend unless it is the
    model's), 16 hex digits. Model cells keep the ids they had before backends existed."""
    d = spec.to_dict() if isinstance(spec, RunSpec) else dict(spec)
    d["args"] = list(d.get("args") or ())
    for name, default in LATE_FIELDS.items():
        if name in d and _is_default(d[name], default):
            del d[name]
    if d.get("patch_policy") == "auto" and not _runs_in_root(d):
        d["patch_policy"] = "exe"   # what auto is for a static guest, and the default its ids were made with
    if backend != "unicorn":
        d["backend"] = backend
    return hashlib.sha256(canonical_json(d).encode()).hexdigest()[:16]


def _runs_in_root(d: dict) -> bool:
    """A cell run under a root filesystem: its program is dynamically linked (or of the root)."""
    return bool(d.get("rootfs")) or d.get("variant") == "dyn"


def _is_default(value, default) -> bool:
    if isinstance(default, tuple):
        return not value
    return value == default


def spec_from_dict(d: dict) -> RunSpec:
    d = dict(d)
    d["args"] = tuple(d.get("args") or ())
    if "env" in d:
        d["env"] = tuple(d.get("env") or ())
    return RunSpec(**d)


def spec_to_dict(spec: RunSpec) -> dict:
    """A RunSpec as JSON-able data (lists for tuples)."""
    return {**spec.to_dict(), "args": list(spec.args), "env": list(spec.env)}


@dataclass(frozen=True)
class Cell:
    spec: RunSpec
    workload: str           # "lsr [4k]", "syscalls 300": the row of the summary
    weight: float = 1.0     # relative expected cost, for scheduling (longest first)
    skip: str | None = None  # reason if the cell cannot run here (recorded, not run)
    backend: str = "unicorn"  # unicorn (the model) | hw (this CPU, ptrace supervisor)
    options: dict = field(default_factory=dict, compare=False, hash=False)  # hw: repeat, cpu (not identity)

    @property
    def id(self) -> str:
        return cell_id(self.spec, self.backend)

    @property
    def label(self) -> str:
        s = self.spec
        return f"{self.workload} {s.variant} {s.strategy} {s.profile}" + (" on hw" if self.backend == "hw" else "")

    def to_dict(self) -> dict:
        d = {"id": self.id, "workload": self.workload, "weight": self.weight, "skip": self.skip,
             "label": self.label, "spec": spec_to_dict(self.spec)}
        if self.backend != "unicorn":       # run.json of model-only runs is unchanged
            d["backend"] = self.backend
            d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(spec_from_dict(d["spec"]), d["workload"], d.get("weight", 1.0), d.get("skip"),
                   d.get("backend", "unicorn"), dict(d.get("options") or {}))


@dataclass
class GuestEntry:
    name: str
    args: list[str] = field(default_factory=list)
    trees: list[str | None] = field(default_factory=lambda: ["small"])
    applet: str | None = None
    weight: float = 1.0
    stdout: str | None = None
    seed: int | None = None
    root: str | None = None
    label: str | None = None
    rootfs: str | None = None       # a pinned root filesystem (tlslab.rootfs): / of the guest
    tree_at: str = DEFAULT_TREE_AT  # under a root filesystem: where a data tree is mounted
    env: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)   # per-guest strategies/variants/profiles

    @property
    def rooted_program(self) -> bool:
        """A program of the root filesystem (absolute name + rootfs), not a bundled guest."""
        return bool(self.rootfs) and self.name.startswith("/")

    def tree_list(self) -> list[str | None]:
        """The data trees of the cells: None = no tree (a host root, or a root-filesystem program without one)."""
        if self.root or not self.trees:
            return [None]
        return list(self.trees)

    def workload(self, tree: str | None, many_trees: bool) -> str:
        base = self.label or " ".join([self.name, *([self.applet] if self.applet else []), *self.args])
        if self.root:
            return f"{base} [{self.root}]"
        if tree is None:
            return base if self.label or not self.rootfs else f"{base} [{self.rootfs}]"
        if many_trees or self.name in ("lsr", "busybox"):
            return f"{base} [{tree}]"
        return base


@dataclass
class MatrixSpec:
    name: str
    description: str = ""
    strategies: list[str] | str = "all"
    variants: list[str] = field(default_factory=lambda: ["default", "nosegneg"])
    profiles: list[str] = field(default_factory=lambda: ["nonpae"])
    cost_profile: str = "nominal"
    timeout_seconds: float = 300.0
    stdout: str = "pipe"
    seed: int = 0
    max_tasks_per_child: int = 20
    kill_after_seconds: float | None = None   # hard per-cell deadline (default: timeout * 1.25 + 30 s)
    fit: dict = field(default_factory=dict)
    backends: list[str] = field(default_factory=lambda: ["unicorn"])
    hw: dict = field(default_factory=dict)    # the [hw] table: strategies, variants, repeat, cpu
    guests: list[GuestEntry] = field(default_factory=list)
    source: str = ""
    raw: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_toml(cls, text: str, source: str = "") -> "MatrixSpec":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{source or 'spec'}: not valid TOML: {exc}") from None
        return cls.from_dict(raw, source)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "") -> "MatrixSpec":
        where = source or "spec"
        known = {"name", "description", "strategies", "variants", "profiles", "cost_profile", "timeout_seconds",
                 "stdout", "seed", "max_tasks_per_child", "kill_after_seconds", "fit", "guest", "backends", "hw"}
        unknown = set(raw) - known
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        guests_raw = raw.get("guest") or []
        if not isinstance(guests_raw, list) or not guests_raw:
            raise SpecError(f"{where}: needs at least one [[guest]] table")
        guests = []
        gknown = {"name", "args", "trees", "tree", "applet", "weight", "stdout", "seed", "root", "label", "rootfs",
                  "tree_at", "env", *AXES}
        for i, g in enumerate(guests_raw):
            if not isinstance(g, dict) or "name" not in g:
                raise SpecError(f"{where}: [[guest]] #{i + 1} needs a name")
            if not isinstance(g["name"], str) or not g["name"]:
                raise SpecError(f"{where}: [[guest]] #{i + 1}: name must be a non-empty string")
            bad = set(g) - gknown
            if bad:
                raise SpecError(f"{where}: [[guest]] {g['name']}: unknown key(s) {', '.join(sorted(bad))}")
            name = g["name"]
            rootfs = _guest_rootfs(where, g)
            rooted_program = rootfs is not None and name.startswith("/")
            trees = g.get("trees", [g["tree"]] if "tree" in g else ([] if rooted_program else ["small"]))
            if isinstance(trees, str):
                trees = [trees]
            if not isinstance(trees, list) or not all(isinstance(t, str) for t in trees):
                raise SpecError(f"{where}: [[guest]] {name}: trees must be a list of strings")
            if not trees and rootfs is None and not g.get("root"):
                raise SpecError(f"{where}: [[guest]] {name}: trees = [] (no data tree) needs rootfs "
                                "(a program of a root filesystem)")
            args = g.get("args", [])
            if isinstance(args, str) or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise SpecError(f"{where}: [[guest]] {name}: args must be a list of strings")
            label = g.get("label")
            if label is not None and (not isinstance(label, str) or not label.strip()):
                raise SpecError(f"{where}: [[guest]] {name}: label must be a non-empty string")
            tree_at = g.get("tree_at", DEFAULT_TREE_AT)
            if not isinstance(tree_at, str) or not tree_at.startswith("/"):
                raise SpecError(f"{where}: [[guest]] {name}: tree_at must be an absolute path (a string)")
            if "tree_at" in g and rootfs is None:
                raise SpecError(f"{where}: [[guest]] {name}: tree_at needs rootfs (without a root filesystem "
                                "the tree is /)")
            env = g.get("env", [])
            if isinstance(env, str) or not isinstance(env, list) \
                    or not all(isinstance(e, str) and "=" in e and not e.startswith("=") for e in env):
                raise SpecError(f"{where}: [[guest]] {name}: env must be a list of \"KEY=VALUE\" strings")
            if rooted_program and g.get("root"):
                raise SpecError(f"{where}: [[guest]] {name}: a program of a root filesystem takes trees, not root")
            overrides = {k: g[k] for k in AXES if k in g}
            if rooted_program:
                variants = overrides.get("variants", ["default"])
                variants = [variants] if isinstance(variants, str) else variants
                if list(variants) != ["default"]:
                    raise SpecError(f"{where}: [[guest]] {name}: a program of the {rootfs} root has only its "
                                    "packaged build: variants = [\"default\"]")
                overrides["variants"] = ["default"]
            guests.append(GuestEntry(
                name=name, args=list(args), trees=list(trees), applet=g.get("applet"),
                weight=float(g.get("weight", 1.0)), stdout=g.get("stdout"), seed=g.get("seed"),
                root=g.get("root"), label=label, rootfs=rootfs, tree_at=tree_at, env=list(env),
                overrides=overrides))
        spec = cls(
            name=str(raw.get("name") or Path(source).stem or "matrix"),
            description=str(raw.get("description", "")),
            strategies=raw.get("strategies", "all"),
            variants=list(raw.get("variants", ["default", "nosegneg"])),
            profiles=list(raw.get("profiles", ["nonpae"])),
            cost_profile=str(raw.get("cost_profile", "nominal")),
            timeout_seconds=float(raw.get("timeout_seconds", 300.0)),
            stdout=str(raw.get("stdout", "pipe")),
            seed=int(raw.get("seed", 0)),
            max_tasks_per_child=int(raw.get("max_tasks_per_child", 20)),
            kill_after_seconds=float(raw["kill_after_seconds"]) if "kill_after_seconds" in raw else None,
            fit=dict(raw.get("fit", {})),
            backends=[raw["backends"]] if isinstance(raw.get("backends"), str) else list(raw.get("backends", ["unicorn"])),
            hw=dict(raw.get("hw", {})),
            guests=guests,
            source=source,
            raw=raw,
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        from tlslab.guests import VARIANTS
        from tlslab.linux.tree import TreeSpec, TreeSpecError

        where = self.source or "spec"
        for g in self.guests:
            for v in self._axis("variants", g):
                if v not in VARIANTS:
                    raise SpecError(f"{where}: unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
            for p in self._axis("profiles", g):
                if p not in ("nonpae", "pae"):
                    raise SpecError(f"{where}: unknown hypervisor profile {p!r} (nonpae | pae)")
            for s in self._strategies(g):
                self._check_strategy(s)
            if not g.root:
                for t in (t for t in g.tree_list() if t is not None):
                    try:
                        TreeSpec.parse(t or "small")
                    except TreeSpecError as exc:
                        raise SpecError(f"{where}: guest {g.name}: {exc}") from None
        if self.timeout_seconds <= 0:
            raise SpecError(f"{where}: timeout_seconds must be > 0")
        self._validate_backends()

    def _validate_backends(self) -> None:
        where = self.source or "spec"
        for g in self.guests:
            backends = self._axis("backends", g)
            for b in backends:
                if b not in BACKENDS:
                    raise SpecError(f"{where}: guest {g.name}: unknown backend {b!r} (choose from {', '.join(BACKENDS)})")
            if "hw" in backends and "unicorn" not in backends:
                raise SpecError(f"{where}: guest {g.name}: an hw cell is compared with the model's cell: "
                                "backends must include unicorn too")
        bad = set(self.hw) - HW_KEYS
        if bad:
            raise SpecError(f"{where}: [hw]: unknown key(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(HW_KEYS))})")
        for s in self.hw.get("strategies", []):
            if s not in HW_BENCH_STRATEGIES:
                raise SpecError(f"{where}: [hw] strategies: {s!r} has no hw implementation "
                                f"(choose from {', '.join(HW_BENCH_STRATEGIES)})")
        from tlslab.guests import VARIANTS

        for v in self.hw.get("variants", []):
            if v not in VARIANTS:
                raise SpecError(f"{where}: [hw] variants: unknown variant {v!r}")
        if int(self.hw.get("repeat", 3)) < 1:
            raise SpecError(f"{where}: [hw] repeat must be >= 1")

    def _check_strategy(self, name: str) -> None:
        from tlslab.hypervisor.strategies import STRATEGIES

        if name not in STRATEGIES:
            raise SpecError(f"{self.source or 'spec'}: unknown strategy {name!r} "
                            f"(choose from: {', '.join(STRATEGIES)})")

    def _axis(self, axis: str, g: GuestEntry) -> list:
        value = g.overrides.get(axis, getattr(self, axis))
        return [value] if isinstance(value, str) else list(value)

    def _strategies(self, g: GuestEntry) -> list[str]:
        from tlslab.hypervisor.strategies import STRATEGIES

        value = g.overrides.get("strategies", self.strategies)
        if value == "all" or value == ["all"]:
            return list(STRATEGIES)
        return [value] if isinstance(value, str) else list(value)

    # ------------------------------------------------------------------ expansion
    def cells(self) -> list[Cell]:
        """Every cell of the matrix, in spec order (guests x trees x variants x strategies x profiles)."""
        out: list[Cell] = []
        seen: set[str] = set()
        for g in self.guests:
            trees = g.tree_list()
            for tree in trees:
                workload = g.workload(tree, len(trees) > 1)
                for variant in self._axis("variants", g):
                    skip = _variant_unavailable(g.name, variant) or _root_unavailable(g, variant)
                    for strategy in self._strategies(g):
                        for profile in self._axis("profiles", g):
                            spec = RunSpec(guest=g.name, args=tuple(g.args), strategy=strategy, profile=profile,
                                           tree=tree, root=g.root,
                                           seed=self.seed if g.seed is None else int(g.seed),
                                           stdout=g.stdout or self.stdout, variant=variant, applet=g.applet,
                                           timeout_seconds=self.timeout_seconds, rootfs=g.rootfs,
                                           tree_at=g.tree_at, env=tuple(g.env))
                            weight = g.weight * _tree_factor(tree) * (0.4 if strategy == "native" else 1.0)
                            cell = Cell(spec, workload, round(weight, 3), skip)
                            if cell.id in seen:
                                continue
                            seen.add(cell.id)
                            out.append(cell)
                            if "hw" in self._axis("backends", g) and self._hw_wants(strategy, variant):
                                hw = Cell(spec, workload, round(0.05 * self.hw_options()["repeat"] * _tree_factor(tree), 3),
                                          skip or _hw_cell_skip(spec), "hw", self.hw_options())
                                if hw.id not in seen:
                                    seen.add(hw.id)
                                    out.append(hw)
        return out

    def hw_options(self) -> dict:
        return {"repeat": int(self.hw.get("repeat", 3)), "cpu": int(self.hw.get("cpu", 0))}

    def _hw_wants(self, strategy: str, variant: str) -> bool:
        strategies = self.hw.get("strategies", HW_BENCH_STRATEGIES)
        variants = self.hw.get("variants")
        return strategy in strategies and strategy in HW_BENCH_STRATEGIES and (variants is None or variant in variants)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "source": self.source, "toml": self.raw}


def _hw_cell_skip(spec: RunSpec) -> str | None:
    """Why this hw cell can never run (whatever the host); host availability is decided when it runs."""
    if spec.stdout == "tty":
        return "the hw backend cannot model a tty stdout"
    if (spec.rootfs or spec.variant == "dyn") and os.geteuid() != 0:
        return ("the hw backend runs programs of a root filesystem (rootfs, dyn builds) chrooted into it, "
                "which needs root")
    return None


def _tree_factor(tree: str | None) -> float:
    """Cells on bigger trees cost more: entries / 400 (the small tree), at least 1."""
    from tlslab.linux.tree import TreeSpec

    if tree is None:
        return 1.0
    t = TreeSpec.parse(tree)
    return max(1.0, (t.dirs + t.files + t.symlinks) / 400)


@functools.lru_cache(maxsize=None)
def _variant_unavailable(guest: str, variant: str) -> str | None:
    """Why a (guest, variant) cannot run on this machine, or None. Only Debian guests are checked here:
    an unknown bundled guest or a bad path is a worker failure, recorded with its traceback."""
    from tlslab import debian
    from tlslab.guests import GuestError, resolve_guest

    if guest not in debian.GUEST_PACKAGES:
        return None
    if variant != "default":
        return f"{guest} has no {variant} build (it is Debian's binary)"
    try:
        resolve_guest(guest, variant)
    except (GuestError, OSError) as exc:
        return f"{guest} unavailable here: {exc}"
    except Exception as exc:  # apt/network trouble of any kind: skip, with the reason
        return f"{guest} unavailable here: {type(exc).__name__}: {exc}"
    return None


def rootfs_names() -> list[str]:
    """The root filesystems pinned in guests/rootfs.lock.json."""
    from tlslab import rootfs

    try:
        return sorted(rootfs.load_lock().get("roots", {}))
    except Exception:
        return []


def _guest_rootfs(where: str, g: dict) -> str | None:
    if "rootfs" not in g:
        return None
    value = g["rootfs"]
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: [[guest]] {g['name']}: rootfs must be the name of a pinned root (a string)")
    names = rootfs_names()
    if value not in names:
        raise SpecError(f"{where}: [[guest]] {g['name']}: unknown root filesystem {value!r} "
                        f"(pinned in guests/rootfs.lock.json: {', '.join(names) or 'none'})")
    return value


def _root_unavailable(g: GuestEntry, variant: str) -> str | None:
    """Why the root filesystem a (guest, variant) runs in is not here (None if it is, or it needs none)."""
    name = g.rootfs or (DEFAULT_ROOTFS if variant == "dyn" else None)
    return _rootfs_missing(name) if name else None


@functools.lru_cache(maxsize=None)
def _rootfs_missing(name: str) -> str | None:
    from tlslab import rootfs

    try:
        rootfs.materialise(name, fetch=False)
    except rootfs.GuestError as exc:     # RootfsUnavailable, RootfsMismatch: one line, with the hint
        return f"root filesystem {name} unavailable here: {exc}"
    except Exception as exc:  # noqa: BLE001 -- a damaged cache of any kind: skip, with the reason
        return f"root filesystem {name} unavailable here: {type(exc).__name__}: {exc}"
    return None


def load_spec(path: str | Path | None = None) -> MatrixSpec:
    p = Path(path) if path else DEFAULT_SPEC
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"matrix spec {p} does not exist") from None
    except OSError as exc:
        raise SpecError(f"cannot read matrix spec {p}: {exc}") from None
    return MatrixSpec.from_toml(text, str(p) if path else f"{p.name} (bundled default)")
