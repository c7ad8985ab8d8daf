"""Cost profiles: predictions are counters times prices; fitted profiles say so."""

from __future__ import annotations

import pytest

from tlslab.hypervisor import costmodel


def counters(instructions, traps, writes=0, accesses=0, syscalls=0):
    return {"instructions": instructions, "linux": {"syscalls": {"total": syscalls}},
            "strategy": {"traps": traps, "decodes": traps, "descriptor_writes": writes,
                         "emulated_accesses": accesses}}


def test_fit_reproduces_keir_on_its_workload_and_is_labelled_fitted():
    native, emulate, flip = counters(10_000_000, 0), counters(10_000_000, 4000, accesses=4000), \
        counters(10_000_000, 5000, writes=5000)
    prof = costmodel.fit_xen_2004(native, emulate, flip, "synthetic")
    assert prof.kind == "fitted" and "FITTED" in prof.label() and "synthetic" in prof.fitted_on
    for c, ms in ((native, 180), (emulate, 300), (flip, 390)):
        assert costmodel.predict(prof, c).total_ms == pytest.approx(ms)


def test_fit_refuses_runs_without_traps():
    with pytest.raises(ValueError):
        costmodel.fit_xen_2004(counters(1, 0), counters(1, 0), counters(1, 0), "x")


def test_prediction_is_linear_in_counters():
    prof = costmodel.CostProfile("t", "nominal", "test", instruction_ns=2, syscall_ns=100, trap_ns=1000,
                                 descriptor_write_ns=10)
    t = costmodel.predict(prof, counters(50, 3, writes=3, syscalls=4))
    assert t.total_ns == 50 * 2 + 4 * 100 + 3 * 1000 + 3 * 10
    assert t.breakdown_ns["trap"] == 3000


def test_bundled_profiles_load_and_declare_their_kind():
    profiles = costmodel.available_profiles()
    assert "nominal" in profiles
    for prof in profiles.values():
        assert prof.kind in ("fitted", "measured", "nominal")
        if prof.kind == "fitted":
            assert prof.fitted_on


def test_a_fresh_xen_2004_fit_carries_the_measured_walk_price_as_a_lower_bound(tmp_path, monkeypatch):
    """Keir's table has no walk in it: a refit takes the walk's prices from the measured profile (so
    online-lookahead's walk is not silently free), says where they come from, and is free, saying so,
    where no measured profile has them."""
    native, emulate, flip = counters(10_000_000, 0), counters(10_000_000, 4000, accesses=4000), \
        counters(10_000_000, 5000, writes=5000)
    measured = costmodel.get_profile("hw-vm")
    prof = costmodel.fit_xen_2004(native, emulate, flip, "synthetic")
    assert measured.lookahead_ns > 0
    assert (prof.lookahead_ns, prof.lookahead_reuse_ns) == (measured.lookahead_ns, measured.lookahead_reuse_ns)
    assert prof.provenance["lookahead"]["from"] == "hw-vm" and "LOWER BOUND" in prof.provenance["lookahead"]["note"]
    monkeypatch.setattr(costmodel, "available_profiles", lambda: {"nominal": costmodel.NOMINAL})
    free = costmodel.fit_xen_2004(native, emulate, flip, "synthetic")
    assert free.lookahead_ns == 0 and "free" in free.provenance["lookahead"]["note"]
