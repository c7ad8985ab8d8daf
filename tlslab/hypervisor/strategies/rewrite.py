"""rewrite: Jakub Jelinek's in-place prefix rewrite (65 -> 64), 2004 proposal.

Idea (docs/background.md#prefix-rewrite): give ``%fs`` the same base as ``%gs`` but a
descriptor that admits the *negative* side, keep ``%gs`` the truncated
expand-up segment (+ve offsets never fault), and on the first #GP at a site
with a negative ``%gs`` offset rewrite that instruction's 0x65 (gs) prefix to
0x64 (fs). The site never faults again: one trap per distinct -ve site, then
none. Every rewrite is a :class:`tlslab.hypervisor.patches.Patch`.

The fs-twin ABI (:class:`FsTwinABI`), which a statically rewritten binary
needs too: when the guest installs its first flat 4 GiB TLS descriptor
(glibc's TCB) with set_thread_area, the hypervisor installs in GDT TLS slot 7
the *expand-down twin* of the installed (truncated) descriptor -- the
descriptor Xen's flip would produce: same base, limit ``-(base & PAGE_MASK)``,
covering everything below the base -- or, without truncation (``native``), an
exact copy; and loads ``%fs`` with selector 0x3b. ``%fs`` then belongs to the
hypervisor.

Threads: every NPTL thread has its own TCB, so its own ``%gs`` base (clone's
CLONE_SETTLS puts the thread's descriptor in the same TLS slot). The twin
follows the running thread: each time a switch has loaded a thread's TLS
slots (``Kernel.after_tls_load``), the ABI installs the twin of that thread's
TCB descriptor in slot 7 -- what a XenLinux whose ``__switch_to`` loads one
more TLS entry per thread would do -- and counts the descriptor write. A
rewritten site therefore reaches the running thread's own variables; a
thread whose slot holds no TCB gets an empty twin (every ``%fs`` access
faults) and the strategy refuses from then on.

Hazard: a guest that uses ``%fs`` itself (fs-user). The ABI notices (a) a
guest set_thread_area into slot 7, (b) ``%fs`` holding a selector other than
0x3b at any trap, (c) ``%fs`` already loaded when the TCB is installed. From
then on the strategy *refuses*: the next trap kills the guest with the reason
("rewrite refuses: guest uses %fs itself ..."). Rewritten sites executed while
the guest's own segment is in ``%fs`` address the guest's segment: they fault
on %fs (caught, killed with that reason) or silently access the wrong memory.

Processes: a fork's child starts with the parent's patched code (its memory
is a copy) and the parent's ABI state. With ``page_sharing="shared"`` a patch
lands in the page-cache page of the file, so every live process mapping that
page gets it at once and every later mapping (exec, ld.so, mmap) maps it
rewritten (``tlslab.linux.pagecache``): a site is patched once for the whole
run, in whichever process meets it first, and an un-patch (a mixed site)
likewise holds for every process, each of which learns it from the page
cache at its next fault there (``_learn_shared``); an exec'd image installs
its own twin at its own TCB. With ``private`` every address space patches
its own copy. Patches belong to files (the page cache's ``file_key``), so a
static program's rewritten bytes never reach another executable.

Fallbacks, all counted in ``by_kind``: a site whose rewritten form meets a
+ve offset (it serves both signs) is un-patched (64 -> 65) and marked mixed;
a -ve fault at a mixed site, at a site the patch policy excludes, or when no
twin could be installed is fixed by flipping %gs (Xen seg_fixup), and a +ve
fault on a flipped %gs flips it back.

Patch policy (``patch_policy``): ``lib`` is XenLinux's own rule on real
files -- patch only code of a shared object the loader mapped from under the
patch directory (``patch_dir``, default ``/lib``: 2004's /lib/tls libraries
sat there; today's libc is /lib/i386-linux-gnu/libc.so.6), and only while
that file has no writable shared mapping in the process (fixup.c's
"safe_to_patch"). ``exe`` patches only code in the guest executable's
file-backed mapping: our analogue of that rule for static programs, which
have no libraries. ``auto`` (default) is ``lib`` for a dynamically linked
program and ``exe`` for a static one. ``all``: any executable mapping;
``none``: never (pure flip). Page sharing (``page_sharing``): ``shared``
(default: patches land in the page-cache page of the file, as XenLinux
patched /lib/tls) or ``private`` (copy-on-write first); see :mod:`tlslab.linux.pagecache`.
"""

from __future__ import annotations

import posixpath
import weakref
from dataclasses import dataclass, field, replace

from tlslab.hypervisor import patches as P
from tlslab.hypervisor.patchpolicy import DEFAULT_PATCH_DIR, check_patch_options
from tlslab.hypervisor.strategies.base import Strategy, Trap, Verdict, WatchesLeaks, fetch_and_decode
from tlslab.hypervisor.strategies.online import probe_descriptor
from tlslab.machine import layout
from tlslab.machine.memory import PROT_EXEC
from tlslab.x86 import xen
from tlslab.x86.decode import DecodeError

FS_SLOT = 7
FS_SELECTOR = (FS_SLOT << 3) | 3  # 0x3b
_SEGMENT_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65}


def _segment_prefix_at(insn) -> int | None:
    """Offset of the instruction's (last) segment-override prefix, None without one."""
    seg_at = None
    for i in range(insn.prefixes.count):
        if insn.raw[i] in _SEGMENT_PREFIXES:
            seg_at = i
    return seg_at


def _is_flat_tcb(desc) -> bool:
    """glibc's TCB request: present 32-bit page-granular expand-up data, limit 0xFFFFF."""
    return (desc is not None and desc.present and desc.is_data and desc.db and desc.granularity
            and not desc.expand_down and desc.limit == 0xFFFFF)


def space_state(spaces: weakref.WeakKeyDictionary, vcpu, make):
    """``vcpu``'s entry of a per-address-space table (made on first use; gone with the vCPU)."""
    state = spaces.get(vcpu)
    if state is None:
        state = spaces[vcpu] = make()
    return state


@dataclass
class TwinState:
    """The fs-twin ABI in one address space (a fork copies it; an exec starts afresh)."""

    twin: object = None
    tcb_slot: int | None = None   # the TLS slot of the TCB the twin mirrors (glibc: 6)
    installed: bool = False
    conflict: str | None = None


class FsTwinABI:
    """Installs and guards the %fs twin of glibc's %gs (see the module docstring)."""

    abi_name = f"fs-twin: GDT TLS slot {FS_SLOT}, %fs = {FS_SELECTOR:#x}, expand-down twin of the TCB descriptor"

    def __init__(self, counters=None):
        self.counters = counters
        self.domain = None
        self._spaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # vcpu -> TwinState

    def attach(self, domain) -> "FsTwinABI":
        self.domain = domain
        domain.process.tls_hooks.append(self._on_set_thread_area)   # fork copies the hook list
        kernel = getattr(domain, "kernel", None)
        if kernel is not None:
            kernel.after_tls_load.append(self._on_switch)
            kernel.on_new_address_space.append(self._on_new_space)
        return self

    # one address space's state: the running process's (the hooks run in the process that acts)
    def state(self, vcpu=None) -> TwinState:
        return space_state(self._spaces, self.domain.vcpu if vcpu is None else vcpu, TwinState)

    @property
    def installed(self) -> bool:
        return self.state().installed

    @property
    def conflict(self) -> str | None:
        return self.state().conflict

    @property
    def twin(self):
        return self.state().twin

    @property
    def tcb_slot(self) -> int | None:
        return self.state().tcb_slot

    def _on_new_space(self, process, how: str) -> None:
        """fork: the child's CPU state is the parent's (twin in slot 7, %fs loaded), so is its ABI state;
        exec: a fresh address space starts without the ABI, until its TCB is installed."""
        if how == "fork":
            self._spaces[process.vcpu] = replace(self.state())   # the fork runs in the parent

    def _on_switch(self, task) -> None:
        """A switch loaded ``task``'s TLS slots: give slot 7 the twin of its own TCB descriptor."""
        vcpu = task.process.vcpu
        st = self._spaces.get(vcpu)
        if st is None or not st.installed or st.conflict is not None:
            return
        requested = task.tls.get(st.tcb_slot)
        if not _is_flat_tcb(requested):
            # nothing to mirror: an empty twin, so a rewritten site faults (and is refused) instead of
            # reaching another thread's variables through the previous thread's twin
            st.conflict = (f"thread {task.tid}'s TLS slot {st.tcb_slot} holds no TCB descriptor "
                           "for the %fs twin to mirror")
            if vcpu.descriptors[FS_SLOT] is not None:
                vcpu.set_descriptor(FS_SLOT, probe_descriptor(vcpu.descriptors[FS_SLOT]))
                if self.counters is not None:
                    self.counters.descriptor_writes += 1
            return
        self._set_twin(st, vcpu, self.domain.kernel.shape(requested), "fs-twin-switched")

    def _twin_of(self, installed):
        d = self.domain
        if not d.policy.truncating:
            return installed
        return xen.flip(installed, 0xFFFFFFFC, d.policy.profile, size=4)

    def _on_set_thread_area(self, index: int, requested, installed) -> None:
        st = self.state()
        if index == FS_SLOT:
            if st.installed or st.conflict is None:
                st.conflict = (f"guest installed its own descriptor in GDT TLS slot {FS_SLOT} "
                               f"(the %fs slot of the rewrite ABI)")
            return
        if st.conflict is not None or not _is_flat_tcb(requested) or installed is None:
            return
        if not st.installed:
            if self.install(installed):
                st.tcb_slot = index
        elif index == st.tcb_slot:   # the running thread replaced its TCB descriptor
            self._set_twin(st, self.domain.vcpu, installed, "fs-twin-replaced")

    def install(self, gs_installed) -> bool:
        """Install the twin of ``gs_installed`` in slot 7 and load %fs; False (conflict set) if impossible."""
        vcpu = self.domain.vcpu
        st = self.state(vcpu)
        fs = vcpu.loaded["fs"]
        if fs and fs != FS_SELECTOR:
            st.conflict = f"guest already holds selector {fs:#x} in %fs"
            return False
        # the guest's own requests say whether it uses slot 7 (the CPU's slot may hold what a switch
        # carried from another process, which the twin simply replaces)
        if self.domain.process.tls_requested.get(FS_SLOT) is not None and not st.installed:
            st.conflict = f"GDT TLS slot {FS_SLOT} is already in use by the guest"
            return False
        twin = self._twin_of(gs_installed)
        if twin is None:
            st.conflict = "no expand-down twin exists for the %gs descriptor"
            return False
        vcpu.set_descriptor(FS_SLOT, twin)
        vcpu.regs.set("fs", FS_SELECTOR)
        st.twin, st.installed = twin, True
        if st.tcb_slot is None:
            st.tcb_slot = next((i for i in layout.TLS_SLOTS if vcpu.descriptors[i] == gs_installed), None)
        if self.counters is not None:
            self.counters.descriptor_writes += 1
            self.counters.count("fs-twin-installed")
        return True

    def _set_twin(self, st: TwinState, vcpu, gs_installed, kind: str) -> None:
        """Make slot 7 the twin of ``gs_installed`` (a descriptor write only when it changes)."""
        twin = self._twin_of(gs_installed)
        if twin is None:
            st.conflict = "no expand-down twin exists for the running thread's %gs descriptor"
            return
        st.twin = twin
        if vcpu.descriptors[FS_SLOT] != twin:
            vcpu.set_descriptor(FS_SLOT, twin)
            if self.counters is not None:
                self.counters.descriptor_writes += 1
                self.counters.count(kind)

    def check(self) -> str | None:
        """Why %fs no longer belongs to the ABI in the running process (None: it does)."""
        vcpu = self.domain.vcpu
        st = self.state(vcpu)
        if st.conflict:
            return st.conflict
        if st.installed:
            fs = vcpu.loaded["fs"]
            if fs != FS_SELECTOR:
                st.conflict = f"guest loaded selector {fs:#x} into %fs (the ABI's is {FS_SELECTOR:#x})"
            elif vcpu.descriptors[FS_SLOT] != st.twin:
                st.conflict = f"GDT TLS slot {FS_SLOT} no longer holds the %fs twin"
            elif (st.tcb_slot is not None and (gs := vcpu.descriptors[st.tcb_slot]) is not None
                  and gs.base != st.twin.base):
                # the twin follows each thread's TCB (_on_switch): a thread whose slot holds no TCB
                # descriptor the ABI could mirror would reach another thread's variables
                st.conflict = (f"the running thread's %gs base {gs.base:#x} is not the %fs twin's "
                               f"{st.twin.base:#x} (its TLS slot {st.tcb_slot} holds no TCB to mirror)")
        return st.conflict


def attach_fs_abi(domain) -> FsTwinABI:
    """Give any domain the fs-twin ABI (run a statically rewritten binary under emulate/flip/native)."""
    return FsTwinABI(getattr(domain.strategy, "counters", None)).attach(domain)


def code_origin(domain, address: int) -> tuple | None:
    """(file node, file offset) of the byte at ``address``: what a patch there was written over. A guest
    that unmaps or replaces the page has other bytes there, which are not the patch's to restore."""
    objects = getattr(domain.process, "objects", None)
    m = objects.mapping_at(address) if objects is not None else None
    return None if m is None else (id(m.node), m.offset + (address - m.start))


def effective_policy(domain, policy: str) -> str:
    """``auto`` resolved for this process: ``lib`` if it has a program interpreter, else ``exe``."""
    if policy != "auto":
        return policy
    return "lib" if getattr(domain.process, "interp", None) is not None else "exe"


def _under(path: str, directory: str) -> bool:
    path, directory = posixpath.normpath(path), posixpath.normpath(directory)
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")


def patch_allowed(domain, address: int, size: int, policy: str,
                  patch_dir: str = DEFAULT_PATCH_DIR) -> tuple[bool, str]:
    policy = effective_policy(domain, policy)
    if policy == "none":
        return False, "patch policy none"
    r = domain.vcpu.mem.region_at(address)
    if r is None or not r.prot & PROT_EXEC:
        return False, "not in an executable mapping"
    if policy == "all":
        return True, "ok"
    if policy == "lib":
        objects = domain.process.objects
        first, last = objects.mapping_at(address), objects.mapping_at(address + size - 1)
        if first is None or last is None or first.node is not last.node:
            return False, "not in one file mapping (patch policy lib)"
        if first.node is domain.process.exe_node():
            return False, "the executable, not a library (patch policy lib)"
        if not _under(first.path, patch_dir):
            return False, f"{first.name} was mapped from outside {patch_dir} (patch policy lib)"
        if objects.has_writable_shared_mapping(first.node):
            return False, f"{first.name} has a writable shared mapping (not safe to patch)"
        return True, "ok"
    image = getattr(domain.process, "image", None)
    if P.file_offset_of(image, address) is None or P.file_offset_of(image, address + size - 1) is None:
        return False, "not in the executable's file-backed mapping (patch policy exe)"
    return True, "ok"


@dataclass(frozen=True)
class PatchOptions:
    """Options of the patching strategies (see the module docstring)."""

    patch_policy: str = "auto"
    page_sharing: str = "shared"

    def __post_init__(self) -> None:
        check_patch_options(self.patch_policy, self.page_sharing)


class PatchesCode(WatchesLeaks):
    """What both patching strategies share: their options and leak watching."""

    @property
    def patch_policy(self) -> str:
        return self.options.patch_policy

    @property
    def page_sharing(self) -> str:
        return self.options.page_sharing


@dataclass
class SiteState:
    """rewrite's sites in one address space."""

    patched: dict[int, int] = field(default_factory=dict)   # site eip -> address of the rewritten prefix
    mixed: set[int] = field(default_factory=set)             # sites un-patched: they serve both signs
    origin: dict[int, tuple] = field(default_factory=dict)   # site eip -> (file node, file offset) of its prefix

    def copy(self) -> SiteState:
        return SiteState(dict(self.patched), set(self.mixed), dict(self.origin))


class RewriteStrategy(PatchesCode, Strategy):
    name = "rewrite"
    order = 30
    description = "Jakub's in-place prefix rewrite: -ve %gs sites become %fs (65->64), %fs = expand-down twin"
    Options = PatchOptions

    def __init__(self, options: PatchOptions | None = None) -> None:
        super().__init__(options)
        self.patch_set: P.PatchSet | None = None
        self.abi: FsTwinABI | None = None
        self.domain = None
        self._spaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # vcpu -> SiteState
        self.hazards: list[str] = []

    def attach(self, domain) -> None:
        self.domain = domain
        self.patch_set = P.new_patch_set(domain, self.name)
        self.patch_set.abi = FsTwinABI.abi_name
        self.abi = FsTwinABI(self.counters).attach(domain)
        self.watch_leaks(domain)

    def attach_process(self, domain, process, how: str) -> str | None:
        """Patched sites are one address space's code: a fork's child has the parent's (its memory is a
        copy), an exec'd image starts unpatched (the model maps file pages as the file holds them)."""
        if how == "fork":
            self._spaces[process.vcpu] = self.sites().copy()   # the fork runs in the parent
        return None

    def sites(self, vcpu=None) -> SiteState:
        """The running process's patched and mixed sites."""
        return space_state(self._spaces, self.domain.vcpu if vcpu is None else vcpu, SiteState)

    @property
    def patched(self) -> dict[int, int]:
        return self.sites().patched

    @property
    def mixed(self) -> set[int]:
        return self.sites().mixed

    # ------------------------------------------------------------ faults
    def before_decode(self, trap: Trap) -> Verdict | None:
        v = trap.violation
        c = self.counters
        conflict = self.abi.check()
        if v.segment == "fs":
            if self.page_sharing == "shared":   # another process may have rewritten the site: decode to ask
                insn = fetch_and_decode(trap.domain, v.eip)
                c.decodes += 1
                if not isinstance(insn, DecodeError):
                    self._learn_shared(trap.domain, v.eip, insn)
            if v.eip in self.patched and conflict is None:
                self._unpatch(trap.domain, v.eip)
                return Verdict.restart()
            c.count("refused-fs")
            return Verdict.kill(f"rewrite refuses: guest uses %fs itself ({conflict})" if conflict
                                else f"fault on %fs at a site rewrite did not patch: {v.reason}")
        if conflict is not None:
            c.count("refused-fs-in-use")
            return Verdict.kill(f"rewrite refuses: guest uses %fs itself ({conflict})")
        return None

    def step(self, trap: Trap, insn) -> Verdict:
        v = trap.violation
        domain = trap.domain
        negative = bool(v.offset & 0x80000000) and not v.descriptor.expand_down
        self._learn_shared(domain, v.eip, insn)
        if negative and v.eip not in self.mixed:
            why = self._try_patch(domain, v, insn)
            if why is None:
                return Verdict.restart()
            self.counters.count(f"flip: {why}")
        return self._flip(domain, v)

    def _flip(self, domain, v) -> Verdict:
        c = self.counters
        flipped = xen.flip(v.descriptor, v.offset, domain.policy.profile, size=v.size)
        if flipped is None:
            return Verdict.kill(f"genuine fault: {v.reason}")
        domain.vcpu.set_descriptor(layout.selector_index(v.selector), flipped)
        c.descriptor_writes += 1
        c.count("flip-to-expand-down" if flipped.expand_down else "flip-to-expand-up")
        return Verdict.restart()

    def _learn_shared(self, domain, eip: int, insn) -> None:
        """What another process did to this site's page-cache page (shared patches reach every
        mapping of the page): a site this address space has not met may already be rewritten, or
        un-patched as mixed."""
        if self.page_sharing != "shared":
            return
        st = self.sites()
        seg_at = _segment_prefix_at(insn)
        if eip in st.mixed or seg_at is None:
            return
        page_cache = getattr(domain.process, "page_cache", None)
        last = page_cache.shared_patch_at(eip + seg_at) if page_cache is not None else None
        if last is None:
            return
        if last.old == b"\x64" and last.new == b"\x65":   # un-patched, here or elsewhere: serves both signs
            st.patched.pop(eip, None)
            st.mixed.add(eip)
        elif last.new == b"\x64" and insn.raw[seg_at] == 0x64:
            st.patched[eip] = eip + seg_at

    def _try_patch(self, domain, v, insn) -> str | None:
        """Rewrite the site's gs prefix; None on success, else why not."""
        if not self.abi.installed and not self.abi.install(v.descriptor):
            return f"no %fs twin ({self.abi.conflict})"
        raw = insn.raw
        seg_at = _segment_prefix_at(insn)
        if seg_at is None or raw[seg_at] != 0x65:
            return "no gs override prefix to rewrite"
        addr = v.eip + seg_at
        ok, why = patch_allowed(domain, addr, 1, self.patch_policy)
        if not ok:
            return why
        P.patch_code(domain, addr, b"\x64", patch_set=self.patch_set, kind="prefix-65-to-64",
                     instruction=P.disassemble(raw, v.eip), expect=b"\x65",
                     why=f"-ve %gs offset {v.offset:#x} faulted; the site now uses %fs (expand-down twin)",
                     shared=self.page_sharing == "shared")
        self.patched[v.eip] = addr
        self.sites().origin[v.eip] = code_origin(domain, addr)
        self.counters.patches += 1
        return None

    def _unpatch(self, domain, eip: int,
                 why: str = "a +ve offset reached the rewritten site: it serves both signs",
                 kind: str = "unpatched-mixed-site") -> None:
        """Give the site its gs prefix back; it is *mixed* from then on (never patched again)."""
        addr = self.patched.pop(eip)
        insn = fetch_and_decode(domain, eip)
        text = P.disassemble(insn.raw, eip) if not isinstance(insn, DecodeError) else "??"
        P.patch_code(domain, addr, b"\x65", patch_set=self.patch_set, kind="unpatch", instruction=text,
                     expect=b"\x64", why=why, shared=self.page_sharing == "shared")
        self.mixed.add(eip)
        self.counters.count(kind)
