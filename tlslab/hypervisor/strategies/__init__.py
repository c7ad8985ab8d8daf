"""Fault strategies, one small module each; ``STRATEGIES`` is the registry.

The registry is discovered: every module of this package is imported and each
``Strategy`` subclass with a ``name`` defined there is registered, in ``order``
(then name). Adding a strategy is one new module (and its test).
"""

from __future__ import annotations

import importlib
import pkgutil

from tlslab.hypervisor.strategies.base import (
    Action,
    Strategy,
    StrategyCounters,
    StrategyOptionError,
    Trap,
    Verdict,
    fetch_and_decode,
)


def _discover() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Strategy) and obj.__module__ == module.__name__
                    and obj.name != "?"):
                if obj.name in found and found[obj.name] is not obj:
                    raise RuntimeError(f"two strategies are named {obj.name!r}")
                found[obj.name] = obj
    return dict(sorted(found.items(), key=lambda item: (item[1].order, item[0])))


STRATEGIES: dict[str, type[Strategy]] = _discover()


class UnknownStrategy(ValueError):
    pass


def get_strategy(name: str, **options) -> Strategy:
    """A strategy by name with its declared options checked (UnknownStrategy, StrategyOptionError)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise UnknownStrategy(f"unknown strategy {name!r} (choose from: {', '.join(STRATEGIES)})") from None
    return cls.make(**options)


def is_online(name: str) -> bool:
    """Whether strategy ``name`` is an online policy (decides per fault with a cost profile's prices)."""
    return bool(getattr(STRATEGIES.get(name), "online", False))


def online_names() -> list[str]:
    """The online strategies, in registry order."""
    return [name for name in STRATEGIES if is_online(name)]


def patches_code(name: str) -> bool:
    """Whether strategy ``name`` rewrites guest code (then the emulate/flip offline bound does not bound it)."""
    return bool(getattr(STRATEGIES.get(name), "patches_code", False))


def option_names(name: str) -> tuple[str, ...]:
    """The options strategy ``name`` declares (for specs and the CLI)."""
    return tuple(STRATEGIES[name].Options.__dataclass_fields__)


__all__ = ["Action", "Strategy", "StrategyCounters", "StrategyOptionError", "Trap", "Verdict", "STRATEGIES",
           "get_strategy", "option_names", "UnknownStrategy", "fetch_and_decode", "is_online", "online_names", "patches_code"]
