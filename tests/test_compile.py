"""`torch.compile` as a training option: `TCLModel.compile_encoders()` compiles the towers in place (the trainer does
this for `torch_compile=True` instead of compiling the whole model, whose losses and queues hold data-dependent
steps), and training with it gives the weights of eager training. The inductor speed-up is measured in
benchmarks/train_step.py --compile; here the `aot_eager` backend keeps the test fast while tracing the same graphs."""

from __future__ import annotations

import torch
from fixtures import tiny_batch, tiny_tcl_config
from transformers import TrainingArguments

from vlalign import TCLModel
from vlalign.trainer import ContrastiveTrainer


class FixedBatches:
    def __init__(self):
        self.calls = 0

    def __call__(self, rows):
        self.calls += 1
        return dict(tiny_batch(seed=self.calls), return_loss=True)


def _train(tmp_path, compile_backend=None):
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    extra = {"torch_compile": True, "torch_compile_backend": compile_backend} if compile_backend else {}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                             report_to="none", remove_unused_columns=False, use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0, **extra)
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=list(range(8)), data_collator=FixedBatches())
    trainer.train()
    return trainer


def test_torch_compile_trains_the_towers_compiled_to_the_eager_weights(tmp_path):
    eager = _train(tmp_path / "eager")
    compiled = _train(tmp_path / "compiled", compile_backend="aot_eager")
    model = compiled.model
    # the towers (students and teachers) are compiled in place; the model itself is not wrapped
    for name in TCLModel.ENCODER_NAMES:
        assert getattr(model, name)._compiled_call_impl is not None, name
    assert compiled.accelerator.unwrap_model(compiled.model_wrapped) is model
    assert type(model) is TCLModel and not any("_orig_mod" in k for k in model.state_dict())
    expected = eager.model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert compiled.state.global_step == 2


def test_mivc_compiles_whole_with_the_eager_loss_and_gradients():
    """MIVC has no ALBEF-style losses: `torch_compile=True` compiles the whole model (transformers' default); the
    graph breaks at the data-dependent placeholder check and image selection, and the results stay exact."""
    from test_modeling_mivc import _mask, _model, _pixels, _prompt_ids

    counts, n_images = (2, 3), 3
    results = []
    for compiled in (False, True):
        model = _model(qformer=True).train()
        ids = torch.tensor([_prompt_ids(model, c) for c in counts])
        run = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(1)
        loss = run(input_ids=ids, pixel_values=_pixels(2, n_images), image_mask=_mask(counts, n_images),
                   labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
