"""Hardware truth: the Unicorn model against the real CPU under the ptrace supervisor.

For every bundled guest (default and nosegneg builds) and for emulate and
flip, the number of #GP faults the real CPU raised with the truncated %gs
descriptor, and the set of faulting instructions with their per-site counts,
must equal the model's exactly; stdout, stderr and exit status must be
byte-identical. Both runs see the same argv, environment (the model's
DEFAULT_ENV), cwd (the same synthetic tree, materialised in the model's
readdir order), stdin (an empty pipe) and stdout kind (a pipe; one guest
also with a regular file and /dev/null).

Skips (with the reason) where the host cannot run 32-bit code or ptrace is
refused; with CI=true in the environment those become failures.
"""

from __future__ import annotations

import os

import pytest

from conftest import unavailable

from tlslab.hw.backend import HwUnavailable, materialised_tree, policy_mismatches, run_spec, tree_order_matches

pytestmark = [pytest.mark.oracle]

GUESTS = [("lsr", (".",)), ("syscalls", ("300",)), ("malloc", ()), ("stdio", ()), ("canary", ()),
          ("selfread", ())]
VARIANTS = ("default", "nosegneg")
STRATEGIES = ("emulate", "flip")


def _unavailable(reason: str):
    unavailable(f"hw backend: {reason}")


@pytest.fixture(scope="module")
def hw_ok():
    from tlslab.experiment import RunSpec
    from tlslab.guests import GuestError

    try:
        run_spec(RunSpec("syscalls", ("1",), strategy="native"))
    except HwUnavailable as exc:
        _unavailable(str(exc))
    except GuestError as exc:
        unavailable(str(exc))
    return True


def model_run(spec):
    """The model's run of ``spec`` (tlslab.experiment.execute); the one place the model is called."""
    from tlslab.experiment import execute

    result, _guest = execute(spec)
    return result


def model_fault_sites(result) -> dict[int, int]:
    return {s["eip"]: s["violations"] for s in result.sites if s["violations"]}


def compare(spec, oracle_summary=None):
    """Run ``spec`` on the model and the hardware; return a one-line verdict, assert equality."""
    model = model_run(spec)
    hw, _guest = run_spec(spec)
    msites, hsites = model_fault_sites(model), hw.fault_sites
    line = (f"{spec.guest}{'.nosegneg' if spec.variant == 'nosegneg' else ''} {spec.strategy}: "
            f"model {sum(msites.values())} faults/{len(msites)} sites, hw {hw.faults}/{len(hsites)}")
    assert model.crash is None, model.crash.describe()
    assert hw.ok, f"hw run died: signal {hw.signal}: {hw.summary.get('first_delivered')}"
    if spec.stdout != "null":  # the model still records what was written to its /dev/null
        assert hw.stdout == model.stdout
        assert hw.stderr == model.stderr
    assert hw.status == model.status
    assert not policy_mismatches(hw, spec.profile)
    assert hw.summary["delivered"] == 0
    assert hw.faults == sum(msites.values()), line
    assert hsites == msites, line
    if spec.strategy == "emulate":
        assert hw.summary["emulated"] + hw.summary["stepped"] == hw.faults
        assert hw.decoder_misses == {}, f"C decoder fell back to single-step: {hw.decoder_misses}"
    else:
        assert hw.summary["to_expand_down"] + hw.summary["to_expand_up"] == hw.faults
    return line


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,args", GUESTS, ids=[g for g, _ in GUESTS])
def test_hw_equals_model(hw_ok, oracle_summary, name, args, variant, strategy):
    from tlslab.experiment import RunSpec

    assert tree_order_matches(materialised_tree("small")), "host cannot reproduce the model's readdir order"
    spec = RunSpec(name, args, strategy=strategy, variant=variant, stdout="pipe")
    line = compare(spec)
    oracle_summary[f"hw {name}.{variant} {strategy}"] = line + " (equal)"


@pytest.mark.slow
@pytest.mark.parametrize("stdout", ["file", "null"])
def test_hw_equals_model_other_stdout_kinds(hw_ok, stdout):
    """The stdout kind changes what glibc does (isatty -> errno): both sides see the same kind."""
    from tlslab.experiment import RunSpec

    spec = RunSpec("stdio", ("50",), strategy="emulate", stdout=stdout)
    compare(spec)


def test_native_has_no_faults_and_same_output(hw_ok):
    from tlslab.experiment import RunSpec

    spec = RunSpec("lsr", (".",), strategy="native")
    hw, _ = run_spec(spec)
    model = model_run(spec)
    assert hw.faults == 0 and hw.stdout == model.stdout and hw.status == model.status
