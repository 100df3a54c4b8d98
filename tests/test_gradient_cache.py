"""Gradient caching gives the full-batch gradients (GradCache), for every objective it covers."""

import pytest
import torch
from fixtures import tiny_batch, tiny_tcl_config

from vlalign import TCLModel
from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments

CONTRASTIVE_ONLY = dict(use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0,
                        num_fusion_layers=0)


def _config(dropout=0.0, **overrides):
    config = tiny_tcl_config(**overrides)
    for sub in (config.vision_config, config.text_config):
        sub.hidden_dropout_prob = dropout
        sub.attention_probs_dropout_prob = dropout
    return config


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _plain_and_cached(config, batch, chunk_size, ids=None):
    torch.manual_seed(0)
    plain = TCLModel(config)
    torch.manual_seed(0)
    cached = TCLModel(config)
    plain.train()
    cached.train()
    out_plain = plain(**batch, positive_ids=ids, return_loss=True)
    out_plain.loss.backward()
    out_cached = cached.gradient_cached_backward(**batch, positive_ids=ids, chunk_size=chunk_size)
    return plain, cached, out_plain, out_cached


def _assert_same_grads(a, b, atol=1e-5):
    grads_a, grads_b = _grads(a), _grads(b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol, rtol=1e-4), name


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
def test_contrastive_only_gradients_equal_full_batch(chunk_size):
    batch = tiny_batch(batch=8)
    plain, cached, out_plain, out_cached = _plain_and_cached(_config(**CONTRASTIVE_ONLY), batch, chunk_size)
    assert out_cached.loss.item() == pytest.approx(out_plain.loss.item(), rel=1e-5)
    _assert_same_grads(plain, cached)
    assert cached.temp.grad is not None


def test_class_level_positives_and_all_alignment_terms_with_momentum():
    """TCL's CMA (distillation + queue), IMC and LMI with EMA teachers: cached == plain, queues identical."""
    config = _config(itm_weight=0.0, mlm_weight=0.0, queue_size=32)
    batch = tiny_batch(batch=8)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    plain, cached, out_plain, out_cached = _plain_and_cached(config, batch, 3, ids)
    for name in ("i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text"):
        assert getattr(out_cached, f"loss_{name}").item() == pytest.approx(
            getattr(out_plain, f"loss_{name}").item(), rel=1e-5), name
    _assert_same_grads(plain, cached)
    assert torch.allclose(plain.image_queue.features, cached.image_queue.features, atol=1e-6)  # chunked teacher
    assert torch.equal(plain.image_queue.ids, cached.image_queue.ids)
    assert torch.equal(plain.momentum_vision_proj.weight, cached.momentum_vision_proj.weight)


@pytest.mark.parametrize("objective", [
    dict(contrastive_loss="decomposable"),
    dict(contrastive_loss="decomposable", z_estimate="queue", queue_size=32),
    dict(use_feature_separation=True),
    dict(use_brownian_bridge=True),
    dict(use_geometric_consistency=True),
    dict(imc_weight=1.0, lmi_weight=1.0),  # in-batch IMC (second student pass) and student LMI
])
def test_other_objectives_gradients_equal_full_batch(objective):
    batch = tiny_batch(batch=6)
    config = _config(**{**CONTRASTIVE_ONLY, **objective})
    plain, cached, out_plain, out_cached = _plain_and_cached(config, batch, 4)
    assert set(out_cached.loss_components()) == set(out_plain.loss_components())
    assert out_cached.loss.item() == pytest.approx(out_plain.loss.item(), rel=1e-5)
    _assert_same_grads(plain, cached)


def test_dropout_masks_are_replayed_per_chunk():
    """With dropout on, the cached gradients equal those of the same chunked forward kept in one graph: the
    re-run of each chunk sees exactly the dropout masks of its cached pass."""
    config = _config(dropout=0.3, **{**CONTRASTIVE_ONLY, "use_geometric_consistency": True})
    batch = tiny_batch(batch=6)
    torch.manual_seed(0)
    reference = TCLModel(config)
    torch.manual_seed(0)
    cached = TCLModel(config)
    reference.train()
    cached.train()

    torch.manual_seed(123)
    cached.gradient_cached_backward(**batch, chunk_size=4)

    torch.manual_seed(123)
    prepared, temp = reference._prepare_training(batch["input_ids"], batch["attention_mask"],
                                                 batch["pixel_values"], batch["pixel_values_view2"])
    parts = [reference._student_pass({k: v[a:b] for k, v in prepared.items()}, keep_tokens=False)
             for a, b in ((0, 4), (4, 6))]
    student = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    losses = reference._alignment_losses(student, {}, prepared, None, None, temp)
    reference._loss_total(losses).backward()
    _assert_same_grads(reference, cached, atol=1e-6)
    # and it differs from a single unchunked pass (different masks), so the test has teeth
    torch.manual_seed(0)
    unchunked = TCLModel(config)
    unchunked.train()
    torch.manual_seed(123)
    unchunked(**batch, return_loss=True).loss.backward()
    assert not torch.allclose(_grads(unchunked)["vision_proj.weight"], _grads(cached)["vision_proj.weight"])


def test_itm_and_mlm_are_computed_per_chunk():
    config = _config(queue_size=32)
    torch.manual_seed(0)
    model = TCLModel(config)
    model.train()
    out = model.gradient_cached_backward(**tiny_batch(batch=8), chunk_size=4)
    assert torch.isfinite(out.loss_itm) and torch.isfinite(out.loss_mlm)
    assert model.itm_head.weight.grad is not None and model.mlm_head.decoder.weight.grad is not None
    ita = sum(getattr(out, f"loss_{n}") for n in ("i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text")) / 6
    assert out.loss.item() == pytest.approx((ita + out.loss_itm + out.loss_mlm).item(), rel=1e-5)


def test_trainer_with_gradient_cache_matches_uncached_training(tmp_path):
    """Two SGD steps through ContrastiveTrainer: identical weights with and without caching (SGD, not Adam,
    whose normalisation would blow float rounding of near-zero gradients up to visible differences)."""
    config = _config(**CONTRASTIVE_ONLY)
    batches = [dict(tiny_batch(batch=8, seed=s), return_loss=True) for s in (1, 2)]

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, index):
            return index

    def collate(indices):
        return batches[indices[0] // 8]

    weights = []
    for chunk in (None, 3):
        torch.manual_seed(0)
        model = TCLModel(config)
        args = ContrastiveTrainingArguments(
            output_dir=str(tmp_path / str(chunk)), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-2,
            optim="sgd", report_to="none", use_cpu=True, save_strategy="no", remove_unused_columns=False, seed=0,
            logging_steps=1, dataloader_drop_last=True, gradient_cache_chunk_size=chunk)
        trainer = ContrastiveTrainer(model=model, args=args, train_dataset=Batches(), data_collator=collate)
        trainer.train()
        assert "loss_i2t" in trainer.state.log_history[0]
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name
