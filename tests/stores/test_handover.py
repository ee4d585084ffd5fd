"""The batch hand-over core (stores.handover): a slot is refilled only once the main process is done with it."""
import threading

import pytest
import torch

from stores.handover import SLOT_KEY, SLOTS_PER_WORKER, EmptyBatches, SlotLoader, SlotPool, SlotStream, slot_flags

RING = 3


class EagerFlags:
    """Busy flags whose every free refills the slot at once with garbage (-1), as the fastest worker would."""

    def __init__(self, slots: list[torch.Tensor]):
        self.flags, self.slots = torch.zeros(len(slots), dtype=torch.int32), slots

    def __getitem__(self, slot):
        return self.flags[slot]

    def __setitem__(self, slot, value):
        self.flags[slot] = value
        if value == 0:
            self.slots[slot].fill_(-1)


class Counting(SlotStream):
    """Batch k is `x` filled with k, written into a ring of RING slots in this process (workers=0), so that the
    loader's frees interleave with the writes deterministically. A slot still busy when its turn comes is an error."""

    def __init__(self, n: int):
        super().__init__(recycle=False)
        self.n, self.slots = n, [torch.empty(4, dtype=torch.int64) for _ in range(RING)]
        self.busy = EagerFlags(self.slots)

    def __iter__(self):
        for k in range(self.n):
            slot = k % RING
            if int(self.busy[slot]):
                raise RuntimeError(f"slot {slot} was never freed")
            self.busy[slot] = 1
            self.slots[slot].fill_(k)
            yield {"x": self.slots[slot], SLOT_KEY: torch.tensor(slot)}


def test_copied_batches_stay_the_callers_after_their_slot_is_refilled():
    stream = Counting(5 * RING)
    kept = list(SlotLoader(stream, workers=0))                           # all held at once
    slot_memory = {t.data_ptr() for t in stream.slots}
    for k, batch in enumerate(kept):
        assert list(batch) == ["x"]                                      # the slot number stays behind
        assert batch["x"].tolist() == [k] * 4
        assert batch["x"].data_ptr() not in slot_memory
    assert int(stream.busy.flags.sum()) == 0                             # every slot freed


def test_a_borrowed_batch_holds_until_the_next_is_drawn_then_its_slot_goes_back():
    stream = Counting(5 * RING)
    loader = SlotLoader(stream, workers=0, borrow=True)
    previous = None
    for k, batch in enumerate(loader):
        assert batch["x"].tolist() == [k] * 4                            # not refilled while held
        assert int(stream.busy[loader.lent]) == 1 and batch["x"].data_ptr() == stream.slots[k % RING].data_ptr()
        if previous is not None:
            assert previous["x"].tolist() == [-1] * 4                    # lent, not copied: its slot was refilled
        previous = batch
    assert k == 5 * RING - 1


def test_a_worker_waits_for_its_slot_and_reuses_its_memory():
    busy = slot_flags()
    pool = SlotPool(busy, worker=1)
    taken = [pool.take() for _ in range(SLOTS_PER_WORKER)]
    assert [flag for flag, _ in taken] == list(range(SLOTS_PER_WORKER, 2 * SLOTS_PER_WORKER))
    memory = pool.buffer(taken[0][1], "x", (4, 3), torch.float16)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.take()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got                                 # its slot is still held
    busy[SLOTS_PER_WORKER] = 0
    waiter.join(5)
    flag, buffers = got[0]
    assert flag == SLOTS_PER_WORKER and int(busy[flag]) == 1 and buffers is taken[0][1]
    assert pool.buffer(buffers, "x", (4, 3), torch.float16).data_ptr() == memory.data_ptr()      # no fresh memory
    assert pool.buffer(buffers, "x", (2, 3), torch.float16).data_ptr() == memory.data_ptr()      # a short last batch
    assert pool.buffer(buffers, "x", (5, 3), torch.float16).shape == (5, 3)                      # outgrown: new


def test_the_main_process_fills_plain_memory_without_a_slot():
    batch = EmptyBatches(slot_flags()).take({"x": ((4, 3), torch.uint8), "y": ((4,), torch.int64)})
    assert list(batch) == ["x", "y"] and not batch["x"].is_shared()
    assert (batch["x"].shape, batch["x"].dtype, batch["y"].shape) == ((4, 3), torch.uint8, (4,))


class Filled(SlotStream):
    """Batch k of each worker: x filled with 1000 * worker + k, through the real EmptyBatches in DataLoader workers."""

    def __init__(self, n: int, recycle: bool):
        super().__init__(recycle)
        self.n = n

    def __iter__(self):
        batches, worker = self.empty_batches(), torch.utils.data.get_worker_info().id
        for k in range(self.n):
            batch = batches.take({"x": ((64,), torch.int64)})
            batch["x"].fill_(1000 * worker + k)
            yield batch


@pytest.mark.parametrize("recycle", [True, False])
def test_workers_hand_over_every_batch_intact(recycle):
    n = 4 * SLOTS_PER_WORKER
    loader = SlotLoader(Filled(n, recycle), workers=2)
    kept = list(loader)
    values = sorted(int(b["x"][0]) for b in kept)
    assert values == sorted(1000 * w + k for w in range(2) for k in range(n))
    assert all(list(b) == ["x"] and (b["x"] == b["x"][0]).all() for b in kept)
    if recycle:
        assert int(loader.stream.busy.sum()) == 0


def test_borrowed_worker_batches_are_lent_from_recycled_slots():
    n = 4 * SLOTS_PER_WORKER
    batches = iter(SlotLoader(Filled(n, recycle=True), workers=2, borrow=True))
    first = next(batches)
    value = int(first["x"][0])
    seen = [value] + [int(b["x"][0]) for b in batches]
    assert sorted(seen) == sorted(1000 * w + k for w in range(2) for k in range(n))
    assert not (first["x"] == value).all()                               # its slot came back and was refilled
