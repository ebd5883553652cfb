import torch

from tricks.pipeline.buffers import HostBuffers


def test_host_buffers_are_reused_only_when_nothing_holds_them():
    pool = HostBuffers(limit=3)
    a = pool.get((2, 4, 4, 3), torch.float32)
    a.fill_(1)
    b = pool.get((2, 4, 4, 3), torch.float32)
    assert a.data_ptr() != b.data_ptr()  # a is held
    kept = a[1:]  # a view outlives the batch: still held
    a_ptr = a.data_ptr()
    del a
    c = pool.get((2, 4, 4, 3), torch.float32)
    assert c.data_ptr() != a_ptr and torch.equal(kept, torch.ones(1, 4, 4, 3))
    del kept, c
    assert pool.get((2, 4, 4, 3), torch.float32).data_ptr() == a_ptr  # free again: reused
    assert len(pool.buffers) == 3
    d = pool.get((1, 8, 8, 3), torch.uint8)  # another shape: a free buffer makes room for it
    assert d.shape == (1, 8, 8, 3) and len(pool.buffers) <= 3


def test_a_buffer_moved_to_shared_memory_leaves_the_pool():
    """A torch.multiprocessing queue moves a tensor's storage into shared memory in place:
    another process may read it long after this one dropped it."""
    pool = HostBuffers(limit=3)
    a = pool.get((2, 8, 8, 3), torch.float32)
    a.share_memory_()
    a_ptr = a.data_ptr()
    del a
    b = pool.get((2, 8, 8, 3), torch.float32)
    assert b.data_ptr() != a_ptr
    assert all(not x.untyped_storage().is_shared() for x in pool.buffers)


def test_free_buffers_of_another_size_are_dropped():
    pool = HostBuffers(limit=4)
    for _ in range(2):
        kept = [pool.get((4, 16, 16, 3), torch.float32) for _ in range(2)]
    del kept
    pool.get((4, 2, 2, 3), torch.float32)  # the image size changed
    assert [tuple(b.shape) for b in pool.buffers] == [(4, 2, 2, 3)]
    pool.clear()
    assert pool.buffers == []
