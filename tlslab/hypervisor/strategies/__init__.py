"""Fault strategies, one small module each; ``STRATEGIES`` is the registry."""

from __future__ import annotations

from tlslab.hypervisor.strategies.base import (
    Action,
    Strategy,
    StrategyCounters,
    StrategyOptionError,
    Trap,
    Verdict,
    fetch_and_decode,
)
from tlslab.hypervisor.strategies.emulate import Emulate2004Strategy, EmulateStrategy
from tlslab.hypervisor.strategies.flip import FlipFsStrategy, FlipFullStrategy, FlipStrategy
from tlslab.hypervisor.strategies.native import NativeStrategy
from tlslab.hypervisor.strategies.rewrite import RewriteStrategy
from tlslab.hypervisor.strategies.rewrite2004 import Rewrite2004Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (NativeStrategy, EmulateStrategy, Emulate2004Strategy, FlipStrategy, FlipFullStrategy, FlipFsStrategy,
                RewriteStrategy, Rewrite2004Strategy)
}


class UnknownStrategy(ValueError):
    pass


def get_strategy(name: str, **options) -> Strategy:
    """A strategy by name with its declared options checked (UnknownStrategy, StrategyOptionError)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise UnknownStrategy(f"unknown strategy {name!r} (choose from: {', '.join(STRATEGIES)})") from None
    return cls.make(**options)


def option_names(name: str) -> tuple[str, ...]:
    """The options strategy ``name`` declares (for specs and the CLI)."""
    return tuple(STRATEGIES[name].Options.__dataclass_fields__)


__all__ = ["Action", "Strategy", "StrategyCounters", "StrategyOptionError", "Trap", "Verdict", "STRATEGIES",
           "get_strategy", "option_names", "UnknownStrategy", "fetch_and_decode"]
