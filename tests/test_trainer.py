"""ContrastiveTrainer: GA scaling, alpha ramp, weight decay, component logging, evaluate(), the alignment check
(the evaluation functions themselves: tests/test_evaluation.py)."""

import json

import pytest
import torch
from fixtures import tiny_batch, tiny_tcl_config

from vlalign import TCLModel
from vlalign.data import ImageTextCollator
from vlalign.evaluation import build_eval_inputs, evaluate_model
from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments


def _deterministic_model(**overrides):
    torch.manual_seed(0)
    config = tiny_tcl_config(use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0,
                             num_fusion_layers=0, **overrides)
    for sub in (config.vision_config, config.text_config):
        sub.hidden_dropout_prob = 0.0
        sub.attention_probs_dropout_prob = 0.0
    return TCLModel(config)


def _trainer(model, tmp_path, **kwargs):
    args = ContrastiveTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                             remove_unused_columns=False, use_cpu=True, **kwargs)
    return ContrastiveTrainer(model=model, args=args, train_dataset=[0] * 16)


def test_gradient_accumulation_divides_per_batch_mean_loss(tmp_path):
    """With GA=2, each micro-batch's gradient must be half of its plain gradient (HF5.md pitfall)."""
    batch = dict(tiny_batch(), return_loss=True)
    model = _deterministic_model()
    model.train()
    model(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    trainer = _trainer(model, tmp_path, gradient_accumulation_steps=2)
    trainer.current_gradient_accumulation_steps = 2
    reported = trainer.training_step(model, dict(batch))
    for name, grad in plain.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad / 2, atol=1e-6), name
    assert reported.item() == pytest.approx(model(**batch).loss.item() / 2, rel=1e-5)


def test_alpha_ramps_linearly(tmp_path):
    model = _deterministic_model(alpha=0.4)
    trainer = _trainer(model, tmp_path)
    trainer.args.alpha_ramp_steps = 100
    for step, expected in ((0, 0.0), (25, 0.1), (50, 0.2), (100, 0.4), (300, 0.4)):
        trainer.state.global_step = step
        assert trainer.current_alpha() == pytest.approx(expected)
    trainer.args.alpha_ramp_steps = 0
    assert trainer.current_alpha() == pytest.approx(0.4)


def test_temperature_gets_no_weight_decay(tmp_path):
    trainer = _trainer(_deterministic_model(), tmp_path)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert "temp" not in names and "vision_proj.weight" in names


def test_codebook_gets_no_weight_decay(tmp_path):
    from fixtures import tiny_codis_config

    from vlalign import CODISModel

    trainer = _trainer(CODISModel(tiny_codis_config()), tmp_path)
    names = trainer.get_decay_parameter_names(trainer.model)
    assert "codebook.weight" not in names and "temp" not in names and "text_proj.weight" in names


def test_a_queue_the_batch_does_not_divide_trains_and_wraps(tmp_path):
    """No divisibility rule between queue_size and the global batch (the queue is a ring buffer): a 30-entry queue
    with batches of 4 is accepted, and after 9 steps it holds the newest 30 keys with the pointer at 36 % 30."""
    model = TCLModel(tiny_tcl_config(queue_size=30))
    _trainer(model, tmp_path)  # accepted (it used to refuse the pair)
    model.train()
    initial = model.image_queue.features.clone()
    for step in range(9):
        model(**tiny_batch(seed=step), return_loss=True).loss.backward()
    for queue in (model.image_queue, model.text_queue):
        assert int(queue.ptr) == 36 % 30
        assert torch.isfinite(queue.features).all()
    assert not (model.image_queue.features == initial).all(dim=1).any()  # every slot was written


def test_few_steps_on_digits_lower_the_loss_and_log_components(tmp_path, digits_processor_16, digits_small):
    data_args, train, evaluation = digits_small
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config(queue_size=64, vision_config=dict(
        model_type="vit", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, initializer_range=0.1)))
    args = ContrastiveTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=32, max_steps=40,
                             learning_rate=1e-3, logging_steps=10, report_to="none", remove_unused_columns=False,
                             alpha_ramp_steps=20,
                             use_cpu=True, dataloader_drop_last=True, save_strategy="no", seed=0)
    eval_inputs = build_eval_inputs(evaluation, data_args)
    class_names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    trainer = ContrastiveTrainer(
        model=model, args=args, train_dataset=train, processing_class=digits_processor_16,
        data_collator=ImageTextCollator.from_data_args(digits_processor_16, data_args),
        eval_inputs=eval_inputs,
        class_names=class_names,
        zero_shot_templates=data_args.zero_shot_templates,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for key in ("loss_i2t", "loss_t2i", "loss_i2i", "loss_t2t", "loss_lmi_image", "loss_lmi_text", "loss_itm",
                "loss_mlm", "temperature", "alpha"):
        assert key in logs[0], key
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["loss_mlm"] < logs[0]["loss_mlm"]
    assert logs[0]["alpha"] < logs[-1]["alpha"] == pytest.approx(0.4)
    metrics = trainer.evaluate()
    for key in ("eval_i2t_recall@1", "eval_t2i_recall@10", "eval_zero_shot_accuracy"):
        assert 0.0 <= metrics[key] <= 100.0
    # evaluate() reports evaluate_model's numbers for the trained model (whose own recalls against hand-computed
    # values: tests/test_evaluation.py), with the eval_ prefix
    expected = evaluate_model(model, digits_processor_16, eval_inputs, class_names, data_args.zero_shot_templates)
    for key, value in expected.items():
        assert metrics[f"eval_{key}"] == pytest.approx(value), key


# ----------------------------------------------------------------------------- alignment that never started
def test_alignment_check_compares_cross_modal_losses_with_ln_keys_after_the_warm_up(tmp_path, caplog):
    import math

    from vlalign.evaluation import ALIGNMENT_STUCK_FRACTION, alignment_not_started

    uniform = math.log(1056)
    assert alignment_not_started(uniform, uniform + 0.2, 1056)
    assert alignment_not_started(ALIGNMENT_STUCK_FRACTION * uniform, uniform, 1056)
    assert not alignment_not_started(0.9 * uniform, uniform, 1056)  # one direction learning is a start
    with pytest.raises(ValueError, match="num_keys"):
        alignment_not_started(1.0, 1.0, 1)

    model = TCLModel(tiny_tcl_config(queue_size=64))  # momentum: keys = batch 4 + queue 64
    trainer = _trainer(model, tmp_path, max_steps=100, warmup_steps=20)
    assert trainer.contrastive_num_keys() == 68
    trainer.state.max_steps = 100
    assert trainer.alignment_check_step() == 20
    stuck = {"loss_i2t": math.log(68), "loss_t2i": math.log(68) + 0.01}
    trainer.state.global_step = 19  # still warming up: no verdict
    trainer._check_alignment(dict(stuck))
    assert trainer.alignment_not_started is None
    trainer.state.global_step = 20
    with caplog.at_level("WARNING", logger="vlalign.trainer"):
        trainer._check_alignment(dict(stuck))
        trainer._check_alignment(dict(stuck))
    assert trainer.alignment_not_started is True
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1  # warned once
    assert "ln(68 keys) = 4.220" in caplog.records[0].getMessage()
    assert trainer.alignment_check == {"step": 20, "loss_i2t": stuck["loss_i2t"], "loss_t2i": stuck["loss_t2i"],
                                       "num_keys": 68}
    trainer._check_alignment({"loss_i2t": 2.0, "loss_t2i": 2.5})  # learning later clears the verdict
    assert trainer.alignment_not_started is False

    in_batch = _trainer(_deterministic_model(), tmp_path)  # in-batch InfoNCE: keys = the global batch
    assert in_batch.contrastive_num_keys() == 4
    decomposable = _trainer(_deterministic_model(contrastive_loss="decomposable"), tmp_path)
    assert decomposable.contrastive_num_keys() is None  # no uniform value ln(keys): never judged



@pytest.mark.parametrize("field, value", [("gradient_cache_chunk_size", 0), ("gradient_cache_chunk_size", 2.5),
                                          ("alpha_ramp_steps", -1), ("itm_rerank_k", -1), ("itm_rerank_k", True),
                                          ("max_consecutive_nonfinite_steps", 0)])
def test_training_settings_are_validated_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        ContrastiveTrainingArguments(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_training_settings_stay_out_of_the_saved_model(tmp_path):
    model = _deterministic_model()
    trainer = _trainer(model, tmp_path, gradient_cache_chunk_size=2, alpha_ramp_steps=5)
    assert trainer.gradient_cache_chunk_size == 2 and trainer.alpha_ramp_steps == 5
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert not {"gradient_cache_chunk_size", "train_batch_size", "alpha_ramp_steps"} & set(saved)
    assert json.loads(trainer.args.to_json_string())["gradient_cache_chunk_size"] == 2  # saved with the run instead
