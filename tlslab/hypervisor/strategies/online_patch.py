"""online-patch: patch a negative-%gs site where the rewrite safety policy allows; elsewhere online-probe.

Issue 15's third kind of online policy: besides choosing emulate or flip per
fault, a hypervisor may rewrite the faulting instruction so that it never
faults again. This strategy combines the two mechanisms tlslab measures best
on their own ground:

* **Patch** (``rewrite``'s mechanism: Jakub Jelinek's 2004 prefix rewrite,
  0x65 -> 0x64, with the ``%fs`` twin of :class:`FsTwinABI`): a fault with a
  negative ``%gs`` offset at a site the rewrite safety policy allows (patch
  policy ``auto``: the shared objects under ``/lib`` of a dynamic program, the
  executable of a static one; no writable shared mapping of the file; the
  instruction has a ``gs`` prefix; the site has never served a positive
  offset) is patched at its first fault. A patch costs the fault being taken
  anyway and a one-byte write, and removes every later fault at the site,
  so patching at the first fault is never worse than waiting for a "hot"
  site (under the measured hw-vm profile a patch is priced below an
  emulation).
* **Probe** (``online-probe``, the best emulate/flip rule): every other fault
  -- a site outside the policy, a mixed site, a positive offset, any fault
  once ``%fs`` is the guest's own -- is decided by online-probe's rule with
  the same prices.

Pages: a patch goes into a private (copy-on-write) copy of the page
(``page_sharing="private"``, the only value it takes), not into the file's
page-cache page as XenLinux's fixup.c did (``rewrite``'s default). A
hypervisor patching behind the guest's back must not change files: then
read(2) of the file, another process's mapping of it and a prelink run all
see the file's own bytes (``prelink`` copies its own binary correctly, where
shared patches reach the copy). And a shared patch would reach every process
mapping the file, including one that has loaded its own ``%fs`` and has not
trapped since, which nothing could protect. The price: every exec'd image
patches its own sites again (the boot workload: 11,345 faults, against 72 for
``rewrite`` with shared pages and 259,190 under emulate).

Safety, where ``rewrite`` would refuse: when ``%fs`` stops belonging to the
twin ABI (the guest installs slot 7, loads its own ``%fs`` or the null
selector, or a thread has no TCB to mirror; ``FsTwinABI.check``), this
strategy does not kill the guest: it restores the ``gs`` prefix of every site
it rewrote in that address space (they become *mixed*, never patched again),
stops patching there, and decides every fault with the probe rule. A guest
that loads its own ``%fs`` can still execute a rewritten site before the next
trap shows the change: through the null selector that is a #GP, which the
strategy settles (``null_selector_fault``: restore, run again through
``%gs``); through a segment that rejects the negative offset it faults on
``%fs`` and is restored and restarted; through a segment that admits it, the
access reaches the guest's segment (``rewrite``'s hazard,
docs/online-strategies.md). A fault on ``%fs`` while it still holds the twin,
at a site not rewritten, is the guest using a segment it never loaded
(natively its ``%fs`` is null): refused, as ``rewrite`` refuses it. A program
that reads its own code sees rewritten bytes (``selfread``), and one that
reads ``%fs`` before loading its own sees the twin's selector (``fs-user``):
hazards no patching through ``%fs`` can hide; the bench marks such output
``!out``.

Inputs, all available at the fault: the faulting address and decoded
instruction (prefix, offset sign), the mapping that holds the site (the
guest kernel's VMAs, which Xen's XenLinux had: fixup.c ran in the guest
kernel), the slot's descriptor, and the strategy's own history. The hw
backend's ptrace supervisor runs this rule on the CPU (tlslab/hw/supervisor/patch.c: the twin in GDT
entry 13, patches through /proc/PID/mem into private copies of the pages).
"""

from __future__ import annotations

from dataclasses import dataclass

from tlslab.hypervisor.patchpolicy import check_patch_options
from tlslab.hypervisor.strategies.base import Trap, Verdict
from tlslab.hypervisor.strategies.online import PriceOptions, ProbeStrategy
from tlslab.hypervisor.strategies.rewrite import RewriteStrategy, code_origin


@dataclass(frozen=True)
class OnlinePatchOptions(PriceOptions):
    """online-probe's ``prices`` (its decision threshold) and rewrite's ``patch_policy``; ``page_sharing`` is
    ``private`` only (see the module docstring: shared pages would let one process's patch reach another
    that uses %fs itself before anything traps)."""

    patch_policy: str = "auto"
    page_sharing: str = "private"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_patch_options(self.patch_policy, self.page_sharing)
        if self.page_sharing != "private":
            raise ValueError("online-patch patches private copies only (page_sharing private): with shared "
                             "pages a patch reaches processes that use %fs themselves")


class OnlinePatchStrategy(RewriteStrategy):
    """online-patch: rewrite a -ve %gs site at its first fault where the safety policy allows; otherwise
    decide emulate or flip by online-probe's rule. See the module docstring."""

    name = "online-patch"
    order = 54
    online = True
    description = "online: patch -ve %gs sites where the rewrite safety policy allows, online-probe elsewhere"
    Options = OnlinePatchOptions

    def __init__(self, options: OnlinePatchOptions | None = None) -> None:
        super().__init__(options)
        o = self.options
        self.fallback = ProbeStrategy(PriceOptions(o.prices, o.emulate_ns, o.flip_ns))
        self.fallback.counters = self.counters            # one set of counters: its work is ours
        self.fallback._emulator.counters = self.counters
        self.threshold = self.fallback.threshold
        self.stopped: list[str] = []                      # why patching stopped, per address space that stopped

    # ------------------------------------------------------------ faults
    def before_decode(self, trap: Trap) -> Verdict | None:
        v = trap.violation
        conflict = self.abi.check()
        was_patched = v.eip in self.patched
        if conflict is not None and self.patched:
            self._stop_patching(trap.domain, conflict)
        if v.segment != "fs":
            return None
        if was_patched:
            if v.eip in self.patched:        # %fs is the twin: a +ve offset reached the site (both signs)
                self._restore(trap.domain, v.eip, "a +ve offset reached the rewritten site: it serves both signs",
                              "unpatched-mixed-site")
            return Verdict.restart()         # the restored gs prefix takes it (probe rule if it faults)
        if conflict is None and self.abi.installed:
            # %fs holds the twin, which the guest never loaded: natively its %fs is null here
            self.counters.count("refused-fs")
            return Verdict.kill(f"online-patch refuses: the guest used %fs while it held the hypervisor's "
                                f"twin ({v.reason})")
        return None                          # the guest's own %fs: emulated in step

    def null_selector_fault(self, domain, eip: int, segment: str) -> Verdict | None:
        """The guest loaded the null selector into %fs and ran a rewritten site: restore every site (the
        twin is gone) and run it again through %gs."""
        if segment != "fs" or eip not in self.patched:
            return None
        self.counters.traps += 1
        self.counters.count("null-%fs-at-a-rewritten-site")
        self._stop_patching(domain, self.abi.check() or "the guest loaded the null selector into %fs")
        return Verdict.restart()

    def step(self, trap: Trap, insn) -> Verdict:
        v = trap.violation
        if v.segment != "gs":
            return self.fallback.emulate(trap, insn)
        if v.offset & 0x8000_0000 and v.eip not in self.mixed and self.abi.conflict is None:
            why = self._patchable_twin(v)
            if why is None:
                why = self._try_patch(trap.domain, v, insn)
            if why is None:
                return Verdict.restart()
            self.counters.count("not patched: " + why.split(" (")[0])
        return self.fallback.step(trap, insn)

    def _patchable_twin(self, v) -> str | None:
        """The twin is made from the TCB's truncated descriptor; a slot the probe rule has flipped or
        emptied does not show it, so the first patch waits for the ABI's own install (at set_thread_area)."""
        if not self.abi.installed and v.descriptor.expand_down:
            return "no %fs twin yet"
        return None

    def _restore(self, domain, eip: int, why: str, kind: str) -> None:
        """Give a rewritten site its gs prefix back, unless the guest has rewritten that byte itself
        (self-modifying code: its bytes are its own; the site is only forgotten)."""
        prefix = self.patched[eip]
        sites = self.sites()
        if code_origin(domain, prefix) != sites.origin.get(eip):
            # the guest unmapped or replaced the page: the byte there now is not the one rewritten
            self.patched.pop(eip)
            sites.origin.pop(eip, None)
            self.mixed.add(eip)
            domain.vcpu.invalidate_code(prefix, 1)
            self.counters.count("rewritten-site-remapped-by-the-guest")
            return
        if domain.vcpu.mem.read(prefix, 1) != b"\x64":
            self.patched.pop(eip)
            self.mixed.add(eip)
            domain.vcpu.invalidate_code(prefix, 1)   # run what memory holds now, not a stale translation
            self.counters.count("rewritten-byte-changed-by-the-guest")
            return
        self._unpatch(domain, eip, why=why, kind=kind)

    def _stop_patching(self, domain, conflict: str) -> None:
        """%fs is no longer the twin's in this address space: give every rewritten site its gs prefix back."""
        for eip in list(self.patched):
            self._restore(domain, eip, f"%fs is no longer the twin's ({conflict}): patching stopped",
                          "unpatched-fs-not-the-twin")
        self.stopped.append(conflict)
        self.counters.count("patching-stopped: %fs not the twin's")
