"""The run record: one typed, versioned shape for every backend (model and hw) and every writer.

Writers: ``tlslab run --json`` (model and ``--backend hw``), bench cells
(``cells.jsonl``, :mod:`tlslab.bench.runner` / :mod:`tlslab.bench.hwcells`),
``tlslab faults --json``, and the run file ``run.json``. Every object they
write carries ``"schema": SCHEMA_VERSION``. Readers (bench resume, summary,
report, export, ``tlslab faults``) go through :func:`load` (or
:meth:`RunRecord.from_dict`), which refuses a schema it does not know with one
line (:class:`SchemaError`; the CLI turns it into exit status 2).

The fields every backend fills the same way:

* ``outcome``: an :class:`Outcome` (``ok``, ``guest-crash``, ``failed``,
  ``skipped``); it is a ``str`` enum, so it is written as the same strings as
  before and compares equal to them;
* ``faults``: the #GP faults the run took -- the model's
  ``counters.strategy.traps`` (every trap the strategy saw), the hw backend's
  faults the CPU raised under the supervisor. None only where nothing ran
  (a failed or skipped cell);
* ``instructions``: guest instructions (the model's count; the hw backend's
  retired-instruction counter where it has one, else None);
* ``backend``, ``status``, ``reason``, ``crash``, ``counters``.

Backend-specific fields (``modelled``, ``sites``, ``timeline`` of the model;
``run_seconds``, ``hw_fault_sites`` of hw; ...) are kept as they are, in
:attr:`RunRecord.extra`, and written at the top level as before.

**Compatibility reader (schema 1).** Records written before this module (no
``schema`` key; all of ``results/reference/run/``) are schema 1: the same
layout without ``schema``, without a top-level ``faults`` for model cells and
without ``instructions``. :func:`upgrade` reads them: it fills ``faults`` from
``counters.strategy.traps`` (hw records had it already) and ``instructions``
from the counters, and marks them ``schema`` 2. That is the only place that
knows about the old shape; nothing else reads ``counters.strategy.traps`` for
a fault count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

SCHEMA_VERSION = 2
READABLE = (1, 2)           # 1: the layout before the schema key (read by upgrade())
SCHEMA_KEY = "schema"


class SchemaError(ValueError):
    """A record or file this tlslab cannot read (unknown schema, malformed outcome): one line."""


class Outcome(str, Enum):
    OK = "ok"
    GUEST_CRASH = "guest-crash"     # a measurement: the strategy refused a fault, the guest got SIGSEGV
    FAILED = "failed"               # the cell did not run to a measurement (reason says why)
    SKIPPED = "skipped"             # this host cannot run it (reason says why)

    def __str__(self) -> str:
        return self.value

    @property
    def measured(self) -> bool:
        """ok and guest-crash: the run produced counters."""
        return self in (Outcome.OK, Outcome.GUEST_CRASH)

    @classmethod
    def parse(cls, value, what: str = "record") -> "Outcome":
        try:
            return cls(value)
        except ValueError:
            raise SchemaError(f"{what}: unknown outcome {value!r} (known: "
                              f"{', '.join(o.value for o in cls)})") from None


FINISHED = frozenset(Outcome)                           # every outcome ends a cell
RETRYABLE = frozenset((Outcome.FAILED, Outcome.SKIPPED))
MEASURED = frozenset((Outcome.OK, Outcome.GUEST_CRASH))

_CORE = ("outcome", "backend", "faults", "instructions", "status", "reason", "crash", "counters")


def check_schema(obj: dict, what: str = "record") -> int:
    """The schema version of ``obj`` (1 when it has none: written before versioning); SchemaError otherwise."""
    version = obj.get(SCHEMA_KEY, 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE:
        raise SchemaError(f"{what}: schema {version!r} is not one this tlslab reads "
                          f"({', '.join(map(str, READABLE))}): upgrade tlslab or re-run")
    return version


def model_faults(counters: dict | None) -> int | None:
    """The model's fault count: every #GP trap the strategy saw."""
    if not counters:
        return None
    strategy = counters.get("strategy")
    if not isinstance(strategy, dict) or "traps" not in strategy:
        return None
    return int(strategy["traps"])


def upgrade(obj: dict, what: str = "record") -> dict:
    """A record of any readable schema as a current-schema dict (the compatibility reader; see the module doc)."""
    version = check_schema(obj, what)
    if "outcome" in obj:
        Outcome.parse(obj["outcome"], what)
    if version == SCHEMA_VERSION and "faults" in obj:
        return obj
    out = dict(obj)
    backend = out.get("backend") or "unicorn"
    counters = out.get("counters") if isinstance(out.get("counters"), dict) else None
    if "faults" not in out or (backend != "hw" and out.get("faults") is None):
        out["faults"] = model_faults(counters) if backend != "hw" else out.get("faults")
    if "instructions" not in out:
        out["instructions"] = counters.get("instructions") if counters else None
    out[SCHEMA_KEY] = SCHEMA_VERSION
    return out


@dataclass
class RunRecord:
    """One run of one backend: what every reader may rely on, plus the backend's own fields (``extra``)."""

    outcome: Outcome
    backend: str = "unicorn"
    faults: int | None = None
    instructions: int | None = None
    status: int | None = None
    reason: str | None = None
    crash: dict | None = None
    counters: dict | None = None
    extra: dict = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def __post_init__(self):
        self.outcome = Outcome.parse(self.outcome)
        if self.faults is None and self.backend != "hw":
            self.faults = model_faults(self.counters)
        if self.instructions is None and self.counters:
            self.instructions = self.counters.get("instructions")

    @property
    def measured(self) -> bool:
        return self.outcome.measured

    @classmethod
    def from_dict(cls, obj: dict, what: str = "record") -> "RunRecord":
        d = upgrade(obj, what)
        if "outcome" not in d:
            raise SchemaError(f"{what}: no outcome")
        core = {k: d.get(k) for k in _CORE}
        core["backend"] = core["backend"] or "unicorn"
        extra = {k: v for k, v in d.items() if k not in _CORE and k != SCHEMA_KEY}
        return cls(**core, extra=extra)

    def to_dict(self) -> dict:
        """The JSON object written: the backend's fields, then the common ones, and the schema."""
        out = dict(self.extra)
        for k in _CORE:
            out[k] = getattr(self, k)
        out["outcome"] = self.outcome.value
        out[SCHEMA_KEY] = self.schema
        return out


def crash_dict(crash) -> dict | None:
    """A GuestCrash as the record writes it (``text`` is its one-line description)."""
    if crash is None:
        return None
    return {"eip": crash.eip, "symbol": crash.symbol, "instruction": crash.instruction, "reason": crash.reason,
            "text": crash.describe()}


def model_outcome(crash) -> Outcome:
    """A model run's outcome from its GuestCrash: none -> ok; the vCPU's time budget -> failed; else guest-crash."""
    if crash is None:
        return Outcome.OK
    return Outcome.FAILED if getattr(crash, "timed_out", False) else Outcome.GUEST_CRASH


def from_result(result, backend: str = "unicorn", **extra) -> RunRecord:
    """The record of a model run (a ``RunResult``): ``tlslab run --json``, ``tlslab faults --json``."""
    crash = result.crash
    return RunRecord(outcome=model_outcome(crash), backend=backend, status=result.status,
                     reason=crash.describe() if crash is not None else None, crash=crash_dict(crash),
                     counters=result.counters, extra=extra)


def hw_outcome(result) -> Outcome:
    """An hw run's outcome (a ``tlslab.hw.backend.HwResult``): ok; its timeout -> failed; else guest-crash."""
    if result.ok:
        return Outcome.OK
    return Outcome.FAILED if result.summary.get("timed_out") else Outcome.GUEST_CRASH


def stamp(obj: dict) -> dict:
    """``obj`` (a file's top-level object that is not a run record: run.json, faults --json) with the schema."""
    return {**obj, SCHEMA_KEY: SCHEMA_VERSION}


def load(obj: dict, what: str = "record") -> dict:
    """Validate and upgrade a record read from a file; the dict readers index (see :func:`upgrade`)."""
    if not isinstance(obj, dict):
        raise SchemaError(f"{what}: not a JSON object")
    return upgrade(obj, what)
