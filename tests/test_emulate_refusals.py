"""The emulator's refusals (issue 17, item 2): what ``GuestAccess`` refuses, and that a refusal kills.

``tlslab.hypervisor.access.GuestAccess.linear`` refuses an emulated access
(1) the guest's own descriptor refuses, (2) that reaches the hypervisor hole
or wraps past 4 GiB, (3) that is outside guest user space, (4) that page-faults.
Because guest user space ends at ``layout.USER_TOP`` (1 GiB), far below every
hole, check (3) alone would refuse everything check (2) refuses: the hole
check is redundant as a safety net, and a regression in it would change only
the message. These tests pin both messages at their exact boundaries (so the
hole check is observable) with the bounds written here from Xen's constants,
not read from tlslab, and check end to end, on a real guest, that both
refusals are reached from a trap and kill the guest under emulate and
emulate-2004 instead of resuming it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tlslab.hypervisor.access import AccessRefused, GuestAccess
from tlslab.machine.memory import PROT_READ, PROT_WRITE
from tlslab.x86.descriptor import SegmentDescriptor

# HYPERVISOR_VIRT_START, Xen x86-32 non-PAE and PAE (xen/include/asm-x86/config.h)
HOLES = {"nonpae": 0xFC00_0000, "pae": 0xF580_0000}
USER_TOP = 0x4000_0000          # README "Layout": guest user space is [0, 1 GiB)


def _access(base: int, hv: int, mapped=((0x3FFF_0000, 0x4000_0000),)) -> GuestAccess:
    regions = [SimpleNamespace(start=a, end=b, prot=PROT_READ | PROT_WRITE) for a, b in mapped]

    def region_at(addr):
        return next((r for r in regions if r.start <= addr < r.end), None)

    mem = SimpleNamespace(region_at=region_at)
    domain = SimpleNamespace(vcpu=SimpleNamespace(mem=mem))
    return GuestAccess(domain, {"gs": SegmentDescriptor.flat_user_data(base), "fs": None}, hv)


def _refusal(acc: GuestAccess, offset: int, size: int = 4, write: bool = False) -> AccessRefused:
    with pytest.raises(AccessRefused) as info:
        acc.linear("gs", offset, size, write)
    return info.value


@pytest.mark.parametrize("profile", sorted(HOLES))
def test_an_access_into_the_hole_is_refused_as_the_hole(profile):
    hv = HOLES[profile]
    acc = _access(0, hv)
    for offset, size in ((hv, 4), (hv, 1), (hv - 2, 4), (hv - 1, 2), (0xFFFF_FFF0, 4), (0xFFFF_FFFF, 1)):
        exc = _refusal(acc, offset, size)
        assert "reaches the hypervisor hole" in exc.reason, (hex(offset), size, exc.reason)
        assert exc.linear == offset
    # a base, not the offset, takes it there
    exc = _refusal(_access(0x1000, hv), hv - 0x1000)
    assert "hypervisor hole" in exc.reason and exc.linear == hv


@pytest.mark.parametrize("profile", sorted(HOLES))
def test_the_last_byte_below_the_hole_is_refused_as_outside_user_space(profile):
    hv = HOLES[profile]
    acc = _access(0, hv)
    for offset, size in ((hv - 4, 4), (hv - 1, 1), (USER_TOP, 4), (USER_TOP - 3, 4), (0x8000_0000, 4)):
        exc = _refusal(acc, offset, size)
        assert "outside guest user space" in exc.reason, (hex(offset), size, exc.reason)
        assert exc.linear == offset


def test_wrapping_past_4gib_is_refused_as_the_hole():
    acc = _access(0x10, HOLES["nonpae"])
    # base 0x10 + 0xFFFFFFFE wraps to 0xE: a wrapping access through a non-flat base is refused by the segment
    # rule first (the guest's own descriptor refuses it: base != 0), never performed
    exc = _refusal(acc, 0xFFFF_FFFE)
    assert exc.linear is None and "gs:0xfffffffe" in exc.reason
    # base 0: the access's last byte is past 4 GiB
    exc = _refusal(_access(0, HOLES["nonpae"]), 0xFFFF_FFFE, 4)
    assert "hypervisor hole" in exc.reason and exc.linear == 0xFFFF_FFFE


def test_the_last_user_page_is_allowed_and_unmapped_pages_fault():
    acc = _access(0, HOLES["pae"])
    assert acc.linear("gs", USER_TOP - 4, 4, True) == USER_TOP - 4
    assert acc.linear("gs", USER_TOP - 1, 1, False) == USER_TOP - 1
    exc = _refusal(acc, 0x1000)
    assert "page fault" in exc.reason and exc.linear == 0x1000


def test_null_and_missing_segments_are_refused():
    acc = _access(0, HOLES["nonpae"])
    with pytest.raises(AccessRefused, match="null selector"):
        acc.linear("fs", 0, 4, False)
    with pytest.raises(AccessRefused, match="no descriptor"):
        acc.linear("es", 0, 4, False)


# ----------------------------------------------------------------- end to end: the guest dies
@pytest.mark.parametrize("strategy", ["emulate", "emulate-2004"])
@pytest.mark.parametrize("profile", sorted(HOLES))
def test_an_unsafe_emulated_access_kills_the_guest(strategy, profile, monkeypatch):
    """gs flat at base 0, `mov eax, gs:[ebx=-4]` reads 0xFFFFFFFC: in the hole; the guest dies there, nothing after runs."""
    from adversary import generator as G
    from adversary import harness as H
    from tlslab.x86.descriptor import UserDesc

    flat = dict(limit=0xFFFFF, limit_in_pages=True, seg_32bit=True)
    hv = HOLES[profile]
    cases = [
        G._named(-100, "negative offset into the hole", [UserDesc(base_addr=0, **flat)],
                 ["mov ebx, 0xfffffffc", "mov eax, dword ptr gs:[ebx]", f"mov dword ptr [{G.DATA + 0x2000:#x}], 0x4f4b"]),
        # base above user space: the truncated segment refuses the offset, and base + offset wraps to 1 GiB
        G._named(-101, "wraps to the user-space top", [UserDesc(base_addr=0x5000_0000, **flat)],
                 ["mov ebx, 0xf0000000", "mov eax, dword ptr gs:[ebx]",
                  f"mov dword ptr [{G.DATA + 0x2000:#x}], 0x4f4b"]),
    ]
    verdicts = []
    lab = H.Lab(strategy, profile)
    real_handle = type(lab.domain.strategy).handle

    def spy(self, trap):
        verdict = real_handle(self, trap)
        verdicts.append((trap.violation.offset, verdict))
        return verdict

    monkeypatch.setattr(type(lab.domain.strategy), "handle", spy)
    st = H.Stats()
    for seq in cases:
        lab.run_sequence(seq, st)
        assert lab.vcpu.mem.read(G.DATA + 0x2000, 4) != (0x4F4B).to_bytes(4, "little"), "ran on after the fault"
    assert st.guest_faults == 2 and st.unsafe_survived == 0 and st.fatal_refusals == 2, st
    assert [off for off, _ in verdicts] == [0xFFFF_FFFC, 0xF000_0000]
    assert all(v.action.value == "kill" for _, v in verdicts), verdicts
    hole, outside = verdicts[0][1].reason, verdicts[1][1].reason
    assert "DISALLOWING UNSAFE ACCESS" in hole and "reaches the hypervisor hole" in hole
    assert "DISALLOWING UNSAFE ACCESS" in outside and "outside guest user space" in outside
