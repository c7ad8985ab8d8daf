"""The 8-byte x86 segment descriptor and Linux's ``struct user_desc``.

Pure data: no policy, no CPU. Every one of the 64 bits of a descriptor maps to
exactly one field of :class:`SegmentDescriptor`, so ``decode(x).encode() == x``
for every 64-bit ``x``; that is what lets a hypervisor model rewrite one field
(a limit, the expand-down bit) and leave the rest of a guest's descriptor alone.

Layout (Intel SDM vol. 3, 3.4.5), as one little-endian 64-bit integer::

    bits  0-15  limit[15:0]          bits 48-51  limit[19:16]
    bits 16-39  base[23:0]           bit  52     AVL
    bits 40-43  type (A, W/R, E/C, X) bit 53     L (64-bit code)
    bit  44     S (1 = code/data)    bit  54     D/B
    bits 45-46  DPL                  bit  55     G (limit in 4 KiB units)
    bit  47     P                    bits 56-63  base[31:24]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

PAGE_SIZE = 0x1000
U32_MASK = 0xFFFF_FFFF
LIMIT_MASK = 0xF_FFFF

# Linux set_thread_area/modify_ldt "contents" values (struct user_desc).
CONTENTS_DATA = 0
CONTENTS_DATA_EXPAND_DOWN = 1
CONTENTS_CODE = 2
CONTENTS_CODE_CONFORMING = 3


@dataclass(frozen=True)
class SegmentDescriptor:
    """One GDT/LDT code or data (or system) segment descriptor, field by field.

    ``limit`` is the raw 20-bit field; use :attr:`effective_limit` for the byte
    limit the CPU checks. The four type bits are kept separately because their
    meaning depends on ``executable``: bit 1 (``rw``) is *writable* for data and
    *readable* for code, bit 2 (``dc``) is *expand-down* for data and
    *conforming* for code. Properties give the unambiguous names.
    """

    base: int = 0
    limit: int = 0
    accessed: bool = False
    rw: bool = False
    dc: bool = False
    executable: bool = False
    s: bool = True
    dpl: int = 0
    present: bool = False
    avl: bool = False
    l: bool = False  # noqa: E741 - the SDM's name for the 64-bit code flag
    db: bool = False
    granularity: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.base <= U32_MASK:
            raise ValueError(f"base {self.base:#x} does not fit 32 bits")
        if not 0 <= self.limit <= LIMIT_MASK:
            raise ValueError(f"limit field {self.limit:#x} does not fit 20 bits")
        if not 0 <= self.dpl <= 3:
            raise ValueError(f"dpl {self.dpl} is not 0..3")

    # ----------------------------------------------------------- encoding
    @property
    def type(self) -> int:
        """The 4-bit type field (bit 0 accessed ... bit 3 executable)."""
        return (
            int(self.accessed)
            | int(self.rw) << 1
            | int(self.dc) << 2
            | int(self.executable) << 3
        )

    def encode(self) -> int:
        """The descriptor as the 64-bit integer the CPU reads (little-endian)."""
        value = self.limit & 0xFFFF
        value |= (self.base & 0xFF_FFFF) << 16
        value |= self.type << 40
        value |= int(self.s) << 44
        value |= self.dpl << 45
        value |= int(self.present) << 47
        value |= (self.limit >> 16) << 48
        value |= int(self.avl) << 52
        value |= int(self.l) << 53
        value |= int(self.db) << 54
        value |= int(self.granularity) << 55
        value |= (self.base >> 24) << 56
        return value

    def to_bytes(self) -> bytes:
        """The 8 bytes as stored in a GDT/LDT."""
        return self.encode().to_bytes(8, "little")

    @classmethod
    def decode(cls, raw: int | bytes) -> SegmentDescriptor:
        """Inverse of :meth:`encode` / :meth:`to_bytes`; exact for all 2**64 values."""
        if isinstance(raw, (bytes, bytearray, memoryview)):
            if len(raw) != 8:
                raise ValueError(f"a descriptor is 8 bytes, got {len(raw)}")
            value = int.from_bytes(raw, "little")
        else:
            value = int(raw)
            if not 0 <= value < 1 << 64:
                raise ValueError(f"descriptor {value:#x} does not fit 64 bits")
        bit = lambda n: bool(value >> n & 1)  # noqa: E731
        return cls(
            base=(value >> 16) & 0xFF_FFFF | ((value >> 56) & 0xFF) << 24,
            limit=value & 0xFFFF | ((value >> 48) & 0xF) << 16,
            accessed=bit(40),
            rw=bit(41),
            dc=bit(42),
            executable=bit(43),
            s=bit(44),
            dpl=(value >> 45) & 3,
            present=bit(47),
            avl=bit(52),
            l=bit(53),
            db=bit(54),
            granularity=bit(55),
        )

    # --------------------------------------------------------- semantics
    @property
    def effective_limit(self) -> int:
        """Byte limit checked by the CPU: G=1 scales by 4 KiB and fills the low 12 bits."""
        return (self.limit << 12) | 0xFFF if self.granularity else self.limit

    @property
    def upper_bound(self) -> int:
        """Highest offset of an expand-down segment: set by the B flag."""
        return U32_MASK if self.db else 0xFFFF

    @property
    def is_system(self) -> bool:
        return not self.s

    @property
    def is_code(self) -> bool:
        return self.s and self.executable

    @property
    def is_data(self) -> bool:
        """A data segment (S=1, not executable); readable code is *not* counted here."""
        return self.s and not self.executable

    @property
    def expand_down(self) -> bool:
        return self.is_data and self.dc

    @property
    def conforming(self) -> bool:
        return self.is_code and self.dc

    @property
    def writable(self) -> bool:
        """Only data segments can be written through; code segments never."""
        return self.is_data and self.rw

    @property
    def readable(self) -> bool:
        """Data is always readable; code only if its R bit is set."""
        return self.s and (not self.executable or self.rw)

    def with_limit(self, limit: int) -> SegmentDescriptor:
        return replace(self, limit=limit)

    # ------------------------------------------------------ constructors
    @classmethod
    def flat_user_data(cls, base: int = 0) -> SegmentDescriptor:
        """What NPTL asks for: ring-3 writable data, 4 GiB page-granular, 32-bit.

        With base 0 this encodes as 0x00cff2000000ffff.
        """
        return cls(
            base=base, limit=LIMIT_MASK, rw=True, s=True, dpl=3, present=True,
            db=True, granularity=True,
        )

    def describe(self) -> str:
        """Short human form, e.g. ``data RW expand-up base=0 limit=0xffffffff``."""
        if not self.s:
            kind = f"system type={self.type:#x}"
        elif self.executable:
            kind = "code " + ("R" if self.rw else "X-only") + (" conforming" if self.dc else "")
        else:
            kind = "data " + ("RW" if self.rw else "RO") + (
                " expand-down" if self.dc else " expand-up"
            )
        flags = "" if self.present else " not-present"
        return (
            f"{kind} base={self.base:#x} limit={self.effective_limit:#x} "
            f"dpl={self.dpl} {'32' if self.db else '16'}-bit{flags}"
        )


_USER_DESC = struct.Struct("<IIII")


@dataclass(frozen=True)
class UserDesc:
    """Linux ``struct user_desc``: the argument of set_thread_area and modify_ldt.

    16 bytes: u32 entry_number, u32 base_addr, u32 limit, then a u32 of
    bitfields, lowest bit first: seg_32bit:1, contents:2, read_exec_only:1,
    limit_in_pages:1, seg_not_present:1, useable:1 (bit 7 is ``lm`` on 64-bit
    builds and is kept so that pack/unpack round-trips).
    """

    entry_number: int = U32_MASK  # -1: "pick a free TLS slot"
    base_addr: int = 0
    limit: int = 0
    seg_32bit: bool = True
    contents: int = CONTENTS_DATA
    read_exec_only: bool = False
    limit_in_pages: bool = False
    seg_not_present: bool = False
    useable: bool = False
    lm: bool = False

    def __post_init__(self) -> None:
        for name in ("entry_number", "base_addr", "limit"):
            if not 0 <= getattr(self, name) <= U32_MASK:
                raise ValueError(f"{name} {getattr(self, name):#x} does not fit 32 bits")
        if not 0 <= self.contents <= 3:
            raise ValueError(f"contents {self.contents} is not 0..3")

    @property
    def flags(self) -> int:
        return (
            int(self.seg_32bit)
            | self.contents << 1
            | int(self.read_exec_only) << 3
            | int(self.limit_in_pages) << 4
            | int(self.seg_not_present) << 5
            | int(self.useable) << 6
            | int(self.lm) << 7
        )

    def pack(self) -> bytes:
        return _USER_DESC.pack(self.entry_number, self.base_addr, self.limit, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> UserDesc:
        if len(data) != _USER_DESC.size:
            raise ValueError(f"struct user_desc is {_USER_DESC.size} bytes, got {len(data)}")
        entry, base, limit, flags = _USER_DESC.unpack(data)
        if flags >> 8:
            raise ValueError(f"unknown user_desc flag bits {flags:#x}")
        return cls(
            entry_number=entry,
            base_addr=base,
            limit=limit,
            seg_32bit=bool(flags & 1),
            contents=(flags >> 1) & 3,
            read_exec_only=bool(flags >> 3 & 1),
            limit_in_pages=bool(flags >> 4 & 1),
            seg_not_present=bool(flags >> 5 & 1),
            useable=bool(flags >> 6 & 1),
            lm=bool(flags >> 7 & 1),
        )

    def to_descriptor(self) -> SegmentDescriptor:
        """The descriptor Linux's fill_ldt() writes for this request.

        Type = contents << 2 | writable/readable (= !read_exec_only) << 1 | accessed
        (set since Linux 4.15 so the GDT can be mapped read-only), S=1, DPL 3,
        P = !seg_not_present, D/B = seg_32bit, G = limit_in_pages,
        AVL = useable, L = 0. Only the low 20 bits of ``limit`` are kept.
        Validation (which requests the kernel refuses) is not modelled here.
        """
        return SegmentDescriptor(
            base=self.base_addr,
            limit=self.limit & LIMIT_MASK,
            accessed=True,
            rw=not self.read_exec_only,
            dc=bool(self.contents & 1),
            executable=bool(self.contents & 2),
            s=True,
            dpl=3,
            present=not self.seg_not_present,
            avl=self.useable,
            l=False,
            db=self.seg_32bit,
            granularity=self.limit_in_pages,
        )

    @classmethod
    def from_descriptor(cls, desc: SegmentDescriptor, entry_number: int = U32_MASK) -> UserDesc:
        """The request that makes Linux install ``desc`` (ignoring the accessed bit).

        Raises ValueError for descriptors user space cannot ask for (system
        segments, DPL other than 3, the L flag).
        """
        if not desc.s or desc.dpl != 3 or desc.l:
            raise ValueError(f"not expressible as struct user_desc: {desc.describe()}")
        return cls(
            entry_number=entry_number,
            base_addr=desc.base,
            limit=desc.limit,
            seg_32bit=desc.db,
            contents=int(desc.dc) | int(desc.executable) << 1,
            read_exec_only=not desc.rw,
            limit_in_pages=desc.granularity,
            seg_not_present=not desc.present,
            useable=desc.avl,
        )
