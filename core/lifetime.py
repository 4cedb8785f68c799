"""Helper processes that die with the entry point that started them, even a SIGKILLed one.

An entry point (``python -m flows.train`` and the like) starts processes of its own: Prefect's
temporary API server (in its own session, so that Ctrl-C does not kill it before the flow has
reported its end), a local Ray's GCS, raylet, dashboard and agents. A SIGKILL leaves no chance
to stop them, and they ran on, re-parented to PID 1, one set per killed run.

``guard()`` starts a small watcher process (this module, run as ``python -m core.lifetime``)
holding the read end of a pipe; ``tie(pid)`` tells it of a process that must not outlive us.
When the entry point ends, however it ends, the pipe closes (or its PID is gone) and the
watcher terminates each tied process that is still the same process (PID and start time),
with its descendants: SIGTERM, then SIGKILL after a grace period. A process nobody tied (a
BentoML service ``flows.deploy serve`` started on purpose) is left alone.

A descendant can escape the tree before the watcher sees it: Ray's GCS and raylet share the
fate of the process that started them (they die with it at once), and the agents the raylet
started a moment earlier are re-parented to PID 1. ``marked()`` closes that gap: whatever is
started inside it carries a mark in its environment, passed on to everything it starts, and the
watcher ends every process with the mark, wherever it was re-parented.
"""

from __future__ import annotations

import atexit
import os
import select
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

GRACE_S = 5.0
MARK = "FLYWHEEL_ENDS_WITH"  # environment variable: the mark of processes that end with their owner

_watcher: subprocess.Popen[bytes] | None = None
_lock = threading.Lock()


def guard() -> bool:
    """Start this process's watcher (once). False where it cannot run (no psutil)."""
    global _watcher
    with _lock:
        if _watcher is not None and _watcher.poll() is None:
            return True
        try:
            import psutil  # noqa: F401 - the watcher needs it
        except ImportError:
            return False
        _watcher = subprocess.Popen([sys.executable, "-m", "core.lifetime", str(os.getpid())],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True,  # Ctrl-C at the terminal must not kill it first
                                    close_fds=True)
        atexit.register(_close)
        return True


def tie(pids: Iterable[int]) -> None:
    """The processes ``pids`` end when this process ends. Without a watcher: nothing."""
    import psutil

    lines = []
    for pid in pids:
        try:
            lines.append(f"{pid} {psutil.Process(pid).create_time()!r}\n")
        except psutil.Error:
            continue
    _send(lines)


@contextmanager
def marked() -> Iterator[str]:
    """Every process started inside the block, and all it starts later, ends when this process
    ends (found by the mark in its environment). Without a watcher: nothing is marked."""
    if _watcher is None or _watcher.poll() is not None:
        yield ""
        return
    mark = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    previous = os.environ.get(MARK)
    _send([f"env {mark}\n"])
    os.environ[MARK] = mark
    try:
        yield mark
    finally:
        if previous is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = previous


def _send(lines: list[str]) -> None:
    with _lock:
        if _watcher is None or _watcher.stdin is None or not lines:
            return
        try:
            _watcher.stdin.write("".join(lines).encode())
            _watcher.stdin.flush()
        except OSError:
            pass


def same_process(pid: int, started: float) -> psutil.Process | None:
    """The ``psutil.Process`` of ``pid`` if it is still the one that started at ``started``
    (PIDs are reused), else None."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process if abs(process.create_time() - started) < 0.01 else None
    except psutil.Error:
        return None


def new_descendants(before: set[int]) -> list[int]:
    """This process's descendants that are not in ``before`` (take ``before`` with
    ``descendants()`` ahead of starting something)."""
    return [pid for pid in descendants() if pid not in before]


def descendants() -> set[int]:
    import psutil

    watcher = _watcher.pid if _watcher is not None else None
    return {p.pid for p in psutil.Process().children(recursive=True) if p.pid != watcher}


def _close() -> None:
    """At a clean exit: closing the pipe is the watcher's signal (a SIGKILL closes it too)."""
    if _watcher is not None and _watcher.stdin is not None:
        try:
            _watcher.stdin.close()
        except OSError:
            pass


# ------------------------------------------------------------------ the watcher process
def _end(tied: dict[int, float], marks: set[str], grace_s: float) -> None:
    import psutil

    victims: list[psutil.Process] = []
    for pid, started in tied.items():
        process = same_process(pid, started)
        try:
            if process is not None:
                victims += [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
    victims += _marked(marks, exclude={p.pid for p in victims})
    for process in victims:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def _marked(marks: set[str], exclude: set[int]) -> list[psutil.Process]:
    import psutil

    if not marks:
        return []
    found = []
    for process in psutil.process_iter():
        if process.pid in exclude or process.pid == os.getpid():
            continue
        try:
            if process.environ().get(MARK) in marks:
                found.append(process)
        except psutil.Error:  # gone, or not ours to read
            continue
    return found


def watch(parent: int, pipe: IO[bytes], grace_s: float = GRACE_S, poll_s: float = 1.0) -> dict[int, float]:
    """Collect tied PIDs and marks from ``pipe`` until it closes or ``parent`` is gone; then
    end them. Returns what was tied by PID."""
    tied: dict[int, float] = {}
    marks: set[str] = set()
    buffer = b""
    fd = pipe.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], poll_s)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                first, _, rest = line.decode().partition(" ")
                if first == "env":
                    marks.add(rest)
                else:
                    tied[int(first)] = float(rest)
        elif _gone(parent):  # a child of the parent that kept the pipe open (a fork) must not hold us
            break
        else:
            # What the tied processes started since (Ray's raylet starts its agents later) is
            # tied too: once their parent has exited they would be out of reach.
            tied.update(_descendants_of(tied))
    _end(tied, marks, grace_s)
    return tied


def _descendants_of(tied: dict[int, float]) -> dict[int, float]:
    import psutil

    found: dict[int, float] = {}
    for pid, started in tied.items():
        process = same_process(pid, started)
        try:
            for child in process.children(recursive=True) if process is not None else []:
                if child.pid not in tied:
                    found[child.pid] = child.create_time()
        except psutil.Error:
            continue
    return found


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped counts: it runs nothing)."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parent = int(args[0])
    watch(parent, sys.stdin.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

