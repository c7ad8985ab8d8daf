"""check_data_access: every fault reason with hand-checked values (SDM vol. 3, 5.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlslab.x86 import (
    AccessFault,
    SegmentDescriptor,
    check_data_access,
    linear_address,
    valid_offset_interval,
)

U32 = 0xFFFF_FFFF


def data(limit, *, base=0x1000, expand_down=False, writable=True, g=False, b=True, present=True):
    return SegmentDescriptor(base=base, limit=limit, rw=writable, dc=expand_down, dpl=3,
                             present=present, db=b, granularity=g)


def reason(desc, offset, size=1, write=False):
    return check_data_access(desc, offset, size, write).reason


def test_worked_example_flat_segment_allows_minus_four():
    flat = SegmentDescriptor.decode(0x00CF_F200_0000_FFFF)
    assert check_data_access(flat, 0xFFFF_FFFC, 4, write=False).allowed


def test_expand_up_byte_granular_limit_is_the_last_valid_byte():
    seg = data(0x0FFF)
    assert reason(seg, 0x0FFF, 1) is None
    assert reason(seg, 0x0FFC, 4) is None
    assert reason(seg, 0x0FFD, 4) is AccessFault.BEYOND_LIMIT  # dword crosses 0xFFF
    assert reason(seg, 0x1000, 1) is AccessFault.BEYOND_LIMIT
    assert reason(seg, 0x0FFF, 2) is AccessFault.BEYOND_LIMIT


def test_page_granularity_fills_the_low_12_bits():
    seg = data(0, g=True)  # limit field 0 still gives offsets 0..0xFFF
    assert reason(seg, 0xFFF) is None
    assert reason(seg, 0x1000) is AccessFault.BEYOND_LIMIT


def test_truncated_gs_refuses_negative_offsets():
    truncated = data(0xFBFFF, base=0, g=True)  # Xen non-PAE: ends below 0xFC000000
    assert reason(truncated, 0xFBFF_FFFC, 4) is None
    assert reason(truncated, 0xFBFF_FFFD, 4) is AccessFault.BEYOND_LIMIT
    assert reason(truncated, 0xFFFF_FFE0, 4) is AccessFault.BEYOND_LIMIT  # %gs:-0x20


def test_wrap_past_4g_faults_unless_the_segment_is_flat():
    # Measured by tests/test_oracle.py on Intel: base 0 + 4 GiB limit tolerates the
    # wrap, any other base faults.
    flat = SegmentDescriptor.flat_user_data(0)
    assert check_data_access(flat, 0xFFFF_FFFE, 4, False).allowed
    based = SegmentDescriptor.flat_user_data(1)
    assert reason(based, 0xFFFF_FFFE, 4) is AccessFault.BEYOND_LIMIT
    assert reason(based, 0xFFFF_FFFE, 2) is None
    assert reason(based, 0xFFFF_FFFF, 1) is None


def test_expand_down_valid_range_is_above_the_limit():
    seg = data(0x0FFF, expand_down=True)  # B=1: valid offsets 0x1000..0xFFFFFFFF
    assert valid_offset_interval(seg) == (0x1000, U32)
    assert reason(seg, 0x0FFF) is AccessFault.AT_OR_BELOW_LIMIT
    assert reason(seg, 0x0FFE, 4) is AccessFault.AT_OR_BELOW_LIMIT  # starts below
    assert reason(seg, 0x1000, 4) is None
    assert reason(seg, 0xFFFF_FFFC, 4) is None  # %gs:-4 on a flipped segment
    assert reason(seg, 0xFFFF_FFFD, 4) is AccessFault.ABOVE_UPPER_BOUND  # wraps
    assert reason(seg, 0xFFFF_FFFF, 2) is AccessFault.ABOVE_UPPER_BOUND


def test_expand_down_16_bit_upper_bound_is_0xffff():
    seg = data(0x00FF, expand_down=True, b=False)
    assert valid_offset_interval(seg) == (0x100, 0xFFFF)
    assert reason(seg, 0xFFFC, 4) is None
    assert reason(seg, 0xFFFD, 4) is AccessFault.ABOVE_UPPER_BOUND
    assert reason(seg, 0x10000) is AccessFault.ABOVE_UPPER_BOUND
    assert reason(seg, 0x00FF) is AccessFault.AT_OR_BELOW_LIMIT


def test_expand_down_with_maximal_limit_admits_nothing():
    seg = data(0xFFFFF, expand_down=True, g=True)
    assert valid_offset_interval(seg) is None
    assert reason(seg, U32) is AccessFault.AT_OR_BELOW_LIMIT


def test_not_present_comes_first():
    assert reason(data(0xFFFF, present=False), 0) is AccessFault.NOT_PRESENT


def test_system_and_execute_only_code_are_not_data():
    system = SegmentDescriptor(s=False, present=True, limit=0xFFFF, dpl=3)
    assert reason(system, 0) is AccessFault.NOT_DATA
    exec_only = SegmentDescriptor(executable=True, present=True, limit=0xFFFF, dpl=3)
    assert reason(exec_only, 0) is AccessFault.NOT_DATA


def test_readable_code_is_readable_data_but_never_writable():
    code = SegmentDescriptor(executable=True, rw=True, present=True, limit=0xFFFF, dpl=3)
    assert reason(code, 0x10, 4) is None
    assert reason(code, 0x10, 4, write=True) is AccessFault.NOT_WRITABLE
    assert reason(code, 0x10000) is AccessFault.BEYOND_LIMIT


def test_read_only_data_refuses_writes_only():
    ro = data(0xFFFF, writable=False)
    assert reason(ro, 0) is None
    assert reason(ro, 0, write=True) is AccessFault.NOT_WRITABLE


def test_messages_name_the_numbers():
    check = check_data_access(data(0x0FFF), 0x0FFE, 4, False)
    assert not check and "0x1001" in check.message and "0xfff" in check.message


def test_linear_address_wraps_mod_2_32():
    seg = data(0xFFFFF, base=0x0804_A000, g=True)
    assert linear_address(seg, 0xFFFF_FFFC) == 0x0804_9FFC
    assert linear_address(seg, 0x10) == 0x0804_A010


@pytest.mark.parametrize("offset,size", [(-1, 1), (1 << 32, 1), (0, 0)])
def test_bad_arguments_are_refused(offset, size):
    with pytest.raises(ValueError):
        check_data_access(data(0xFFFF), offset, size, False)


@given(st.integers(0, 2**64 - 1), st.integers(0, U32), st.sampled_from((1, 2, 4, 8)),
       st.booleans())
def test_allowed_iff_access_inside_valid_interval(raw, offset, size, write):
    """The check is the interval rule (plus permissions and the flat-segment exception)."""
    desc = SegmentDescriptor.decode(raw)
    check = check_data_access(desc, offset, size, write)
    interval = valid_offset_interval(desc)
    inside = interval is not None and interval[0] <= offset and offset + size - 1 <= interval[1]
    flat_wrap = (desc.base == 0 and not desc.expand_down
                 and desc.effective_limit == U32)
    permitted = desc.present and desc.readable and (desc.writable or not write)
    assert check.allowed == (permitted and (inside or flat_wrap))
    assert check.allowed == (check.reason is None)
