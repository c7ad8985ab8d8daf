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
    online_prices = ["xen-2004", "hw-vm"]        # online strategies also decide with these
                                                 # prices, each judged in its own online table
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
emulate, flip, online-site, online-probe, online-lookahead; other strategies get no hw cell). A
``[hw]`` table narrows and tunes them::

    [hw]
    strategies = ["native", "emulate", "flip"]   # subset of HW_BENCH_STRATEGIES (default: these three)
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from tlslab.experiment import DEFAULT_ROOTFS, DEFAULT_TREE_AT, RunSpec, host_directory

DEFAULT_SPEC = Path(__file__).with_name("default.toml")
AXES = ("strategies", "variants", "profiles", "backends")
BACKENDS = ("unicorn", "hw")   # tlslab.bench.backends.BACKENDS (a test keeps them in step)
# what the ptrace supervisor implements (tlslab.hw.backend.HW_STRATEGIES but untraced)
HW_BENCH_STRATEGIES = ("native", "emulate", "flip", "online-site", "online-rate", "online-probe", "online-lookahead",
                       "online-patch")
HW_BENCH_DEFAULT = ("native", "emulate", "flip")   # hw cells when [hw] names no strategies (online ones: ask for them)
HW_KEYS = {"strategies", "variants", "repeat", "cpu"}
#: RunSpec fields added after cell ids were first recorded, with their defaults: they enter a cell's
#: identity only when set to something else, so every earlier cell keeps its id.
LATE_FIELDS = {"rootfs": None, "tree_at": DEFAULT_TREE_AT, "env": (), "prices": "hw-vm", "emulate_ns": 0.0,
               "flip_ns": 0.0}


class SpecError(ValueError):
    """A malformed matrix spec (one line)."""


STDOUT_KINDS = ("pipe", "file", "null", "tty")
HV_PROFILES = ("nonpae", "pae")
MAX_CELLS = 20_000              # a matrix bigger than this is a mistake (the default has a few hundred)
MAX_TIMEOUT = 7 * 86400.0       # seconds, per cell
MAX_HW_REPEAT = 1000
MAX_SPEC_BYTES = 1 << 20
FIT_KEYS = {"guest", "tree", "variant", "profile"}


def _where(where: str, key: str) -> str:
    return f"{where}: {key}"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(where: str, key: str, v, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if not _is_number(v) or v != v:     # NaN
        raise SpecError(f"{_where(where, key)} must be a number, not {type(v).__name__} {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise SpecError(f"{_where(where, key)} = {v!r} is out of range ({'>' if lo_open else '>='} {lo:g}, "
                        f"<= {hi:g})")
    return float(v)


def _integer(where: str, key: str, v, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise SpecError(f"{_where(where, key)} must be an integer, not {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise SpecError(f"{_where(where, key)} = {v} is out of range ({lo}..{hi})")
    return v


def _string(where: str, key: str, v, *, empty: bool = False) -> str:
    if not isinstance(v, str) or (not empty and not v.strip()):
        raise SpecError(f"{_where(where, key)} must be a {'' if empty else 'non-empty '}string, "
                        f"not {type(v).__name__} {v!r}")
    if "\x00" in v:
        raise SpecError(f"{_where(where, key)} contains a NUL character")
    return v


def _string_list(where: str, key: str, v, *, one_ok: bool = True, empty_ok: bool = False) -> list[str]:
    """A list of strings; a single string is one item when ``one_ok`` (never iterated by character)."""
    if isinstance(v, str) and one_ok:
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SpecError(f"{_where(where, key)} must be a list of strings, not {type(v).__name__} {v!r}")
    if not v and not empty_ok:
        raise SpecError(f"{_where(where, key)} must not be empty")
    for x in v:
        _string(where, key, x, empty=True)
    return list(v)


def _choices(where: str, key: str, values: list[str], known, what: str) -> list[str]:
    for x in values:
        if x not in known:
            raise SpecError(f"{_where(where, key)}: unknown {what} {x!r} (choose from {', '.join(known)})")
    return values


def _axis_value(where: str, key: str, v) -> list[str] | str:
    """strategies/variants/profiles/backends: a string or a list of strings, never empty."""
    if isinstance(v, str):
        _string(where, key, v)
        return v if key == "strategies" and v == "all" else [v]
    return _string_list(where, key, v)


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
    if d.get("page_sharing") == "":
        d["page_sharing"] = default_page_sharing(d.get("strategy"))   # the value "" stands for
    if backend != "unicorn":
        d["backend"] = backend
    return hashlib.sha256(canonical_json(d).encode()).hexdigest()[:16]


def default_page_sharing(strategy: str | None) -> str:
    """What ``page_sharing=""`` means for ``strategy``: its declared default; "shared" (the value cell ids were
    made with before the field could be empty) for a strategy that does not patch."""
    from tlslab.hypervisor.strategies import STRATEGIES

    options = getattr(STRATEGIES.get(strategy or ""), "Options", None)
    field = getattr(options, "__dataclass_fields__", {}).get("page_sharing")
    return field.default if field is not None else "shared"


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
        from tlslab.hypervisor.strategies import is_online

        s = self.spec
        # an online strategy's cells differ by the prices it decides with (MatrixSpec.online_prices)
        prices = f" prices={s.prices}" if is_online(s.strategy) else ""
        return f"{self.workload} {s.variant} {s.strategy} {s.profile}{prices}" + (" on hw" if self.backend == "hw" else "")

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
            return base if self.label else f"{base} [{self.root}]"
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
    online_prices: list[str] = field(default_factory=list)   # more profiles the online strategies decide with
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
        """Check every key's type and range, then every name (guests, strategies, variants, profiles,
        trees, root filesystems): a bad spec is one line naming the key, before anything runs."""
        from tlslab.guests import VARIANTS

        where = source or "spec"
        if not isinstance(raw, dict):
            raise SpecError(f"{where}: a matrix spec is a TOML table")
        known = {"name", "description", "strategies", "variants", "profiles", "cost_profile", "online_prices",
                 "timeout_seconds", "stdout", "seed", "max_tasks_per_child", "kill_after_seconds", "fit", "guest",
                 "backends", "hw"}
        unknown = set(raw) - known
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        guests_raw = raw.get("guest") or []
        if not isinstance(guests_raw, list) or not guests_raw:
            raise SpecError(f"{where}: needs at least one [[guest]] table")
        top = {}
        for key in AXES:
            if key in raw:
                top[key] = _axis_value(where, key, raw[key])
        if "variants" in top:
            _choices(where, "variants", top["variants"], VARIANTS, "variant")
        if "profiles" in top:
            _choices(where, "profiles", top["profiles"], HV_PROFILES, "hypervisor profile")
        if "backends" in top:
            _choices(where, "backends", top["backends"], BACKENDS, "backend")
        for key in ("name", "description"):
            if key in raw:
                _string(where, key, raw[key], empty=True)
        if "cost_profile" in raw:
            _check_cost_profile(where, _string(where, "cost_profile", raw["cost_profile"]))
        if "online_prices" in raw:
            _check_online_prices(where, raw["online_prices"])
        if "timeout_seconds" in raw:
            _number(where, "timeout_seconds", raw["timeout_seconds"], 0, MAX_TIMEOUT, lo_open=True)
        if "kill_after_seconds" in raw:
            _number(where, "kill_after_seconds", raw["kill_after_seconds"], 0, MAX_TIMEOUT, lo_open=True)
        if "stdout" in raw:
            _choices(where, "stdout", [_string(where, "stdout", raw["stdout"])], STDOUT_KINDS, "stdout kind")
        if "seed" in raw:
            _integer(where, "seed", raw["seed"], 0, 2**63 - 1)
        if "max_tasks_per_child" in raw:
            _integer(where, "max_tasks_per_child", raw["max_tasks_per_child"], 1, 1_000_000)
        fit = raw.get("fit", {})
        if not isinstance(fit, dict):
            raise SpecError(f"{where}: [fit] must be a table (guest, tree, variant, profile)")
        bad = set(fit) - FIT_KEYS
        if bad:
            raise SpecError(f"{where}: [fit]: unknown key(s) {', '.join(sorted(bad))} "
                            f"(known: {', '.join(sorted(FIT_KEYS))})")
        for key in fit:
            _string(where, f"[fit] {key}", fit[key])
        if "variant" in fit:
            _choices(where, "[fit] variant", [fit["variant"]], VARIANTS, "variant")
        if "profile" in fit:
            _choices(where, "[fit] profile", [fit["profile"]], HV_PROFILES, "hypervisor profile")
        hw = raw.get("hw", {})
        if not isinstance(hw, dict):
            raise SpecError(f"{where}: [hw] must be a table ({', '.join(sorted(HW_KEYS))})")
        hw = dict(hw)
        if "strategies" in hw:
            hw["strategies"] = _string_list(where, "[hw] strategies", hw["strategies"])
        if "variants" in hw:
            hw["variants"] = _choices(where, "[hw] variants", _string_list(where, "[hw] variants", hw["variants"]),
                                      VARIANTS, "variant")
        if "repeat" in hw:
            _integer(where, "[hw] repeat", hw["repeat"], 1, MAX_HW_REPEAT)
        if "cpu" in hw:
            _integer(where, "[hw] cpu", hw["cpu"], -1, 4095)
        guests = []
        gknown = {"name", "args", "trees", "tree", "applet", "weight", "stdout", "seed", "root", "label", "rootfs",
                  "tree_at", "env", *AXES}
        for i, g in enumerate(guests_raw):
            if not isinstance(g, dict) or "name" not in g:
                raise SpecError(f"{where}: [[guest]] #{i + 1} needs a name")
            if not isinstance(g["name"], str) or not g["name"] or "\x00" in g["name"]:
                raise SpecError(f"{where}: [[guest]] #{i + 1}: name must be a non-empty string")
            bad = set(g) - gknown
            if bad:
                raise SpecError(f"{where}: [[guest]] {g['name']}: unknown key(s) {', '.join(sorted(bad))}")
            name = g["name"]
            gw = f"{where}: [[guest]] {name}"
            rootfs = _guest_rootfs(where, g)
            rooted_program = rootfs is not None and name.startswith("/")
            if "tree" in g and "trees" in g:
                raise SpecError(f"{gw}: give trees or tree, not both")
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
            _string_list(gw, "args", args, one_ok=False, empty_ok=True)
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
            applet = g.get("applet")
            if applet is not None:
                _string(gw, "applet", applet)
            weight = _number(gw, "weight", g.get("weight", 1.0), 0, 1e6, lo_open=True)
            stdout = g.get("stdout")
            if stdout is not None:
                _choices(gw, "stdout", [_string(gw, "stdout", stdout)], STDOUT_KINDS, "stdout kind")
            seed = g.get("seed")
            if seed is not None:
                _integer(gw, "seed", seed, 0, 2**63 - 1)
            root = g.get("root")
            if root is not None:
                _string(gw, "root", root)
                if not os.path.isdir(host_directory(root)):
                    raise SpecError(f"{gw}: root {root!r} is not a directory here")
            overrides = {k: _axis_value(gw, k, g[k]) for k in AXES if k in g}
            if rooted_program:
                variants = overrides.get("variants", ["default"])
                variants = [variants] if isinstance(variants, str) else variants
                if list(variants) != ["default"]:
                    raise SpecError(f"{where}: [[guest]] {name}: a program of the {rootfs} root has only its "
                                    "packaged build: variants = [\"default\"]")
                overrides["variants"] = ["default"]
            guests.append(GuestEntry(
                name=name, args=list(args), trees=list(trees), applet=applet,
                weight=weight, stdout=stdout, seed=seed,
                root=root, label=label, rootfs=rootfs, tree_at=tree_at, env=list(env),
                overrides=overrides))
        spec = cls(
            name=str(raw.get("name") or Path(source).stem or "matrix"),
            description=str(raw.get("description", "")),
            strategies=top.get("strategies", "all"),
            variants=list(top.get("variants", ["default", "nosegneg"])),
            profiles=list(top.get("profiles", ["nonpae"])),
            cost_profile=str(raw.get("cost_profile", "nominal")),
            online_prices=list(raw.get("online_prices", [])),
            timeout_seconds=float(raw.get("timeout_seconds", 300.0)),
            stdout=str(raw.get("stdout", "pipe")),
            seed=int(raw.get("seed", 0)),
            max_tasks_per_child=int(raw.get("max_tasks_per_child", 20)),
            kill_after_seconds=float(raw["kill_after_seconds"]) if "kill_after_seconds" in raw else None,
            fit=dict(fit),
            backends=list(top.get("backends", ["unicorn"])),
            hw=hw,
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
            for v in self._axis("variants", g):
                _check_guest(where, g, v)
            if not g.root:
                for t in (t for t in g.tree_list() if t is not None):
                    try:
                        TreeSpec.parse(t or "small")
                    except TreeSpecError as exc:
                        raise SpecError(f"{where}: guest {g.name}: {exc}") from None
        if self.timeout_seconds <= 0:
            raise SpecError(f"{where}: timeout_seconds must be > 0")
        self._validate_backends()
        n = sum(len(g.tree_list()) * len(self._axis("variants", g)) * len(self._strategies(g))
                * len(self._axis("profiles", g)) * len(self._axis("backends", g)) for g in self.guests)
        if n > MAX_CELLS:
            raise SpecError(f"{where}: the matrix has {n:,} cells, more than the limit of {MAX_CELLS:,}")

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
                                           tree_at=g.tree_at, env=tuple(g.env),
                                           **self._price_fields(strategy))
                            weight = g.weight * _tree_factor(tree) * (0.4 if strategy == "native" else 1.0)
                            cell = Cell(spec, workload, round(weight, 3), skip)
                            if cell.id in seen:
                                continue
                            seen.add(cell.id)
                            out.append(cell)
                            for prices in self._extra_prices(strategy):   # the same policy deciding with other prices
                                extra = Cell(replace(spec, prices=prices), workload, round(weight, 3), skip)
                                if extra.id not in seen:
                                    seen.add(extra.id)
                                    out.append(extra)
                            if "hw" in self._axis("backends", g) and self._hw_wants(strategy, variant):
                                hw = Cell(spec, workload, round(0.05 * self.hw_options()["repeat"] * _tree_factor(tree), 3),
                                          skip or _hw_cell_skip(spec), "hw", self.hw_options())
                                if hw.id not in seen:
                                    seen.add(hw.id)
                                    out.append(hw)
        return out

    def _price_fields(self, strategy: str) -> dict:
        """Online strategies decide with the matrix's cost profile (the one their cells are priced with)."""
        from tlslab.hypervisor.strategies import is_online

        if not is_online(strategy):
            return {}
        prices = self._main_prices()
        return {"prices": prices} if prices == self.cost_profile else {}

    def _main_prices(self) -> str:
        """The profile online strategies' main cells decide with: the matrix's cost profile where it is stored
        and prices faults, else RunSpec's default (a profile fitted during the run does not exist yet)."""
        from tlslab.hypervisor import costmodel

        try:
            e, f = costmodel.fault_prices(costmodel.get_profile(self.cost_profile))
        except ValueError:
            return LATE_FIELDS["prices"]
        return self.cost_profile if e > 0 and f > 0 else LATE_FIELDS["prices"]

    def _extra_prices(self, strategy: str) -> list[str]:
        """The profiles an online strategy gets more cells with (``online_extra_prices``); none for the others."""
        from tlslab.hypervisor.strategies import is_online

        return self.online_extra_prices() if is_online(strategy) else []

    def online_extra_prices(self) -> list[str]:
        """``online_prices`` beyond the prices online strategies' main cells decide with: each gives every online
        strategy one more cell per row, so the summary can judge them under that profile too. run.json keeps
        the list, so the summary can tell those cells from the main ones."""
        main = self._main_prices()
        return [p for p in dict.fromkeys(self.online_prices) if p != main]

    def hw_options(self) -> dict:
        return {"repeat": int(self.hw.get("repeat", 3)), "cpu": int(self.hw.get("cpu", 0))}

    def _hw_wants(self, strategy: str, variant: str) -> bool:
        strategies = self.hw.get("strategies", HW_BENCH_DEFAULT)
        variants = self.hw.get("variants")
        return strategy in strategies and strategy in HW_BENCH_STRATEGIES and (variants is None or variant in variants)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "source": self.source, "toml": self.raw}


def _check_online_prices(where: str, value) -> None:
    """``online_prices``: a list of stored cost profiles that price faults (the online strategies' threshold
    is 2F/E from them)."""
    from tlslab.hypervisor import costmodel

    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(f"{where}: online_prices: expected a list of cost profile names, got {value!r}")
    known = costmodel.available_profiles()
    for name in value:
        profile = known.get(name)
        if profile is None:
            raise SpecError(f"{where}: online_prices: unknown cost profile {name!r} "
                            f"(choose from {', '.join(known)}; see `tlslab costs`)")
        e, f = costmodel.fault_prices(profile)
        if e <= 0 or f <= 0:
            raise SpecError(f"{where}: online_prices: cost profile {name!r} does not price faults")


def _check_cost_profile(where: str, name: str) -> None:
    from tlslab.hypervisor import costmodel

    known = list(costmodel.available_profiles())
    if name not in known and name not in ("fit", "xen-2004"):
        raise SpecError(f"{where}: cost_profile: unknown cost profile {name!r} "
                        f"(choose from {', '.join([*known, 'fit'])}; see `tlslab costs`)")


def _check_guest(where: str, g: "GuestEntry", variant: str) -> None:
    """The guest exists: a bundled name (in this variant), a Debian guest, or a path to a file. Programs of a
    root filesystem are looked up in the root when their cells run (skipped if it is not fetched)."""
    from tlslab import debian
    from tlslab.guests import VARIANT_SUFFIX, _bundled_entries, _looks_like_path, _split_name, manifest_path

    if g.rooted_program:
        return
    name = g.name
    try:
        base, var = _split_name(name, variant)
    except Exception as exc:  # noqa: BLE001 -- a name the registry cannot even split
        raise SpecError(f"{where}: [[guest]] {name}: {exc}") from None
    entries = _bundled_entries() if manifest_path().exists() else {}
    if base + VARIANT_SUFFIX.get(var, "") in entries or base in debian.GUEST_PACKAGES:
        return
    if _looks_like_path(name):
        if not os.path.isfile(name):
            raise SpecError(f"{where}: [[guest]] {name}: no such file")
        return
    names = sorted({e["name"] for e in entries.values()} | set(debian.GUEST_PACKAGES))
    if any(base + VARIANT_SUFFIX.get(v, "") in entries for v in VARIANT_SUFFIX):
        raise SpecError(f"{where}: [[guest]] {name}: has no {var} build")
    raise SpecError(f"{where}: [[guest]] {name}: unknown guest (known: {', '.join(names)}; or a path)")


def _hw_cell_skip(spec: RunSpec) -> str | None:
    """Why this hw cell can never run (whatever the host); host availability is decided when it runs."""
    if spec.stdout == "tty":
        return "the hw backend cannot model a tty stdout"
    if os.geteuid() != 0:   # every hw run is jailed (tlslab.hw.backend): mount namespace, chroot, uid 1000
        if spec.rootfs or spec.variant == "dyn":
            return ("the hw backend runs programs of a root filesystem (rootfs, dyn builds) chrooted into it, "
                    "which needs root")
        return "the hw backend runs every guest jailed (a private mount namespace, chroot, uid 1000), which needs root"
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
        if not p.exists():
            raise FileNotFoundError(p)
        if not p.is_file():         # a directory, a FIFO (reading it would block), a device
            raise SpecError(f"matrix spec {p} is not a regular file")
        if p.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"matrix spec {p} is larger than {MAX_SPEC_BYTES:,} bytes")
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"matrix spec {p} does not exist") from None
    except UnicodeDecodeError:
        raise SpecError(f"matrix spec {p} is not UTF-8 text") from None
    except OSError as exc:
        raise SpecError(f"cannot read matrix spec {p}: {exc}") from None
    return MatrixSpec.from_toml(text, str(p) if path else f"{p.name} (bundled default)")
