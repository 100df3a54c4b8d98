"""Gradient caching (GradCache, vlalign.gradient_cache): the dropout masks of each chunk are replayed, ITM and
MLM are computed per chunk, and the trainer's `gradient_cache_chunk_size` trains to the uncached weights.

That the cached gradients equal the full-batch gradients, for every objective it covers (TCL: contrastive-only at
several chunk sizes, EMA teachers with class-level positives, the decomposable loss and the regularisers; CODIS: the
codebook terms), is checked for each model by `ALBEFModelTesterMixin.test_gradient_cache_gives_full_batch_gradients`
(albef_model_tester.py; the cases are in test_modeling_tcl.py and test_modeling_codis.py)."""

import pytest
import torch
from fixtures import tiny_batch, tiny_tcl_config

from vlalign import TCLModel
from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments

CONTRASTIVE_ONLY = dict(
    use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0, num_fusion_layers=0
)


def _config(dropout=0.0, **overrides):
    config = tiny_tcl_config(**overrides)
    for sub in (config.vision_config, config.text_config):
        sub.hidden_dropout_prob = dropout
        sub.attention_probs_dropout_prob = dropout
    return config


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b, atol=1e-5):
    grads_a, grads_b = _grads(a), _grads(b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=atol, rtol=1e-4), name


def _cached_equals_chunked_in_one_graph(config):
    """Gradient-cached step (chunks 4 + 2, seed 123) against the same chunked forward kept in one graph under the
    same seed: equal gradients. Returns the batch and the cached model."""
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
    prepared, temp = reference._prepare_training(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["pixel_values_view2"]
    )
    parts = [
        reference._student_pass({k: v[a:b] for k, v in prepared.items()}, keep_tokens=False)
        for a, b in ((0, 4), (4, 6))
    ]
    student = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    losses = reference._alignment_losses(student, {}, prepared, None, None, temp)
    reference._loss_total(losses).backward()
    _assert_same_grads(reference, cached, atol=1e-6)
    return batch, cached


def test_dropout_masks_are_replayed_per_chunk():
    """With dropout on, the cached gradients equal those of the same chunked forward kept in one graph: the
    re-run of each chunk sees exactly the dropout masks of its cached pass."""
    config = _config(dropout=0.3, **{**CONTRASTIVE_ONLY, "use_geometric_consistency": True})
    batch, cached = _cached_equals_chunked_in_one_graph(config)
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
            output_dir=str(tmp_path / str(chunk)),
            per_device_train_batch_size=8,
            max_steps=2,
            learning_rate=1e-2,
            optim="sgd",
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            remove_unused_columns=False,
            seed=0,
            logging_steps=1,
            dataloader_drop_last=True,
            gradient_cache_chunk_size=chunk,
        )
        trainer = ContrastiveTrainer(model=model, args=args, train_dataset=Batches(), data_collator=collate)
        trainer.train()
        assert "loss_i2t" in trainer.state.log_history[0]
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-5), name


def test_patch_dropout_is_replayed_per_chunk():
    """Patch dropout draws from torch's RNG: the re-run of each chunk keeps the patches of its cached pass, so the
    cached gradients equal those of the same chunked forward kept in one graph (which draws the same patches)."""
    config = _config(patch_dropout=0.5, **CONTRASTIVE_ONLY)
    batch, cached = _cached_equals_chunked_in_one_graph(config)
    # a chunked pass with other patches gives other gradients, so the test has teeth
    torch.manual_seed(0)
    other = TCLModel(config)
    other.train()
    torch.manual_seed(124)
    other.gradient_cached_backward(**batch, chunk_size=4)
    assert not torch.allclose(_grads(other)["vision_proj.weight"], _grads(cached)["vision_proj.weight"])
