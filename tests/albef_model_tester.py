"""`ALBEFModelTesterMixin`: the tests that every ALBEF-style model (TCL, CODIS) must pass, written once, as
transformers' `ModelTesterMixin`.

Not a test module (pytest does not collect this file, and the mixin's name does not start with ``Test``): a test
module defines ``class TestTCLModel(ALBEFModelTesterMixin)`` and sets the class attributes below; pytest then runs
every ``test_*`` method here for that model. What a model adds of its own (TCL's LMI, CODIS's codebook) is tested
in its own module. Model-independent pieces of the base are tested in test_modeling_albef.py and test_momentum.py.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from fixtures import BLOCK_VLALIGN, TINY_TEXT, TINY_VISION, tiny_batch
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

# LoRA on the query / value projections of the student towers and the fusion layers (BERT names them
# query/value, transformers' ViT q_proj/v_proj) and on the two projection heads. A regex, because a list of names
# matches by suffix and would also adapt the EMA teachers `momentum_*` (refused, see test_peft.py).
ALBEF_LORA_TARGETS = r"(vision_model|text_model|fusion_model)\..*\.(query|value|q_proj|v_proj)|(vision_proj|text_proj)"
LORA_STEPS = 6
LORA_LR = 1e-2
# peft asks transformers for the deprecated `is_gradient_checkpointing` when it wraps a model
PEFT_WARNING_FILTER = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
# the files a saved folder carries besides the model's own modeling_<type>.py / configuration_<type>.py
SHARED_CODE_FILES = (
    "modeling_albef.py",
    "configuration_albef.py",
    "loading.py",
    "towers.py",
    "momentum.py",
    "gradient_cache.py",
    "losses.py",
    "processing_vlalign.py",
)


def randomize_weights(model, seed=0):
    """O(1) random student weights (the 0.02 init makes every embedding nearly the same, so that a few steps
    cannot move the in-batch contrastive loss), then teachers = students again."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.startswith("momentum_"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.copy_params_to_momentum()
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def eval_inference(model, batch):
    """Eval-mode CLIP-style outputs (no dropout, no EMA / queue update); the train/eval mode is restored."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
        )
    model.train(was_training)
    return out


def _in_batch_loss(model, batch):
    logits = eval_inference(model, batch).logits_per_image
    return F.cross_entropy(logits, torch.arange(logits.shape[0])).item()


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class ALBEFModelTesterMixin:
    """Shared tests of `ALBEFModel` subclasses. A concrete ``Test<Model>`` class sets:"""

    model_class = None  # TCLModel / CODISModel
    config_class = None  # TCLConfig / CODISConfig
    model_type = None  # "tcl" / "codis": config.json's model_type, configuration_<type>.py, modeling_<type>.py
    # every loss component of the default tiny config's training forward
    loss_terms = ()
    # config overrides that switch the model's own alignment terms off (what remains: the ALBEF terms)
    own_terms_off = {}
    # config fields that only this model has and from_vision_text_pretrained needs for a tiny model
    tiny_own_fields = {}
    # parameters only this model has (checked where present: saved, trained, given gradients)
    own_parameter_names = ()
    # config overrides of the save/load and bf16 tests (to cover the model's optional modules)
    save_load_overrides = {}
    bf16_overrides = {}
    # config overrides of the model saved for the pipeline / remote-code tests
    pipeline_overrides = {}
    # a model method (pixel_values, input_ids, attention_mask) -> ModelOutput whose fields must survive save/load
    # and remote code too (CODIS: get_codes); None: the logits only
    extra_outputs_method = None
    # loss terms that read the vision tower's patch tokens (must be computed for any vision encoder)
    patch_token_terms = ()
    # PEFT: the modules without an EMA teacher that are trained fully (`modules_to_save`)
    peft_modules_to_save = ()
    # gradient caching: case id -> dict(config=overrides, batch=size, seed=, chunk_size=, positive_ids=, terms=)
    gradient_cache_cases = {}

    def tiny_config(self, **overrides):
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------------

    def make_model(self, **overrides):
        torch.manual_seed(0)
        return self.model_class(self.tiny_config(**overrides))

    def config_without_dropout(self, **overrides):
        config = self.tiny_config(**overrides)
        for sub in (config.vision_config, config.text_config):
            sub.hidden_dropout_prob = sub.attention_probs_dropout_prob = 0.0
        return config

    def extra_outputs(self, model, b):
        if self.extra_outputs_method is None:
            return {}
        with torch.no_grad():
            out = getattr(model, self.extra_outputs_method)(b["pixel_values"], b["input_ids"], b["attention_mask"])
        return dict(out.items())

    def save_tiny_with_processor(self, path, processor):
        model = self.make_model(**self.pipeline_overrides)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return model

    def pytest_generate_tests(self, metafunc):
        """Per-model parameters (pytest calls this for each test method of a concrete class)."""
        if "gradient_cache_case" in metafunc.fixturenames:
            cases = self.gradient_cache_cases
            metafunc.parametrize("gradient_cache_case", list(cases.values()), ids=list(cases))

    # -- Auto classes ----------------------------------------------------------------------------------------

    def test_auto_classes_resolve(self):
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

        from vlalign import VLAlignProcessor

        config = self.tiny_config()
        assert type(AutoConfig.for_model(self.model_type)) is self.config_class
        assert type(AutoModel.from_config(config)) is self.model_class
        assert type(AutoModelForZeroShotImageClassification.from_config(config)) is self.model_class
        assert PROCESSOR_MAPPING[self.config_class] is VLAlignProcessor

    # -- training forward: EMA, queues, temperature, ITM negatives -------------------------------------------

    def test_training_forward_applies_ema_before_teacher_pass(self):
        model = self.make_model(itm_weight=0.0, mlm_weight=0.0)
        assert model.config.momentum == 0.995
        with torch.no_grad():
            model.vision_proj.weight.add_(1.0)
        teacher_before = model.momentum_vision_proj.weight.clone()
        model.train()
        model(**tiny_batch(), return_loss=True)
        expected = teacher_before.mul(0.995).add(model.vision_proj.weight, alpha=1 - 0.995)
        assert torch.equal(model.momentum_vision_proj.weight, expected)

    def test_model_queues_receive_teacher_features_in_order(self):
        model = self.make_model(itm_weight=0.0, mlm_weight=0.0, queue_size=8)
        model.eval()
        batch = tiny_batch()
        ids = torch.tensor([10, 11, 12, 13])
        for step in range(3):
            model(**batch, positive_ids=ids + 4 * step, return_loss=True)
        # 12 items written into 8 slots: slots 0-3 hold step 2, slots 4-7 step 1; pointer at 4
        assert model.image_queue.ptr.item() == model.text_queue.ptr.item() == 4
        assert model.image_queue.ids.tolist() == [18, 19, 20, 21, 14, 15, 16, 17]
        with torch.no_grad():
            v_m = model._image_feature(model._encode_image(batch["pixel_values_view2"], momentum=True)[1], True)
        assert torch.allclose(model.image_queue.features[:4], v_m, atol=1e-5)

    def test_temperature_is_clamped(self):
        model = self.make_model(itm_weight=0.0, mlm_weight=0.0)
        with torch.no_grad():
            model.temp.fill_(5.0)
        out = model(**tiny_batch(), return_loss=True)
        assert model.temp.item() == pytest.approx(0.5)
        assert out.temperature.item() == pytest.approx(0.5)

    def test_itm_hard_negatives_are_drawn_from_student_against_teacher_similarities(self, monkeypatch):
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
        model = self.make_model(**self.own_terms_off, mlm_weight=0.0, momentum=0.5).double()
        model.eval()
        batch = {k: v.double() if v.is_floating_point() else v for k, v in tiny_batch().items()}
        ids = torch.tensor([5, 6, 5, 7])
        model(**batch, positive_ids=ids, return_loss=True)
        with torch.no_grad():  # the teacher after this step's EMA update is the one the step used
            v = model.get_image_features(batch["pixel_values"])
            t = model.get_text_features(batch["input_ids"], batch["attention_mask"])
            v_m = model._image_feature(model._encode_image(batch["pixel_values_view2"], momentum=True)[1], True)
            t_m = model._text_feature(model._encode_text(batch["input_ids"], batch["attention_mask"], True)[1], True)
        tau = float(model.temperature.detach())
        positive = (ids[:, None] == ids[None, :]) | torch.eye(4, dtype=torch.bool)
        (sim_t2i, mask_t2i), (sim_i2t, mask_i2t) = seen

        def distribution(sim, mask):
            return torch.softmax(sim.double(), 1).masked_fill(mask, 0.0) / torch.softmax(sim.double(), 1).masked_fill(
                mask, 0.0
            ).sum(1, keepdim=True)

        assert torch.equal(mask_t2i, positive) and torch.equal(mask_i2t, positive)
        torch.testing.assert_close(
            distribution(sim_t2i, mask_t2i), distribution(t @ v_m.t() / tau, positive), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(
            distribution(sim_i2t, mask_i2t), distribution(v @ t_m.t() / tau, positive), rtol=1e-12, atol=1e-12
        )
        # the comparison has teeth: student x student similarities give another distribution
        assert (distribution(t @ v.t() / tau, positive) - distribution(t @ v_m.t() / tau, positive)).abs().max() > 1e-3

    def test_bf16_autocast_losses_are_float32_and_finite(self):
        model = self.make_model(**self.bf16_overrides)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**tiny_batch(), return_loss=True)
        assert set(out.loss_components()) == set(self.loss_terms)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        for name in out.loss_components():
            value = getattr(out, f"loss_{name}")
            assert value.dtype == torch.float32 and torch.isfinite(value), name
        out.loss.backward()
        parameters = dict(model.named_parameters())
        for name in ("vision_proj.weight", "text_proj.weight", *self.own_parameter_names):
            if name in parameters:
                grad = parameters[name].grad
                assert torch.isfinite(grad).all() and grad.abs().max() > 0, name

    # -- inference API ---------------------------------------------------------------------------------------

    def test_itm_score_and_inference_logits(self):
        model = self.make_model()
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

    def test_return_dict_false_gives_the_output_fields_as_a_tuple(self):
        model = self.make_model()
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

    # -- save / load, remote code, pipeline ------------------------------------------------------------------

    def test_save_and_load_round_trip(self, tmp_path):
        """safetensors only; every tensor, the logits and the model's extra outputs identical after loading."""
        model = self.make_model(**self.save_load_overrides)
        model.train()
        model(**tiny_batch(), positive_ids=torch.arange(4), return_loss=True)  # move queues / EMA off init
        model.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        own = self.model_type
        assert config["model_type"] == own
        assert config["auto_map"]["AutoConfig"] == f"configuration_{own}.{self.config_class.__name__}"
        assert config["auto_map"]["AutoModel"] == f"modeling_{own}.{self.model_class.__name__}"
        assert (
            config["auto_map"]["AutoModelForZeroShotImageClassification"]
            == f"modeling_{own}.{self.model_class.__name__}"
        )
        for name in (f"modeling_{own}.py", f"configuration_{own}.py", *SHARED_CODE_FILES, "model.safetensors"):
            assert (tmp_path / name).exists(), name
        assert not list(tmp_path.glob("*.bin"))
        loaded = AutoModel.from_pretrained(tmp_path)
        assert type(loaded) is self.model_class
        for field, value in self.save_load_overrides.items():
            assert getattr(loaded.config, field) == value, field
        assert list(model.state_dict()) == list(loaded.state_dict())
        for name in self.own_parameter_names:
            assert name in loaded.state_dict(), name
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        model.eval()
        loaded.eval()
        b = tiny_batch(seed=3)
        with torch.no_grad():
            o1 = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
            o2 = loaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
        assert torch.equal(o1.logits_per_image, o2.logits_per_image)
        e1, e2 = self.extra_outputs(model, b), self.extra_outputs(loaded, b)
        assert e1.keys() == e2.keys()
        for key in e1:
            assert torch.equal(e1[key], e2[key]), key

    def test_remote_code_loads_without_vlalign(self, tmp_path, digits_processor_16):
        from PIL import Image

        folder = tmp_path / f"tiny-{self.model_type}"
        model = self.save_tiny_with_processor(folder, digits_processor_16)
        model.eval()
        b = tiny_batch(seed=5)
        with torch.no_grad():
            logits = model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"]
            ).logits_per_image
        labels = ["a handwritten digit one", "a handwritten digit two"]
        inputs = digits_processor_16(images=[Image.new("RGB", (20, 20), "white")], text=labels, return_tensors="pt")
        with torch.no_grad():
            zero_shot = model(**inputs).logits_per_image.softmax(-1)[0]
        torch.save(b, tmp_path / "batch.pt")
        torch.save(
            dict(logits=logits, extras=self.extra_outputs(model, b), zero_shot=dict(zip(labels, zero_shot.tolist()))),
            tmp_path / "expected.pt",
        )
        script = BLOCK_VLALIGN + textwrap.dedent(
            f"""
            import torch
            from transformers import AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor, pipeline
            from PIL import Image
            model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
            assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
            assert type(model).__name__ == {self.model_class.__name__!r}, type(model)
            model.eval()
            b = torch.load({str(tmp_path / "batch.pt")!r})
            expected = torch.load({str(tmp_path / "expected.pt")!r})
            with torch.no_grad():
                out = model(input_ids=b['input_ids'], attention_mask=b['attention_mask'],
                            pixel_values=b['pixel_values'])
            assert torch.allclose(out.logits_per_image, expected['logits'], atol=1e-6)
            method = {self.extra_outputs_method!r}
            if method is not None:
                with torch.no_grad():
                    extras = getattr(model, method)(b['pixel_values'], b['input_ids'], b['attention_mask'])
                assert set(extras.keys()) == set(expected['extras']), (extras.keys(), expected['extras'].keys())
                for key, value in expected['extras'].items():
                    if value.is_floating_point():
                        assert torch.allclose(extras[key], value, atol=1e-6), key
                    else:
                        assert torch.equal(extras[key], value), (key, extras[key], value)
            zs = AutoModelForZeroShotImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
            assert type(zs).__module__.startswith('transformers_modules'), type(zs).__module__
            pipe = pipeline('zero-shot-image-classification', model={str(folder)!r}, trust_remote_code=True)
            assert type(pipe.model).__module__.startswith('transformers_modules'), type(pipe.model).__module__
            result = pipe(Image.new('RGB', (20, 20), 'white'), candidate_labels=list(expected['zero_shot']),
                          hypothesis_template='{{}}')
            assert abs(sum(r['score'] for r in result) - 1) < 1e-5, result
            for r in result:  # the model's own softmax over the prompts, as computed with vlalign in the parent
                assert abs(r['score'] - expected['zero_shot'][r['label']]) < 1e-4, (result, expected['zero_shot'])
            processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
            assert type(processor).__name__ == 'VLAlignProcessor', type(processor)
            assert type(processor).__module__.startswith('transformers_modules'), type(processor).__module__
            views = processor(images=[Image.new('RGB', (20, 20))], text=['a handwritten digit one'], two_views=True)
            assert views['pixel_values_view2'].shape == (1, 3, 16, 16)
            print('REMOTE CODE CHECKS PASSED')
            import vlalign
            """
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["HF_HUB_OFFLINE"] = "1"
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert "REMOTE CODE CHECKS PASSED" in proc.stdout, proc.stderr[-3000:]
        # the script ends by importing vlalign, which must fail: that proves it really ran without the package
        assert "vlalign is blocked in this test" in proc.stderr, proc.stderr[-3000:]
        assert "AssertionError" not in proc.stderr, proc.stderr[-3000:]

    def test_zero_shot_pipeline_on_saved_tiny_model(self, tmp_path, digits_processor_16):
        from PIL import Image
        from transformers import pipeline

        self.save_tiny_with_processor(tmp_path, digits_processor_16)
        pipe = pipeline("zero-shot-image-classification", model=str(tmp_path))
        assert type(pipe.model) is self.model_class
        labels = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit three"]
        image = Image.new("RGB", (20, 20), "white")
        result = pipe(image, candidate_labels=labels, hypothesis_template="{}")
        assert sorted(r["label"] for r in result) == sorted(labels)
        assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-5)
        # the pipeline's scores are the model's own softmax over the candidate prompts
        inputs = digits_processor_16(images=[image], text=labels, return_tensors="pt")
        with torch.no_grad():
            probs = pipe.model(**inputs).logits_per_image.softmax(-1)[0]
        by_label = {r["label"]: r["score"] for r in result}
        for label, p in zip(labels, probs):
            assert by_label[label] == pytest.approx(p.item(), abs=1e-4)

    def test_teachers_and_fixed_temperature_stay_frozen_after_from_pretrained(self, tmp_path):
        """transformers' loader makes every parameter trainable; teachers must not be (DDP would see unused
        parameters, optimisers would hold them)."""
        self.make_model(learnable_temperature=False).save_pretrained(tmp_path)
        for loaded in (
            self.model_class.from_pretrained(tmp_path),
            AutoModel.from_pretrained(tmp_path),
            self.model_class.from_pretrained(tmp_path, output_loading_info=True)[0],
        ):
            teachers = [n for n, p in loaded.named_parameters() if n.startswith("momentum_")]
            assert teachers and not any(p.requires_grad for n, p in loaded.named_parameters() if n in teachers)
            assert not loaded.temp.requires_grad
            assert loaded.vision_model.embeddings.cls_token.requires_grad

    # -- towers: from_vision_text_pretrained, other encoders, gradient checkpointing -------------------------

    def _from_vision_text_pretrained(self, vision, text, **overrides):
        kwargs = dict(num_fusion_layers=1, embed_dim=16, queue_size=32, mask_token_id=4, **self.tiny_own_fields)
        kwargs.update(overrides)
        return self.model_class.from_vision_text_pretrained(str(vision), str(text), **kwargs)

    def test_from_vision_text_pretrained_splits_text_layers(self, tmp_path):
        from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel

        torch.manual_seed(1)
        vit = ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"}))
        bert = BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
        vit.save_pretrained(tmp_path / "vit")
        bert.save_pretrained(tmp_path / "bert")
        model = self._from_vision_text_pretrained(tmp_path / "vit", tmp_path / "bert")
        assert type(model) is self.model_class
        for key, value in vit.state_dict().items():
            if not key.startswith("pooler."):
                assert torch.equal(model.vision_model.state_dict()[key], value), key
        assert torch.equal(
            model.text_model.embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight
        )
        assert torch.equal(
            model.text_model.encoder.layer[1].output.dense.weight, bert.bert.encoder.layer[1].output.dense.weight
        )
        # the third BERT layer becomes fusion layer 0
        assert torch.equal(
            model.fusion_model.layer[0].attention.self.key.weight, bert.bert.encoder.layer[2].attention.self.key.weight
        )
        assert torch.equal(
            model.fusion_model.layer[0].intermediate.dense.weight, bert.bert.encoder.layer[2].intermediate.dense.weight
        )
        assert torch.equal(model.mlm_head.decoder.weight, bert.cls.predictions.decoder.weight)
        assert torch.equal(
            model.momentum_fusion_model.layer[0].attention.self.key.weight,
            model.fusion_model.layer[0].attention.self.key.weight,
        )
        assert len(model.text_model.encoder.layer) == 2

    def test_from_vision_text_pretrained_rejects_mismatched_checkpoint(self, tmp_path):
        from transformers import BertConfig, BertModel, ViTConfig, ViTModel

        ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})).save_pretrained(
            tmp_path / "v"
        )
        BertModel(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(
            tmp_path / "t"
        )
        with pytest.raises(ValueError, match="num_fusion_layers"):
            self._from_vision_text_pretrained(tmp_path / "v", tmp_path / "t", num_fusion_layers=5)

    def test_from_vision_text_pretrained_takes_the_vision_half_of_a_clip_checkpoint(self, tmp_path):
        from transformers import BertConfig, BertForMaskedLM, CLIPConfig, CLIPModel

        torch.manual_seed(2)
        clip = CLIPModel(
            CLIPConfig(
                vision_config=dict(
                    image_size=16,
                    patch_size=4,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=64,
                ),
                text_config=dict(
                    vocab_size=99,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=64,
                    max_position_embeddings=16,
                ),
                projection_dim=16,
            )
        )
        clip.save_pretrained(tmp_path / "clip")
        BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(
            tmp_path / "bert"
        )
        model = self._from_vision_text_pretrained(tmp_path / "clip", tmp_path / "bert")
        assert model.config.vision_config.model_type == "clip_vision_model"
        assert torch.equal(
            model.vision_model.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight
        )

    @pytest.mark.parametrize(
        "vision_config",
        [
            dict(
                model_type="deit",
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
            ),  # [CLS] + distillation token before the patches
            dict(
                model_type="clip_vision_model",
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
                projection_dim=16,
            ),
        ],
    )
    def test_other_vision_encoders_with_patch_tokens(self, vision_config):
        model = self.model_class(self.tiny_config(vision_config=vision_config))
        model.train()
        out = model(**tiny_batch(), return_loss=True)
        assert torch.isfinite(out.loss)
        for name in self.patch_token_terms:
            assert getattr(out, f"loss_{name}") is not None, name
        out.loss.backward()

    def test_roberta_text_encoder(self):
        text = dict(
            model_type="roberta",
            vocab_size=144,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            pad_token_id=1,
        )
        model = self.model_class(self.tiny_config(text_config=text))
        model.train()
        out = model(**tiny_batch(), return_loss=True)
        assert torch.isfinite(out.loss)

    def test_gradient_checkpointing_gives_identical_gradients(self):
        config = self.config_without_dropout(use_momentum=False, imc_weight=0.0, mlm_weight=0.0, **self.own_terms_off)
        batch = dict(tiny_batch(), return_loss=True)
        results = []
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = self.model_class(config)
            model.train()
            if checkpointing:
                # `activation_checkpointing_enable` from transformers 5.23 on, `gradient_checkpointing_enable` before
                (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
                assert model.fusion_model.layer[0].gradient_checkpointing
            torch.manual_seed(1)  # same ITM negatives
            model(**batch).loss.backward()
            results.append(grads(model))
        assert results[0].keys() == results[1].keys()
        for name in results[0]:
            assert torch.allclose(results[0][name], results[1][name], atol=1e-6), name

    # -- gradient caching ------------------------------------------------------------------------------------

    def test_gradient_cache_gives_full_batch_gradients(self, gradient_cache_case):
        """The gradients of `gradient_cached_backward(..., chunk_size=k)` equal the full-batch backward's; the
        losses, the queues and the teachers too."""
        case = gradient_cache_case
        config = self.config_without_dropout(**case["config"])
        batch = tiny_batch(batch=case["batch"], seed=case.get("seed", 0))
        ids = case.get("positive_ids")
        ids = None if ids is None else torch.tensor(ids)
        torch.manual_seed(0)
        plain = self.model_class(config)
        torch.manual_seed(0)
        cached = self.model_class(config)
        plain.train()
        cached.train()
        out_plain = plain(**batch, positive_ids=ids, return_loss=True)
        out_plain.loss.backward()
        out_cached = cached.gradient_cached_backward(**batch, positive_ids=ids, chunk_size=case["chunk_size"])
        assert set(out_cached.loss_components()) == set(out_plain.loss_components()) >= set(case.get("terms", ()))
        for name in out_plain.loss_components():
            assert getattr(out_cached, f"loss_{name}").item() == pytest.approx(
                getattr(out_plain, f"loss_{name}").item(), rel=1e-5, abs=1e-6
            ), name
        assert out_cached.loss.item() == pytest.approx(out_plain.loss.item(), rel=1e-5)
        grads_plain, grads_cached = grads(plain), grads(cached)
        assert grads_plain.keys() == grads_cached.keys()
        parameters = dict(plain.named_parameters())
        for name in ("temp", "vision_proj.weight", *self.own_parameter_names):
            if name in parameters:
                assert name in grads_plain, name
        for name in grads_plain:
            torch.testing.assert_close(grads_cached[name], grads_plain[name], rtol=1e-4, atol=1e-5, msg=name)
        if config.use_momentum:
            assert torch.allclose(plain.image_queue.features, cached.image_queue.features, atol=1e-6)  # chunked
            assert torch.equal(plain.image_queue.ids, cached.image_queue.ids)
            assert torch.equal(plain.image_queue.ptr, cached.image_queue.ptr)
            assert torch.equal(plain.momentum_vision_proj.weight, cached.momentum_vision_proj.weight)

    # -- PEFT / LoRA: only the adapters train, the EMA teachers follow the effective weights -----------------

    @pytest.fixture
    def one_thread(self):
        """Tiny models run faster on one intra-op thread (and the results do not depend on the thread count)."""
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)

    def lora_base_model(self, **overrides):
        return randomize_weights(self.make_model(**overrides))

    def lora_config(self, **kwargs):
        from peft import LoraConfig

        return LoraConfig(
            target_modules=ALBEF_LORA_TARGETS,
            r=4,
            lora_alpha=8,
            modules_to_save=list(self.peft_modules_to_save),
            **kwargs,
        )

    @pytest.fixture(scope="class")
    @classmethod
    def lora_run(cls, tmp_path_factory):
        """Base model saved to `base_dir`, then LoRA-wrapped and trained LORA_STEPS AdamW steps on one batch (once
        per model class; the tests copy the model before they change it)."""
        pytest.importorskip("peft")
        from peft import get_peft_model

        self = cls()  # the class's settings; nothing is stored on the instance

        before_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            base = self.lora_base_model()
            base_dir = str(tmp_path_factory.mktemp(f"peft-{self.model_type}") / "base")
            base.save_pretrained(base_dir)
            model = get_peft_model(base, self.lora_config())
            before = _snapshot(model)
            batch = tiny_batch()
            eval_before = _in_batch_loss(model, batch)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LORA_LR)
            model.train()
            losses = []
            for _ in range(LORA_STEPS):
                out = model(**batch, return_loss=True)
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                losses.append(out.loss.item())
            eval_after = _in_batch_loss(model, batch)
        finally:
            torch.set_num_threads(before_threads)
        return dict(
            model=model,
            before=before,
            batch=batch,
            losses=losses,
            eval_before=eval_before,
            eval_after=eval_after,
            base_dir=base_dir,
        )

    @pytest.mark.filterwarnings(PEFT_WARNING_FILTER)
    def test_lora_trains_only_student_adapters_and_modules_to_save(self, lora_run, one_thread):
        from peft.tuners.lora import LoraLayer

        model = lora_run["model"]
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable, "nothing to train"
        for name in trainable:
            assert ".lora_A." in name or ".lora_B." in name or ".modules_to_save." in name, name
            assert "momentum_" not in name, f"a teacher parameter is trainable: {name}"
        adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        towers = {n.split(".")[0] for n in adapted}
        assert towers == {"vision_model", "text_model", "fusion_model", "vision_proj", "text_proj"}, towers
        assert any(n.endswith("q_proj") for n in adapted) and any(n.endswith("value") for n in adapted)
        assert {n.split(".")[2] for n in trainable if ".modules_to_save." in n} == set(self.peft_modules_to_save)
        # the temperature is a bare parameter: PEFT freezes it (it keeps the base model's value)
        assert not model.base_model.model.temp.requires_grad

    @pytest.mark.filterwarnings(PEFT_WARNING_FILTER)
    def test_lora_steps_lower_the_loss_and_change_only_trainable_parameters(self, lora_run, one_thread):
        model, before = lora_run["model"], lora_run["before"]
        losses = lora_run["losses"]
        assert losses[-1] < losses[0], losses
        assert lora_run["eval_after"] < lora_run["eval_before"] - 0.02, (
            lora_run["eval_before"],
            lora_run["eval_after"],
        )
        after = dict(model.named_parameters())
        assert after.keys() == before.keys()
        changed_teachers = 0
        for name, p in after.items():
            if p.requires_grad:
                assert not torch.equal(p, before[name]), f"trainable {name} did not change"
            elif ".momentum_" in name:
                changed_teachers += not torch.equal(p, before[name])  # EMA towards the adapted students
            else:
                assert torch.equal(p, before[name]), f"frozen base weight {name} changed"
        assert changed_teachers > 0

    @pytest.mark.filterwarnings(PEFT_WARNING_FILTER)
    def test_teachers_follow_the_ema_of_the_effective_student_weights(self, lora_run, one_thread):
        """teacher <- m * teacher + (1 - m) * (W + B A * scaling), with the merged weights computed by PEFT
        itself."""
        model = copy.deepcopy(lora_run["model"])
        inner = model.base_model.model
        momentum = inner.config.momentum
        merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
        teachers_before = {n: p.detach().clone() for n, p in inner.named_parameters() if n.startswith("momentum_")}
        assert len(teachers_before) > 50
        model.train()
        model(**tiny_batch(seed=1), return_loss=True)  # the EMA step runs at the start of the training forward
        after = dict(inner.named_parameters())
        folded = 0
        for name, before in teachers_before.items():
            student = merged[name.removeprefix("momentum_")]
            torch.testing.assert_close(
                after[name], before.mul(momentum).add(student, alpha=1 - momentum), rtol=0, atol=0, msg=name
            )
            base_weight = after.get(name.removeprefix("momentum_").replace(".weight", ".base_layer.weight"))
            if base_weight is not None and not torch.equal(base_weight, student):
                folded += 1  # a LoRA layer whose delta is non-zero: an EMA over base weights only would differ here
        assert folded >= 4

    @pytest.mark.filterwarnings(PEFT_WARNING_FILTER)
    def test_copy_params_to_momentum_copies_base_plus_lora(self, lora_run, one_thread):
        """After loading adapters to resume training, `copy_params_to_momentum()` restarts the teachers from base +
        LoRA: their outputs equal the adapted students'; with the adapters disabled, from the base weights."""
        model = copy.deepcopy(lora_run["model"]).eval()
        inner = model.base_model.model
        batch = tiny_batch()
        with torch.no_grad():
            model.copy_params_to_momentum()
            features = {}
            for momentum in (False, True):
                image = inner._image_feature(inner._encode_image(batch["pixel_values"], momentum)[1], momentum)
                text = inner._text_feature(
                    inner._encode_text(batch["input_ids"], batch["attention_mask"], momentum)[1], momentum
                )
                features[momentum] = (image, text)
            torch.testing.assert_close(features[True], features[False], rtol=1e-5, atol=1e-6)
            with model.disable_adapter():
                model.copy_params_to_momentum()
            base = dict(self.lora_base_model().named_parameters())
            for name, p in inner.named_parameters():
                if name.startswith("momentum_"):
                    assert torch.equal(p, base[name.removeprefix("momentum_")]), name

    @pytest.mark.filterwarnings(PEFT_WARNING_FILTER)
    def test_save_pretrained_writes_adapters_only_and_reload_reproduces_outputs(self, lora_run, one_thread, tmp_path):
        from peft import PeftModel
        from safetensors.torch import load_file

        model = lora_run["model"]
        model.save_pretrained(tmp_path)
        files = set(os.listdir(tmp_path))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert files - {"adapter_model.safetensors", "adapter_config.json", "README.md"} == set(), files
        saved = load_file(tmp_path / "adapter_model.safetensors")
        for key in saved:
            assert "lora_" in key or any(f"{m}." in key for m in self.peft_modules_to_save), key
            assert "momentum_" not in key, key
        n_base = sum(p.numel() for p in model.base_model.model.parameters())
        assert sum(t.numel() for t in saved.values()) < 0.1 * n_base

        reloaded = PeftModel.from_pretrained(self.model_class.from_pretrained(lora_run["base_dir"]), tmp_path)
        assert not any(p.requires_grad for p in reloaded.parameters())  # inference mode by default
        batch = tiny_batch(seed=3)
        expected, actual = eval_inference(model, batch), eval_inference(reloaded, batch)
        for key in ("logits_per_image", "image_embeds", "text_embeds"):
            assert torch.equal(actual[key], expected[key]), key
        # the adapters matter: the base model alone gives other logits
        plain = eval_inference(self.model_class.from_pretrained(lora_run["base_dir"]), batch)
        assert not torch.allclose(plain.logits_per_image, expected.logits_per_image, atol=1e-4)
        # the model's extra outputs (CODIS: the codes, from the trained codebook copy) come from the adapted model
        reloaded.eval()
        model.eval()
        extra_reloaded, extra_trained = self.extra_outputs(reloaded, batch), self.extra_outputs(model, batch)
        assert extra_reloaded.keys() == extra_trained.keys()
        for key in extra_trained:
            assert torch.equal(extra_reloaded[key], extra_trained[key]), key
