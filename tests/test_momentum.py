"""vlalign.momentum: the EMA teachers (ema_update follows the student exactly) and FeatureQueue, the ring buffer of
past features and their ids (any batch size, in order of arrival; a non-finite batch is kept out)."""

import math

import torch
from fixtures import tiny_tcl_config

from vlalign import TCLModel
from vlalign.momentum import FeatureQueue, ema_update


def test_ema_update_is_exact():
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())  # any ALBEF-style model: its student / teacher module pairs
    students, teachers = model._momentum_pairs()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before_t = [p.clone() for m in teachers for p in m.parameters()]
    before_s = [p.clone() for m in students for p in m.parameters()]
    ema_update(students, teachers, 0.9)
    after_t = [p for m in teachers for p in m.parameters()]
    for t0, s0, t1 in zip(before_t, before_s, after_t):
        # bitwise equal to the formula evaluated in the same float32 order
        assert torch.equal(t1, t0.mul(0.9).add(s0, alpha=1 - 0.9))


def test_enqueue_wraps_around_exactly():
    queue = FeatureQueue(5, 2)
    queue.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]), torch.tensor([1, 2, 3]))
    assert queue.ptr.item() == 3
    queue.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))
    assert queue.ptr.item() == 1
    assert torch.equal(queue.features[:, 0], torch.tensor([6.0, 2, 3, 4, 5]))
    assert queue.ids.tolist() == [-1, 2, 3, -1, -1]
    keys = queue.keys(torch.zeros(2, 2))
    assert keys.shape == (7, 2) and torch.equal(keys[2:], queue.features)


def test_the_queue_is_a_ring_buffer_for_any_batch_size():
    """A queue whose size the batch does not divide (30 and 8) still holds exactly the newest 30 features, in order
    of arrival from the pointer on: no divisibility rule is needed (ALBEF's reference asserts one because it writes
    a contiguous slice; this queue writes modulo its size)."""
    queue = FeatureQueue(30, 4)
    arrived = []
    for step in range(7):
        features = torch.nn.functional.normalize(
            torch.randn(8, 4, generator=torch.Generator().manual_seed(step)), dim=1
        )
        ids = torch.arange(8) + 8 * step
        queue.enqueue(features, ids)
        arrived += list(zip(features, ids.tolist()))
    newest = arrived[-30:]
    ptr = int(queue.ptr)
    assert ptr == (7 * 8) % 30
    order = [(ptr + k) % 30 for k in range(30)]  # oldest first
    assert [int(queue.ids[i]) for i in order] == [i for _, i in newest]
    assert torch.equal(queue.features[order], torch.stack([f for f, _ in newest]))


def test_queue_ignores_a_nonfinite_batch():
    torch.manual_seed(0)
    queue = FeatureQueue(size=6, dim=3)
    queue.enqueue(torch.ones(2, 3), torch.tensor([1, 2]))
    before = {k: v.clone() for k, v in queue.state_dict().items()}
    bad = torch.ones(2, 3)
    bad[1, 2] = math.nan
    queue.enqueue(bad, torch.tensor([3, 4]))
    for key, value in queue.state_dict().items():
        assert torch.equal(value, before[key]), key
    queue.enqueue(2 * torch.ones(2, 3), torch.tensor([5, 6]))
    assert int(queue.ptr) == 4 and queue.ids[2:4].tolist() == [5, 6]
    assert torch.equal(queue.features[2:4], 2 * torch.ones(2, 3))
