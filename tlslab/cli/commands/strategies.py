"""`tlslab strategies`: the fault strategies, one line each."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("strategies", help="list fault strategies with one-line descriptions")
    p.set_defaults(handler=run)


def run(args) -> int:
    from tlslab.hypervisor.strategies import STRATEGIES

    width = max(len(n) for n in STRATEGIES)
    for name, cls in STRATEGIES.items():
        hv = "truncating" if cls.truncates else "untruncated"
        print(f"{name:<{width}}  [{hv}]  {cls.description}")
    return 0
