"""The strategy template and declared options (one place counts, decodes and validates)."""

from __future__ import annotations

import dataclasses

import pytest

from tlslab.experiment import RunSpec, make_domain
from tlslab.hypervisor.strategies import (
    STRATEGIES,
    Strategy,
    StrategyOptionError,
    UnknownStrategy,
    Verdict,
    get_strategy,
    option_names,
)


def test_options_are_declared_and_validated():
    assert option_names("rewrite") == option_names("rewrite-2004") == ("patch_policy", "page_sharing")
    assert option_names("flip") == option_names("emulate") == ()
    s = get_strategy("rewrite", patch_policy="lib", page_sharing="private")
    assert s.options.patch_policy == "lib" and s.patch_policy == "lib" and s.page_sharing == "private"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.options.patch_policy = "all"
    with pytest.raises(StrategyOptionError, match="patch policy 'bogus'"):
        get_strategy("rewrite-2004", patch_policy="bogus")
    with pytest.raises(StrategyOptionError, match="its options: none"):
        get_strategy("flip", patch_policy="lib")
    with pytest.raises(UnknownStrategy):
        get_strategy("teleport")


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_trap_is_counted_once(name):
    """The run loop and the strategy agree: one trap per segment violation, decodes <= traps."""
    d, _ = make_domain(RunSpec("syscalls", args=("40",), strategy=name))
    r = d.run()
    c = r.counters["strategy"]
    assert c["traps"] == sum(r.counters["violations"].values())
    assert c["decodes"] <= c["traps"]
    assert c["refused"] == (0 if r.ok else 1)


def test_a_toy_strategy_needs_only_step():
    """A new strategy implements `step` (and maybe `before_decode`); counting is the template's."""

    class Refuse(Strategy):
        name = "refuse"
        description = "kill on every fault"

        def step(self, trap, insn):
            return Verdict.kill(f"refusing `{insn.mnemonic}`")

    strategy = Refuse()
    d, _ = make_domain(RunSpec("lsr", strategy="emulate"))
    d.strategy = strategy
    r = d.run()
    assert not r.ok and "refusing" in r.crash.reason
    assert strategy.counters.traps == strategy.counters.decodes == strategy.counters.refused == 1


def test_a_new_strategy_is_one_new_module(tmp_path, monkeypatch):
    """Discovery: a module dropped into the strategies package registers its strategy, in order."""
    import tlslab.hypervisor.strategies as registry

    (tmp_path / "toy_refuse.py").write_text(
        "from tlslab.hypervisor.strategies.base import Strategy, Verdict\n\n\n"
        "class ToyRefuse(Strategy):\n"
        '    name = "toy-refuse"\n'
        '    description = "kill on every fault"\n\n'
        "    def step(self, trap, insn):\n"
        '        return Verdict.kill("toy")\n')
    monkeypatch.setattr(registry, "__path__", [*registry.__path__, str(tmp_path)])
    found = registry._discover()
    assert list(found)[-1] == "toy-refuse" and list(found)[:len(STRATEGIES)] == list(STRATEGIES)
    assert found["toy-refuse"].make().name == "toy-refuse"
