"""SegmentDescriptor and UserDesc: exact bit layout, round trips, Linux's fill_ldt."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlslab.x86 import SegmentDescriptor, UserDesc

FLAT_USER_DATA = 0x00CF_F200_0000_FFFF


def test_flat_user_data_encodes_as_the_classic_constant():
    desc = SegmentDescriptor.flat_user_data()
    assert desc.encode() == FLAT_USER_DATA
    assert SegmentDescriptor.decode(FLAT_USER_DATA) == desc
    assert desc.effective_limit == 0xFFFF_FFFF
    assert desc.is_data and desc.writable and not desc.expand_down
    assert (desc.dpl, desc.present, desc.db, desc.granularity) == (3, True, True, True)


def test_every_field_has_its_own_bits():
    desc = SegmentDescriptor.decode(0x12C9_F345_6789_ABCD)
    assert desc.base == 0x1245_6789
    assert desc.limit == 0x9ABCD
    assert desc.type == 0x3  # accessed + writable data
    assert desc.s and desc.dpl == 3 and desc.present
    assert (desc.avl, desc.l, desc.db, desc.granularity) == (False, False, True, True)
    single_bits = {
        40: "accessed", 41: "rw", 42: "dc", 43: "executable", 44: "s", 47: "present",
        52: "avl", 53: "l", 54: "db", 55: "granularity",
    }
    for bit, field in single_bits.items():
        assert getattr(SegmentDescriptor.decode(1 << bit), field) is True, field
        assert SegmentDescriptor.decode(1 << bit).encode() == 1 << bit
    assert SegmentDescriptor.decode(3 << 45).dpl == 3


def test_to_bytes_is_little_endian():
    raw = SegmentDescriptor.flat_user_data().to_bytes()
    assert raw == bytes.fromhex("ffff000000f2cf00")
    assert SegmentDescriptor.decode(raw).encode() == FLAT_USER_DATA


@given(st.integers(0, 2**64 - 1))
def test_decode_encode_round_trips_all_64_bits(value):
    desc = SegmentDescriptor.decode(value)
    assert desc.encode() == value
    assert SegmentDescriptor.decode(desc.to_bytes()) == desc


def test_effective_limit_and_upper_bound():
    byte_granular = SegmentDescriptor(limit=0x12345)
    assert byte_granular.effective_limit == 0x12345
    assert SegmentDescriptor(limit=0, granularity=True).effective_limit == 0xFFF
    assert SegmentDescriptor(limit=0xFBFFF, granularity=True).effective_limit == 0xFBFF_FFFF
    assert SegmentDescriptor(db=True).upper_bound == 0xFFFF_FFFF
    assert SegmentDescriptor(db=False).upper_bound == 0xFFFF


def test_type_bits_mean_different_things_for_code_and_data():
    data = SegmentDescriptor(rw=True, dc=True, present=True)
    assert data.writable and data.expand_down and data.readable and not data.conforming
    code = SegmentDescriptor(rw=True, dc=True, executable=True, present=True)
    assert code.readable and code.conforming and not code.writable and not code.expand_down
    exec_only = SegmentDescriptor(executable=True)
    assert not exec_only.readable
    system = SegmentDescriptor(s=False, rw=True)
    assert system.is_system and not system.readable and not system.writable


@pytest.mark.parametrize("kwargs", [{"base": 1 << 32}, {"limit": 1 << 20}, {"dpl": 4}])
def test_out_of_range_fields_are_refused(kwargs):
    with pytest.raises(ValueError):
        SegmentDescriptor(**kwargs)


def test_decode_refuses_wrong_widths():
    with pytest.raises(ValueError):
        SegmentDescriptor.decode(b"\x00" * 7)
    with pytest.raises(ValueError):
        SegmentDescriptor.decode(1 << 64)


# ------------------------------------------------------------- user_desc
def test_user_desc_layout_is_linux_abi():
    ud = UserDesc(entry_number=12, base_addr=0x0804_A000, limit=0xFFFFF, seg_32bit=True,
                  contents=1, read_exec_only=True, limit_in_pages=True, useable=True)
    raw = ud.pack()
    assert len(raw) == 16
    assert raw[:12] == bytes.fromhex("0c000000" "00a00408" "ffff0f00")
    # seg_32bit | contents=1 << 1 | read_exec_only << 3 | limit_in_pages << 4 | useable << 6
    assert int.from_bytes(raw[12:], "little") == 0b101_1011


user_descs = st.builds(
    UserDesc,
    entry_number=st.integers(0, 2**32 - 1), base_addr=st.integers(0, 2**32 - 1),
    limit=st.integers(0, 2**32 - 1), seg_32bit=st.booleans(), contents=st.integers(0, 3),
    read_exec_only=st.booleans(), limit_in_pages=st.booleans(),
    seg_not_present=st.booleans(), useable=st.booleans(), lm=st.booleans(),
)


@given(user_descs)
def test_user_desc_pack_round_trips(ud):
    assert UserDesc.unpack(ud.pack()) == ud


def test_glibc_tls_request_becomes_flat_user_data_plus_accessed():
    # what NPTL passes to set_thread_area for the TCB
    ud = UserDesc(base_addr=0x0804_A8C0, limit=0xFFFFF, seg_32bit=True, limit_in_pages=True,
                  useable=True)
    desc = ud.to_descriptor()
    expected = SegmentDescriptor.flat_user_data(0x0804_A8C0)
    assert desc.encode() == expected.encode() | 1 << 40 | 1 << 52  # accessed, AVL
    assert desc.encode() == 0x08DF_F304_A8C0_FFFF


@given(user_descs)
def test_to_descriptor_follows_fill_ldt(ud):
    desc = ud.to_descriptor()
    assert desc.base == ud.base_addr
    assert desc.limit == ud.limit & 0xFFFFF
    assert desc.type == (ud.contents << 2 | (not ud.read_exec_only) << 1 | 1)
    assert desc.s and desc.dpl == 3 and not desc.l
    assert desc.present == (not ud.seg_not_present)
    assert (desc.db, desc.granularity, desc.avl) == (ud.seg_32bit, ud.limit_in_pages, ud.useable)
    back = UserDesc.from_descriptor(desc, ud.entry_number)
    assert back.to_descriptor() == desc
    assert back.limit == ud.limit & 0xFFFFF


def test_expand_down_and_code_contents():
    assert UserDesc(contents=1).to_descriptor().expand_down
    code = UserDesc(contents=2, read_exec_only=True).to_descriptor()
    assert code.is_code and not code.readable
    assert UserDesc(contents=3).to_descriptor().conforming


def test_from_descriptor_refuses_what_user_space_cannot_ask_for():
    with pytest.raises(ValueError):
        UserDesc.from_descriptor(SegmentDescriptor(dpl=0, present=True))
    with pytest.raises(ValueError):
        UserDesc.from_descriptor(SegmentDescriptor(s=False, dpl=3))
