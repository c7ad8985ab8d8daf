"""Run a guest on the real CPU under the ptrace supervisor: ``run_hw`` -> ``HwResult``.

The run is set up to match the Unicorn model's (``tlslab.experiment``): the
same argv, exactly the model's environment (``tlslab.linux.process.DEFAULT_ENV``),
cwd = the synthetic tree materialised from the same spec (or a host
directory), stdin an empty pipe, and stdout/stderr of the same kind (a pipe, a
regular file or /dev/null -- the kind changes what glibc does, see docs/measurements.md#glibc).

Strategies: ``untraced`` (fork/exec/wait, no tracer), ``native`` (traced, nothing
truncated), ``emulate``, ``flip``, and the online strategies ``online-site``,
``online-rate`` (its clock, instructions since the previous fault up to the
rule's cap, counted by single-stepping: tlslab/hw/supervisor/rate.c),
``online-probe`` and ``online-lookahead`` (the latter with the model's C walk
ahead of the fault, ``tlslab/x86/_ahead.c``, over the tracee's memory; its
``budget`` is the model strategy's): the supervisor runs the rules of
``tlslab.hypervisor.strategies`` (their specification) with the
decision threshold of the run's cost profile (``RunSpec.prices``,
``emulate_ns``, ``flip_ns``; the supervisor computes ``2 * flip_ns /
emulate_ns`` from the prices passed at full precision and reports it, and
``run_hw`` checks it equals the model's), and reports the model's counters
(``HwResult.online``). ``online-patch`` also rewrites guest code: the
supervisor runs the model's rule with the fs-twin ABI in GDT entry 13
(``%fs`` = 0x6b, the model's slot 7 and 0x3b) and patches private copies of
code pages through /proc/PID/mem (tlslab/hw/supervisor/patch.c, which says
where Linux and the model differ); ``patch_policy`` is the model's option.
Faults are counted per site (EIP).

Processes and threads: the supervisor follows every fork, vfork, clone and
execve of the guest (ptrace's TRACEFORK/VFORK/CLONE/EXEC options; a new task
is traced from its first instruction and its TLS descriptors -- inherited, or
installed untruncated by the kernel for CLONE_SETTLS -- are truncated before
it runs), handles each task's faults on that task, and counts per process
(``HwResult.processes``; ``faults`` is the total). A site belongs to one
program image of one process; ``object_sites`` names it by (object, offset)
from that image's own mappings and sums over processes. The run ends with
the guest's first process, as in the model: processes it leaves running are
killed then (``summary["orphans_killed"]``, ``killed`` in their entries); at
the timeout, or when the guest starts more than ``max_procs`` processes, the
whole tree is killed (``HwResult.stopped``).

The jail. The model promises that a guest never writes the host, so every
hw run is jailed (needs root; refused with one line otherwise, and a host
that refuses mount namespaces fails the run with one line -- never an
unjailed run). The guest runs with the model's credentials (uid/gid 1000, no
supplementary groups, so no capabilities) and chrooted (a chrooted process
may not create a user namespace, the way out of a chroot); mounts it needs
are made in a private mount namespace that disappears with it, the host's
mount table is never touched. Ways out that are no path are closed too: its
own network and IPC namespaces (no host daemon, socket or SysV segment; the
model has no network), and a seccomp filter in every strategy refusing
ptrace, process_vm_readv/writev, process_madvise and pidfd_* with ENOSYS, as
the model does (a uid-1000 guest could drive an unjailed host process of
that uid). Signals still reach host processes of uid 1000 (a PID namespace
would make the guest init, whose signal rules differ).

Runs without a root filesystem (static guests): the guest's working
directory is an overlayfs of its data tree (the materialised ``tree``,
``root`` or the current directory, bound read-only as the lower layer) whose
upper layer is a size-bounded tmpfs: what the model lets the guest write
(its tree, owned by uid 1000 as in the model: ``materialised_tree`` chowns
the host copy) it writes into that throwaway copy, as into the model's
in-memory overlay. Its ``/`` is a tmpfs holding the tree's top-level entries
(bound, so ``/x`` is ``./x`` as in the model), ``/dev`` (null, zero, urandom,
random) and ``/proc/self/exe``, a symlink with the model's text (static glibc
reads it at start-up and mallocs its directory; a procfs would expose
/proc/PID/root of host processes). The model hides dev and proc from the
root's listing, a directory cannot, so the working directory is the overlay
itself, detached from every path: ``.`` lists exactly the tree, and ``..``
from it stays there (the model's root is its own parent). Differences left:
``/`` lists dev and proc, entries created at the top level during the run
are reachable only relative to the cwd, creating directly in ``/`` fails
with EACCES, getcwd fails with ENOENT (the model: ``/``), /proc/self/exe
cannot be opened. The guest binary is opened before the jail and executed
by descriptor.

Root-filesystem runs (``RunSpec.rootfs``, dynamic guests): the guest runs
chrooted into the materialised root (``tlslab.rootfs``) with the model's argv
(argv[0] as the guest knows its path), environment (``experiment.environment``)
and credentials: it can write neither the root nor the host; cwd ``/``. A
program of the root is executed by its path inside the chroot (AT_EXECFN as
``chroot ROOT PROG`` gives it); a bundled guest outside the root is opened
before the chroot and executed by descriptor, the kernel finding its
PT_INTERP inside the root. The guest's ``/`` is a view in the private mount
namespace: a tmpfs (writable by root only) with read-only bind mounts of the
root's top-level entries, a writable overlay of the data tree at ``tree_at``
(the cwd) when there is one (its writes in a size-bounded tmpfs outside the
view, gone with the guest, as in the model's overlay), and, where the root has none, the model's ``/dev`` (null,
zero, urandom, random) and ``/proc/self/exe`` (a static symlink to the
model's path of the program: a program the guest executes sees the same
link, where the model's follows each exec); the root is never touched.
``/`` lists dev and proc, as the model's root filesystem does.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tlslab.hw.build import BuildError, supervisor_path
from tlslab.linux.nodes import GUEST_GID, GUEST_UID
from tlslab.machine.cpuid import render_table

HW_STRATEGIES = ("untraced", "native", "emulate", "flip", "online-site", "online-rate", "online-probe",
                 "online-lookahead", "online-patch")
STDOUT_MODES = ("pipe", "file", "null")
TRUNCATING = ("emulate", "flip", "online-site", "online-rate", "online-probe", "online-lookahead", "online-patch")
ONLINE = ("online-site", "online-rate", "online-probe", "online-lookahead", "online-patch")   # decide per fault with a threshold from two prices
#: strategies of the model the supervisor cannot run, and why (one line each)
#: online-patch's patch policies the supervisor applies (tlslab.hypervisor.patchpolicy.PATCH_POLICIES)
HW_PATCH_POLICIES = ("auto", "lib", "exe", "all", "none")


class HwError(RuntimeError):
    """The supervisor could not run the guest (one-line reason)."""


class HwUnavailable(HwError):
    """This host cannot run the hw backend at all: no ptrace, no 32-bit exec, no compiler."""


@dataclass
class HwResult:
    strategy: str
    status: int | None          # exit status; None if killed by a signal
    signal: int                 # terminating signal (SIGSEGV when a fault was delivered), else 0
    stdout: bytes
    stderr: bytes
    faults: int                 # #GP stops handled or delivered
    sites: list[dict]           # per EIP: faults, emulated, stepped, to_expand_down/up, delivered, ...
    wall_seconds: float         # fork -> reaped
    run_seconds: float          # exec -> reaped (untraced: from just before the execve, after the jail)
    cpu: int
    summary: dict = field(repr=False, default_factory=dict)   # the supervisor's whole JSON

    @property
    def ok(self) -> bool:
        return self.signal == 0 and not self.summary.get("timed_out") and not self.summary.get("stopped")

    @property
    def stopped(self) -> str | None:
        """Why the supervisor killed the guest's process tree ("timeout", "max_procs", ...), or None."""
        return self.summary.get("stopped")

    def _guest_path(self, path: str) -> str:
        """A host path as the chrooted guest sees it (unchanged outside a chroot)."""
        jail = self.summary.get("chroot")
        if jail and (path + "/").startswith(jail.rstrip("/") + "/"):
            return "/" + path[len(jail.rstrip("/")):].lstrip("/")
        return path

    @property
    def processes(self) -> list[dict]:
        """Every process the guest ran, in creation order: pid, ppid, program (as the guest sees it,
        after its last execve; a forked child that did not exec runs its parent's), programs (one per
        image), tasks (threads included), exited/status/signal/killed, and its counters (faults,
        emulated, stepped, flips = to_expand_down + to_expand_up, delivered, tls_installs, ...)."""
        images = self.summary.get("images", [])
        out = []
        for p in self.summary.get("processes", []):
            progs = [self._guest_path(images[i]["program"]) for i in p.get("images", []) if i < len(images)]
            out.append({**p, "program": self._guest_path(p.get("program", "")), "programs": progs})
        return out

    @property
    def fault_sites(self) -> dict[int, int]:
        """EIP -> faults at that instruction (summed over processes: with several programs, EIPs of different
        images can coincide; ``object_sites`` keeps them apart)."""
        out: dict[int, int] = {}
        for s in self.sites:
            if s["faults"]:
                out[s["eip"]] = out.get(s["eip"], 0) + s["faults"]
        return out

    @property
    def objects(self) -> list[dict]:
        """The guest's file mappings at its exit (path, start, end, offset, perms), as /proc/PID/maps
        gives them (symlinks resolved); paths inside the chroot are given as the guest sees them."""
        return [{**m, "path": self._guest_path(m["path"])} for m in self.summary.get("objects", [])]

    def image_objects(self, image: int) -> list[dict]:
        """The file mappings of one program image (``sites[i]["image"]``), read at its process's exit or
        before its execve, paths as the guest sees them."""
        images = self.summary.get("images", [])
        if not 0 <= image < len(images):
            return []
        return [{**m, "path": self._guest_path(m["path"])} for m in images[image].get("objects", [])]

    def object_sites(self) -> dict[tuple[str, int], int]:
        """(object path, file offset) -> faults: fault sites independent of load addresses, each site named
        with the mappings of its own process image and summed over all processes."""
        per_image: dict[int, list[dict]] = {}
        sites: dict[tuple[str, int], int] = {}
        for s in self.sites:
            eip, n = s["eip"], s["faults"]
            if not n:
                continue
            image = s.get("image")
            if image is None or image < 0:
                maps = self.objects
            else:
                if image not in per_image:
                    per_image[image] = self.image_objects(image)
                maps = per_image[image]
            key = next(((m["path"], eip - m["start"] + m["offset"]) for m in maps if m["start"] <= eip < m["end"]),
                       ("?", eip))
            sites[key] = sites.get(key, 0) + n
        return sites

    @property
    def decoder_misses(self) -> dict[str, int]:
        return dict(self.summary.get("decoder_misses", {}))

    @property
    def descriptor_switches(self) -> int:
        return int(self.summary.get("descriptor_switches", 0))

    @property
    def online(self) -> dict | None:
        """An online strategy's counts as the model reports them (None for the other strategies).

        ``by_kind`` and ``descriptor_writes`` are the model's ``StrategyCounters`` fields for the same
        run (equal to them when hw and model take the same decisions); ``faults``, ``emulations``,
        ``flips`` and ``probes`` are what ``tlslab hybrid`` derives from those counters: emulations =
        instructions the supervisor emulated or single-stepped, flips = flips + probes ended by a
        flip. Also ``threshold`` and ``probe_cap`` (int(threshold) + 1) as the supervisor used them.
        """
        on = self.summary.get("online")
        if on is None:
            return None
        kinds = dict(on.get("by_kind", {}))
        return {"faults": self.faults,
                "emulations": int(self.summary.get("emulated", 0)) + int(self.summary.get("stepped", 0)),
                "flips": kinds.get("flip", 0) + kinds.get("probe-flip", 0),
                "probes": kinds.get("probe", 0),
                "descriptor_writes": int(on.get("descriptor_writes", 0)),
                "by_kind": kinds,
                "threshold": on.get("threshold"),
                "probe_cap": on.get("probe_cap"),
                "unknown_sign": int(on.get("unknown_sign", 0)),
                "patches": int(on.get("patches", 0)),
                "refused": int(on.get("refused", 0)),
                "rate_steps": int(on.get("rate_steps", 0))}

    def counters(self) -> dict:
        keys = ("faults", "emulated", "stepped", "to_expand_down", "to_expand_up", "delivered",
                "descriptor_switches", "tls_installs", "ldt_installs", "threads", "other_sigsegv",
                "processes_started")
        out = {k: self.summary.get(k, 0) for k in keys} | {"decoder_misses": self.decoder_misses}
        if self.online is not None:
            out["online"] = self.online
        return out


# ----------------------------------------------------------------- trees
_TREES: dict[str, str] = {}
_TREE_PARENT: list[str] = []


def _cleanup_trees() -> None:
    for parent in _TREE_PARENT:
        shutil.rmtree(parent, ignore_errors=True)


TREE_BASES = ("/dev/shm", None)   # tmpfs first: its readdir order is creation order (or its reverse)


def _model_children(tree) -> dict[str, list]:
    """Per directory, the entries in the order the model's VFS lists them (attach order)."""
    children: dict[str, list] = {"": []}
    for e in tree.entries:
        children.setdefault(os.path.dirname(e.path), []).append(e)
        if e.kind == "dir":
            children.setdefault(e.path, [])
    return children


def _write_ordered(tree, dest: str, reverse: bool) -> None:
    """Like SyntheticTree.materialise, but creating each directory's children in a chosen order.

    readdir order decides what order glibc's malloc sees strdup'ed names in,
    and so the fault counts of a directory walker: the host listing must be
    the model's. ext4 lists in hash order; tmpfs in creation order or its
    reverse (depending on the kernel), which we can reproduce. The model's
    ``Dir.listing()`` is the reference.
    """
    children = _model_children(tree)
    os.makedirs(dest)

    def fill(rel: str) -> None:
        kids = children.get(rel, [])
        for e in (reversed(kids) if reverse else kids):
            tree.create_entry(e, dest)
        for e in kids:
            if e.kind == "dir":
                fill(e.path)

    fill("")
    for e in reversed(tree.entries):
        full = os.path.join(dest, e.path)
        if e.kind != "symlink":
            os.chmod(full, e.mode)
        os.utime(full, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    os.chmod(dest, 0o755)
    os.utime(dest, ns=(tree.root_mtime_ns, tree.root_mtime_ns))


def listing_matches_model(tree, root: str) -> bool:
    """Does every host directory list its entries in the order the model's VFS does?"""
    from tlslab.linux.vfs import Vfs

    vfs = Vfs.from_tree(tree)
    for rel in _model_children(tree):
        node = vfs.root if not rel else vfs.resolve(rel.encode())
        want = [name.decode() for name, _ in node.listing()]
        if os.listdir(os.path.join(root, rel) if rel else root) != want:
            return False
    return True


def materialised_tree(spec: str, fresh: bool = False) -> str:
    """A host copy of synthetic tree ``spec`` whose readdir order is the model's, if the host allows.

    Cached per process unless ``fresh``. Tries a tmpfs (/dev/shm) with both
    creation orders, then the default temp dir; ``tree_order_matches(root)``
    tells whether the order could be matched (on ext4 it cannot: hash order).
    """
    from tlslab.linux.tree import SyntheticTree, TreeSpec

    key = str(TreeSpec.parse(spec))
    if not fresh and key in _TREES and os.path.isdir(_TREES[key]):
        return _TREES[key]
    tree = SyntheticTree(key)
    root = None
    for base in TREE_BASES:
        if base is not None and not os.access(base, os.W_OK):
            continue
        parent = tempfile.mkdtemp(prefix="tlslab-hw-tree-", dir=base)
        _TREE_PARENT.append(parent)
        if len(_TREE_PARENT) == 1:
            atexit.register(_cleanup_trees)
        for reverse in (True, False):
            candidate = os.path.join(parent, f"root{int(reverse)}")
            _write_ordered(tree, candidate, reverse)
            if listing_matches_model(tree, candidate):
                root = candidate
                break
            shutil.rmtree(candidate)
        if root:
            break
    if root is None:  # order cannot be matched here: still a faithful tree, in the default order
        root = tree.materialise(os.path.join(_TREE_PARENT[-1], "root"))
        _ORDER_MISMATCH.add(root)
    _own_as_guest(root)
    if not fresh:
        _TREES[key] = root
    return root


def _own_as_guest(root: str) -> None:
    """Give the tree the model's owner (uid/gid 1000 own every node of a synthetic tree), if we may.

    The jailed guest runs as that user: as in the model, it may then write its
    tree -- into the overlay that hides the host copy (see ``run_hw``).
    """
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), GUEST_UID, GUEST_GID, follow_symlinks=False)
    os.chown(root, GUEST_UID, GUEST_GID)


_ORDER_MISMATCH: set[str] = set()


def tree_order_matches(root: str) -> bool:
    return root not in _ORDER_MISMATCH


# ----------------------------------------------------------------- running
def _default_env() -> list[str]:
    from tlslab.linux.process import DEFAULT_ENV

    return [e.decode() for e in DEFAULT_ENV]


def _hv_start(profile: str) -> int:
    from tlslab.x86.xen import get_profile

    return get_profile(profile).hypervisor_start


def run_hw(
    guest_path: str | os.PathLike,
    argv: list[str] | None = None,
    strategy: str = "emulate",
    tree: str | None = "small",
    root: str | os.PathLike | None = None,
    stdout: str = "pipe",
    cpu: int | None = 0,
    profile: str = "nonpae",
    env: list[str] | None = None,
    timeout: float = 120.0,
    fresh_tree: bool = False,
    step_only: bool = False,
    model_env: bool = True,
    model_cpuid: bool | None = None,
    chroot: str | os.PathLike | None = None,
    exe_in_root: str | None = None,
    tree_at: str = "/data",
    uid: int | None = None,
    gid: int | None = None,
    max_procs: int = 1024,
    exe_path: str | None = None,
    prices: tuple[float, float] | None = None,
    budget: int | None = None,
    trace: str | os.PathLike | None = None,
    patch_policy: str = "auto",
) -> HwResult:
    """Run ``guest_path`` natively with ``argv`` (argv[0] included; default its basename).

    cwd is ``root`` if given, else the synthetic ``tree`` materialised on disk
    (None: the current directory). ``cpu=None`` or ``-1`` leaves tracer and
    guest unpinned (slow and noisy: docs/measurements.md#cpu). ``step_only`` makes emulate use
    its single-step fallback for every fault (a test of the fallback).
    ``model_env`` (default) gives the guest the model's process environment:
    no vDSO/AT_MINSIGSTKSZ/AT_RSEQ_* in the auxv and rseq refused with ENOSYS
    (the binary itself is never modified), and a fixed address space with room
    above the stack: personality ADDR_NO_RANDOMIZE | ADDR_LIMIT_3GB, so the
    i386 stack ends at 0xC0000000 (the 3G/1G split of a 2004 Linux) instead of
    a random 0..8 MiB below 4 GiB. The model's stack ends at 1 GiB with
    nothing mapped for GiBs above it; programs that look for the end of their
    stack (gnulib's c-stack in grep: mincore probes of up to 4 MiB above it,
    halving down to a page, each failure an errno write, i.e. a %gs fault) make
    as many failing probes as in the model, and the same number in every run.
    Every run is jailed (module docstring; needs root, else HwUnavailable).
    Without ``chroot``, the cwd (``root``, the tree or the current directory)
    becomes the guest's working directory in a throwaway overlay. Either way
    ``exe_path`` (default ``exe_in_root``, else ``/bin/`` + argv[0]'s basename:
    the model's path of the program) is what /proc/self/exe reads, and /dev
    has null, zero, random and urandom, as in the model.
    ``chroot``: run chrooted into this directory. The guest is
    then ``exe_in_root`` (a path inside it) if given, else ``guest_path``
    executed by descriptor; cwd is ``/``, or ``tree_at`` with the data tree
    (``root`` or ``tree``; None for neither) mounted there in a private mount
    namespace. ``uid``/``gid``: drop to these after chroot (default: the model's,
    1000). ``max_procs``: processes the guest may
    start in all (itself included); one more, or the ``timeout``, and the supervisor kills the whole
    process tree and reports it (``HwResult.stopped``; ``timed_out`` for the timeout).
    ``prices``: (emulate_ns, flip_ns), required by the online strategies (``run_spec`` takes them
    from the spec's cost profile as the model does); the threshold the supervisor reports must be
    the model's ``2 * flip_ns / emulate_ns`` exactly (else HwError). ``budget``: online-lookahead's
    instructions decoded ahead per fault (1..4096; None: the supervisor's default, the model's 32).
    ``model_cpuid``: answer every ``cpuid`` of the guest with the model vCPU's
    (CPUID faulting, ``tlslab.machine.cpuid``): glibc then picks the string
    functions it picks in the model, so the guest retires the model's
    instructions. None (default): only for ``online-rate`` with ``model_env``,
    whose clock counts them. Not by default elsewhere because it is not free:
    a task with CPUID faulting on has the faulting MSR rewritten at every switch
    to and from it, a VM exit here, which tripled keir's time under emulate
    (1.38 s -> 4.46 s, 184,489 faults, the same count); fault counts do not
    depend on the string functions glibc picks. An image that cannot turn
    faulting on is counted in ``summary["cpuid"]["refused"]``; ``untraced``
    has no tracer to answer and always runs with the host's.
    ``patch_policy``: online-patch's (the model's ``patch_policy`` option: auto, lib, exe, all, none).
    ``trace``: a file the supervisor writes one line per fault to (``EIP OFFSET``), and under
    online-rate one per %gs fault decided (``gap EIP INSTRUCTIONS``: the clock's reading, capped).
    Raises HwUnavailable when the host cannot do this at all, HwError when the
    supervisor failed for this run.
    """
    if strategy not in HW_STRATEGIES:
        raise ValueError(f"unknown hw strategy {strategy!r} (choose from {', '.join(HW_STRATEGIES)})")
    threshold = None
    if strategy in ONLINE:
        if prices is None:
            raise ValueError(f"hw strategy {strategy} needs prices=(emulate_ns, flip_ns)")
        emulate_ns, flip_ns = (float(p) for p in prices)
        if not (0 < emulate_ns <= 1e12 and 0 < flip_ns <= 1e12):
            raise ValueError(f"hw strategy {strategy}: prices must be in (0, 1e12] ns, not {prices!r}")
        threshold = 2 * flip_ns / emulate_ns   # OnlineStrategy.threshold's expression
    if patch_policy not in HW_PATCH_POLICIES:
        raise ValueError(f"patch policy {patch_policy!r} is not one of {', '.join(HW_PATCH_POLICIES)}")
    if budget is not None and (strategy != "online-lookahead" or isinstance(budget, bool)
                               or not isinstance(budget, int) or not 1 <= budget <= 4096):
        raise ValueError(f"budget {budget!r}: online-lookahead's instructions per fault, 1 to 4096")
    if stdout not in STDOUT_MODES:
        raise ValueError(f"hw stdout kind {stdout!r} is not one of {', '.join(STDOUT_MODES)}")
    guest_path = os.path.abspath(os.fspath(guest_path))
    if not os.path.isfile(guest_path):
        raise HwError(f"guest {guest_path} does not exist")
    argv = list(argv) if argv else [os.path.basename(guest_path)]
    try:
        exe = supervisor_path()
    except BuildError as exc:
        raise HwUnavailable(str(exc)) from None
    if os.geteuid() != 0:
        raise HwUnavailable(ROOT_NEEDED)
    if root is not None:
        cwd = os.fspath(root)
    elif tree is not None:
        cwd = materialised_tree(tree, fresh=fresh_tree)
    else:
        cwd = None if chroot is not None else os.getcwd()
    cpu = -1 if cpu is None else int(cpu)
    uid = GUEST_UID if uid is None else uid
    gid = GUEST_GID if gid is None else gid

    with tempfile.TemporaryDirectory(prefix="tlslab-hw-") as work:
        json_path = os.path.join(work, "summary.json")
        jail: list[str] = []
        if chroot is not None:
            chroot = os.fspath(chroot)
            if not os.path.isdir(chroot):
                raise HwError(f"root filesystem {chroot} is not a directory")
            # always a view: the root's entries bound read-only on a private tmpfs, plus the /dev and
            # /proc/self/exe the model mounts on every root (a Debian root has neither)
            view = os.path.join(work, "view")
            os.mkdir(view, 0o700)
            jail = ["--chroot", chroot, "--view", view,
                    "--exe-path", exe_path or exe_in_root or "/bin/" + os.path.basename(argv[0])]
            if cwd is not None:  # the data tree, mounted at tree_at in the guest's private namespace
                if not tree_at.startswith("/") or tree_at.rstrip("/") == "":
                    raise HwError(f"cannot mount the data tree at {tree_at}: not an absolute path below /")
                scratch = os.path.join(work, "scratch")   # the tree's overlay writes (outside the view)
                os.mkdir(scratch, 0o700)
                jail += ["--mount-src", os.path.abspath(cwd), "--mount-at", tree_at, "--scratch", scratch]
                cwd = tree_at
            else:
                cwd = "/"
            if exe_in_root is None:
                jail.append("--exec-fd")
        else:  # no root filesystem: "/" is the data tree (or cwd), its writes in a private overlay
            if not os.path.isdir(cwd):
                raise HwError(f"data directory {cwd} is not a directory")
            view = os.path.join(work, "view")
            os.mkdir(view, 0o700)
            jail = ["--overlay", os.path.abspath(cwd), "--view", view, "--exec-fd",
                    "--exe-path", exe_path or "/bin/" + os.path.basename(argv[0])]
            cwd = None  # the tree itself (see the module docstring)
        jail += ["--uid", str(int(uid)), "--gid", str(int(gid))]
        cmd = [str(exe), "--strategy", strategy, "--hv-start", hex(_hv_start(profile)), "--cpu", str(cpu),
               *(["--cwd", cwd] if cwd is not None else []), "--json", json_path, "--timeout", str(timeout),
               "--max-procs", str(int(max_procs)), *jail]
        for e in env if env is not None else _default_env():
            cmd += ["--env", e]
        if threshold is not None:   # repr: the shortest string that reads back as the same double
            cmd += ["--emulate-ns", repr(emulate_ns), "--flip-ns", repr(flip_ns)]
        if budget is not None:
            cmd += ["--budget", str(budget)]
        if strategy == "online-patch":
            cmd += ["--patch-policy", patch_policy]
        if trace is not None:
            cmd += ["--trace", os.fspath(trace)]
        if step_only:
            cmd.append("--step-only")
        if model_env:
            cmd.append("--model-env")
        if model_cpuid if model_cpuid is not None else (model_env and strategy == "online-rate"):
            cpuid = os.path.join(work, "cpuid")
            Path(cpuid).write_text(render_table())
            cmd += ["--cpuid", cpuid]
        out_path = err_path = None
        if stdout == "file":
            out_path, err_path = os.path.join(work, "stdout"), os.path.join(work, "stderr")
            cmd += ["--stdout", out_path, "--stderr", err_path]
        elif stdout == "null":
            cmd += ["--stdout", "/dev/null", "--stderr", "/dev/null"]
        cmd += ["--", exe_in_root if chroot is not None and exe_in_root else guest_path, *argv]
        try:
            proc = subprocess.run(cmd, input=b"", capture_output=True, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            raise HwError(f"supervisor did not finish within {timeout + 30:.0f} s") from None
        summary = _read_summary(json_path, proc, guest_path)
        if threshold is not None and (summary.get("online") or {}).get("threshold") != threshold:
            raise HwError(f"the supervisor's {strategy} threshold {(summary.get('online') or {}).get('threshold')!r} "
                          f"is not the model's {threshold!r}")
        if stdout == "file":
            out = Path(out_path).read_bytes() if os.path.exists(out_path) else b""
            err = Path(err_path).read_bytes() if os.path.exists(err_path) else b""
        elif stdout == "null":
            out = err = b""
        else:
            out, err = proc.stdout, proc.stderr
    return HwResult(
        strategy=strategy,
        status=summary.get("status"),
        signal=int(summary.get("signal") or 0),
        stdout=out,
        stderr=err,
        faults=int(summary.get("faults", 0)),
        sites=summary.get("sites", []),
        wall_seconds=summary.get("wall_ns", 0) / 1e9,
        run_seconds=summary.get("run_ns", 0) / 1e9,
        cpu=cpu,
        summary=summary,
    )


def _is_i386_elf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return head[:4] == b"\x7fELF" and head[4] == 1 and int.from_bytes(head[18:20], "little") == 3


def _read_summary(json_path: str, proc: subprocess.CompletedProcess, guest_path: str = "") -> dict:
    summary = None
    if os.path.exists(json_path):
        with open(json_path) as f:
            summary = json.load(f)
    if summary is None:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise HwError(f"supervisor exited {proc.returncode} without a summary: {tail[0]}")
    error = summary.get("error")
    if error:
        stage, errno_ = summary.get("error_stage", ""), summary.get("error_errno", 0)
        if stage in ("PTRACE_TRACEME", "PTRACE_SETOPTIONS", "seccomp", "PR_SET_NO_NEW_PRIVS") or (
            # every run is jailed: a container that forbids chroot, mount namespaces or mounts
            errno_ == 1 and stage in ("chroot", "unshare(CLONE_NEWNS)", "unshare(CLONE_NEWNET|CLONE_NEWIPC)",
                                      "mount private /", "mount tmpfs view",
                                      "bind mount", "bind mount /dev", "remount bind read-only")
        ) or (
            # overlayfs missing (ENODEV), forbidden, or refusing this directory as its lower layer
            stage == "mount overlay"
        ) or (
            # ENOEXEC for a well-formed i386 ELF: the kernel has no 32-bit support (IA32_EMULATION off)
            stage == "execve" and errno_ == 8 and _is_i386_elf(guest_path)
        ):
            hint = {
                "PTRACE_TRACEME": " (ptrace refused: container seccomp/yama, or not permitted)",
                "execve": " (this kernel cannot execute 32-bit i386 programs)",
                "chroot": " (every hw guest runs chrooted)",
                "unshare(CLONE_NEWNS)": " (every hw guest runs in a private mount namespace)",
                "unshare(CLONE_NEWNET|CLONE_NEWIPC)": " (every hw guest runs without the host's network and IPC)",
                "mount overlay": " (a guest without a root filesystem runs on an overlayfs of its data tree)",
            }.get(stage, "")
            raise HwUnavailable(f"hw backend unavailable: {error}{hint}")
        raise HwError(f"supervisor failed: {error}")
    return summary


ROOT_NEEDED = ("the hw backend runs every guest jailed (a private mount namespace, chroot, uid 1000), "
               "which needs root")


def _i386_image(path):
    """The parsed i386 ELF at ``path``; HwError (one line) for anything else (64-bit, not ELF, ...)."""
    from tlslab.linux.elf import ElfError, parse_elf

    try:
        return parse_elf(path)[1]
    except ElfError as exc:
        raise HwError(str(exc)) from None


def run_spec(spec, cpu: int | None = 0, timeout: float | None = None) -> tuple[HwResult, object]:
    """Run a ``tlslab.experiment.RunSpec`` on the hardware (for ``tlslab run --backend hw``).

    Same program resolution (``experiment.resolve_program``), argv
    (``[argv0, *args]``), environment (``experiment.environment``), tree/root
    and stdout kind as the Unicorn model's ``execute(spec)``, jailed as uid/gid
    1000 (see the module docstring), which needs root: programs with a root
    filesystem (``rootfs``, or dynamic guests) chrooted into it, the others in
    an overlay of their data tree. Anything but an i386 ELF is refused
    (HwError); not being root raises HwUnavailable. ``spec.strategy`` must be
    one of HW_STRATEGIES; an online
    strategy decides with the prices the model's strategy takes from the spec
    (``prices``, ``emulate_ns``, ``flip_ns``). Returns ``(HwResult, GuestBinary)``.
    """
    from tlslab.experiment import environment, host_directory, resolve_program
    from tlslab.guests import resolve_guest

    prices = model_prices(spec) if spec.strategy in ONLINE else None
    budget = model_strategy(spec).lookahead.budget if spec.strategy == "online-lookahead" else None
    extra = {"patch_policy": model_strategy(spec).patch_policy} if spec.strategy == "online-patch" else {}

    rooted_path = bool(spec.rootfs) and spec.guest.startswith("/")
    if not rooted_path:  # a registry guest or host path: refuse non-i386 files before anything else
        _i386_image(resolve_guest(spec.guest, spec.variant).path)
    if os.geteuid() != 0:   # this host (user) cannot jail the guest: not bad input
        raise HwUnavailable(ROOT_NEEDED)
    try:
        program = resolve_program(spec)
    except ValueError as exc:  # ElfError from resolving a dynamic guest
        raise HwError(str(exc).splitlines()[0]) from None
    guest = program.guest
    _i386_image(guest.path)
    env = [os.fsdecode(e) for e in environment(spec, program.rootfs)]
    timeout = timeout if timeout is not None else (spec.timeout_seconds or 120.0)
    common = dict(strategy=spec.strategy, stdout=spec.stdout, cpu=cpu, profile=spec.profile, env=env,
                  timeout=timeout, prices=prices, budget=budget, **extra)
    root = host_directory(spec.root) if spec.root else None   # as the model resolves it
    if program.rootfs is None:
        return run_hw(guest.path, [program.argv0, *spec.args],
                      tree=None if root else (spec.tree or "small"), root=root,
                      exe_path=program.guest_path, **common), guest
    import inspect

    from tlslab.linux.vfs import Vfs

    creds = inspect.signature(Vfs).parameters  # the model's guest credentials: Vfs(uid=, gid=) defaults
    return run_hw(guest.path, [program.argv0, *spec.args],
                  tree=None if root else spec.tree, root=root,
                  chroot=program.root_dir, exe_in_root=program.guest_path if rooted_path else None,
                  tree_at=spec.tree_at, uid=creds["uid"].default, gid=creds["gid"].default,
                  exe_path=program.guest_path, **common), guest


def model_strategy(spec):
    """The model's strategy for ``spec``, made from the spec's options (``experiment``'s way; a bad option:
    HwError, one line)."""
    from tlslab.experiment import strategy_for
    from tlslab.hypervisor.strategies import StrategyOptionError

    try:
        return strategy_for(spec)
    except StrategyOptionError as exc:
        raise HwError(str(exc)) from None


def model_prices(spec) -> tuple[float, float]:
    """(emulate_ns, flip_ns) of an online strategy for ``spec``: the model's strategy's, so the threshold is
    the model's."""
    strategy = model_strategy(spec)
    strategy = getattr(strategy, "fallback", strategy)   # online-patch: online-probe decides what it does not patch
    return strategy.emulate_ns, strategy.flip_ns


# ----------------------------------------------------------------- checks
def policy_mismatches(result: HwResult, profile: str = "nonpae") -> list[str]:
    """Descriptors the supervisor installed that tlslab.x86.xen would not have.

    For every TLS install: installed == xen.truncate(requested), and the
    expand-down twin == xen.flip(installed, a negative offset) with
    xen.flip(twin, 0) == installed. Empty list: the C and Python policies agree.
    """
    from tlslab.x86 import xen
    from tlslab.x86.descriptor import UserDesc

    def desc(raw):
        e, b, lim, fl = raw
        return UserDesc(e, b, lim, *_flags(fl)).to_descriptor()

    problems = []
    truncating = result.strategy in TRUNCATING
    for rec in result.summary.get("tls", []):
        req, inst = desc(rec["requested"]), desc(rec["installed"])
        want = xen.truncate(req, profile) if truncating else req
        if rec["how"] == "modify_ldt":
            want = xen.truncate(req, profile)
        if inst != want:
            problems.append(f"{rec['how']}: installed {inst.describe()}, xen.truncate gives {want.describe()}")
        if "expand_down" in rec:
            dn = desc(rec["expand_down"])
            flipped = xen.flip(inst, 0xFFFFFFFC, profile)
            if flipped != dn:
                problems.append(f"expand-down twin {dn.describe()} != xen.flip {flipped and flipped.describe()}")
            elif xen.flip(dn, 0, profile) != inst:
                problems.append(f"flip back from {dn.describe()} does not give {inst.describe()}")
        elif truncating and rec["how"] != "modify_ldt" and xen.looks_like_truncated_flat(inst, profile):
            problems.append(f"{inst.describe()} is a truncated flat segment but the supervisor does not manage it")
    return problems


def _flags(fl: int) -> tuple:
    return (bool(fl & 1), (fl >> 1) & 3, bool(fl >> 3 & 1), bool(fl >> 4 & 1), bool(fl >> 5 & 1),
            bool(fl >> 6 & 1), bool(fl >> 7 & 1))
