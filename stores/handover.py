"""Handing batches from DataLoader workers to the main process through recycled shared buffers (slots).

On this machine kind a batch written into fresh shared memory moves at 1-2 GB/s (the VM hands fresh pages over
slowly), into memory written before at about 10. So each worker writes its batches into a few shared buffers of
its own, again and again, and tags each batch with its slot. The main process copies the batch out into memory
of its own and frees the slot, or lends it (borrow) and frees it once the caller draws the next batch. A worker
refills a slot only once it is freed.

Worker side: a SlotStream subclass calls `self.empty_batches()` once per pass and takes each empty batch from it.
Main side: SlotLoader runs the stream in DataLoader workers and hands the batches over.
"""
from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stores import remote
from stores.errors import IntegrityError, UserError

SLOTS_PER_WORKER = 6                 # DataLoader keeps prefetch_factor (2 by default, 4 in the trainer) batches per
                                     # worker in flight, plus the one the consumer holds and the one being filled
MAX_WORKERS = 64
SLOT_KEY = "_slot"

Layout = dict[str, tuple[tuple, torch.dtype]]    # key -> (full shape, batch dimension first; dtype)


def slot_flags() -> torch.Tensor:
    """The shared busy flags of every worker's slots (1 = handed out, not yet freed by the consumer)."""
    return torch.zeros(MAX_WORKERS * SLOTS_PER_WORKER, dtype=torch.int32).share_memory_()


class SlotPool:
    """One worker's recycled shared batch buffers and its view of the shared busy flags."""

    def __init__(self, busy: torch.Tensor, worker: int):
        if worker >= MAX_WORKERS:
            raise ValueError(f"recycled batch slots support at most {MAX_WORKERS} loader workers")
        self.busy, self.first, self.next = busy, worker * SLOTS_PER_WORKER, 0
        self.buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(SLOTS_PER_WORKER)]
        busy[self.first:self.first + SLOTS_PER_WORKER] = 0          # a new pass: earlier batches are gone
        self.parent = os.getppid()

    def take(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The next slot, once the consumer has freed it (copied its batch out, or moved on from a borrowed one).

        A training step (or an epoch's evaluation) may hold a slot for long, so there is no time limit; the wait
        ends with an error only if the consumer's process is gone. Polling backs off to 5 ms so that a waiting
        worker does not take CPU from the step."""
        j, self.next = self.next, (self.next + 1) % SLOTS_PER_WORKER
        flag, pause = self.first + j, 0.0002
        while int(self.busy[flag]):
            if os.getppid() != self.parent:
                raise RuntimeError(f"batch slot {flag} is never freed: the process that consumes the batches is gone")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
        self.busy[flag] = 1
        return flag, self.buffers[j]

    @staticmethod
    def buffer(buffers: dict[str, torch.Tensor], key: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """The slot's tensor for `key`, allocated (shared) once and again only if `shape` outgrows it."""
        held = buffers.get(key)
        if held is None or held.shape[1:] != shape[1:] or held.shape[0] < shape[0] or held.dtype != dtype:
            held = buffers[key] = torch.empty(shape, dtype=dtype).share_memory_()
        return held[:shape[0]]


class EmptyBatches:
    """One pass's source of empty batch tensors, in the process that fills them: a recycled slot's (tagged with
    batch[SLOT_KEY]) in a worker of a recycling stream, fresh shared memory in any other worker (handed over
    without a copy), plain memory in the main process."""

    def __init__(self, busy: torch.Tensor | None):
        info = get_worker_info()
        self.shared = info is not None
        self.pool = SlotPool(busy, info.id) if self.shared and busy is not None else None

    def take(self, layout: Layout) -> dict[str, torch.Tensor]:
        """Tensors of the layout's shapes and dtypes, to be written in place; a slot waits until it is freed."""
        if self.pool is not None:
            slot, buffers = self.pool.take()
            batch = {key: self.pool.buffer(buffers, key, shape, dtype) for key, (shape, dtype) in layout.items()}
            batch[SLOT_KEY] = torch.tensor(slot)
            return batch
        batch = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in layout.items()}
        if self.shared:
            for t in batch.values():
                t.share_memory_()
        return batch


class SlotStream(IterableDataset):
    """An iterable of batches whose workers write into recycled slots; run it with SlotLoader, which frees them.

    recycle: keep shared busy flags (they travel to the workers with the stream). Without it (no SlotLoader, or
    workers=0), batches come in fresh memory and carry no slot."""

    def __init__(self, recycle: bool = False):
        self.busy = slot_flags() if recycle else None        # 1 = the slot's batch is not yet copied out or returned

    def empty_batches(self) -> EmptyBatches:
        """Where this pass's batches are written; call at the start of __iter__ (in the worker)."""
        return EmptyBatches(self.busy)


class SlotLoader:
    """A SlotStream's batches, read by `workers` DataLoader processes and handed over through its slots.

    borrow=False: each batch is the caller's own memory (copied out of the worker's slot, which is then freed),
    so it may be kept as long as wanted. borrow=True: a batch is valid only until the next one is drawn (its slot
    then goes back to the worker), and nothing is copied. pin_memory: the batch arrives as DataLoader's pinned copy
    and its slot is freed at once; where torch skips pinning (no accelerator) it is borrowed or copied as without.
    workers=0 reads in this process. seed: DataLoader's own generator, so that creating an iterator draws nothing
    from torch's global RNG; None draws its base seed from the global RNG, as DataLoader does by default.
    """

    def __init__(self, stream: SlotStream, workers: int, borrow: bool = False, pin_memory: bool = False,
                 prefetch: int | None = None, seed: int | None = None):
        self.stream, self.borrow, self.pinned = stream, borrow, pin_memory
        self.lent: int | None = None           # the slot of the borrowed batch the caller holds
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        # obstore hangs in a process forked after it ran: with a bucket attached, workers start fresh (forkserver)
        # with this process's environment (the forkserver's is the one it was started with)
        fresh = workers and remote.attached()
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers,
                                 prefetch_factor=prefetch if workers else None, generator=generator,
                                 pin_memory=pin_memory, multiprocessing_context="forkserver" if fresh else None,
                                 worker_init_fn=functools.partial(_environment, dict(os.environ)) if fresh else None)

    def __iter__(self):
        self.lent = None
        for batch in _worker_errors_as_raised(self.loader):
            if self.lent is not None:
                self.stream.busy[self.lent] = 0              # the caller has moved on from the previous batch
                self.lent = None
            slot = batch.pop(SLOT_KEY, None)
            pinned = self.pinned and arrived_pinned(batch)
            if slot is None:
                yield batch
            elif self.borrow and not pinned:
                self.lent = int(slot)
                yield batch
            else:
                own = batch if pinned else copy_batch(batch)
                del batch                                    # the slot's mapping goes before the slot is freed
                self.stream.busy[int(slot)] = 0
                yield own


def _environment(values: dict[str, str], worker: int) -> None:
    os.environ.clear()
    os.environ.update(values)


def _worker_errors_as_raised(loader):
    """The loader's batches; a UserError or IntegrityError raised in a DataLoader worker comes back as the worker
    raised it. DataLoader re-raises it with the worker's whole traceback as its message, which would become a
    1,500-character "one line" on the user's terminal."""
    try:
        yield from loader
    except (UserError, IntegrityError) as exc:
        text = str(exc)
        if not text.startswith("Caught ") or "DataLoader worker" not in text.partition("\n")[0]:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        _, sep, message = last.partition(": ")
        raise type(exc)(message if sep else text) from None


def copy_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Private copies of a batch's tensors; numpy's single-threaded copy leaves the cores to the workers."""
    own = {}
    for key, t in batch.items():
        own[key] = torch.empty(t.shape, dtype=t.dtype)
        np.copyto(own[key].numpy(), t.numpy())
    return own


def arrived_pinned(batch: dict[str, torch.Tensor]) -> bool:
    """Whether DataLoader really copied the batch into page-locked memory: it skips pinning, with a warning, where
    torch has no accelerator (a CPU-only build, MPS); the batch is then the worker's slot itself."""
    return all(t.is_pinned() for t in batch.values())
