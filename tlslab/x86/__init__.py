"""Pure x86 segmentation semantics: descriptors, access checks, Xen's descriptor policy.

No emulator here (no unicorn import): everything is a function of descriptor
bits and numbers, so it can be checked against the real CPU (tests/test_oracle.py)
and reused by every backend.
"""

from tlslab.x86.descriptor import (
    CONTENTS_CODE,
    CONTENTS_CODE_CONFORMING,
    CONTENTS_DATA,
    CONTENTS_DATA_EXPAND_DOWN,
    PAGE_SIZE,
    SegmentDescriptor,
    UserDesc,
)
from tlslab.x86.segcheck import (
    AccessCheck,
    AccessFault,
    check_data_access,
    linear_address,
    valid_offset_interval,
)
from tlslab.x86.xen import (
    DEFAULT_PROFILE,
    PROFILES,
    HypervisorProfile,
    admits_linear,
    admitted_linear_ranges,
    expand_down_flat_limit,
    flip,
    get_profile,
    looks_like_truncated_flat,
    reaches_hypervisor,
    truncate,
    truncated_flat_limit,
)

__all__ = [
    "CONTENTS_CODE",
    "CONTENTS_CODE_CONFORMING",
    "CONTENTS_DATA",
    "CONTENTS_DATA_EXPAND_DOWN",
    "DEFAULT_PROFILE",
    "PAGE_SIZE",
    "PROFILES",
    "AccessCheck",
    "AccessFault",
    "HypervisorProfile",
    "SegmentDescriptor",
    "UserDesc",
    "admits_linear",
    "admitted_linear_ranges",
    "check_data_access",
    "expand_down_flat_limit",
    "flip",
    "get_profile",
    "linear_address",
    "looks_like_truncated_flat",
    "reaches_hypervisor",
    "truncate",
    "truncated_flat_limit",
    "valid_offset_interval",
]
