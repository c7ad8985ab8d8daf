"""The benchmark runner: cells in worker processes, results written durably.

Design (what survives what):

* Cells run in ``jobs`` worker processes started with the ``spawn`` method (no
  inherited Unicorn state), each owning one end of a pipe; a worker runs one
  cell at a time and is replaced after ``max_tasks_per_child`` cells. The
  runner (parent) is the only writer of ``cells.jsonl``: it appends a record
  per finished cell with one ``write`` + ``flush`` + ``fsync``
  (:class:`tlslab.bench.store.CellWriter`).
* A cell that raises in the worker comes back as a *failed* record with the
  exception and traceback. A worker that dies (segfault, ``os._exit``,
  SIGKILL) is noticed through its process sentinel: the cell is recorded as
  failed with the exit code, a new worker is started. A cell that exceeds its
  hard deadline (``timeout_seconds`` * 1.25 + 30 s; the vCPU's own timeout of
  ``timeout_seconds`` usually fires first and is recorded with the guest EIP)
  has its worker killed and is recorded as failed. The run goes on in all cases.
* A *guest crash* (the strategy refused a fault and the guest got SIGSEGV) is a
  successful measurement -- outcome ``guest-crash`` with the crash site --
  and is not a failure of the runner.
* hw cells (``backend = "hw"``: the guest on this CPU under the ptrace
  supervisor, :mod:`tlslab.bench.hwcells`) run in a final *serial phase*,
  after every model cell has finished and the pool has been retired: one
  worker, one cell at a time, tracer and guest pinned to the ``[hw] cpu``.
  Their measurement is a wall time, and the ``hw-*`` cost profile it is
  compared with was calibrated the same way (pinned, nothing else running);
  a Unicorn worker on the other core would share caches, memory bandwidth
  and -- on a VM -- possibly the physical core, so running them beside the
  model cells (even on distinct CPUs) would bias the comparison. The phase
  is short (tens of traced runs of a second or less). Before it, the runner
  asks whether this host can run them at all; if not, every hw cell is
  recorded as *skipped* with the reason (so is a cell whose run reports
  the backend unavailable).
* Killing the runner (even SIGKILL) loses at most the cells in flight:
  workers die with it (``PR_SET_PDEATHSIG``, and EOF on their pipe), and
  ``--resume RUN`` re-expands nothing: it takes the cell list from
  ``run.json``, skips every cell that has a record, and runs the rest.

Test-only fault injection: ``TLSLAB_BENCH_INJECT="raise:SUBSTR;die:SUBSTR;hang:SUBSTR;slow:SUBSTR;die-once:SUBSTR"``
makes a worker raise, ``os._exit(3)``, sleep forever, (``slow``) sleep 1 s, or (``die-once``: the first time only, a
marker file in ``$TLSLAB_BENCH_INJECT_DIR``) SIGKILL itself on cells whose label contains SUBSTR.

``--cluster``: the model cells go to a Dask cluster instead of the local pool
(:mod:`tlslab.bench.cluster`); this module still writes every record.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from pathlib import Path

from tlslab.bench import hwcells
from tlslab.bench.backends import Backend
from tlslab.bench.blobs import blob
from tlslab.bench.spec import Cell, MatrixSpec
from tlslab.bench.store import FINISHED, RETRYABLE, CellWriter, RunDir
from tlslab.record import Outcome, RunRecord, crash_dict, model_outcome
from tlslab.machine import fastpath

INJECT_ENV = "TLSLAB_BENCH_INJECT"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- metadata

def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            return str(__import__(module).__version__)
        except Exception:
            return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state() -> tuple[str, bool | None]:
    from tlslab.artifacts import checkout_root

    root = checkout_root()
    if root is None:            # an installed wheel: no checkout to ask (git would find any enclosing repository)
        return "unknown", None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty_out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10)
        dirty = bool(dirty_out.stdout.strip()) if dirty_out.returncode == 0 else None
        return (commit or "unknown"), dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def collect_metadata() -> dict:
    from tlslab import __version__

    commit, dirty = git_state()
    return {
        "tlslab_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "unicorn_version": _version("unicorn"),
        # the library actually loaded (tlslab's build or the wheel's) and how it counts instructions
        "unicorn_library": fastpath.unicorn_build(),
        "capstone_version": _version("capstone"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "loadavg": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    """The machine's load when the metadata was taken: wall times of a loaded machine are not comparable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- the worker side

def _inject(label: str) -> None:
    rules = os.environ.get(INJECT_ENV, "")
    for rule in filter(None, (r.strip() for r in rules.split(";"))):
        mode, _, needle = rule.partition(":")
        if needle and needle in label:
            if mode == "raise":
                raise RuntimeError(f"injected failure ({INJECT_ENV}) for cell {label}")
            if mode == "die":
                os._exit(3)
            if mode == "die-once":      # SIGKILL this worker the first time only (marker in $..._DIR)
                marker = Path(os.environ[INJECT_ENV + "_DIR"]) / hashlib.sha256(label.encode()).hexdigest()[:16]
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "slow":          # 1 s more per matching cell (a run slow enough to be killed)
                time.sleep(1.0)
            if mode == "hang":
                while True:
                    time.sleep(3600)


def _profiles_modelled(counters: dict) -> dict:
    from tlslab.hypervisor import costmodel

    out = {}
    for name, profile in costmodel.available_profiles().items():
        m = costmodel.predict(profile, counters)
        out[name] = {"kind": profile.kind, "label": profile.label(), "fitted_on": profile.fitted_on,
                     "total_ns": m.total_ns, "breakdown_ns": m.breakdown_ns}
    return out


def _offline_optimum(domain) -> dict:
    """A native cell's offline bound (tlslab.analysis.hybrid) under every profile that prices faults, with
    the run-length oracle beside it (the summary's account of why online rules fall short where they do)."""
    from tlslab.analysis import hybrid
    from tlslab.hypervisor import costmodel

    traces, dropped = domain.sign_runs("gs")
    out: dict = {"address_spaces": len(traces), "runs": sum(1 for t in traces for r in t if r),
                 "dropped": dropped, "by_profile": {}}
    if dropped:
        return out   # an incomplete trace bounds nothing
    for name, profile in costmodel.available_profiles().items():
        e, f = costmodel.fault_prices(profile)
        if e > 0 and f > 0:
            b = hybrid.optimal_over(traces, e, f)
            o = hybrid.run_oracle_over(traces, e, f)   # one run deep: what deciding run by run costs
            out["by_profile"][name] = {"faults": b.faults, "emulations": b.emulations, "flips": b.flips,
                                       "fault_time_ns": b.cost_ns,
                                       "run_oracle": {"faults": o.faults, "emulations": o.emulations,
                                                      "flips": o.flips, "fault_time_ns": o.cost_ns}}
    return out


def measure(cell: Cell) -> dict:
    """Run one cell in this process and build its record (raises on worker-level errors).

    A native cell also records the sign of every %gs offset and stores the
    offline-optimal hybrid's price over it (``offline_optimum``): the bound the
    report sets every strategy against.
    """
    from tlslab.inspect.trace import fault_sites, traced_run

    _inject(cell.label)
    native = cell.spec.strategy == "native"
    result, guest, domain, recorder = traced_run(cell.spec, trace_signs=native)
    counters = result.counters
    record: dict = {
        "guest": {"name": guest.name, "variant": guest.variant, "path": str(guest.path), "sha256": guest.sha256},
        "status": result.status,
        "counters": counters,
        "modelled": _profiles_modelled(counters),
        "wall_seconds": result.wall_seconds,
        "stdout": _blob(result.stdout),
        "stderr": _blob(result.stderr),
        "sites": result.sites,
        "fault_sites": fault_sites(result, guest, domain, recorder),
        "timeline": recorder.timeline(counters.get("instructions", 0)),
    }
    if native and result.crash is None:
        record["offline_optimum"] = _offline_optimum(domain)
    root = rootfs_facts(cell.spec, guest)
    if root is not None:        # records of cells without a root filesystem are unchanged
        record["rootfs"] = root
    crash = result.crash
    record["outcome"] = model_outcome(crash)         # faults, instructions: filled by RunRecord (tlslab.record)
    record["crash"] = crash_dict(crash)
    if crash is not None:
        if record["outcome"] is Outcome.FAILED:      # the vCPU's time budget
            record["reason"] = (f"timed out after {cell.spec.timeout_seconds:g} s "
                                f"(guest still running at {crash.eip:#010x} <{crash.symbol}>)")
        else:
            record["reason"] = crash.describe()
    return record


def rootfs_facts(spec, guest) -> dict | None:
    """What a cell ran in, if it ran under a pinned root filesystem: the root's name, suite and lock key,
    its package versions, and the number of entries below each absolute directory argument (ls -R /usr/lib:
    what was listed). None for cells without a root filesystem."""
    from tlslab import rootfs
    from tlslab.experiment import DEFAULT_ROOTFS

    name = spec.rootfs or (DEFAULT_ROOTFS if guest.dynamic else None)
    if not name:
        return None
    info = rootfs.describe(name)
    top = Path(info["path"])
    entries = {}
    for arg in spec.args:
        if arg.startswith("/"):
            path = top / arg.lstrip("/")
            if path.is_dir() and not path.is_symlink():
                entries[arg] = rootfs.count_entries(path)
    return {"name": name, "suite": info["suite"], "arch": info["arch"],
            "key": rootfs.lock_key(rootfs.lock_entry(name)),
            "packages": {p["package"]: p["version"] for p in info["packages"]},
            "usr_lib_entries": info["usr_lib_entries"], "arg_entries": entries}


_blob = blob

BACKENDS: dict[str, Backend] = {
    "unicorn": Backend("unicorn", False, lambda cell: measure(cell), lambda: None,
                       "the model: Unicorn with exact segment checks and the hypervisor's strategies"),
    "hw": Backend("hw", True, hwcells.measure, hwcells.unavailable,
                  "this CPU with really truncated segments, under the ptrace supervisor (serial, pinned)"),
}


def run_cell_safely(cell_dict: dict) -> dict:
    cell = Cell.from_dict(cell_dict)
    started, t0 = now_iso(), time.perf_counter()
    try:
        backend = BACKENDS[cell.backend]
        if backend.serial:
            _inject(cell.label)  # the model's measure injects its own (tests' failure injection)
        record = backend.measure(cell)
    except BaseException as exc:  # a worker-level failure: recorded, never fatal to the run
        if isinstance(exc, KeyboardInterrupt):
            raise
        from tlslab.hw.backend import HwUnavailable
        from tlslab.rootfs import RootfsUnavailable

        # the host cannot do it (no 32-bit exec, ptrace refused; the root filesystem is not fetched here):
        # a skip with the reason, not a failure
        if isinstance(exc, (HwUnavailable, RootfsUnavailable)):
            record = {"outcome": Outcome.SKIPPED, "reason": str(exc)}
        else:
            record = {"outcome": Outcome.FAILED, "reason": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc()}
    record.update({"started": started, "ended": now_iso(), "cell_seconds": time.perf_counter() - t0,
                   "worker_pid": os.getpid(), "loadavg_end": _loadavg()})
    return record


def _die_with_parent(parent_pid: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def worker_main(conn, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner decides what ^C means
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        record = run_cell_safely(msg)
        try:
            conn.send(record)
        except (BrokenPipeError, OSError):
            return


# --------------------------------------------------------------------------- the runner side

class _Worker:
    def __init__(self, ctx):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, args=(child_conn, os.getpid()), name="tlslab-bench-worker",
                                daemon=True)
        self.proc.start()  # an exception here propagates to the caller: no silent half-started pool
        child_conn.close()
        self.conn = parent_conn
        self.cell: Cell | None = None
        self.deadline = 0.0
        self.started = ""
        self.t0 = 0.0
        self.tasks = 0

    def assign(self, cell: Cell, hard_timeout: float) -> None:
        self.cell = cell
        self.started, self.t0 = now_iso(), time.monotonic()
        self.deadline = self.t0 + hard_timeout
        self.tasks += 1
        self.conn.send(cell.to_dict())

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def retire(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


def _exit_description(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Runner:
    """Runs a list of cells and appends one record per cell to the run's cells.jsonl."""

    def __init__(self, run: RunDir, meta: dict, jobs: int, max_tasks_per_child: int, hard_timeout,
                 progress=None, on_record=None, cluster=None, log=None):
        self.run = run
        self.meta = meta
        self.jobs = max(1, jobs)
        self.max_tasks = max(1, max_tasks_per_child)
        self.hard_timeout = hard_timeout    # cell -> seconds
        self.progress = progress            # callable(cell, record) or None
        self.on_record = on_record
        self.cluster = cluster              # ClusterSpec or Connection (tlslab.bench.cluster): model cells on Dask
        self.log = log
        self.ctx = mp.get_context("spawn")

    def _finish(self, writer: CellWriter, cell: Cell, record: dict) -> dict:
        full = {"cell": cell.id, "run_id": self.run.id, "label": cell.label, "workload": cell.workload,
                "backend": cell.backend, "spec": cell.to_dict()["spec"], "meta": self.meta, **record}
        full.setdefault("reason", None)
        full = RunRecord.from_dict(full, f"cell {cell.label}").to_dict()    # typed, with the schema
        writer.append(full)
        if self.progress:
            self.progress(cell, full)
        return full

    def run_cells(self, cells: list[Cell]) -> list[dict]:
        writer = CellWriter(self.run.cells_path)
        written: list[dict] = []
        parallel: list[Cell] = []
        serial: dict[str, list[Cell]] = {}
        try:
            for cell in cells:
                if cell.skip:
                    self._skip(writer, written, cell, cell.skip)
                elif BACKENDS[cell.backend].serial:
                    serial.setdefault(cell.backend, []).append(cell)
                else:
                    parallel.append(cell)
            # longest first (LPT): the heavy cells do not end up alone at the tail of the run
            parallel.sort(key=lambda c: -c.weight)
            if self.cluster is not None and parallel:     # model cells on Dask; records still written here
                self.cluster.run_cells(parallel, lambda cell, record: written.append(self._finish(writer, cell, record)),
                                       log=self.log, hard_timeout=self.hard_timeout)
            else:
                self._phase(writer, written, parallel, self.jobs)
            for name, group in serial.items():  # one at a time, after the pool is gone (module docstring)
                why = BACKENDS[name].unavailable()
                if why:
                    for cell in group:
                        self._skip(writer, written, cell, why)
                else:
                    self._phase(writer, written, group, 1)
        finally:
            writer.close()
        return written

    def _skip(self, writer: CellWriter, written: list[dict], cell: Cell, reason: str) -> None:
        t = now_iso()
        written.append(self._finish(writer, cell, {"outcome": Outcome.SKIPPED, "reason": reason, "started": t,
                                                   "ended": t}))

    def _phase(self, writer: CellWriter, written: list[dict], cells: list[Cell], jobs: int) -> None:
        """Run ``cells`` in order on up to ``jobs`` workers; the workers are retired at the end."""
        pending = deque(cells)
        workers: list[_Worker] = []
        try:
            while pending or any(w.cell for w in workers):
                for i, w in enumerate(workers):
                    if w.cell is None and w.tasks >= self.max_tasks:
                        w.retire()
                        workers[i] = _Worker(self.ctx)
                while pending and (len(workers) < jobs or any(w.cell is None for w in workers)):
                    idle = next((w for w in workers if w.cell is None), None)
                    if idle is None:
                        idle = _Worker(self.ctx)
                        workers.append(idle)
                    cell = pending.popleft()
                    try:
                        idle.assign(cell, self.hard_timeout(cell))
                    except (BrokenPipeError, OSError) as exc:
                        idle.cell = None
                        idle.kill()
                        workers.remove(idle)
                        written.append(self._finish(writer, cell, {
                            "outcome": Outcome.FAILED, "reason": f"could not hand the cell to a worker: {exc}",
                            "started": now_iso(), "ended": now_iso()}))
                busy = [w for w in workers if w.cell is not None]
                if not busy:
                    continue
                wait_for = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                mpc.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=wait_for)
                now = time.monotonic()
                for w in busy:
                    record = self._collect(w, now)
                    if record is None:
                        continue
                    cell, w.cell = w.cell, None
                    dead = record.pop("_dead", False)
                    written.append(self._finish(writer, cell, record))
                    if dead:
                        workers.remove(w)
        finally:
            for w in workers:
                if w.cell is not None:
                    w.kill()
                else:
                    w.retire()

    def _collect(self, w: _Worker, now: float) -> dict | None:
        """The worker's record if it finished, a failed record if it died or overran, else None."""
        dead_record = None
        try:
            if w.conn.poll():
                return w.conn.recv()
        except (EOFError, OSError) as exc:  # the pipe closed: normally because the worker died
            w.proc.join(2)
            if w.proc.exitcode is None:
                dead_record = f"lost the worker's result: {type(exc).__name__}: {exc}"
        except Exception as exc:  # unpicklable/corrupt message
            dead_record = f"could not read the worker's result: {type(exc).__name__}: {exc}"
        if dead_record is None and w.proc.is_alive() and now < w.deadline:
            return None
        if dead_record is None and w.proc.is_alive():
            reason = (f"per-cell timeout: no result after {now - w.t0:.0f} s; worker pid {w.proc.pid} killed")
        else:
            w.proc.join(1)
            reason = dead_record or (f"worker process died ({_exit_description(w.proc.exitcode)}) "
                                     f"while running the cell; pid {w.proc.pid}")
        w.kill()
        return {"outcome": Outcome.FAILED, "reason": reason, "traceback": None, "started": w.started,
                "ended": now_iso(), "cell_seconds": now - w.t0, "worker_pid": w.proc.pid, "_dead": True}


# --------------------------------------------------------------------------- runs

def hard_timeout_for(spec_timeout: float, kill_after: float | None = None):
    def runs(cell: Cell) -> int:  # an hw cell is `repeat` runs of the guest
        return max(1, int(cell.options.get("repeat", 1))) if BACKENDS[cell.backend].serial else 1

    if kill_after:
        return lambda cell: kill_after * runs(cell)
    return lambda cell: (cell.spec.timeout_seconds or spec_timeout) * 1.25 * runs(cell) + 30.0


def new_run_dir(out: str | Path, name: str) -> RunDir:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{name}"
    for i in range(1000):
        candidate = root / (base if i == 0 else f"{base}-{i + 1}")
        try:
            candidate.mkdir()
            return RunDir(candidate)
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a run directory under {root}")


def spec_record(spec: MatrixSpec) -> dict:
    return {**spec.to_dict(), "cost_profile": spec.cost_profile, "online_extra_prices": spec.online_extra_prices(),
            "fit": spec.fit,
            "timeout_seconds": spec.timeout_seconds, "max_tasks_per_child": spec.max_tasks_per_child,
            "kill_after_seconds": spec.kill_after_seconds, "backends": spec.backends, "hw": spec.hw}


def start_run(spec: MatrixSpec, out: str | Path, jobs: int, argv: list[str] | None = None,
              cells: list[Cell] | None = None) -> tuple[RunDir, list[Cell]]:
    cells = spec.cells() if cells is None else cells
    run = new_run_dir(out, spec.name)
    meta = collect_metadata()
    run.write_run({
        "run_id": run.id,
        "tool": "tlslab bench",
        "command": argv if argv is not None else sys.argv,
        "created": now_iso(),
        "status": "running",
        "jobs": jobs,
        "spec": spec_record(spec),
        "meta": meta,
        "cells": [c.to_dict() for c in cells],
        "sessions": [],
    })
    return run, cells


def cells_to_run(run: RunDir, retry_failed: bool = False) -> tuple[list[Cell], list[Cell], list[str]]:
    """(all cells of the run, the cells still to run, warnings)."""
    info = run.read_run()
    cells = [Cell.from_dict(c) for c in info["cells"]]
    records, warnings = run.records()
    latest = {}
    for rec in records:
        latest[rec["cell"]] = rec
    done = set()
    for cid, rec in latest.items():
        if rec.get("outcome") in FINISHED and not (retry_failed and rec.get("outcome") in RETRYABLE):
            done.add(cid)
    return cells, [c for c in cells if c.id not in done], warnings


def execute_run(run: RunDir, todo: list[Cell], jobs: int, progress=None, argv: list[str] | None = None,
                cluster=None, log=None) -> list[dict]:
    """Run ``todo`` and record every cell; ``cluster`` (a ClusterSpec) sends the model cells to Dask."""
    info = run.read_run()
    spec = info["spec"]
    meta = collect_metadata()
    session = {"started": now_iso(), "jobs": jobs, "cells": len(todo), "command": argv or sys.argv, "meta": meta}
    if cluster is not None:     # a ClusterSpec, or an open tlslab.bench.cluster.Connection
        session["cluster"] = getattr(cluster, "spec", cluster).describe()
    info.setdefault("sessions", []).append(session)
    info["status"] = "running"
    run.write_run(info)
    runner = Runner(run, meta, jobs, spec.get("max_tasks_per_child", 20),
                    hard_timeout_for(spec.get("timeout_seconds", 300.0), spec.get("kill_after_seconds")),
                    progress=progress, cluster=cluster, log=log)
    status = "interrupted"
    try:
        written = runner.run_cells(todo)
        status = "complete"
    finally:
        info = run.read_run()
        info["sessions"][-1]["ended"] = now_iso()
        info["sessions"][-1]["status"] = status
        info["status"] = status
        run.write_run(info)
    return written
