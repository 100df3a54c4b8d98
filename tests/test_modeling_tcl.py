"""TCLModel: what TCL adds to the ALBEF base -- its loss components and total, the float64 references of the
id-aware CMA / IMC terms and of LMI, the decomposable and sigmoid losses and the regularisers. The tests every
ALBEF-style model shares (save/load, remote code, Auto classes, pipeline, gradient caching, PEFT, bf16, EMA /
queues in the training forward, ...) run here through `ALBEFModelTesterMixin` (albef_model_tester.py)."""

import pytest
import torch
import torch.nn.functional as F
from albef_model_tester import ALBEFModelTesterMixin
from fixtures import tiny_batch, tiny_tcl_config

from vlalign import TCLConfig, TCLModel
from vlalign.losses import local_mutual_information, sigmoid_contrastive_loss

CONTRASTIVE_ONLY = dict(
    use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0, num_fusion_layers=0
)


class TestTCLModel(ALBEFModelTesterMixin):
    model_class = TCLModel
    config_class = TCLConfig
    model_type = "tcl"
    loss_terms = ("i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text", "itm", "mlm")
    own_terms_off = dict(lmi_weight=0.0)
    tiny_own_fields = dict(lmi_image_grid=2)
    patch_token_terms = ("lmi_image",)  # LMI pools the patch tokens
    peft_modules_to_save = ("itm_head",)
    gradient_cache_cases = {
        **{f"contrastive_only-chunk{k}": dict(config=CONTRASTIVE_ONLY, batch=8, chunk_size=k) for k in (1, 3, 8)},
        # TCL's CMA (distillation + queue), IMC and LMI with EMA teachers and class-level positives
        "momentum_class_positives": dict(
            config=dict(itm_weight=0.0, mlm_weight=0.0, queue_size=32),
            batch=8,
            chunk_size=3,
            positive_ids=[0, 1, 1, 2, 3, 3, 3, 4],
            terms=("i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text"),
        ),
        # the sigmoid loss (its learnable bias is a parameter compared like the others) with IMC and class positives
        "sigmoid_imc_class_positives": dict(
            config={**CONTRASTIVE_ONLY, "contrastive_loss": "sigmoid", "imc_weight": 1.0},
            batch=8,
            chunk_size=3,
            positive_ids=[0, 1, 1, 2, 3, 3, 3, 4],
            terms=("sigmoid", "i2i", "t2t"),
        ),
        # the other objectives, each on top of the contrastive-only baseline
        **{
            name: dict(config={**CONTRASTIVE_ONLY, **objective}, batch=6, chunk_size=4)
            for name, objective in {
                "decomposable": dict(contrastive_loss="decomposable"),
                "decomposable_queue_z": dict(contrastive_loss="decomposable", z_estimate="queue", queue_size=32),
                "sigmoid": dict(contrastive_loss="sigmoid"),
                "feature_separation": dict(use_feature_separation=True),
                "brownian_bridge": dict(use_brownian_bridge=True),
                "geometric_consistency": dict(use_geometric_consistency=True),
                "in_batch_imc_and_lmi": dict(imc_weight=1.0, lmi_weight=1.0),  # second student pass, student LMI
            }.items()
        },
    }

    def tiny_config(self, **overrides):
        return tiny_tcl_config(**overrides)


def _model(**overrides):
    torch.manual_seed(0)
    return TCLModel(tiny_tcl_config(**overrides))


def test_training_forward_returns_every_component_and_total():
    model = _model()
    model.train()
    out = model(**tiny_batch(), positive_ids=torch.tensor([0, 1, 1, 2]), return_loss=True, alpha=0.3)
    components = out.loss_components()
    assert set(components) == {"i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text", "itm", "mlm"}
    ita = sum(getattr(out, f"loss_{n}") for n in ("i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text")) / 6
    assert torch.allclose(out.loss, ita + out.loss_itm + out.loss_mlm)
    assert all(torch.isfinite(getattr(out, f"loss_{n}")) for n in components)
    out.loss.backward()
    assert (
        model.temp.grad is not None
        and model.vision_model.embeddings.patch_embeddings.projection.weight.grad is not None
    )
    assert all(p.grad is None for p in model.momentum_vision_model.parameters())


def test_contrastive_only_baseline_from_same_code():
    model = _model(imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0)
    model.train()
    out = model(**tiny_batch(), return_loss=True)
    assert set(out.loss_components()) == {"i2t", "t2i"}
    assert torch.allclose(out.loss, (out.loss_i2t + out.loss_t2i) / 2)


def test_no_momentum_in_batch_loss_equals_reference():
    """use_momentum=False: plain CLIP InfoNCE on in-batch student features."""
    model = _model(
        use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0, num_fusion_layers=0
    )
    model.eval()  # no dropout so the reference features match
    batch = tiny_batch()
    out = model(**batch, return_loss=True)
    img = model.get_image_features(batch["pixel_values"]).double()
    txt = model.get_text_features(batch["input_ids"], batch["attention_mask"]).double()
    t = float(model.temperature.detach())
    logits = img @ txt.t() / t
    labels = torch.arange(4)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert not hasattr(model, "image_queue")


def test_training_views_are_the_views_the_objectives_use():
    """A second augmented view is built only when something encodes it: the EMA teachers, IMC without teachers, or
    TCL's regularisers. Plain CLIP (no teachers, no IMC) trains on one view, and a batch without the second view
    gives the loss of a batch whose second view is anything at all."""
    clip = dict(use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0)
    assert _model().training_views == 2  # teachers encode the second view
    assert _model(**clip).training_views == 1
    assert _model(**{**clip, "imc_weight": 1.0}).training_views == 2
    assert _model(**{**clip, "use_feature_separation": True}).training_views == 2
    model = _model(**clip).eval()
    batch = tiny_batch()
    without = model(**{k: v for k, v in batch.items() if k != "pixel_values_view2"}, return_loss=True).loss
    noise = {**batch, "pixel_values_view2": torch.randn_like(batch["pixel_values"])}
    assert torch.equal(model(**noise, return_loss=True).loss, without)


def test_cma_and_imc_against_reference_from_teacher_features():
    """Recompute i2t / t2i / i2i / t2t in float64 from the model's own student and teacher features, as TCL's
    retrieval code defines them (models/model_retrieval.py): the cross-modal terms against distillation targets, the
    intra-modal ones against the same id-aware targets over batch + queue (every key with the query's id is a
    positive, in the batch and in the queue)."""
    model = _model(lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0, momentum=1.0).double()  # m=1: teacher fixed
    model.eval()  # deterministic (no dropout); the training path does not depend on train/eval otherwise
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch().items()}
    ids = torch.tensor([5, 6, 5, 7])
    queue_img, queue_txt = model.image_queue.features.clone(), model.text_queue.features.clone()
    queue_ids = model.image_queue.ids.clone()
    queue_ids[:3] = torch.tensor([5, 7, 9])
    model.image_queue.ids.copy_(queue_ids)
    model.text_queue.ids.copy_(queue_ids)
    alpha = 0.4
    out = model(**batch, positive_ids=ids, alpha=alpha, return_loss=True)
    with torch.no_grad():
        v = model.get_image_features(batch["pixel_values"]).double()
        t = model.get_text_features(batch["input_ids"], batch["attention_mask"]).double()
        v_m = model._image_feature(model._encode_image(batch["pixel_values_view2"], momentum=True)[1], True).double()
        t_m = model._text_feature(
            model._encode_text(batch["input_ids"], batch["attention_mask"], True)[1], True
        ).double()
    tau = float(model.temperature.detach())
    img_keys = torch.cat([v_m, queue_img.double()])
    txt_keys = torch.cat([t_m, queue_txt.double()])
    key_ids = torch.cat([ids, queue_ids])
    pos = (ids[:, None] == key_ids[None, :]).double()
    pos[torch.arange(4), torch.arange(4)] = 1
    hard = pos / pos.sum(1, keepdim=True)
    tgt_i2t = alpha * torch.softmax(v_m @ txt_keys.t() / tau, 1) + (1 - alpha) * hard
    tgt_t2i = alpha * torch.softmax(t_m @ img_keys.t() / tau, 1) + (1 - alpha) * hard
    ref_i2t = -(torch.log_softmax(v @ txt_keys.t() / tau, 1) * tgt_i2t).sum(1).mean()
    ref_t2i = -(torch.log_softmax(t @ img_keys.t() / tau, 1) * tgt_t2i).sum(1).mean()
    ref_i2i = -(torch.log_softmax(v @ img_keys.t() / tau, 1) * hard).sum(1).mean()
    ref_t2t = -(torch.log_softmax(t @ txt_keys.t() / tau, 1) * hard).sum(1).mean()
    # the batch's same-id pair and the queue's id-5 and id-7 entries really are targets of i2i
    assert hard[0, 2] > 0 and hard[0, 4] > 0 and hard[3, 5] > 0
    for name, ref in (("i2t", ref_i2t), ("t2i", ref_t2i), ("i2i", ref_i2i), ("t2t", ref_t2t)):
        torch.testing.assert_close(getattr(out, f"loss_{name}"), ref, rtol=1e-12, atol=1e-12, msg=name)


def test_imc_without_momentum_counts_same_id_views_as_positives():
    """With use_momentum=False the intra-modal terms compare two student views in the batch; with ids, the other
    view of every same-id item is a positive (float64 reference)."""
    model = _model(use_momentum=False, num_fusion_layers=0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0).double()
    model.eval()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch().items()}
    ids = torch.tensor([5, 6, 5, 7])
    out = model(**batch, positive_ids=ids, return_loss=True)
    with torch.no_grad():
        v = model.get_image_features(batch["pixel_values"])
        v2 = model.get_image_features(batch["pixel_values_view2"])
        t = model.get_text_features(batch["input_ids"], batch["attention_mask"])
    tau = float(model.temperature.detach())
    pos = (ids[:, None] == ids[None, :]).double()
    targets = pos / pos.sum(1, keepdim=True)
    ref_i2i = -(torch.log_softmax(v @ v2.t() / tau, 1) * targets).sum(1).mean()
    ref_t2t = -(torch.log_softmax(t @ t.t() / tau, 1) * targets).sum(1).mean()  # eval: both text views equal
    torch.testing.assert_close(out.loss_i2i, ref_i2i, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss_t2t, ref_t2t, rtol=1e-12, atol=1e-12)


def test_lmi_uses_teacher_locals_and_masks_text_padding():
    model = _model(cma_weight=0.0, imc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, momentum=1.0)
    model.eval()
    batch = tiny_batch()
    out = model(**batch, return_loss=True)
    with torch.no_grad():
        v = model.get_image_features(batch["pixel_values"])
        t = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        img_tokens_m = model._encode_image(batch["pixel_values_view2"], momentum=True)[0]
        patches = F.normalize(model.momentum_vision_proj(img_tokens_m[:, 1:]), dim=-1)  # (B, 16, D), 4x4 grid
        grid = patches.view(4, 4, 4, -1)
        locals_ = torch.stack([grid[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], 1)
        txt_tokens_m = model._encode_text(batch["input_ids"], batch["attention_mask"], True)[0]
        text_locals = F.normalize(model.momentum_text_proj(txt_tokens_m[:, 1:]), dim=-1)
    tau = model.temperature
    assert out.loss_lmi_image.item() == pytest.approx(local_mutual_information(v, locals_, tau).item(), rel=1e-5)
    ref_text = local_mutual_information(t, text_locals, tau, batch["attention_mask"][:, 1:])
    assert out.loss_lmi_text.item() == pytest.approx(ref_text.item(), rel=1e-5)


def test_regularisers_and_decomposable_inside_the_model_match_the_pure_functions():
    from vlalign.losses import brownian_bridge_loss, geometric_consistency_loss

    config = tiny_tcl_config(
        use_momentum=False,
        imc_weight=0.0,
        lmi_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        num_fusion_layers=0,
        contrastive_loss="decomposable",
        z_estimate="running",
        num_train_samples=10,
        use_brownian_bridge=True,
        use_geometric_consistency=True,
        use_feature_separation=True,
        geometric_consistency_weight=0.25,
    )
    for sub in (config.vision_config, config.text_config):
        sub.hidden_dropout_prob = sub.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    model = TCLModel(config)
    model.train()
    batch = tiny_batch()
    out = model(**batch, sample_ids=torch.tensor([0, 3, 5, 9]), return_loss=True)
    assert set(out.loss_components()) == {"i2t", "t2i", "separation", "bridge", "geometric"}
    with torch.no_grad():
        v = model.get_image_features(batch["pixel_values"])
        t = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        v2 = model.get_image_features(batch["pixel_values_view2"])
    assert out.loss_bridge.item() == pytest.approx(brownian_bridge_loss(v, t, v2, 0.25).item(), rel=1e-5)
    ref_gc = geometric_consistency_loss(v, t, v2, t)["total"]  # no dropout: the text "view" equals the text
    assert out.loss_geometric.item() == pytest.approx(ref_gc.item(), rel=1e-4, abs=1e-6)
    expected = (out.loss_i2t + out.loss_t2i) / 2 + out.loss_separation + out.loss_bridge + 0.25 * out.loss_geometric
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    seen = model.decomposable_loss.running_i2t.seen
    assert seen[[0, 3, 5, 9]].all() and seen.sum() == 4  # the running Z table is indexed by sample_ids
    out.loss.backward()
    assert model.vision_independent_proj.weight.grad is not None


def test_full_tcl_with_regularisers_trains():
    model = _model(use_brownian_bridge=True, use_geometric_consistency=True, use_feature_separation=True)
    model.train()
    out = model(**tiny_batch(), return_loss=True)
    assert {"separation", "bridge", "geometric", "itm", "mlm"} <= set(out.loss_components())
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------
# contrastive_loss="sigmoid": SigLIP's loss with its learnable bias

SIGMOID_ONLY = dict(CONTRASTIVE_ONLY, contrastive_loss="sigmoid")


def test_sigmoid_loss_bias_is_a_trainable_parameter_saved_under_logit_bias(tmp_path):
    model = _model(**SIGMOID_ONLY)
    assert isinstance(model.logit_bias, torch.nn.Parameter) and model.logit_bias.requires_grad
    assert model.logit_bias.tolist() == [-10.0]  # SigLIP's initialisation
    assert "logit_bias" in dict(model.named_parameters()) and "logit_bias" in model.state_dict()
    assert _model(**SIGMOID_ONLY, logit_bias_init=-4.0).logit_bias.tolist() == [-4.0]
    assert not hasattr(_model(**CONTRASTIVE_ONLY), "logit_bias")  # the softmax losses have no bias
    with torch.no_grad():
        model.logit_bias.fill_(-6.5)
    model.save_pretrained(tmp_path / "saved")
    loaded = TCLModel.from_pretrained(tmp_path / "saved")
    assert loaded.logit_bias.tolist() == [-6.5] and loaded.logit_bias.requires_grad


@pytest.mark.parametrize("imc_weight", [0.0, 1.0])
def test_sigmoid_loss_in_the_model_equals_the_function_with_its_gradients(imc_weight):
    """The training forward's cross-modal term is `sigmoid_contrastive_loss` of its features, temperature, bias and
    positive ids; it counts as two terms of the alignment mean, so the CLIP-style total is exactly the sigmoid loss
    and with IMC it is (2 * sigmoid + i2i + t2t) / 4. The bias and temperature gradients are the function's."""
    model = _model(**dict(SIGMOID_ONLY, imc_weight=imc_weight))
    model.train()
    ids = torch.tensor([0, 1, 1, 2])
    out = model(**tiny_batch(), positive_ids=ids, return_loss=True)
    expected_terms = {"sigmoid"} | ({"i2i", "t2t"} if imc_weight else set())
    assert set(out.loss_components()) == expected_terms
    img = out.image_embeds.detach().double().requires_grad_()
    txt = out.text_embeds.detach().double().requires_grad_()
    temp = model.temperature.detach().double().requires_grad_()
    bias = model.logit_bias.detach().double().requires_grad_()
    reference = sigmoid_contrastive_loss(img, txt, temp, bias, ids)
    assert out.loss_sigmoid.item() == pytest.approx(reference.item(), rel=1e-5)
    if imc_weight:
        assert out.loss.item() == pytest.approx(((2 * out.loss_sigmoid + out.loss_i2i + out.loss_t2t) / 4).item())
    else:
        assert out.loss.item() == pytest.approx(out.loss_sigmoid.item(), rel=1e-6)
        out.loss.backward()
        reference.backward()
        assert model.logit_bias.grad.item() == pytest.approx(bias.grad.item(), rel=1e-4)
        assert model.temp.grad.item() == pytest.approx(temp.grad.item(), rel=1e-4)


def test_sigmoid_loss_training_steps_lower_the_loss_and_move_the_bias():
    model = _model(**SIGMOID_ONLY)
    model.train()
    batch = tiny_batch(batch=6, seed=4)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert model.logit_bias.item() != -10.0


def test_sigmoid_loss_bias_gets_no_weight_decay(tmp_path):
    """Decay would pull the bias from SigLIP's -10 toward 0 at every step."""
    from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments

    args = ContrastiveTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, weight_decay=0.1)
    trainer = ContrastiveTrainer(model=_model(**SIGMOID_ONLY), args=args, train_dataset=[0] * 4)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert "logit_bias" not in names and "temp" not in names and "vision_proj.weight" in names


def test_sigmoid_loss_needs_the_contrastive_only_configuration():
    with pytest.raises(ValueError, match=r"TCLConfig\.contrastive_loss: .*use_momentum=False"):
        tiny_tcl_config(contrastive_loss="sigmoid")


def _tiny_siglip(bias: float):
    from transformers import SiglipConfig, SiglipModel

    text = dict(
        vocab_size=144, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, pad_token_id=0,
    )  # fmt: skip
    vision = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64)  # fmt: skip
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    with torch.no_grad():
        model.logit_bias.fill_(bias)
        model.logit_scale.fill_(float(torch.log(torch.tensor(10.0))))  # SigLIP's initial logit scale
    return model.eval()


def test_a_siglip_checkpoint_trains_its_own_bias_with_the_sigmoid_loss_and_exports_it(tmp_path):
    """from_dual_encoder_pretrained(..., contrastive_loss="sigmoid") starts from the checkpoint's bias and scale,
    trains the bias, and writes the trained value back into the exported SiglipModel."""
    from transformers import SiglipModel

    _tiny_siglip(bias=-3.0).save_pretrained(tmp_path / "siglip")
    model = TCLModel.from_dual_encoder_pretrained(
        str(tmp_path / "siglip"), use_momentum=False, imc_weight=0.0, lmi_weight=0.0, contrastive_loss="sigmoid"
    )
    assert isinstance(model.logit_bias, torch.nn.Parameter) and model.logit_bias.requires_grad
    assert model.logit_bias.tolist() == [-3.0]  # the checkpoint's, not logit_bias_init
    assert model.temperature.item() == pytest.approx(0.1, rel=1e-6)
    model.train()
    batch = tiny_batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(**batch, return_loss=True)
    assert set(out.loss_components()) == {"sigmoid"}
    out.loss.backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs().item() > 0
    optimizer.step()
    trained = model.logit_bias.item()
    assert trained != pytest.approx(-3.0, abs=1e-4)
    assert model.to_dual_encoder().logit_bias.item() == pytest.approx(trained, abs=1e-7)
    model.save_pretrained(tmp_path / "export", as_source_architecture=True)
    exported = SiglipModel.from_pretrained(tmp_path / "export")
    assert exported.logit_bias.item() == pytest.approx(trained, abs=1e-7)
