"""The block hook (`fp_on_block`, tlslab/machine/_fastpath.c) against a Python statement of what it must do.

The hook runs once per guest translation block (under a stock Unicorn; under tlslab's Unicorn
translated code does its common case and calls it only at or past `count_limit`). It counts the
block's instructions (asking Python once per block and remembering the answer in a table with a
small two-way front), ends a scheduler time slice at a block boundary, reads the wall clock every
CLOCK_EVERY instructions, and forgets a split store's state. Counts feed the reported counters, the
online strategies' clock and the schedule, so they must be exact whatever the front holds: here the
compiled hook is driven directly, block by block, beside `Reference`, and every field it owns is
compared after every step. Whoever changes the budget, the deadline or split_bytes also sets
count_limit to 0 (VCpu.run, request_stop_all, fp_on_prot), and so do the ops here; count_limit
itself is the hook's business and is not compared.
"""

from __future__ import annotations

import ctypes
import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tlslab.machine import fastpath

CLOCK_EVERY = int(re.search(r"#define CLOCK_EVERY (\d+)u", fastpath.SOURCE.read_text()).group(1))
FAR_FUTURE = 1 << 62
ALREADY_PASSED = 1

BLOCK_ICOUNT = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32)
EMU_STOP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


def true_count(address: int, size: int, version: int) -> int:
    """What Python would answer for a block (a pure function of the code, which `version` changes):
    none for an empty block; some counts do not fit 16 bits, as no real block's does."""
    if size == 0:
        return 0
    if (address ^ size) % 7 == 0:
        return 0x10000 + (address + version) % 1000
    return (address * 7 + size * 13 + version * 5) % 300 + 1


class Hook:
    """One fast-path state block with only the block hook's fields in use."""

    def __init__(self):
        lib = fastpath.load_library()
        self.lib = lib
        self._buffer = ctypes.create_string_buffer(lib.fp_sizeof())
        self.address = ctypes.addressof(self._buffer)
        self.h = fastpath.FastpathHeader.from_address(self.address)
        fields, _ = fastpath.c_layout(lib)
        offset = {name: off for name, off, _size in fields["fastpath"]}
        self.split_bytes = ctypes.c_uint32.from_address(self.address + offset["split_bytes"])
        self.version = 0
        self.asked = 0
        self.stops = 0

        def icount(address, size):
            self.asked += 1
            return true_count(address, size, self.version)

        def stop(_uc):
            self.stops += 1
            return 0

        self._callbacks = (BLOCK_ICOUNT(icount), EMU_STOP(stop))
        self.h.block_icount = ctypes.cast(self._callbacks[0], ctypes.c_void_p).value
        self.h.emu_stop = ctypes.cast(self._callbacks[1], ctypes.c_void_p).value
        lib.fp_reset_blocks(self.address)

    def block(self, address: int, size: int) -> None:
        self.lib.fp_on_block(None, address, size, self.address)

    def split_store(self) -> None:
        """What fp_on_prot does after letting an unaligned store through whole."""
        self.split_bytes.value = 7
        self.h.count_limit = 0

    def code_changed(self) -> None:
        self.version += 1
        self.lib.fp_reset_blocks(self.address)

    def state(self) -> tuple:
        h = self.h
        return (h.instructions, h.budget_end, h.budget_first, h.budget_hit, h.clock_check_at,
                h.cur_block_address, h.cur_block_size, h.cur_block_icount, self.split_bytes.value, self.stops)


class Reference:
    """What the hook must do, stated plainly (the fields of `Hook.state`, in the same order)."""

    def __init__(self):
        self.instructions = self.budget_end = self.budget_first = self.budget_hit = self.clock_check_at = 0
        self.cur = (0, 0, 0)
        self.split_bytes = 0
        self.stops = 0
        self.version = 0
        self.deadline_ns = 0

    def block(self, address: int, size: int) -> None:
        self.split_bytes = 0
        first, self.budget_first = self.budget_first, 0
        if self.budget_end and not first and self.instructions >= self.budget_end:
            self.budget_hit, self.budget_end = 1, 0
            self.stops += 1
            return                      # the block does not run now: not counted
        if self.deadline_ns and self.instructions >= self.clock_check_at:
            self.clock_check_at = self.instructions + CLOCK_EVERY
            if self.deadline_ns == ALREADY_PASSED:
                self.stops += 1         # the clock read finds the deadline passed; the block runs
        count = true_count(address, size, self.version)
        self.instructions += count
        self.cur = (address, size, count)

    def state(self) -> tuple:
        return (self.instructions, self.budget_end, self.budget_first, self.budget_hit, self.clock_check_at,
                *self.cur, self.split_bytes, self.stops)


def play(ops, addresses) -> None:
    hook, ref = Hook(), Reference()
    for step, op in enumerate(ops):
        kind = op[0]
        if kind == "block":
            address, size = addresses[op[1] % len(addresses)], op[2]
            hook.block(address, size)
            ref.block(address, size)
        elif kind == "split":
            hook.split_store()
            ref.split_bytes = 7
        elif kind == "slice":          # what VCpu.run does with a scheduler's budget
            _, budget, first = op
            for side in (hook.h, ref):
                side.budget_end = max(1, side.instructions + budget)
                side.budget_hit = 0
                side.budget_first = int(first)
            hook.h.count_limit = 0
        elif kind == "deadline":       # VCpu.run before emu_start
            hook.h.deadline_ns = ref.deadline_ns = op[1]
            hook.h.count_limit = 0
        elif kind == "stop_all":       # request_stop_all (Ctrl-C)
            hook.h.deadline_ns = ref.deadline_ns = ALREADY_PASSED
            hook.h.clock_check_at = ref.clock_check_at = 0
            hook.h.count_limit = 0
        elif kind == "clock":          # move the next clock read near the count (as the hook itself would)
            hook.h.clock_check_at = ref.clock_check_at = max(0, ref.instructions + op[1])
            hook.h.count_limit = 0
        elif kind == "code":
            hook.code_changed()
            ref.version += 1
        assert hook.state() == ref.state(), (step, op, hook.state(), ref.state())


SIZES = [0, 1, 2, 5, 17, 100, 610, 0xFFFF, 0x10000, 0x12345]
OPS = st.one_of(
    st.tuples(st.just("block"), st.integers(0, 10_000), st.sampled_from(SIZES)),
    st.tuples(st.just("slice"), st.integers(0, 400), st.booleans()),
    st.tuples(st.just("deadline"), st.sampled_from([0, ALREADY_PASSED, FAR_FUTURE])),
    st.tuples(st.just("clock"), st.sampled_from([-5, 0, 1, 299, CLOCK_EVERY])),
    st.tuples(st.just("split")),
    st.tuples(st.just("stop_all")),
    st.tuples(st.just("code")),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(OPS, max_size=300), pool=st.sampled_from([2, 8, 64]), seed=st.integers(0, 2**32 - 1))
def test_block_hook_matches_its_reference(ops, pool, seed):
    rng = random.Random(seed)
    play(ops, [rng.randrange(1 << 32) for _ in range(pool)] + [0])


def test_block_hook_matches_its_reference_with_the_front_overflowing():
    """Thousands of distinct blocks: sets of the front collide and evict, ways swap, counts that do not
    fit the front go to the table every time, and code changes drop everything remembered."""
    rng = random.Random(2026_11_30)
    addresses = [rng.randrange(1 << 32) for _ in range(5000)]
    ops = []
    for _ in range(40_000):
        r = rng.random()
        if r < 0.0005:
            ops.append(("code",))
        elif r < 0.01:
            ops.append(("slice", rng.randrange(400), rng.random() < 0.3))
        elif r < 0.012:
            ops.append(("deadline", rng.choice([0, ALREADY_PASSED, FAR_FUTURE])))
        elif r < 0.02:
            ops.append(("split",))
        else:
            hot = rng.choice([16, 1500, 5000])
            ops.append(("block", rng.randrange(hot), rng.choice(SIZES)))
    play(ops, addresses)


def test_a_passed_deadline_stops_the_guest_even_when_every_slice_ends_first():
    """Slices shorter than CLOCK_EVERY: the block a slice stops must not use up the clock read due at
    it, or the deadline would never be seen while slices keep ending (a guest spinning among threads
    would outlive its wall-clock limit). Clock reads due at several points of a slice are tried."""
    for due_in in (0, 1, CLOCK_EVERY // 2, CLOCK_EVERY - 1):
        hook = Hook()
        hook.block(0x1000, 2)
        per_block = hook.h.instructions
        hook.h.deadline_ns = ALREADY_PASSED
        hook.h.clock_check_at = hook.h.instructions + due_in
        deadline_stops = 0
        for _slice in range(3):
            hook.h.budget_end = hook.h.instructions + (CLOCK_EVERY // 3) * per_block
            hook.h.budget_hit = 0
            hook.h.count_limit = 0
            before = hook.stops
            while not hook.h.budget_hit:
                hook.block(0x1000, 2)
            deadline_stops += hook.stops - before - 1   # the last stop of a slice is the slice's own
        assert deadline_stops >= 1, due_in


def test_the_common_case_runs_below_count_limit_without_the_general_case():
    """Below count_limit the hook only counts (as Unicorn's inline counter does): a budget set without
    clearing count_limit is not seen until the limit, which is why every setter clears it."""
    hook = Hook()
    hook.block(0x1000, 2)
    assert hook.h.count_limit == (1 << 64) - 1      # no budget, no deadline: nothing to watch
    per_block = hook.h.instructions
    hook.h.budget_end = hook.h.instructions + 1     # not cleared: the common case goes on counting
    for _ in range(5):
        hook.block(0x1000, 2)
    assert hook.stops == 0 and hook.h.instructions == 6 * per_block
    hook.h.count_limit = 0                          # cleared: the next block is the general case
    hook.block(0x1000, 2)
    assert hook.stops == 1 and hook.h.budget_hit == 1 and hook.h.instructions == 6 * per_block


def test_the_table_asks_python_once_per_block_until_the_code_changes():
    hook = Hook()
    for _round in range(3):
        for k in range(3000):
            hook.block(0x0804_8000 + 16 * k, 1 + k % 5)
    assert hook.asked == 3000
    hook.code_changed()
    hook.block(0x0804_8000, 1)
    assert hook.asked == 3001
    assert hook.h.cur_block_icount == true_count(0x0804_8000, 1, 1)
