"""Ctrl-C that works while a guest runs.

Python runs a signal handler only between bytecodes of the main thread, so two
places never see Ctrl-C in time:

* ``emu_start`` of a guest that spins without system calls: the main thread is
  inside Unicorn (the GIL released) and never returns to Python. The C
  handler CPython installs for SIGINT writes the signal number to the wakeup
  fd (:func:`signal.set_wakeup_fd`); a watcher thread reading it tells every
  live fast path to stop at its block counter's next clock check
  (:func:`tlslab.machine.fastpath.request_stop_all`), so ``emu_start``
  returns within microseconds and the handler runs.
* a ctypes callback of the fast path (site classification, block counting):
  an exception raised there is printed ("Exception ignored on calling ctypes
  callback") and lost. The handler sees that it runs below ``emu_start``,
  stops the fast paths and asks to be called again; it raises
  ``KeyboardInterrupt`` once it runs in ordinary Python code.

:func:`installed` arms both for the duration of one command (main thread only;
elsewhere it does nothing) and puts back what was there before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_watcher: threading.Thread | None = None
_pipe: tuple[int, int] | None = None
_lock = threading.Lock()


def _stop_guests() -> None:
    try:
        from tlslab.machine.fastpath import request_stop_all
    except Exception:  # noqa: BLE001 -- no fast path built yet: nothing can be running
        return
    request_stop_all()


def _watch(read_fd: int) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data or (_alarm_armed and signal.SIGALRM in data):
            _stop_guests()


def _ensure_watcher() -> int:
    """The write end of the wakeup pipe (one watcher thread per process)."""
    global _watcher, _pipe
    with _lock:
        if _pipe is None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            os.set_inheritable(r, False)
            os.set_inheritable(w, False)
            _pipe = (r, w)
            _watcher = threading.Thread(target=_watch, args=(r,), name="tlslab-sigint", daemon=True)
            _watcher.start()
        return _pipe[1]


def _in_swallowing_callback(frame) -> bool:
    """True if ``frame`` runs in a ctypes callback called from inside Unicorn's ``emu_start`` that would
    swallow an exception (the fast path's). Unicorn's own hooks are wrapped: they keep the exception,
    stop the emulation and raise it when ``emu_start`` returns, so raising there is fine."""
    child, f = None, frame
    while f is not None:
        code = f.f_code
        if code.co_name == "emu_start" and "unicorn" in code.co_filename:
            if child is None:            # emu_start's own Python code: the exception propagates
                return False
            wrapped = "unicorn" in child.f_code.co_filename and child.f_code.co_name == "wrapper"
            # inside a Unicorn hook's wrapper but not yet (or no longer) inside its try block: lost too
            return not wrapped or child is frame
        child, f = f, f.f_back
    return False


_active = False
_alarm_armed = False


def _retry() -> None:
    if _active:
        import _thread

        _thread.interrupt_main(signal.SIGINT)


def _on_sigint(signum, frame) -> None:
    _stop_guests()
    if _in_swallowing_callback(frame):
        # come back once the callback has returned (the fast paths stop the guest now); re-arming from
        # here would run this handler again inside itself
        t = threading.Timer(0.005, _retry)
        t.daemon = True
        t.start()
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def installed():
    """Ctrl-C stops a running guest and raises KeyboardInterrupt in ordinary code (see the module)."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except (ValueError, OSError):
        yield
        return
    if previous is signal.SIG_IGN:      # started with Ctrl-C ignored (nohup, a background job): keep it so
        yield
        return
    w = _ensure_watcher()
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _on_sigint)
    _active = True
    try:
        yield
    finally:
        _active = False
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        signal.set_wakeup_fd(old_fd)


class RunTimeout(Exception):
    """The wall-clock limit of a run (``--timeout``) ran out, possibly before the guest started."""


@contextlib.contextmanager
def deadline(seconds: float, what: str = "the run"):
    """Raise :class:`RunTimeout` when ``seconds`` of wall-clock time have passed inside the block, whatever
    it is doing: building a filesystem in Python, or a guest inside Unicorn (stopped like Ctrl-C stops it).
    ``seconds`` <= 0: no limit. Main thread only (elsewhere: no limit)."""
    global _alarm_armed
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    main = threading.main_thread().ident

    def resend() -> None:
        if _alarm_armed:
            signal.pthread_kill(main, signal.SIGALRM)

    def on_alarm(signum, frame) -> None:
        _stop_guests()
        if _in_swallowing_callback(frame):
            t = threading.Timer(0.005, resend)
            t.daemon = True
            t.start()
            return
        raise RunTimeout(f"timed out: {what} took longer than --timeout {seconds:g} s")

    _ensure_watcher()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    wake = None
    try:
        wake = signal.set_wakeup_fd(_pipe[1], warn_on_full_buffer=False)
    except ValueError:
        pass
    _alarm_armed = True
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _alarm_armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if wake is not None:
            signal.set_wakeup_fd(wake)
