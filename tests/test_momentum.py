"""vlalign.momentum: the EMA teachers (ema_update follows the student exactly; the teacher of a frozen parameter is
the student's tensor, skipped by the update) and FeatureQueue, the ring buffer of past features and their ids (any
batch size, in order of arrival; a non-finite batch is kept out)."""

import math

import pytest
import torch
from albef_model_tester import PEFT_WARNING_FILTER
from fixtures import tiny_batch, tiny_tcl_config

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


def test_share_frozen_parameters_makes_frozen_teachers_the_students_tensors_and_unties_trainable_ones():
    from torch import nn

    from vlalign.momentum import copy_parameters, share_frozen_parameters

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    teacher = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    copy_parameters([student], [teacher])
    student[0].requires_grad_(False)
    share_frozen_parameters(student, teacher)
    assert teacher[0].weight is student[0].weight and teacher[0].bias is student[0].bias
    assert teacher[1].weight is not student[1].weight
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    frozen = student[0].weight.clone()
    trainable_teacher = teacher[1].weight.clone()
    ema_update([student], [teacher], 0.9)
    # the shared pair is skipped: 0.9 * w + 0.1 * w is not w in floating point, and the student would move
    assert torch.equal(student[0].weight, frozen) and teacher[0].weight is student[0].weight
    assert torch.equal(teacher[1].weight, trainable_teacher.mul(0.9).add(student[1].weight, alpha=0.1))
    # unfrozen again: the teacher gets its own copy, equal to the student, not trainable
    student[0].requires_grad_(True)
    share_frozen_parameters(student, teacher)
    assert teacher[0].weight is not student[0].weight and torch.equal(teacher[0].weight, student[0].weight)
    assert teacher[0].weight.data_ptr() != student[0].weight.data_ptr() and not teacher[0].weight.requires_grad


@pytest.mark.filterwarnings(PEFT_WARNING_FILTER)
def test_lora_on_a_locked_layer_is_refused_by_the_ema_update_and_locking_after_peft_is_refused():
    """A locked layer's teacher is the student's base weight; an adapter there would make the EMA write base + delta
    into the student's own tensor, so the update refuses it. Locking an adapted model is refused too."""
    peft = pytest.importorskip("peft")

    model = TCLModel(tiny_tcl_config())
    model.lock_image_tower()
    adapted = peft.get_peft_model(
        model, peft.LoraConfig(target_modules=r"vision_model\..*\.q_proj", r=2, init_lora_weights=False)
    )
    with pytest.raises(RuntimeError, match=r"momentum_vision_model\..*q_proj.* frozen \(locked\) tensor"):
        adapted.base_model.model.momentum_update()
    with pytest.raises(ValueError, match="lock vision_model before adapting the model with PEFT"):
        adapted.base_model.model.lock_image_tower()
    # LoRA on the unlocked tower only is fine: the frozen vision teacher stays shared
    model = TCLModel(tiny_tcl_config())
    model.lock_image_tower()
    adapted = peft.get_peft_model(
        model,
        peft.LoraConfig(target_modules=r"text_model\..*\.(query|value)", r=2, init_lora_weights=False),
    )
    adapted(**tiny_batch(), return_loss=True).loss.backward()
    base = adapted.base_model.model
    assert (
        base.momentum_vision_model.layers[0].attention.q_proj.weight
        is base.vision_model.layers[0].attention.q_proj.weight
    )
