"""Xen's descriptor policy: truncation, the seg_fixup predicate, flipping, and safety."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tlslab.x86 import (
    PROFILES,
    AccessFault,
    SegmentDescriptor,
    admits_linear,
    admitted_linear_ranges,
    check_data_access,
    expand_down_flat_limit,
    flip,
    get_profile,
    linear_address,
    looks_like_truncated_flat,
    reaches_hypervisor,
    truncate,
    truncated_flat_limit,
)

U32 = 0xFFFF_FFFF
profiles = st.sampled_from(sorted(PROFILES))
any_descriptor = st.integers(0, 2**64 - 1).map(SegmentDescriptor.decode)


def test_profiles():
    assert get_profile("nonpae").hypervisor_start == 0xFC00_0000
    assert get_profile("pae").hypervisor_start == 0xF580_0000
    with pytest.raises(ValueError, match="unknown hypervisor profile 'x86_64'.*nonpae, pae"):
        get_profile("x86_64")


def test_worked_example_allowed_natively_refused_after_truncation():
    flat = SegmentDescriptor.decode(0x00CF_F200_0000_FFFF)
    truncated = truncate(flat, "nonpae")
    assert truncated.encode() == 0x00CF_F200_0000_BFFF  # limit field 0xFBFFF
    assert truncated.effective_limit == 0xFBFF_FFFF
    assert check_data_access(flat, 0xFFFF_FFFC, 4, False).allowed
    check = check_data_access(truncated, 0xFFFF_FFFC, 4, False)
    assert check.reason is AccessFault.BEYOND_LIMIT


def test_truncation_of_a_tls_segment_ends_on_the_last_page_below_xen():
    base = 0x0804_A8C0
    truncated = truncate(SegmentDescriptor.flat_user_data(base), "pae")
    assert truncated.limit == ((0xF580_0000 - base) >> 12) - 1 == truncated_flat_limit(base, "pae")
    last = base + truncated.effective_limit
    assert 0xF580_0000 - 0x1000 <= last < 0xF580_0000
    assert replace(truncated, limit=truncated.limit + 1).effective_limit + base >= 0xF580_0000


def test_truncation_keeps_safe_and_odd_descriptors():
    small = SegmentDescriptor(base=0x1000, limit=0xFFFF, rw=True, present=True, dpl=3, db=True)
    assert truncate(small, "nonpae") == small
    gate = SegmentDescriptor(s=False, present=True, base=0xFFFF_0000, limit=0xFFFFF)
    assert truncate(gate, "nonpae") == gate
    absent = replace(SegmentDescriptor.flat_user_data(), present=False)
    assert truncate(absent, "nonpae") == absent


def test_truncation_byte_granular_and_unusable_cases():
    near = SegmentDescriptor(base=0xFBFF_0000, limit=0xFFFFF, rw=True, present=True, dpl=3)
    assert truncate(near, "nonpae").limit == 0xFFFF  # byte exact: last byte 0xFBFFFFFF
    inside_xen = SegmentDescriptor.flat_user_data(0xFC00_0000)
    assert not truncate(inside_xen, "nonpae").present
    last_page = SegmentDescriptor.flat_user_data(0xFBFF_F800)  # no whole page fits
    assert not truncate(last_page, "nonpae").present


def test_truncation_of_expand_down_keeps_only_what_is_below_the_base():
    # expand-down, limit 0 (G=1): offsets 0x1000..0xFFFFFFFF reach Xen through base+offset
    down = SegmentDescriptor(base=0x0804_A000, limit=0, rw=True, dc=True, present=True, dpl=3,
                             db=True, granularity=True)
    truncated = truncate(down, "nonpae")
    assert truncated.limit == expand_down_flat_limit(0x0804_A000)
    assert admitted_linear_ranges(truncated) == [(0, 0x0804_9FFF)]
    at_zero = replace(down, base=0)  # its top byte is 0xFFFFFFFF: nothing can be saved
    assert not truncate(at_zero, "nonpae").present


def test_flip_matches_seg_fixup():
    base = 0x0804_A123
    truncated = truncate(SegmentDescriptor.flat_user_data(base), "nonpae")
    assert looks_like_truncated_flat(truncated, "nonpae")
    down = flip(truncated, 0xFFFF_FFE0, "nonpae")  # %gs:-0x20 faulted
    assert down.expand_down and down.limit == ((2**32 - 0x0804_A000) >> 12) - 1
    assert check_data_access(down, 0xFFFF_FFE0, 4, False).allowed
    assert admitted_linear_ranges(down) == [(0x123, base - 1)]
    assert looks_like_truncated_flat(down, "nonpae")
    assert flip(down, 0x14, "nonpae") == truncated  # %gs:0x14 (canary) flips back
    assert flip(truncated, 0x14, "nonpae") is None  # that offset never faulted
    assert flip(down, 0xFFFF_FFE0, "nonpae") is None


def test_flip_refuses_what_seg_fixup_refuses():
    truncated = truncate(SegmentDescriptor.flat_user_data(0x1000_0000), "nonpae")
    for other in (replace(truncated, dpl=1), replace(truncated, granularity=False),
                  replace(truncated, db=False), replace(truncated, executable=True),
                  replace(truncated, present=False), replace(truncated, limit=0x1234),
                  replace(truncated, limit=truncated.limit - 1)):
        assert not looks_like_truncated_flat(other, "nonpae")
        assert flip(other, 0xFFFF_FFFC, "nonpae") is None
    # a truncated segment of the other profile is not "truncated" here
    assert not looks_like_truncated_flat(truncated, "pae")


def test_flip_with_size_refuses_accesses_into_xen():
    truncated = truncate(SegmentDescriptor.flat_user_data(0x1000_0000), "nonpae")
    into_xen = 0xFC00_0000 - 0x1000_0000 + 0x10  # beyond the limit, but not negative
    assert flip(truncated, into_xen, "nonpae") is not None  # Xen 2004 would flip ...
    assert flip(truncated, into_xen, "nonpae", size=4) is None  # ... and ping-pong forever


bases = st.integers(0, U32)
offsets = st.integers(0, U32) | st.integers(-64, 64).map(lambda d: d & U32)


@given(bases, profiles, offsets)
def test_flip_twice_restores_the_truncated_flat_segment(base, profile, offset):
    truncated = truncate(SegmentDescriptor.flat_user_data(base), profile)
    assume(truncated.present)
    assert looks_like_truncated_flat(truncated, profile)
    down = flip(truncated, offset, profile)
    if offset <= truncated.effective_limit:
        assert down is None
        return
    assert down is not None and down.expand_down
    back_offset = offset if offset <= down.effective_limit else 0
    assert flip(down, back_offset, profile) == truncated


def _assert_safe(desc, profile, offset, size):
    hv = get_profile(profile).hypervisor_start
    assert not reaches_hypervisor(desc, profile), desc.describe()
    assert all(last < hv for _, last in admitted_linear_ranges(desc))
    assert not admits_linear(desc, hv) and not admits_linear(desc, U32)
    if check_data_access(desc, offset, size, write=False).allowed:
        for i in range(size):
            assert linear_address(desc, (offset + i) & U32) < hv


@given(any_descriptor, profiles, offsets, st.sampled_from((1, 2, 4)))
def test_truncated_descriptors_never_reach_the_hypervisor(desc, profile, offset, size):
    _assert_safe(truncate(desc, profile), profile, offset, size)


@given(bases, profiles, offsets, st.sampled_from((1, 2, 4)), st.booleans())
def test_flipped_descriptors_never_reach_the_hypervisor(base, profile, offset, size, down):
    desc = SegmentDescriptor.flat_user_data(base)
    if down:
        desc = replace(desc, dc=True, limit=0)
    truncated = truncate(desc, profile)
    _assert_safe(truncated, profile, offset, size)
    flipped = flip(truncated, offset, profile)
    if flipped is not None:
        _assert_safe(flipped, profile, offset, size)
        again = flip(flipped, 0, profile)
        if again is not None:
            _assert_safe(again, profile, offset, size)


@given(any_descriptor, profiles)
def test_truncation_is_idempotent_and_only_touches_limit_or_presence(desc, profile):
    once = truncate(desc, profile)
    assert truncate(once, profile) == once
    assert replace(once, limit=desc.limit, present=desc.present) == desc
    if once.present and once != desc:  # the new limit is the best one: one more unit leaks
        step = 1
        wider = replace(once, limit=once.limit + step) if not once.expand_down else replace(
            once, limit=once.limit - step)
        if 0 <= wider.limit <= 0xFFFFF:
            assert reaches_hypervisor(wider, profile)


@given(any_descriptor, st.integers(0, U32))
def test_admitted_ranges_agree_with_admits_linear(desc, probe):
    ranges = admitted_linear_ranges(desc)
    inside = lambda x: any(first <= x <= last for first, last in ranges)  # noqa: E731
    edges = {probe} | {x for r in ranges for e in r for x in (e - 1, e, e + 1) if 0 <= x <= U32}
    for linear in edges:
        assert admits_linear(desc, linear) == inside(linear), hex(linear)
