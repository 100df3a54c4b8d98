"""EMA teachers and the feature queue (vlalign.momentum)."""

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
