"""Model cells on a Dask distributed cluster: ``tlslab bench --cluster ADDRESS`` (or ``local:N``).

What stays as with the local pool (``tlslab.bench.runner``):

* The driver (the ``tlslab bench`` process) is the only writer of
  ``cells.jsonl``: each finished cell's record comes back to it as the
  future's result and is appended with one ``write`` + ``fsync``
  (:class:`tlslab.bench.store.CellWriter`) before the cell counts as done.
  Killing the driver (even SIGKILL) loses at most the cells in flight, and
  ``--resume RUN --cluster ADDRESS`` runs exactly the cells without a record.
* A cell that raises is a *failed* record with the traceback (the worker runs
  :func:`tlslab.bench.runner.run_cell_safely`, the same function the local
  workers run); a guest crash is a measurement.
* hw cells never go to the cluster: they run afterwards in the driver, one at
  a time, pinned, exactly as without ``--cluster`` (their measurement is a
  wall time on the driver's CPU, compared with a profile calibrated there).

What the cluster adds:

* A worker lost in the middle of a cell (its process killed, its machine
  gone): the scheduler gives the cell to another worker (Dask's
  ``distributed.scheduler.allowed-failures`` retries, default 3). A cell that
  keeps killing its workers ends as a *failed* record whose reason says so
  (Dask's ``KilledWorker``). A cell is never recorded twice: the driver
  writes one record per future.
* No shared filesystem: a worker runs the tlslab it has installed (the same
  wheel on every machine). Every cell carries *claims* about its inputs by
  content hash: the bundled guest's sha256 (the worker resolves the name in
  its own package and refuses the cell, recorded failed with both hashes, on a
  mismatch); an external guest file travels as bytes and is cached on the
  worker under its sha256; a pinned root filesystem by its lock key (the
  worker materialises it from its own cache, ``tlslab rootfs fetch``, which
  downloads by the lock's sha256s; without it the cell is *skipped* as
  locally); a bundled data directory (``root = "guests/boot"``) by a hash of
  its files.
* The vCPU's own timeout (``timeout_seconds``) ends an overlong guest on the
  worker as locally. The local pool's hard deadline (timeout * 1.25 + 30 s,
  or ``kill_after_seconds``) is kept by the worker itself: a cell that
  overruns it SIGKILLs its own worker process (Dask cannot cancel a running
  task); the nanny starts a new worker, the scheduler retries the cell, and
  after the allowed failures it is recorded failed with the deadline in the
  reason.

Dask is optional (``pip install 'tlslab[cluster]'``); it is imported only here
and only when ``--cluster`` is given.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tlslab.bench.spec import Cell
from tlslab.record import Outcome

LOCAL_MAX = 256
_ADDRESS = re.compile(r"^(?:(?:tcp|tls|ucx|inproc|ws|wss)://)?[\w.\-\[\]:]+(?::\d+)?$")


class ClusterError(ValueError):
    """The cluster cannot be used (one-line reason)."""


@dataclass(frozen=True)
class ClusterSpec:
    address: str | None        # a scheduler address, or None for a LocalCluster
    local_workers: int = 0

    def describe(self) -> str:
        return f"local:{self.local_workers} (a Dask LocalCluster)" if self.address is None else self.address

    def run_cells(self, cells: list[Cell], finish, log=None, hard_timeout=None) -> None:
        """Open a connection, run the cells (:func:`run_cells`), close it."""
        run_cells(self, cells, finish, log=log, hard_timeout=hard_timeout)


def parse_cluster(value: str) -> ClusterSpec:
    """``local:N`` or a scheduler address (``tcp://host:8786``, ``host:8786``)."""
    value = (value or "").strip()
    if value.startswith("local:") or value == "local":
        n = value.partition(":")[2]
        if not n.isdigit() or not 1 <= int(n) <= LOCAL_MAX:
            raise ClusterError(f"--cluster {value!r}: local:N needs N in 1..{LOCAL_MAX} (worker processes)")
        return ClusterSpec(None, int(n))
    if not value or not _ADDRESS.match(value):
        raise ClusterError(f"--cluster {value!r}: give a Dask scheduler address (tcp://HOST:PORT) or local:N")
    return ClusterSpec(value)


def _dask():
    try:
        import distributed
    except ImportError:
        raise ClusterError("--cluster needs Dask: pip install 'tlslab[cluster]' (dask[distributed])") from None
    return distributed


class Connection:
    """A client, and the LocalCluster it started (closed together)."""

    def __init__(self, spec: ClusterSpec, connect_timeout: float = 10.0):
        distributed = _dask()
        self.spec = spec
        self.cluster = None
        try:
            if spec.address is None:
                import logging

                self.cluster = distributed.LocalCluster(
                    n_workers=spec.local_workers, threads_per_worker=1, processes=True,
                    dashboard_address=None, silence_logs=logging.ERROR)
                self.client = distributed.Client(self.cluster)
            else:
                self.client = distributed.Client(spec.address, timeout=f"{connect_timeout:g}s")
        except ClusterError:
            raise
        except Exception as exc:
            self.close()
            raise ClusterError(f"cannot use the Dask cluster {spec.describe()}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def run_cells(self, cells: list[Cell], finish, log=None, hard_timeout=None) -> None:
        """Run the cells on this connection (:func:`run_cells`); the connection stays open."""
        run_cells(self, cells, finish, log=log, hard_timeout=hard_timeout)

    def workers(self) -> int:
        try:
            return len(self.client.scheduler_info().get("workers", {}))
        except Exception:
            return 0

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
        if self.cluster is not None:
            try:
                self.cluster.close()
            except Exception:
                pass


# --------------------------------------------------------------------------- claims (driver side)

def tree_hash(path: Path) -> str:
    """sha256 over a directory's files: relative path, mode's executable bit, bytes (symlinks by target)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix().encode()
        if p.is_symlink():
            h.update(b"L" + rel + b"\0" + os.readlink(p).encode() + b"\0")
        elif p.is_file():
            h.update(b"F" + rel + b"\0" + (b"x" if os.access(p, os.X_OK) else b"-"))
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def claims(cell: Cell) -> dict:
    """What the worker must have, by content hash, to run ``cell`` as the driver would."""
    from tlslab import rootfs
    from tlslab.artifacts import GuestError, bundled_path
    from tlslab.experiment import DEFAULT_ROOTFS
    from tlslab.guests import resolve_guest

    spec = cell.spec
    out: dict = {}
    if spec.rootfs and spec.guest.startswith("/"):
        out["guest"] = {"kind": "rootfs", "name": spec.guest}
    else:
        try:
            g = resolve_guest(spec.guest, spec.variant)
        except GuestError:
            g = None            # the worker records the same one-line error
        if g is None:
            out["guest"] = {"kind": "unresolved"}
        elif g.variant == "external":
            out["guest"] = {"kind": "bytes", "sha256": g.sha256, "name": g.path.name, "data": g.path.read_bytes()}
        else:
            out["guest"] = {"kind": "bundled", "key": g.key, "sha256": g.sha256}
    name = spec.rootfs or (DEFAULT_ROOTFS if out["guest"].get("kind") == "bundled" and
                           spec.variant == "dyn" else None)
    if name:
        try:
            out["rootfs"] = {"name": name, "key": rootfs.lock_key(rootfs.lock_entry(name))}
        except Exception:
            pass
    if spec.root and not os.path.isabs(spec.root):
        path = bundled_path(spec.root)
        if path is not None and path.is_dir():
            out["root"] = {"name": spec.root, "sha256": tree_hash(path)}
    return out


# --------------------------------------------------------------------------- the worker side

def _refused(reason: str) -> dict:
    return {"outcome": Outcome.FAILED, "reason": f"refused on worker {socket.gethostname()}: {reason}",
            "traceback": None}


def _cached_guest(claim: dict) -> Path:
    from tlslab.artifacts import sha256_file, user_cache_dir

    data = claim["data"]
    if hashlib.sha256(data).hexdigest() != claim["sha256"]:
        raise ClusterError("the guest bytes received do not match their sha256")
    d = user_cache_dir() / "guests" / claim["sha256"]
    path = d / claim["name"]
    if path.is_file() and sha256_file(path) == claim["sha256"]:
        return path
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{claim['name']}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def check_claims(cell_dict: dict, claim: dict) -> tuple[dict, str | None]:
    """The cell to run here (an external guest rewritten to its cached copy), or the reason to refuse it."""
    from tlslab import rootfs
    from tlslab.artifacts import GuestError, bundled_path
    from tlslab.guests import resolve_guest

    cell_dict = copy.deepcopy(cell_dict)
    spec = cell_dict["spec"]
    g = claim.get("guest", {})
    if g.get("kind") == "bundled":
        try:
            mine = resolve_guest(spec["guest"], spec.get("variant", "default"))
        except GuestError as exc:
            return cell_dict, f"guest {g['key']}: {exc}"
        if mine.sha256 != g["sha256"]:
            return cell_dict, (f"guest {g['key']} here is sha256 {mine.sha256[:16]}..., the driver's is "
                               f"{g['sha256'][:16]}...: install the same tlslab wheel on every worker")
    elif g.get("kind") == "bytes":
        spec["guest"] = str(_cached_guest(g))
    r = claim.get("rootfs")
    if r:
        try:
            key = rootfs.lock_key(rootfs.lock_entry(r["name"]))
        except Exception as exc:
            return cell_dict, f"root filesystem {r['name']}: {exc}"
        if key != r["key"]:
            return cell_dict, (f"root filesystem {r['name']} is pinned here with lock key {key[:12]}, the "
                               f"driver's is {r['key'][:12]}: install the same tlslab wheel on every worker")
    d = claim.get("root")
    if d:
        path = bundled_path(d["name"])
        if path is None or not path.is_dir():
            return cell_dict, f"no data directory {d['name']} here"
        mine = tree_hash(path)
        if mine != d["sha256"]:
            return cell_dict, (f"data directory {d['name']} here hashes to {mine[:16]}..., the driver's to "
                               f"{d['sha256'][:16]}...")
    return cell_dict, None


def _overrun(label: str, seconds: float) -> None:
    import signal
    import sys

    print(f"tlslab: cell {label} overran its hard deadline of {seconds:g} s: killing this worker",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def remote_cell(payload: dict) -> dict:
    """Run one cell on a Dask worker (the function the cluster executes)."""
    import threading

    from tlslab.bench.runner import now_iso, run_cell_safely

    limit = payload.get("hard_timeout")
    timer = None
    if limit:
        timer = threading.Timer(limit, _overrun, args=(payload["cell"].get("label", "?"), limit))
        timer.daemon = True
        timer.start()
    try:
        return _remote_cell(payload, now_iso, run_cell_safely)
    finally:
        if timer is not None:
            timer.cancel()


def _remote_cell(payload: dict, now_iso, run_cell_safely) -> dict:
    started = now_iso()
    cell_dict, refused = check_claims(payload["cell"], payload.get("claims") or {})
    if refused:
        record = _refused(refused)
        record.update({"started": started, "ended": now_iso(), "worker_pid": os.getpid()})
    else:
        record = run_cell_safely(cell_dict)
    where = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        from distributed import get_worker

        where["address"] = get_worker().address
    except Exception:
        pass
    record["worker"] = where
    return record


# --------------------------------------------------------------------------- the driver side

def payload_limit(cell: Cell, hard_timeout) -> str:
    return f"{hard_timeout(cell):g} s" if hard_timeout else "none"


def run_cells(target: "ClusterSpec | Connection", cells: list[Cell], finish: Callable[[Cell, dict], None],
              log: Callable[[str], None] | None = None, hard_timeout: Callable[[Cell], float] | None = None) -> None:
    """Submit every cell, then record each as its future finishes (in the order they finish).

    ``finish(cell, record)`` appends the record durably; it is called exactly once per cell, in this
    (the driver's) process. Returns when every cell has a record; raises ClusterError if the
    scheduler itself is lost (finished cells are saved: resume the run)."""
    if not cells:
        return
    from tlslab.bench.runner import now_iso

    distributed = _dask()
    own = not isinstance(target, Connection)       # a connection the caller opened is the caller's to close
    conn = Connection(target) if own else target
    spec = conn.spec
    try:
        if log:
            log(f"cluster {spec.describe()}: {conn.workers()} worker(s), {len(cells)} model cell(s)")
        client = conn.client
        session = uuid.uuid4().hex[:8]
        futures = {}
        t_submit = {}
        for n, cell in enumerate(cells):          # cells come longest first (LPT): keep that order
            payload = {"cell": cell.to_dict(), "claims": claims(cell),
                       "hard_timeout": hard_timeout(cell) if hard_timeout else None}
            fut = client.submit(remote_cell, payload, key=f"tlslab-cell-{cell.id}-{session}", pure=False,
                                priority=len(cells) - n)
            futures[fut] = cell
            t_submit[fut] = now_iso()
        for fut in distributed.as_completed(list(futures)):
            cell = futures.pop(fut)
            try:
                record = fut.result()
            except distributed.KilledWorker as exc:
                record = {"outcome": Outcome.FAILED, "traceback": None, "started": t_submit[fut], "ended": now_iso(),
                          "reason": f"worker lost while running the cell, again on every retry (a worker is "
                                    f"lost when its machine or process dies, or when the cell overruns its hard "
                                    f"deadline of {payload_limit(cell, hard_timeout)}; Dask KilledWorker: {exc})"}
            except (distributed.client.FutureCancelledError, OSError, TimeoutError) as exc:
                raise ClusterError(f"lost the Dask cluster {spec.describe()} ({type(exc).__name__}: {exc}); "
                                   "finished cells are saved: finish with --resume RUN") from None
            except Exception as exc:    # the task itself raised outside run_cell_safely (import error, ...)
                record = {"outcome": Outcome.FAILED, "traceback": None, "started": t_submit[fut], "ended": now_iso(),
                          "reason": f"on the cluster: {type(exc).__name__}: {exc}"}
            fut.release()
            finish(cell, record)
    finally:
        if own:
            t0 = time.monotonic()
            conn.close()
            if log and time.monotonic() - t0 > 5:
                log(f"cluster closed in {time.monotonic() - t0:.0f} s")
