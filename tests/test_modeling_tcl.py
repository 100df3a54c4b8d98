"""TCLModel: components, EMA, queues, fusion, save/load, remote code, pipeline."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures import BLOCK_VLALIGN, TINY_TEXT, TINY_VISION, tiny_batch, tiny_tcl_config
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from vlalign import TCLConfig, TCLModel
from vlalign.momentum import FeatureQueue, ema_update
from vlalign.losses import local_mutual_information

REPO = Path(__file__).resolve().parent.parent


def _model(**overrides):
    torch.manual_seed(0)
    return TCLModel(tiny_tcl_config(**overrides))


def test_auto_classes_resolve_tcl():
    config = tiny_tcl_config()
    assert isinstance(AutoConfig.for_model("tcl"), TCLConfig)
    assert type(AutoModel.from_config(config)) is TCLModel
    assert type(AutoModelForZeroShotImageClassification.from_config(config)) is TCLModel


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
    assert model.temp.grad is not None and model.vision_model.embeddings.patch_embeddings.projection.weight.grad is not None
    assert all(p.grad is None for p in model.momentum_vision_model.parameters())


def test_contrastive_only_baseline_from_same_code():
    model = _model(imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0)
    model.train()
    out = model(**tiny_batch(), return_loss=True)
    assert set(out.loss_components()) == {"i2t", "t2i"}
    assert torch.allclose(out.loss, (out.loss_i2t + out.loss_t2i) / 2)


def test_no_momentum_in_batch_loss_equals_reference():
    """use_momentum=False: plain CLIP InfoNCE on in-batch student features."""
    model = _model(use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0,
                   num_fusion_layers=0)
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
        v_m = model._image_feature(model._image_tokens(batch["pixel_values_view2"], momentum=True), True).double()
        t_m = model._text_feature(model._text_tokens(batch["input_ids"], batch["attention_mask"], True), True).double()
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


def test_itm_hard_negatives_are_drawn_from_student_against_teacher_similarities(monkeypatch):
    """ALBEF / TCL draw a text's negative image from softmax(student text . teacher image / t) and an image's
    negative text from softmax(student image . teacher text / t), same-id pairs excluded: the distributions the
    model samples from equal that float64 reference."""
    import vlalign.modeling_albef as modeling_albef

    seen = []
    real = modeling_albef.sample_hard_negatives

    def recording(similarity, positive_mask, generator=None):
        seen.append((similarity.clone(), positive_mask.clone()))
        return real(similarity, positive_mask, generator)

    monkeypatch.setattr(modeling_albef, "sample_hard_negatives", recording)
    model = _model(lmi_weight=0.0, mlm_weight=0.0, momentum=0.5).double()
    model.eval()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch().items()}
    ids = torch.tensor([5, 6, 5, 7])
    model(**batch, positive_ids=ids, return_loss=True)
    with torch.no_grad():  # the teacher after this step's EMA update is the one the step used
        v = model.get_image_features(batch["pixel_values"])
        t = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        v_m = model._image_feature(model._image_tokens(batch["pixel_values_view2"], momentum=True), True)
        t_m = model._text_feature(model._text_tokens(batch["input_ids"], batch["attention_mask"], True), True)
    tau = float(model.temperature.detach())
    positive = (ids[:, None] == ids[None, :]) | torch.eye(4, dtype=torch.bool)
    (sim_t2i, mask_t2i), (sim_i2t, mask_i2t) = seen

    def distribution(sim, mask):
        return torch.softmax(sim.double(), 1).masked_fill(mask, 0.0) / torch.softmax(sim.double(), 1).masked_fill(
            mask, 0.0).sum(1, keepdim=True)

    assert torch.equal(mask_t2i, positive) and torch.equal(mask_i2t, positive)
    torch.testing.assert_close(distribution(sim_t2i, mask_t2i), distribution(t @ v_m.t() / tau, positive),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(distribution(sim_i2t, mask_i2t), distribution(v @ t_m.t() / tau, positive),
                               rtol=1e-12, atol=1e-12)
    # the comparison has teeth: student x student similarities give another distribution
    assert (distribution(t @ v.t() / tau, positive) - distribution(t @ v_m.t() / tau, positive)).abs().max() > 1e-3


def test_lmi_uses_teacher_locals_and_masks_text_padding():
    model = _model(cma_weight=0.0, imc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, momentum=1.0)
    model.eval()
    batch = tiny_batch()
    out = model(**batch, return_loss=True)
    with torch.no_grad():
        v = model.get_image_features(batch["pixel_values"])
        t = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        img_tokens_m = model._image_tokens(batch["pixel_values_view2"], momentum=True)
        patches = F.normalize(model.momentum_vision_proj(img_tokens_m[:, 1:]), dim=-1)  # (B, 16, D), 4x4 grid
        grid = patches.view(4, 4, 4, -1)
        locals_ = torch.stack([grid[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], 1)
        txt_tokens_m = model._text_tokens(batch["input_ids"], batch["attention_mask"], True)
        text_locals = F.normalize(model.momentum_text_proj(txt_tokens_m[:, 1:]), dim=-1)
    tau = model.temperature
    assert out.loss_lmi_image.item() == pytest.approx(local_mutual_information(v, locals_, tau).item(), rel=1e-5)
    ref_text = local_mutual_information(t, text_locals, tau, batch["attention_mask"][:, 1:])
    assert out.loss_lmi_text.item() == pytest.approx(ref_text.item(), rel=1e-5)


def test_ema_update_is_exact():
    model = _model()
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


def test_training_forward_applies_ema_before_teacher_pass():
    model = _model(itm_weight=0.0, mlm_weight=0.0)
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    teacher_before = model.momentum_vision_proj.weight.clone()
    model.train()
    model(**tiny_batch(), return_loss=True)
    expected = teacher_before.mul(0.995).add(model.vision_proj.weight, alpha=1 - 0.995)
    assert torch.equal(model.momentum_vision_proj.weight, expected)


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


def test_model_queues_receive_teacher_features_in_order():
    model = _model(itm_weight=0.0, mlm_weight=0.0, queue_size=8)
    model.eval()
    batch = tiny_batch()
    ids = torch.tensor([10, 11, 12, 13])
    for step in range(3):
        model(**batch, positive_ids=ids + 4 * step, return_loss=True)
    # 12 items written into 8 slots: slots 0-3 hold step 2, slots 4-7 step 1; pointer at 4
    assert model.image_queue.ptr.item() == model.text_queue.ptr.item() == 4
    assert model.image_queue.ids.tolist() == [18, 19, 20, 21, 14, 15, 16, 17]
    with torch.no_grad():
        v_m = model._image_feature(model._image_tokens(batch["pixel_values_view2"], momentum=True), True)
    assert torch.allclose(model.image_queue.features[:4], v_m, atol=1e-5)


def test_temperature_is_clamped():
    model = _model(itm_weight=0.0, mlm_weight=0.0)
    with torch.no_grad():
        model.temp.fill_(5.0)
    out = model(**tiny_batch(), return_loss=True)
    assert model.temp.item() == pytest.approx(0.5)
    assert out.temperature.item() == pytest.approx(0.5)


def test_fusion_self_attention_is_bidirectional():
    model = _model()
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        image_tokens = model.get_image_tokens(batch["pixel_values"])
        text = model._text_tokens(batch["input_ids"], torch.ones_like(batch["input_ids"]))
        fused = model.fusion_model(text, torch.ones_like(batch["input_ids"]), image_tokens)
        changed = text.clone()
        changed[:, -1] += 1.0  # change only the last token
        fused_changed = model.fusion_model(changed, torch.ones_like(batch["input_ids"]), image_tokens)
    assert (fused[:, 0] - fused_changed[:, 0]).abs().max() > 1e-4


def test_itm_score_and_inference_logits():
    model = _model()
    model.eval()
    b = tiny_batch()
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
        scores = model.itm_score(b["input_ids"], b["attention_mask"], b["pixel_values"])
    assert out.loss is None and out.logits_per_image.shape == (4, 4)
    assert torch.allclose(out.logits_per_image, out.logits_per_text.t())
    expected = out.image_embeds @ out.text_embeds.t() / model.temperature
    assert torch.allclose(out.logits_per_image, expected, atol=1e-5)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()


def test_return_dict_false_gives_the_output_fields_as_a_tuple():
    model = _model()
    model.eval()
    b = tiny_batch()
    inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    with torch.no_grad():
        out = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(out.to_tuple()) == 5
    for got, expected in zip(as_tuple, out.to_tuple()):
        torch.testing.assert_close(got, expected)
    twin = copy.deepcopy(model)  # a training forward moves the teachers and queues: run each on its own copy
    torch.manual_seed(0)
    trained = model(**inputs, return_loss=True)
    torch.manual_seed(0)
    trained_tuple = twin(**inputs, return_loss=True, return_dict=False)
    assert len(trained_tuple) == len(trained.to_tuple())
    for got, expected in zip(trained_tuple, trained.to_tuple()):
        torch.testing.assert_close(got, expected)


def test_bf16_autocast_losses_are_float32_and_finite():
    model = _model()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**tiny_batch(), return_loss=True)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(getattr(out, f"loss_{n}").dtype == torch.float32 for n in out.loss_components())


def test_save_load_identical_outputs_and_auto_map(tmp_path):
    model = _model()
    model.train()
    model(**tiny_batch(), positive_ids=torch.arange(4), return_loss=True)  # move queues / EMA off init
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_tcl.TCLConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_tcl.TCLModel"
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_tcl.TCLModel"
    for name in ("modeling_tcl.py", "configuration_tcl.py", "modeling_albef.py", "loading.py", "momentum.py",
                 "gradient_cache.py", "losses.py", "model.safetensors"):
        assert (tmp_path / name).exists(), name
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is TCLModel
    assert list(model.state_dict()) == list(loaded.state_dict())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    model.eval()
    loaded.eval()
    b = tiny_batch(seed=3)
    with torch.no_grad():
        o1 = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
        o2 = loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    assert torch.equal(o1.logits_per_image, o2.logits_per_image)


def _save_tiny_with_processor(path, processor):
    model = _model()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


def test_remote_code_loads_without_vlalign(tmp_path, digits_processor_16):
    folder = tmp_path / "tiny-tcl"
    model = _save_tiny_with_processor(folder, digits_processor_16)
    model.eval()
    b = tiny_batch(seed=5)
    with torch.no_grad():
        expected = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         pixel_values=b["pixel_values"]).logits_per_image
    torch.save(b, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = BLOCK_VLALIGN + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForZeroShotImageClassification, pipeline
        from PIL import Image
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
        model.eval()
        b = torch.load({str(tmp_path / 'batch.pt')!r})
        with torch.no_grad():
            out = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'], pixel_values=b['pixel_values'])
        assert torch.allclose(out.logits_per_image, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-6)
        zs = AutoModelForZeroShotImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pipe = pipeline('zero-shot-image-classification', model={str(folder)!r}, trust_remote_code=True)
        result = pipe(Image.new('RGB', (20, 20), 'white'), candidate_labels=['a handwritten digit one', 'a handwritten digit two'])
        assert abs(sum(r['score'] for r in result) - 1) < 1e-5, result
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == 'VLAlignProcessor', type(processor)
        assert type(processor).__module__.startswith('transformers_modules'), type(processor).__module__
        views = processor(images=[Image.new('RGB', (20, 20))], text=['a handwritten digit one'], two_views=True)
        assert views['pixel_values_view2'].shape == (1, 3, 16, 16)
        import vlalign
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    # the script ends by importing vlalign, which must fail: that proves it really ran without the package
    assert "vlalign is blocked in this test" in proc.stderr, proc.stderr[-3000:]
    assert "AssertionError" not in proc.stderr, proc.stderr[-3000:]


def test_zero_shot_pipeline_on_saved_tiny_model(tmp_path, digits_processor_16):
    from PIL import Image
    from transformers import pipeline

    _save_tiny_with_processor(tmp_path, digits_processor_16)
    pipe = pipeline("zero-shot-image-classification", model=str(tmp_path))
    labels = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three"]
    result = pipe(Image.new("RGB", (20, 20), "white"), candidate_labels=labels, hypothesis_template="{}")
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
    # the pipeline's scores are the model's own softmax over the candidate prompts
    model = pipe.model
    processor = digits_processor_16
    inputs = processor(images=[Image.new("RGB", (20, 20), "white")], text=labels, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(-1)[0]
    by_label = {r["label"]: r["score"] for r in result}
    for label, p in zip(labels, probs):
        assert by_label[label] == pytest.approx(p.item(), abs=1e-4)


def test_from_vision_text_pretrained_splits_text_layers(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel

    torch.manual_seed(1)
    vit = ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"}))
    bert = BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    model = TCLModel.from_vision_text_pretrained(
        str(tmp_path / "vit"), str(tmp_path / "bert"), num_fusion_layers=1, embed_dim=16, queue_size=32,
        mask_token_id=4, lmi_image_grid=2,
    )
    for key, value in vit.state_dict().items():
        if not key.startswith("pooler."):
            assert torch.equal(model.vision_model.state_dict()[key], value), key
    assert torch.equal(model.text_model.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight)
    assert torch.equal(model.text_model.encoder.layer[1].output.dense.weight, bert.bert.encoder.layer[1].output.dense.weight)
    # the third BERT layer becomes fusion layer 0
    assert torch.equal(model.fusion_model.layer[0].attention.self.key.weight, bert.bert.encoder.layer[2].attention.self.key.weight)
    assert torch.equal(model.fusion_model.layer[0].intermediate.dense.weight, bert.bert.encoder.layer[2].intermediate.dense.weight)
    assert torch.equal(model.mlm_head.decoder.weight, bert.cls.predictions.decoder.weight)
    assert torch.equal(model.momentum_fusion_model.layer[0].attention.self.key.weight,
                       model.fusion_model.layer[0].attention.self.key.weight)
    assert len(model.text_model.encoder.layer) == 2


def test_from_vision_text_pretrained_rejects_mismatched_checkpoint(tmp_path):
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "v")
    BertModel(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="num_fusion_layers"):
        TCLModel.from_vision_text_pretrained(str(tmp_path / "v"), str(tmp_path / "t"), num_fusion_layers=5,
                                             embed_dim=16, queue_size=32, mask_token_id=4, lmi_image_grid=2)


@pytest.mark.parametrize(
    "vision_config",
    [
        dict(model_type="deit", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
             num_attention_heads=4, intermediate_size=64),  # [CLS] + distillation token before the patches
        dict(model_type="clip_vision_model", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
             num_attention_heads=4, intermediate_size=64, projection_dim=16),
    ],
)
def test_other_vision_encoders_with_patch_tokens(vision_config):
    model = TCLModel(tiny_tcl_config(vision_config=vision_config))
    model.train()
    out = model(**tiny_batch(), return_loss=True)
    assert torch.isfinite(out.loss) and out.loss_lmi_image is not None
    out.loss.backward()


def test_roberta_text_encoder():
    text = dict(model_type="roberta", vocab_size=144, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=40, pad_token_id=1)
    model = TCLModel(tiny_tcl_config(text_config=text))
    model.train()
    out = model(**tiny_batch(), return_loss=True)
    assert torch.isfinite(out.loss)


def test_gradient_checkpointing_gives_identical_gradients():
    config = tiny_tcl_config(use_momentum=False, imc_weight=0.0, lmi_weight=0.0, mlm_weight=0.0)
    for sub in (config.vision_config, config.text_config):
        sub.hidden_dropout_prob = sub.attention_probs_dropout_prob = 0.0
    batch = dict(tiny_batch(), return_loss=True)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = TCLModel(config)
        model.train()
        if checkpointing:
            # `activation_checkpointing_enable` from transformers 5.23 on, `gradient_checkpointing_enable` before
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            assert model.fusion_model.layer[0].gradient_checkpointing
        torch.manual_seed(1)  # same ITM negatives
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_from_vision_text_pretrained_takes_the_vision_half_of_a_clip_checkpoint(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, CLIPConfig, CLIPModel

    torch.manual_seed(2)
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64),
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=16),
        projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(
        tmp_path / "bert")
    model = TCLModel.from_vision_text_pretrained(str(tmp_path / "clip"), str(tmp_path / "bert"), num_fusion_layers=1,
                                                 embed_dim=16, queue_size=32, mask_token_id=4, lmi_image_grid=2)
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)


def test_regularisers_and_decomposable_inside_the_model_match_the_pure_functions():
    from vlalign.losses import brownian_bridge_loss, geometric_consistency_loss

    config = tiny_tcl_config(use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0,
                             num_fusion_layers=0, contrastive_loss="decomposable", z_estimate="running",
                             num_train_samples=10, use_brownian_bridge=True, use_geometric_consistency=True,
                             use_feature_separation=True, geometric_consistency_weight=0.25)
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
    expected = ((out.loss_i2t + out.loss_t2i) / 2 + out.loss_separation + out.loss_bridge
                + 0.25 * out.loss_geometric)
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


def test_teachers_and_fixed_temperature_stay_frozen_after_from_pretrained(tmp_path):
    """transformers' loader makes every parameter trainable; teachers must not be (DDP would see unused
    parameters, optimisers would hold them)."""
    _model(learnable_temperature=False).save_pretrained(tmp_path)
    for loaded in (TCLModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path),
                   TCLModel.from_pretrained(tmp_path, output_loading_info=True)[0]):
        teachers = [n for n, p in loaded.named_parameters() if n.startswith("momentum_")]
        assert teachers and not any(p.requires_grad for n, p in loaded.named_parameters() if n in teachers)
        assert not loaded.temp.requires_grad
        assert loaded.vision_model.embeddings.cls_token.requires_grad
