"""Recycled read buffers: memory comes back only when nothing can see it any more, is handed out
again, and no more than the cap waits idle."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from rayk.cache.read_buffers import ReadBuffers


def _address(array) -> int:
    return array.ctypes.data


def test_a_buffer_comes_back_once_its_tensor_and_views_are_gone_and_is_handed_out_again():
    buffers = ReadBuffers(4096, max_idle_bytes=1 << 20)
    first = buffers.take()
    address = _address(first)
    tensor = torch.from_numpy(first).view(torch.float32).view(2, 512)
    view = tensor[1]
    del first, tensor
    assert buffers.num_idle == 0  # `view` still sees the memory
    other = buffers.take()
    assert _address(other) != address
    del view
    assert buffers.num_idle == 1
    again = buffers.take()
    assert _address(again) == address and again.nbytes == 4096 and again.flags.writeable
    assert buffers.num_idle == 0


def test_buffers_in_use_are_never_handed_out_twice():
    buffers = ReadBuffers(64, max_idle_bytes=1 << 20)
    held = [buffers.take() for _ in range(8)]
    for array in held:
        array[:] = 7
    del held[::2]
    fresh = [buffers.take() for _ in range(8)]
    addresses = [_address(a) for a in held + fresh]
    assert len(set(addresses)) == len(addresses)
    assert all((array == 7).all() for array in held)


def test_no_more_than_the_cap_waits_idle():
    buffers = ReadBuffers(1000, max_idle_bytes=3500)
    taken = [buffers.take() for _ in range(6)]
    del taken
    gc.collect()
    assert buffers.num_idle == 3  # the other three went back to the allocator
    assert buffers.idle_bytes == 3000


def test_a_buffer_dropped_on_another_thread_comes_back():
    buffers = ReadBuffers(256, max_idle_bytes=1 << 20)
    box = [buffers.take()]
    dropper = threading.Thread(target=box.clear)
    dropper.start()
    dropper.join()
    assert buffers.num_idle == 1


@pytest.mark.parametrize("num_bytes, max_idle_bytes", [(0, 10), (-1, 10), (10, -1), (True, 10)])
def test_bad_sizes_are_named(num_bytes, max_idle_bytes):
    with pytest.raises(ValueError, match="ReadBuffers"):
        ReadBuffers(num_bytes, max_idle_bytes=max_idle_bytes)
