"""Decode ahead from a trapped vCPU: the walk of :mod:`tlslab.x86.ahead` over its guest memory.

The strategy's walk is the C one (:class:`tlslab.x86.aheadc.RegionWalker`): it
reads guest code and words straight from the host buffers that back guest
memory, as a hypervisor's #GP handler reads guest memory it maps, and nothing
crosses into Python during a walk. The Python walk (``native=False``) is the
specification, over the same memory through :func:`guest_readers`; the tests
run real guests both ways and require the same decisions and counts.

Either walk only reads guest code (executable pages) and words of guest memory
(readable pages) below the hypervisor's start, and registers. The C walker
keeps a region table, a decode cache and a memo of walks (by site and sign,
with the registers and words each read); it is rebuilt when the regions or
their rights change (``GuestMemory.version``), when the host changes guest
code (``VCpu.code_generation``) or the hypervisor's start moves. The Python
walk decodes through a cache of its own dropped when the host changes guest
code. A guest storing into its own code is seen by neither cache until then
(as everywhere in tlslab: the decode caches are the host's): an answer may be
stale, a prediction gone wrong, which costs time, never correctness. Both are
keyed weakly: a finished process's go with it.
"""

from __future__ import annotations

import weakref

from tlslab.machine.memory import PROT_EXEC, PROT_READ
from tlslab.x86.ahead import BUDGET, LONG, MAX_INSN, SHORT, UNKNOWN, Ahead, walk
from tlslab.x86.aheadc import RegionWalker, c_regs
from tlslab.x86.decode import DecodeError, Instruction, decode
from tlslab.x86.opcodes import REG32

__all__ = ["BUDGET", "LONG", "SHORT", "UNKNOWN", "Ahead", "Lookahead", "guest_readers", "walk"]


def guest_readers(mem, below: int, code: dict | None = None):
    """(code_at, read_word) over guest memory ``mem`` (``region_at``, ``read``) for :func:`walk`: only
    executable code and readable words, nothing at or above ``below``; ``code``: a decode cache to use."""
    code = {} if code is None else code

    def readable(address: int, prot: int) -> bool:
        region = mem.region_at(address)
        return region is not None and bool(region.prot & prot)

    def read_word(address: int) -> int | None:
        if address + 4 > below or not (readable(address, PROT_READ) and readable(address + 3, PROT_READ)):
            return None
        return int.from_bytes(mem.read(address, 4), "little")

    def code_at(address: int):
        here = code.get(address)
        if here is None:
            n = min(MAX_INSN, max(0, below - address))
            while n > 0 and not (readable(address, PROT_EXEC) and readable(address + n - 1, PROT_EXEC)):
                n -= 1
            if n == 0:
                return DecodeError(f"no executable code at {address:#010x}")
            here = code[address] = decode(mem.read(address, n), address)
        return here

    return code_at, read_word


class Lookahead:
    """The walk over a trapped vCPU's memory: in C (the default), or the Python specification.

    The C walker holds a table of the guest's regions (host buffers), rebuilt when the regions or their
    rights change (``GuestMemory.version``) or the hypervisor's start does; the Python one decodes through
    a cache of its own, dropped when the host changes guest code (``VCpu.code_generation``).
    """

    def __init__(self, threshold: float, budget: int = BUDGET, native: bool = True, memo: bool = True) -> None:
        self.threshold = threshold
        self.budget = budget
        self.native = native
        self.memo = memo            # the C walker's memo of walks by site (the Python walk has none)
        self._walkers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # mem -> (key, walker)
        self._code: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()      # vcpu -> (generation, cache)
        self.walks = 0
        #: benchmarks/lookahead_price.py: time every C walk (clock readings included)
        self.timing = False
        self.timed_ns = 0           # nanoseconds the timed walks took, faults that walked
        self.timed_reuse_ns = 0     # nanoseconds the timed memo hits took

    def _walker(self, vcpu, below: int) -> RegionWalker:
        mem = vcpu.mem
        key = (mem.version, below, vcpu.code_generation)
        held = self._walkers.get(mem)
        if held is None or held[0] != key:
            walker = RegionWalker(((r.start, r.size, r.prot, r.host_address) for r in mem.regions()), below,
                                  decode_cache=True, memo=self.memo)
            self._walkers[mem] = held = (key, walker)
        return held[1]

    def ahead(self, vcpu, below: int, insn: Instruction, sign: int) -> Ahead:
        """The answer for the access ``insn`` (the faulting instruction) makes with an offset of ``sign``;
        ``vcpu``: the trapped one (registers, memory); ``below``: the hypervisor's start (no code or word at or
        above it is read; only readable words, only executable code)."""
        self.walks += 1
        read_reg = vcpu.regs.get
        if self.native:
            regs = c_regs({name: read_reg(name) for name in REG32}, insn.address)
            walker = self._walker(vcpu, below)
            if self.timing:
                answer, ns = walker.timed(regs, sign, self.threshold, self.budget)
                if answer.reused:
                    self.timed_reuse_ns += ns
                else:
                    self.timed_ns += ns
                return answer
            return walker.walk(regs, sign, self.threshold, self.budget)
        generation, code = self._code.get(vcpu, (None, None))
        if generation != vcpu.code_generation:
            code = {}
            self._code[vcpu] = (vcpu.code_generation, code)
        code_at, read_word = guest_readers(vcpu.mem, below, code)
        answer, inputs = walk(code_at, read_reg, read_word, insn, sign, self.threshold, self.budget)
        inputs.done()
        return answer
