"""Cost model: named profiles that map a run's counters to modelled time.

A profile is a price list (nanoseconds per guest instruction, per system call,
per #GP trap, per decode, per descriptor write, per emulated access, per patch,
per guest notification, per instruction decoded ahead of a fault, per reuse of
a memoised walk). Counters are always reported next to the modelled
time, so a reader can reprice them.

Provenance is part of a profile: ``kind`` is "fitted" (parameters solved from
published figures -- then ``fitted_on`` says what they were fitted to and on
which workload, and predictions for that workload are not evidence), "measured"
(from ``tlslab calibrate`` on real hardware), or "nominal" (unit prices, i.e.
just weighted counts).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROFILE_DIR = Path(__file__).with_name("profiles")   # bundled profiles (tracked in the repository)


def user_profile_dir() -> Path:
    """Where ``tlslab calibrate`` and ``tlslab costs fit-xen-2004`` write: $TLSLAB_PROFILES, else
    $XDG_CONFIG_HOME/tlslab/profiles (~/.config/tlslab/profiles). A profile here overrides a bundled
    profile of the same name."""
    env = os.environ.get("TLSLAB_PROFILES")
    if env:
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "tlslab" / "profiles"

PRICE_FIELDS = (
    "instruction_ns",
    "syscall_ns",
    "trap_ns",
    "decode_ns",
    "descriptor_write_ns",
    "emulated_access_ns",
    "patch_ns",
    "notification_ns",
    "lookahead_ns",
    "lookahead_reuse_ns",
)


FAULT_PRICE_FIELDS = ("trap_ns", "decode_ns", "descriptor_write_ns", "emulated_access_ns", "patch_ns",
                     "notification_ns", "lookahead_ns", "lookahead_reuse_ns")


@dataclass(frozen=True)
class CostProfile:
    name: str
    kind: str                       # "fitted" | "measured" | "nominal"
    description: str
    instruction_ns: float = 1.0
    syscall_ns: float = 0.0
    trap_ns: float = 0.0
    decode_ns: float = 0.0
    descriptor_write_ns: float = 0.0
    emulated_access_ns: float = 0.0
    patch_ns: float = 0.0
    notification_ns: float = 0.0
    #: per instruction decoded ahead of a fault (online-lookahead's walk; benchmarks/lookahead_price.py)
    lookahead_ns: float = 0.0
    #: per fault whose walk is a memoised one (its inputs re-read and compared, nothing decoded)
    lookahead_reuse_ns: float = 0.0
    fitted_on: str = ""             # for kind == "fitted": targets and workload
    provenance: dict = field(default_factory=dict)

    def prices_faults(self) -> bool:
        """Whether a fault costs anything under this profile (else every strategy models as native)."""
        return any(getattr(self, f) for f in FAULT_PRICE_FIELDS)

    def label(self) -> str:
        if self.kind == "fitted":
            text = f"{self.name} (FITTED to {self.fitted_on}"
        elif self.kind == "nominal":
            text = f"{self.name} (nominal: a weighted instruction count, not a time"
        else:
            text = f"{self.name} ({self.kind}"
        return text + ("" if self.prices_faults() else "; faults not priced") + ")"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "CostProfile":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class ModelledTime:
    profile: str
    total_ns: float
    breakdown_ns: dict[str, float]

    @property
    def total_ms(self) -> float:
        return self.total_ns / 1e6


def work_units(counters: dict) -> dict[str, float]:
    """The priced quantities of a run, from ``Domain.counters()``."""
    s = counters.get("strategy", {})
    syscalls = counters.get("linux", {}).get("syscalls", {}).get("total", 0)
    return {
        "instruction_ns": counters.get("instructions", 0),
        "syscall_ns": syscalls,
        "trap_ns": s.get("traps", 0),
        "decode_ns": s.get("decodes", 0),
        "descriptor_write_ns": s.get("descriptor_writes", 0),
        "emulated_access_ns": s.get("emulated_accesses", 0),
        "patch_ns": s.get("patches", 0),
        "notification_ns": s.get("notifications", 0),
        "lookahead_ns": s.get("by_kind", {}).get("lookahead-instructions", 0),
        "lookahead_reuse_ns": s.get("by_kind", {}).get("lookahead-reused", 0),
    }


def fault_prices(profile: CostProfile) -> tuple[float, float]:
    """(ns per emulated fault, ns per flip) under ``profile``: what a fault-driven policy weighs.

    An emulated fault is a trap, a decode and one emulated access; a flip is a
    trap, a decode and one descriptor write (the restarted instruction then runs
    free). Online strategies take their decision threshold from these two prices.
    """
    emulate = profile.trap_ns + profile.decode_ns + profile.emulated_access_ns
    flip = profile.trap_ns + profile.decode_ns + profile.descriptor_write_ns
    return emulate, flip


def fault_handling_ns(profile: CostProfile, counters: dict) -> float:
    """The part of a run's modelled time spent handling faults (everything but instructions and system calls)."""
    units = work_units(counters)
    return sum(units[k] * getattr(profile, k) for k in FAULT_PRICE_FIELDS)


def predict(profile: CostProfile, counters: dict) -> ModelledTime:
    units = work_units(counters)
    breakdown = {k.removesuffix("_ns"): units[k] * getattr(profile, k) for k in PRICE_FIELDS}
    return ModelledTime(profile.name, sum(breakdown.values()), breakdown)


NOMINAL = CostProfile(
    "nominal", "nominal", "unit prices: 1 ns per instruction, nothing else (a weighted count, not a time)"
)


def available_profiles() -> dict[str, CostProfile]:
    """nominal, the bundled profiles, then the user's (a user profile replaces a bundled one of its name;
    an unreadable or malformed user file is left out)."""
    profiles = {NOMINAL.name: NOMINAL}
    if PROFILE_DIR.is_dir():
        for path in sorted(PROFILE_DIR.glob("*.json")):
            p = CostProfile.from_json(path.read_text())
            profiles[p.name] = p
    user = user_profile_dir()
    try:
        paths = sorted(user.glob("*.json")) if user.is_dir() else []
    except OSError:
        paths = []
    for path in paths:
        try:
            p = CostProfile.from_json(path.read_text())
        except (OSError, ValueError, TypeError):
            continue
        if p.name != NOMINAL.name:
            profiles[p.name] = p
    return profiles


def get_profile(name: str) -> CostProfile:
    profiles = available_profiles()
    if name not in profiles:
        raise ValueError(f"unknown cost profile {name!r} (choose from: {', '.join(profiles)})")
    return profiles[name]


# Keir Fraser, xen-devel, 2004-10-20: `time /bin/ls -R /usr/lib >/dev/null`,
# warm cache: no /lib/tls 180 ms, emulation 300 ms, flipping 390 ms.
KEIR_2004_MS = {"native": 180.0, "emulate": 300.0, "flip": 390.0}


XEN_2004_WALK_NOTE = ("a LOWER BOUND, not fitted: Keir's 2004 table has no walk in it; this is the price "
                      "measured on today's CPU (a 2004 CPU decoded no faster)")


def measured_walk_prices() -> tuple[float, float, dict] | None:
    """(lookahead_ns, lookahead_reuse_ns, provenance) of a measured profile that has them (hw-vm first), or
    None: what a fitted profile carries as the lower bound of the walk's prices."""
    profiles = available_profiles()
    for p in sorted(profiles.values(), key=lambda p: p.name != "hw-vm"):
        if p.kind == "measured" and p.lookahead_ns > 0:
            source = {k: v for k, v in (p.provenance.get("lookahead") or {}).items() if k != "note"}
            return p.lookahead_ns, p.lookahead_reuse_ns, {"note": XEN_2004_WALK_NOTE, "from": p.name, **source}
    return None


def fit_xen_2004(native: dict, emulate: dict, flip: dict, workload: str) -> CostProfile:
    """Solve three prices from Keir's three times on one workload.

    Three equations, three unknowns, so the fit is exact on ``workload`` by
    construction: the native time sets the price of a guest instruction (system
    calls folded in), the emulate time the price of an emulate trap (trap +
    decode + access, carried by ``trap_ns``), and the flip time the extra price
    of a flip trap over an emulate trap (carried by ``descriptor_write_ns``).
    The walk ahead of a fault (online-lookahead) is not in Keir's table: the
    profile carries a measured profile's walk prices as a lower bound
    (``measured_walk_prices``; none measured: the walk is free, and the
    provenance says so).
    """
    n_instr = native["instructions"]
    t_native = KEIR_2004_MS["native"] * 1e6
    instruction_ns = t_native / n_instr

    def rest(c: dict, total_ms: float) -> float:
        return total_ms * 1e6 - c["instructions"] * instruction_ns

    e_traps = emulate["strategy"]["traps"]
    f_traps = flip["strategy"]["traps"]
    f_writes = flip["strategy"]["descriptor_writes"]
    if not e_traps or not f_traps or not f_writes:
        raise ValueError("the fit needs emulate and flip runs that took traps")
    trap_ns = rest(emulate, KEIR_2004_MS["emulate"]) / e_traps
    descriptor_write_ns = (rest(flip, KEIR_2004_MS["flip"]) - f_traps * trap_ns) / f_writes
    walk = measured_walk_prices()
    return CostProfile(
        name="xen-2004",
        kind="fitted",
        description="prices solved from Keir Fraser's 2004 ls -R table; use for relative comparisons only",
        instruction_ns=instruction_ns,
        trap_ns=trap_ns,
        descriptor_write_ns=descriptor_write_ns,
        lookahead_ns=walk[0] if walk else 0.0,
        lookahead_reuse_ns=walk[1] if walk else 0.0,
        fitted_on=f"Keir 2004 (180/300/390 ms) on {workload}",
        provenance={
            "targets_ms": KEIR_2004_MS,
            "workload": workload,
            "native_instructions": n_instr,
            "emulate_traps": e_traps,
            "flip_traps": f_traps,
            "flip_descriptor_writes": f_writes,
            "lookahead": walk[2] if walk else {"note": "no measured walk price: the walk is free here"},
        },
    )
