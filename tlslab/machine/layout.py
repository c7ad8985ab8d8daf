"""The linear address map the machine gives a guest, and why.

Unicorn does not enforce segment limits (docs/measurements.md#unicorn), so the machine must
see every fs/gs access itself, before it commits, without a Python callback per
instruction. The layout makes that possible:

    0x00000000 .. USER_TOP     guest user space (ELF image, heap, mmaps, stack)
    USER_TOP   .. 0x80000000   hypervisor pages: GDT (read-only), entry stack; the entry stub
                               is mapped there only while the host enters ring 3
    0x80000000 .. 0xC0000000   window of TLS slot 6: user space aliased at +2 GiB
    0xC0000000 .. 0x100000000  window of TLS slot 7: user space aliased at +3 GiB

The descriptor Unicorn sees for TLS slot 6 has base ``real_base + 2 GiB``, so
``%gs:off`` (glibc loads slot 6 into %gs) reaches linear ``real_base + off +
2 GiB``: the alias of the page the guest meant. A protection hook on the windows
sees every such access before it commits and checks it with the shared x86
core's segment check (tlslab/x86/_core.c, held to tlslab.x86 by a differential
test); the offset is exact because ``off = linear - window_base (mod 2^32)``
wherever the access lands. Whichever of fs/gs loads a slot uses its window, so
segment loads need no interception. Slot 8 has no window: its view is kept not
present, and a guest loading it is stopped (#NP), never left unchecked.

Known blind spot: an fs/gs access whose *real* linear address lies outside user
space and whose shifted address lands back inside user space (slot 6: real
linear in [0x80000000, 0xC0000000); slot 7: in [0x40000000, 0x80000000)) is not
seen. Such an access is ~1 GiB away from any TLS block; real code never makes
one.
"""

PAGE_SIZE = 0x1000

USER_TOP = 0x4000_0000
STACK_TOP = USER_TOP
STACK_SIZE = 8 << 20
MMAP_TOP = STACK_TOP - STACK_SIZE - 0x10_0000  # a guard gap below the stack
MMAP_BOTTOM = 0x1000_0000

HYPERVISOR_PAGES = 0x7FFF_0000  # GDT page, then the ring-3 entry stub page
GDT_BASE = HYPERVISOR_PAGES
GDT_ENTRIES = 32
ENTRY_STUB = HYPERVISOR_PAGES + PAGE_SIZE
ENTRY_STACK = HYPERVISOR_PAGES + 3 * PAGE_SIZE  # ring-0 stack used once by the entry stub

SLOT_WINDOW_SHIFT = {6: 0x8000_0000, 7: 0xC000_0000}  # GDT TLS slot -> alias distance
HYPERVISOR_PAGES_SIZE = 4 * PAGE_SIZE
# Everything above user space is watched: the windows, and [USER_TOP, 2 GiB) where
# slot 6's window sends accesses whose real address is kernel or hole space.
WATCHED_REGION = (USER_TOP, 0xFFFF_FFFF)

# Linux i386 GDT slots (arch/x86/include/asm/segment.h)
GDT_ENTRY_TLS_MIN = 6
GDT_ENTRY_TLS_ENTRIES = 3
TLS_SLOTS = tuple(range(GDT_ENTRY_TLS_MIN, GDT_ENTRY_TLS_MIN + GDT_ENTRY_TLS_ENTRIES))   # GDT entries 6, 7, 8
GDT_ENTRY_KERNEL_CS = 12
GDT_ENTRY_KERNEL_DS = 13
GDT_ENTRY_USER_CS = 14
GDT_ENTRY_USER_DS = 15

USER_CS = (GDT_ENTRY_USER_CS << 3) | 3
USER_DS = (GDT_ENTRY_USER_DS << 3) | 3
KERNEL_CS = GDT_ENTRY_KERNEL_CS << 3
KERNEL_DS = GDT_ENTRY_KERNEL_DS << 3


def window_base(slot: int, base: int) -> int:
    """The base Unicorn gets for a TLS slot with a window: the real base shifted into the window."""
    return (base + SLOT_WINDOW_SHIFT[slot]) & 0xFFFF_FFFF


def selector_index(selector: int) -> int:
    return selector >> 3
