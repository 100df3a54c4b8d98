"""Exactness across processes: contrastive losses, feature queues, DDP training and `accelerate launch`.

Module fixtures each spawn 2 CPU processes (gloo, meeting through a file store: no port to race for) that run
scenarios from `distributed_workers.py` and save their results; the tests compare them with a single process on
the concatenated batch. Every spawn and subprocess has a timeout and is killed when it runs over.

The identity behind the loss tests: with W processes each holding B/W rows, rank r's "local loss" L_r (its rows
against keys gathered from every rank) satisfies ``L_full = mean_r L_r``. The gather's backward sums over ranks,
so rank r's embedding gradient is ``sum_s dL_s/dx_r = W * dL_full/dx_r``; DDP then divides by W.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import distributed_workers as workers  # noqa: E402

from vlalign.losses import (  # noqa: E402
    info_nce,
    intra_modal_info_nce,
    sigmoid_contrastive_loss,
)
from vlalign.momentum import FeatureQueue  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
W = workers.WORLD_SIZE
EXACT = dict(rtol=0.0, atol=1e-10)  # float64

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


def _run(names, out_dir, timeout=900.0):
    """Run the named scenarios on 2 spawned processes; {name: [payload of rank 0, payload of rank 1]}."""
    assert not torch.distributed.is_initialized()  # references below must take the single-process path
    workers.run_distributed(workers.scenario_worker, str(out_dir), tuple(names), timeout=timeout)
    return {name: [torch.load(out_dir / f"{name}_rank{r}.pt", weights_only=False) for r in range(W)] for name in names}


# one spawn per group of tests: each spawned process spends seconds importing torch and transformers
@pytest.fixture(scope="module")
def loss_results(tmp_path_factory):
    return _run(["info_nce", "intra_modal", "feature_queue", "unequal_batches"], tmp_path_factory.mktemp("losses"))


@pytest.fixture(scope="module")
def model_results(tmp_path_factory):
    return _run(["ddp_model", "momentum"], tmp_path_factory.mktemp("model"))


def _close(actual, expected, msg="", **tol):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{msg}\n{m}", **(tol or EXACT))


# ----------------------------------------------------------------------------------------------------------------


def _full_batch_info_nce(use_ids, learnable):
    images, texts = workers.embedding_pairs(seed=0)
    img, txt = images.clone().requires_grad_(), texts.clone().requires_grad_()
    temp = torch.tensor(workers.LEARNABLE_TEMPERATURE, dtype=torch.float64, requires_grad=True) if learnable else 0.07
    loss, i2t, t2i = info_nce(img, txt, temp, workers.IMAGE_IDS if use_ids else None, return_directions=True)
    loss.backward()
    return dict(
        loss=loss.detach(),
        i2t=i2t.detach(),
        t2i=t2i.detach(),
        image_grad=img.grad,
        text_grad=txt.grad,
        temperature_grad=temp.grad if learnable else None,
        images=images,
        texts=texts,
    )


def test_info_nce_across_two_processes_equals_full_batch(loss_results):
    ranks = loss_results["info_nce"]
    for name, use_ids, learnable in workers.LOSS_CASES:
        full = _full_batch_info_nce(use_ids, learnable)
        per_rank = [r[name] for r in ranks]
        for key in ("loss", "i2t", "t2i"):
            _close(torch.stack([r[key] for r in per_rank]).mean(), full[key], f"{name}: mean over ranks of {key}")
        for which, embeds in (("image", full["images"]), ("text", full["texts"])):
            key_side = [r[f"gathered_{which}_grad"] for r in per_rank]  # dL_r / d(gathered keys), all 8 rows
            rank_loss_grads = []  # dL_r / d(whole batch): key side everywhere + query side on rank r's rows
            for rank, result in enumerate(per_rank):
                rows = workers.rows_of(rank)
                query_side = result[f"query_side_{which}_grad"]
                # every rank saw the whole batch as keys, in rank order
                _close(result[f"gathered_{which}s"], embeds, f"{name}: rank {rank} gathered {which}s")
                # rank gradient = W x full-batch gradient of its rows (DDP's averaging then gives the full one)
                _close(
                    result[f"{which}_grad"],
                    W * full[f"{which}_grad"][rows],
                    f"{name}: rank {rank} {which} gradient != world_size x full-batch gradient",
                )
                # ... because the gather's backward summed every rank's key-side gradient w.r.t. these rows
                _close(
                    result[f"{which}_grad"],
                    query_side + sum(g[rows] for g in key_side),
                    f"{name}: rank {rank} {which} gradient is not query side + sum over ranks of key side",
                )
                # the comparison has teeth: a gradient-less gather leaves only the query side, clearly different
                assert (query_side - result[f"{which}_grad"]).abs().max() > 1e-3, (name, which, rank)
                grad = key_side[rank].clone()
                grad[rows] += query_side
                rank_loss_grads.append(grad)
            # sum over ranks of each rank's loss gradient, divided by the world size = the full-batch gradient
            _close(sum(rank_loss_grads) / W, full[f"{which}_grad"], f"{name}: sum_r dL_r/d{which} / W")
        if learnable:
            # the temperature is replicated: DDP's average of the rank gradients is the full-batch gradient
            _close(
                torch.stack([r["temperature_grad"] for r in per_rank]).mean(),
                full["temperature_grad"],
                f"{name}: temperature gradient averaged over ranks",
            )


def test_intra_modal_info_nce_across_two_processes_equals_full_batch(loss_results):
    ranks = loss_results["intra_modal"]
    queries, other_view = workers.embedding_pairs(seed=1)
    for name, learnable in (("fixed_temperature", False), ("learnable_temperature", True)):
        q, k = queries.clone().requires_grad_(), other_view.clone().requires_grad_()
        temp = (
            torch.tensor(workers.LEARNABLE_TEMPERATURE, dtype=torch.float64, requires_grad=True) if learnable else 0.07
        )
        loss = intra_modal_info_nce(q, k, temp)
        loss.backward()
        per_rank = [r[name] for r in ranks]
        _close(torch.stack([r["loss"] for r in per_rank]).mean(), loss.detach(), f"{name}: mean loss")
        for rank, result in enumerate(per_rank):
            rows = workers.rows_of(rank)
            _close(result["query_grad"], W * q.grad[rows], f"{name}: rank {rank} query gradient")
            _close(result["key_grad"], W * k.grad[rows], f"{name}: rank {rank} key gradient")
            _close(
                result["key_grad"],
                sum(r["gathered_key_grad"][rows] for r in per_rank),
                f"{name}: rank {rank} key gradient is not the sum over ranks",
            )
        _close(sum(r["gathered_key_grad"] for r in per_rank) / W, k.grad, f"{name}: sum_r dL_r/dkeys / W")
        if learnable:
            _close(
                torch.stack([r["temperature_grad"] for r in per_rank]).mean(),
                temp.grad,
                f"{name}: temperature gradient averaged over ranks",
            )


def test_feature_queue_enqueue_gathers_all_ranks_in_rank_order(loss_results):
    ranks = loss_results["feature_queue"]
    size = workers.QUEUE_SIZE
    torch.manual_seed(0)
    reference = FeatureQueue(size, workers.QUEUE_DIM)  # same seed as the workers: same initial contents
    features, ids, ptr = reference.features.clone(), reference.ids.clone(), 0
    for step, rank_states in enumerate(zip(*ranks)):
        if step > 0:
            # expected ring buffer, written by hand: rank 0's rows then rank 1's, the newest `size` rows kept
            inputs = [workers.queue_step_inputs(step - 1, r) for r in range(W)]
            new_features = torch.cat([f for f, _ in inputs])
            new_ids = torch.cat([i if i is not None else torch.full((len(f),), -1) for f, i in inputs])
            for feature, id_ in list(zip(new_features, new_ids))[-size:]:
                features[ptr], ids[ptr] = feature, id_
                ptr = (ptr + 1) % size
        for rank, state in enumerate(rank_states):
            where = f"after step {step}, rank {rank}"
            assert torch.equal(state["features"], features), where
            assert torch.equal(state["ids"], ids), where
            assert state["ptr"].tolist() == [ptr], where
        assert torch.equal(rank_states[0]["features"], rank_states[1]["features"])
    # the schedule really wrapped around and overflowed: spot-check the final layout by hand
    final = ranks[1][-1]
    last = torch.cat([workers.queue_step_inputs(len(workers.QUEUE_STEPS) - 1, r)[0] for r in range(W)])
    # pointer history 0 -> 6 -> 2 (wrapped) -> 6; the last global batch has 12 rows: its newest 10 are written
    # from position 6 on (6..9, then 0..5), its oldest 2 (rank 0's first rows) are dropped
    assert final["ptr"].item() == 6
    assert torch.equal(final["features"][6:], last[2:6]) and torch.equal(final["features"][:6], last[6:])
    assert final["ids"].tolist() == [3100, 3101, 3102, 3103, 3104, 3105, 3002, 3003, 3004, 3005]
    assert ranks[0][3]["ids"].tolist() == [1101, 1102, -1, -1, -1, -1, 1000, 1001, 1002, 1100]  # wrapped, no ids


def _full_batch_model_grads(case):
    model = workers.build_model(seed=0, **workers.DDP_MODEL_CASES[case])
    out = model(**workers.model_batch(case), return_loss=True)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("grad_cache", [False, True], ids=["plain", "grad_cache"])
@pytest.mark.parametrize("case", list(workers.DDP_MODEL_CASES))
def test_ddp_tcl_gradients_equal_single_process_full_batch(model_results, case, grad_cache):
    """DDP on 2 x 4 rows, with or without gradient caching (chunks of 3), gives the 1 x 8 full-batch gradients."""
    ranks = model_results["ddp_model"]
    out, full_grads = _full_batch_model_grads(case)
    per_rank = [r[f"{case}_grad_cache" if grad_cache else case] for r in ranks]
    assert set(per_rank[0]["components"]) == set(out.loss_components())
    _close(
        torch.stack([r["loss"] for r in per_rank]).mean(),
        out.loss.detach(),
        "mean over ranks of the loss",
        rtol=0.0,
        atol=1e-5,
    )
    assert len(full_grads) > 50 and "temp" in full_grads
    assert ("logit_bias" in full_grads) is (case == "sigmoid_ids")
    for name, expected in full_grads.items():
        assert expected is not None, f"{name} got no gradient in the single-process reference"
        for rank, result in enumerate(per_rank):
            actual = result["grads"][name]
            assert actual is not None, f"rank {rank}: {name} got no gradient"
            # float32 with other batch shapes and thread counts: ~3e-6 observed, a gradient-less gather is off by ~1
            _close(actual, expected, f"rank {rank}: gradient of {name} (DDP on 2 x 4 vs 1 x 8)", rtol=1e-5, atol=1e-5)


def test_momentum_step_fills_queues_with_teacher_features_of_all_ranks_in_rank_order(model_results):
    ranks = model_results["momentum"]
    per_rank = workers.GLOBAL_BATCH // W
    size = workers.MOMENTUM_CONFIG["queue_size"]
    expected_ids = torch.full((size,), -1, dtype=torch.long)
    expected_ids[: W * per_rank] = torch.cat(workers.MOMENTUM_POSITIVE_IDS)
    _close(ranks[0]["initial"]["image"], ranks[1]["initial"]["image"], "initial queues differ", rtol=0, atol=0)
    for which in ("image", "text"):
        queues = [r[f"{which}_queue"] for r in ranks]
        assert torch.equal(queues[0]["features"], queues[1]["features"]), f"{which} queues differ between ranks"
        assert torch.equal(queues[0]["ids"], queues[1]["ids"]), f"{which} queue ids differ between ranks"
        for rank, queue in enumerate(queues):
            assert queue["ptr"].tolist() == [W * per_rank], (which, rank)  # advanced by the global batch
            assert torch.equal(queue["ids"], expected_ids), (which, rank)
            for source in range(W):
                # rows [4 * source, 4 * source + 4) hold rank `source`'s teacher features of this step
                _close(
                    queue["features"][workers.rows_of(source)],
                    ranks[source][f"teacher_{which}"],
                    f"{which} queue rank {rank}: rows of rank {source}",
                    rtol=0.0,
                    atol=1e-6,
                )
            # the rest of the queue is untouched
            assert torch.equal(queue["features"][W * per_rank :], ranks[0]["initial"][which][W * per_rank :])
        # different inputs per rank: the two halves really differ
        assert (ranks[0][f"teacher_{which}"] - ranks[1][f"teacher_{which}"]).abs().max() > 1e-3
    assert all(torch.isfinite(r["loss"]) for r in ranks)


# ----------------------------------------------------------------------------------------------------------------
# `accelerate launch` with 2 CPU processes

TINY_OVERRIDES = [
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "16",
    "--queue_size",
    "64",
    "--max_eval_samples",
    "40",
    "--logging_steps",
    "2",
    "--model.vision_config.hidden_size",
    "32",
    "--model.vision_config.num_hidden_layers",
    "1",
    "--model.vision_config.intermediate_size",
    "64",
    "--model.text_config.hidden_size",
    "32",
    "--model.text_config.intermediate_size",
    "64",
    "--model.text_config.num_hidden_layers",
    "2",
    "--embed_dim",
    "16",
]


def test_accelerate_launch_two_cpu_processes(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process on CPU (its simple launcher runs the script
    once, with MASTER_PORT set but no RANK / WORLD_SIZE; multi-process CPU needs mpirun). Two real processes come
    from the torchrun-based launcher (`--multi_gpu`), told to train on CPU with `--use_cpu true` (gloo): that is
    the command used here. `--main_process_port` becomes torchrun's MASTER_PORT (default 29500, often taken)."""
    out = tmp_path / "out"

    def cmd(port):
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            str(REPO / "training/train.py"),
            "--config",
            str(REPO / "training/configs/tcl_digits.yaml"),
            "--use_cpu",
            "true",
            "--output_dir",
            str(out),
            *TINY_OVERRIDES,
        ]

    workers.launch_and_wait(cmd, tmp_path, timeout=900)
    results = json.loads((out / "eval_results.json").read_text())
    for key in (
        "zero_shot_accuracy",
        "i2t_recall@1",
        "i2t_recall@5",
        "i2t_recall@10",
        "t2i_recall@1",
        "t2i_recall@5",
        "t2i_recall@10",
    ):
        assert 0.0 <= results[key] <= 100.0, key
    assert results["train_steps"] == 4
    assert results["num_eval_images"] == 40
    config = json.loads((out / "config.json").read_text())
    assert "train_batch_size" not in config and "gradient_cache_chunk_size" not in config  # run settings stay out
    assert config["queue_size"] == 64
    assert json.loads((out / "training_args.json").read_text())["use_cpu"] is True
    assert "| world\\_size | 2 |" in (out / "README.md").read_text()


def test_a_worker_that_dies_is_reported_with_its_rank_signal_and_log(tmp_path):
    """A worker killed by a signal is not a bare "process 1 terminated with signal SIGABRT": the error names the
    rank and how it ended and shows what each worker printed; the process still waiting is killed, not left."""
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        workers.run_distributed(workers.aborting_worker, str(tmp_path), timeout=600)
    message = str(error.value)
    assert "distributed worker rank 1 failed" in message and "SIGABRT" in message
    assert "rank 1 is about to abort" in message  # the dead worker's own output
    assert "--- worker rank 0 log tail ---" in message
    assert time.monotonic() - start < 300  # reported when it happens, not at the timeout


def test_processes_with_different_batch_sizes(loss_results):
    """A collator that dropped unreadable images leaves ranks with different batch sizes: gathers pad and trim,
    and the per-rank losses weighted by their share of rows are exactly the full-batch loss and gradients."""
    ranks = loss_results["unequal_batches"]
    images, texts = workers.embedding_pairs(seed=0)
    img, txt = images.clone().requires_grad_(), texts.clone().requires_grad_()
    loss = info_nce(img, txt, 0.07)
    loss.backward()
    _close(sum(r["weighted_loss"] for r in ranks), loss.detach())
    for rank, rows in enumerate(workers.UNEQUAL_ROWS):
        _close(ranks[rank]["image_grad"], img.grad[rows], msg=f"rank {rank} image grad")
        _close(ranks[rank]["text_grad"], txt.grad[rows], msg=f"rank {rank} text grad")
    for r in ranks:  # 5 + 3 rows, rank order, identical on both ranks
        assert r["queue_ids"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1, -1]
        assert r["queue_ptr"].item() == 8
    # without gather=True nothing crosses processes, even under torch.distributed: the loss of the local rows
    for rank, rows in enumerate(workers.UNEQUAL_ROWS):
        _close(ranks[rank]["local_loss"], info_nce(images[rows], texts[rows], 0.07))
        own = list(range(8))[rows]
        assert ranks[rank]["local_queue_ids"].tolist() == own + [-1] * (10 - len(own))


# ----------------------------------------------------------------------------------------------------------------
# CODIS: the OT plan is solved over the teacher features of all ranks


@pytest.fixture(scope="module")
def code_assignment_results(tmp_path_factory):
    return _run(["code_assignment"], tmp_path_factory.mktemp("codis"))


def test_code_assignment_targets_across_two_processes_are_rows_of_the_global_plan(code_assignment_results):
    """Each rank gets exactly its rows of the single-process plan over the whole batch (the equipartition over
    the codes is global), for halves and for unequal shares, IPOT and Sinkhorn."""
    from references import targets_reference

    from vlalign.losses import code_assignment_targets

    ranks = code_assignment_results["code_assignment"]
    features, codebook = workers.code_assignment_inputs()
    n, k = features.shape[0], codebook.shape[0]
    for split, rows in workers.CODE_ASSIGNMENT_SPLITS.items():
        for solver, kwargs in workers.CODE_ASSIGNMENT_SOLVERS.items():
            full = code_assignment_targets(features, codebook, solver, **kwargs)
            # the single-process plan itself is the float64 reference plan
            _close(
                full,
                targets_reference(features, codebook, solver, **kwargs),
                f"{solver}: reference",
                rtol=1e-9,
                atol=1e-12,
            )
            for dtype, atol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
                where = f"{split}, {solver}, {dtype}"
                per_rank = [r[(split, solver, str(dtype))] for r in ranks]
                for rank, result in enumerate(per_rank):
                    assert not result["requires_grad"], where
                    assert result["targets"].dtype == dtype, where
                    _close(
                        result["targets"].double(), full[rows[rank]], f"{where}: rank {rank} rows", rtol=0.0, atol=atol
                    )
                    # the comparison has teeth: a plan over this rank's rows only is clearly different
                    local = code_assignment_targets(features[rows[rank]], codebook, solver, **kwargs)
                    assert (local - full[rows[rank]]).abs().max() > 1e-2, where
                # together the ranks' rows give every code N/K samples (up to the solver's convergence: the rows
                # are normalised exactly)
                stacked = torch.cat([r["targets"].double() for r in per_rank])
                _close(
                    stacked.sum(0),
                    torch.full((k,), n / k, dtype=torch.float64),
                    f"{where}: column sums",
                    rtol=1e-3,
                    atol=0.0,
                )


# ----------------------------------------------------------------------------------------------------------------
# SigLIP's sigmoid loss: the texts of the other ranks come around the ring (point-to-point), not gathered


@pytest.fixture(scope="module")
def sigmoid_results(tmp_path_factory):
    """{world size: [payload of each rank]} with 2 processes (one shift) and 3 (one bidirectional step)."""
    results = {}
    for world_size in workers.SIGMOID_SPLITS:
        out_dir = tmp_path_factory.mktemp(f"sigmoid{world_size}")
        workers.run_distributed(workers.scenario_worker, str(out_dir), ("sigmoid",), world_size=world_size)
        results[world_size] = [
            torch.load(out_dir / f"sigmoid_rank{r}.pt", weights_only=False) for r in range(world_size)
        ]
    return results


def _full_batch_sigmoid(use_ids):
    img, txt, temp, bias = workers.sigmoid_leaves()
    ids = workers.SIGMOID_IDS if use_ids else None
    loss = sigmoid_contrastive_loss(img, txt, temp, bias, ids)
    loss.backward()
    return dict(
        loss=loss.detach(), image_grad=img.grad, text_grad=txt.grad, temperature_grad=temp.grad, bias_grad=bias.grad
    )


SIGMOID_TOLERANCE = dict(rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("world_size", list(workers.SIGMOID_SPLITS))
def test_sigmoid_loss_around_the_ring_equals_full_batch(sigmoid_results, world_size):
    """Equal shares (W ranks of B rows): the mean over ranks of the rank losses is the single-process loss on the
    concatenated W * B pairs (every pair once, divided by W * B); a rank's feature gradient is W times the
    full-batch gradient of its rows (the ring's backward brings every rank's gradient w.r.t. its texts home), so
    DDP's average over ranks gives the full-batch gradient, as does the average of the replicated bias's and
    temperature's gradients."""
    ranks = sigmoid_results[world_size]
    splits = workers.SIGMOID_SPLITS[world_size]["equal"]
    for name, use_ids in workers.SIGMOID_CASES:
        full = _full_batch_sigmoid(use_ids)
        per_rank = [r[("equal", name)] for r in ranks]
        where = f"{world_size} ranks, {name}"
        _close(torch.stack([r["loss"] for r in per_rank]).mean(), full["loss"], where, **SIGMOID_TOLERANCE)
        for which in ("temperature", "bias"):
            mean = torch.stack([r[f"{which}_grad"] for r in per_rank]).mean(0)
            _close(mean, full[f"{which}_grad"], f"{where}: {which} gradient", **SIGMOID_TOLERANCE)
        for rank, (result, rows) in enumerate(zip(per_rank, splits)):
            for which in ("image", "text"):
                _close(
                    result[f"{which}_grad"],
                    world_size * full[f"{which}_grad"][rows],
                    f"{where}: rank {rank} {which} gradient != world_size x full-batch gradient",
                    **SIGMOID_TOLERANCE,
                )
            # autograd keeps this rank's features (and the scalars), no block of another rank: flat in W
            local_features = 2 * (rows.stop - rows.start) * workers.EMBED_DIM
            assert local_features <= result["saved_numel"] <= local_features + 2 * workers.SIGMOID_BATCH, (where, rank)
            # the comparison has teeth: without the texts of the other ranks, loss and text gradient differ
            assert (result["local_text_grad"] - result["text_grad"]).abs().max() > 1e-2, (where, rank)
            assert abs(result["local_loss"] - result["loss"]) > 1e-2, (where, rank)


def test_sigmoid_loss_with_unequal_shares_weighted_by_rows_equals_full_batch(sigmoid_results):
    """Ranks of 5 and 7 rows: each rank's loss (divided by its own batch size) weighted by its share of the rows
    sums to the full-batch loss, and the weighted losses' gradients are the full-batch gradients of each rank's
    rows (the bias's and temperature's summed over ranks)."""
    ranks = sigmoid_results[2]
    for name, use_ids in workers.SIGMOID_CASES:
        full = _full_batch_sigmoid(use_ids)
        per_rank = [r[("unequal", name)] for r in ranks]
        shares = [rows.stop - rows.start for rows in workers.SIGMOID_SPLITS[2]["unequal"]]
        weighted = sum(r["loss"] * n / workers.SIGMOID_BATCH for r, n in zip(per_rank, shares))
        _close(weighted, full["loss"], name, **SIGMOID_TOLERANCE)
        for which in ("temperature", "bias"):
            _close(sum(r[f"{which}_grad"] for r in per_rank), full[f"{which}_grad"], name, **SIGMOID_TOLERANCE)
        for result, rows in zip(per_rank, workers.SIGMOID_SPLITS[2]["unequal"]):
            for which in ("image", "text"):
                _close(result[f"{which}_grad"], full[f"{which}_grad"][rows], f"{name} {which}", **SIGMOID_TOLERANCE)
