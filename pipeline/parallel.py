"""Independent jobs of `dra-pipe run` (the DRA-off and DRA-on trainings, their evaluations) side by side on the CPU.

A small model trains and is attacked fastest with one torch thread per process, so on a 2-core machine the two
variants done one after the other leave a core idle. With `run.parallel` on, each job runs in its own spawned
process (no forked torch or Ray state), pinned to its share of the cores (torch's thread count follows the
affinity). Its console lines reach this process as they are printed, prefixed with the job's name; a job's error
is raised here once the others are stopped.
"""
from __future__ import annotations

import multiprocessing
import os
import queue as queues
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stores.errors import IntegrityError, UserError

_LINE, _DONE, _FAILED = "line", "done", "failed"
STOP_WAIT_S = 30.0                       # a stopped child's time to close its loader workers before it is killed


@dataclass(frozen=True)
class Job:
    name: str                            # shown in front of each of its lines
    function: Callable[..., Any]         # a module-level function (it is pickled into the child)
    args: tuple


class JobFailed(RuntimeError):
    """A job failed with an unexpected error or died; the CLI prints one line (the child's traceback came first)."""


def cpu_set() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:                                # not on Linux
        return list(range(os.cpu_count() or 1))


def cpu_cores() -> int:
    return len(cpu_set())


def parallel_slots(jobs: int, enabled: bool, on_cpu: bool) -> int:
    """How many jobs run at once: one per core on the CPU when enabled, else one."""
    if not enabled or not on_cpu or jobs < 2:
        return 1
    return max(1, min(jobs, cpu_cores()))


def run_jobs(jobs: list[Job], slots: int, echo: Callable[[str, bool], None]) -> None:
    """Run every job, `slots` at a time; echo(line, to_stderr) prints each child line (prefixed) as it arrives."""
    if slots <= 1:
        for job in jobs:
            job.function(*job.args)
        return
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    cores = cpu_set()
    groups = [cores[i * len(cores) // slots:(i + 1) * len(cores) // slots] for i in range(slots)]
    waiting, running, held = list(jobs), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < slots:
                job, group = waiting.pop(0), next(g for g in range(slots) if g not in held.values())
                # not daemonic: a DataLoader in the child starts processes of its own
                process = context.Process(target=_child,
                                          args=(messages, job.name, job.function, job.args, groups[group]))
                process.start()
                running[job.name], held[job.name] = process, group
            _drain(messages, running, echo)
            held = {name: group for name, group in held.items() if name in running}
    finally:
        for process in running.values():                   # an error or Ctrl-C here: stop the others
            process.terminate()                            # SIGTERM: a KeyboardInterrupt in the child (clean exit)
        for process in running.values():
            process.join(STOP_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join()


def _drain(messages, running: dict, echo) -> None:
    """Handle the next message (or notice a child that died without one)."""
    try:
        name, kind, payload = messages.get(timeout=1.0)
    except queues.Empty:
        for name, process in list(running.items()):
            if not process.is_alive():
                running.pop(name).join()
                raise JobFailed(f"job {name} died (exit code {process.exitcode}) before it finished") from None
        return
    if kind == _LINE:
        line, to_stderr = payload
        echo(f"[{name}] {line}", to_stderr)
    elif kind == _DONE:
        running.pop(name).join()
    else:
        running.pop(name).join()
        raise _rebuild(name, *payload)


def _rebuild(name: str, kind: str, message: str) -> Exception:
    """The child's error as this process's: bad input and damaged data keep their kinds (and exit statuses)."""
    known = {"UserError": UserError, "IntegrityError": IntegrityError}
    if kind in known:
        return known[kind](message)
    return JobFailed(f"job {name} failed: {kind}: {message}")


class _LineWriter:
    """A text stream that sends each complete line to the parent."""

    def __init__(self, messages, name: str, to_stderr: bool):
        self.messages, self.name, self.to_stderr, self.partial = messages, name, to_stderr, ""

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self.messages.put((self.name, _LINE, (line, self.to_stderr)))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _child(messages, name: str, function, args: tuple, cores: list[int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)           # Ctrl-C is the parent's: it stops the children with
    signal.signal(signal.SIGTERM, _interrupt)              # SIGTERM, which unwinds here like a Ctrl-C would
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    import torch
    torch.set_num_threads(len(cores))
    from pipeline.console import console
    sys.stdout, sys.stderr = _LineWriter(messages, name, False), _LineWriter(messages, name, True)
    console.file, console.soft_wrap = sys.stdout, True        # a long line stays one line behind its prefix
    try:
        function(*args)
    except BaseException as exc:                            # noqa: BLE001 - every failure goes to the parent
        if not isinstance(exc, (UserError, IntegrityError)):
            traceback.print_exc()                           # reaches the parent's stderr, prefixed
        text = " ".join(str(exc).split()) or type(exc).__name__
        messages.put((name, _FAILED, (type(exc).__name__, text)))
        return
    finally:
        for stream in (sys.stdout, sys.stderr):
            if stream.partial:
                stream.write("\n")
    messages.put((name, _DONE, None))
