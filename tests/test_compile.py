"""`torch.compile` of MIVC as a training option (`torch_compile=True` compiles the whole MIVC model). The ALBEF
models' `compile_encoders()` test is in test_modeling_albef.py.

Only MIVC's test is left here: it belongs in test_modeling_mivc.py, whose helpers it imports (owned by the
test-reorganisation of the other test files, where it should move)."""

import torch


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
