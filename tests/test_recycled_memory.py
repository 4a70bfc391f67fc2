"""Recycled memory: a buffer comes back only when nothing can see it any more, is handed out
again (the smallest that fits), and no more than the cap waits idle."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from rayk.cache.recycled_memory import RecycledMemory


def _address(array) -> int:
    return array.ctypes.data


def test_a_buffer_comes_back_once_its_tensor_and_views_are_gone_and_is_handed_out_again():
    memory = RecycledMemory(max_idle_bytes=1 << 20)
    first = memory.take(4096)
    address = _address(first)
    tensor = torch.from_numpy(first).view(torch.float32).view(2, 512)
    view = tensor[1]
    del first, tensor
    assert memory.num_idle == 0  # `view` still sees the memory
    other = memory.take(4096)
    assert _address(other) != address
    del view
    assert memory.num_idle == 1
    again = memory.take(4096)
    assert _address(again) == address and again.nbytes == 4096 and again.flags.writeable
    assert memory.num_idle == 0


def test_buffers_in_use_are_never_handed_out_twice():
    memory = RecycledMemory(max_idle_bytes=1 << 20)
    held = [memory.take(64) for _ in range(8)]
    for array in held:
        array[:] = 7
    del held[::2]
    fresh = [memory.take(64) for _ in range(8)]
    addresses = [_address(a) for a in held + fresh]
    assert len(set(addresses)) == len(addresses)
    assert all((array == 7).all() for array in held)


def test_the_smallest_idle_buffer_that_fits_is_taken_and_cut_to_the_size_asked():
    memory = RecycledMemory(max_idle_bytes=1 << 20)
    small, large = memory.take(100), memory.take(1000)
    small_address, large_address = _address(small), _address(large)
    del small, large
    middle = memory.take(500)
    assert _address(middle) == large_address and middle.nbytes == 500
    tiny = memory.take(50)
    assert _address(tiny) == small_address and tiny.nbytes == 50
    assert _address(memory.take(2000)) not in (small_address, large_address)


def test_no_more_than_the_cap_waits_idle():
    memory = RecycledMemory(max_idle_bytes=3500)
    taken = [memory.take(1000) for _ in range(6)]
    del taken
    assert memory.num_idle == 3  # the other three went back to the allocator
    assert memory.idle_bytes == 3000


def test_a_buffer_dropped_on_another_thread_comes_back():
    memory = RecycledMemory(max_idle_bytes=1 << 20)
    box = [memory.take(256)]
    dropper = threading.Thread(target=box.clear)
    dropper.start()
    dropper.join()
    assert memory.num_idle == 1


@pytest.mark.parametrize("max_idle_bytes", [-1, True, 1.5])
def test_a_bad_cap_is_named(max_idle_bytes):
    with pytest.raises(ValueError, match="RecycledMemory.max_idle_bytes"):
        RecycledMemory(max_idle_bytes)


@pytest.mark.parametrize("num_bytes", [0, -1, True, 2.0])
def test_a_bad_size_is_named(num_bytes):
    with pytest.raises(ValueError, match="RecycledMemory.take"):
        RecycledMemory(1 << 20).take(num_bytes)


def test_a_buffer_given_back_by_a_collection_inside_take_does_not_deadlock():
    memory = RecycledMemory(max_idle_bytes=1 << 20)

    class Cycle:
        pass

    held = Cycle()
    held.self, held.buffer = held, memory.take(128)  # collected only by the cycle collector
    del held
    with memory._lock:  # as if take() held the lock when the collector ran
        gc.collect()
    assert memory.num_idle == 1
