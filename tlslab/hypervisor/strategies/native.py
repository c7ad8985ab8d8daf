"""native: no truncation at all -- bare metal, or Xen before /lib/tls existed."""

from tlslab.hypervisor.strategies.base import Strategy, Trap, Verdict


class NativeStrategy(Strategy):
    name = "native"
    order = 0
    description = "no truncation: descriptors installed as asked (bare-metal / no-/lib/tls baseline)"
    truncates = False

    def before_decode(self, trap: Trap) -> Verdict | None:
        # with untruncated segments a violation is the guest's own bug
        return Verdict.kill(trap.violation.reason)
