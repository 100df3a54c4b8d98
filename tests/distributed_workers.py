"""Worker functions for tests/test_distributed.py (importable, so `torch.multiprocessing` can spawn them).

`scenario_worker(rank, world_size, store_path, out_dir, names)` joins a gloo process group through a file store, runs
the scenarios ``scenario_<name>(rank, world_size)`` and saves what each returns (what the parent test needs) to
``out_dir/<name>_rank<r>.pt``.
The parent computes the single-process references and does the assertions, so failures read as ordinary pytest
assertion errors. Inputs are built by functions of this module shared by parent and workers (same seeds).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # conftest's tiny configs, in spawned children

WORLD_SIZE = 2
GLOBAL_BATCH = 8
EMBED_DIM = 6
# a collective waits this long for the other process (which may still be importing on a loaded machine)
COLLECTIVE_TIMEOUT_S = 600


# ----------------------------------------------------------------------------------------------------------------
# process management


def launch_and_wait(cmd_for_port, cwd, timeout: float, attempts: int = 3) -> str:
    """Run an `accelerate launch` command line to completion on CPU and return its combined output.

    ``cmd_for_port(port)`` builds the command for a rendezvous port. torchrun must be given a port number, and a
    port found free can be taken by another process before torchrun binds it (a loaded machine runs many tests):
    a launch that failed because its port was taken is retried on a new port. On timeout the launcher and every
    worker it started are killed (one process group) and the test fails with the log tail."""
    import pytest

    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    for attempt in range(attempts):
        process = subprocess.Popen(
            cmd_for_port(free_port()),
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            log, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            log, _ = process.communicate()
            pytest.fail(f"accelerate launch did not finish within {timeout:.0f} s; log tail:\n{log[-4000:]}")
        port_taken = "address already in use" in log.lower() or "EADDRINUSE" in log
        if process.returncode == 0 or not port_taken or attempt == attempts - 1:
            break
    assert process.returncode == 0, f"accelerate launch exited with {process.returncode}; log tail:\n{log[-4000:]}"
    return log


def free_port() -> int:
    """A port that was free a moment ago on the loopback interface (bind to port 0, let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logged_worker(rank: int, worker, log_dir: str, args: tuple) -> None:
    """Spawn entry point: the worker's stdout/stderr go to ``log_dir/worker_rank<r>.log`` (with faulthandler, so a
    native abort leaves its stack there too), for the parent to show when the worker dies."""
    import faulthandler

    log = open(os.path.join(log_dir, f"worker_rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.enable(log)
    worker(rank, *args)


def _worker_logs(log_dir: str, world_size: int, chars: int = 3000) -> str:
    """The tail of every worker's log, for an error message."""
    tails = []
    for rank in range(world_size):
        try:
            with open(os.path.join(log_dir, f"worker_rank{rank}.log"), errors="replace") as f:
                tail = f.read()[-chars:] or "(empty log)"
        except OSError:
            tail = "(no log written)"
        tails.append(f"--- worker rank {rank} log tail ---\n{tail}")
    return "\n".join(tails)


def run_distributed(worker, out_dir: str, *args, world_size: int = WORLD_SIZE, timeout: float = 900.0) -> None:
    """Spawn `world_size` processes running ``worker(rank, world_size, store_path, out_dir, *args)`` and wait for
    them, at most `timeout` seconds.

    The processes meet through a file store in a fresh folder (no TCP port to race other tests for). When a worker
    raises or dies (a signal, an abort in gloo), the error names the rank, how it ended, and shows the tail of every
    worker's log; on timeout every process we spawned is killed, so a deadlocked collective can never hang the test
    session. The timeouts are generous: on a loaded 2-core machine one process can lag the other by minutes."""
    log_dir = tempfile.mkdtemp(prefix="workers_", dir=out_dir)
    store_path = os.path.join(log_dir, "store")
    context = mp.start_processes(
        _logged_worker,
        args=(worker, log_dir, (world_size, store_path, out_dir) + args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if context.join(timeout=0.5):
                    return
            # a worker raised, exited non-zero or was killed by a signal
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
                raise RuntimeError(
                    f"distributed worker rank {error.error_index} failed: {error}\n{_worker_logs(log_dir, world_size)}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{worker.__name__} did not finish within {timeout:.0f} s\n{_worker_logs(log_dir, world_size)}"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def _init(rank: int, world_size: int, store_path: str) -> None:
    torch.set_num_threads(1)  # two processes share two cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def scenario_worker(rank: int, world_size: int, store_path: str, out_dir: str, names: tuple[str, ...]) -> None:
    """Join the process group once, run the named scenarios in order (each process pays the torch/transformers
    imports once), save each payload to ``out_dir/<name>_rank<rank>.pt``."""
    _init(rank, world_size, store_path)
    try:
        for name in names:
            payload = globals()[f"scenario_{name}"](rank, world_size)
            torch.save(payload, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def aborting_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    """Rank 1 dies in native code (SIGABRT) after joining the group; rank 0 waits for it in a barrier forever."""
    _init(rank, world_size, store_path)
    if rank == 1:
        print("rank 1 is about to abort", flush=True)
        os.abort()
    dist.barrier()


def rows_of(rank: int, per_rank: int = GLOBAL_BATCH // WORLD_SIZE) -> slice:
    return slice(rank * per_rank, (rank + 1) * per_rank)


# ----------------------------------------------------------------------------------------------------------------
# shared inputs


def embedding_pairs(
    seed: int = 0, batch: int = GLOBAL_BATCH, dim: int = EMBED_DIM
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float64 (image, text) embeddings of `batch` pairs, correlated so the loss is not trivial."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    texts = images + 0.8 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return F.normalize(images, dim=1), F.normalize(texts, dim=1)


# class-level positives: ids repeat within a rank (rows 0, 3) and across ranks (1 <-> 4, 2 <-> 6, 0 <-> 7)
IMAGE_IDS = torch.tensor([0, 1, 2, 0, 1, 5, 2, 0])
LEARNABLE_TEMPERATURE = 0.1

# (name, use image_ids, learnable temperature)
LOSS_CASES = (("plain", False, False), ("image_ids", True, False), ("learnable_temperature", True, True))


def tcl_config(**overrides):
    """conftest's tiny TCL config with every dropout probability at 0 (deterministic passes)."""
    from fixtures import TINY_TEXT, TINY_VISION, tiny_tcl_config

    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tiny_tcl_config(
        vision_config=dict(TINY_VISION, **no_dropout), text_config=dict(TINY_TEXT, **no_dropout), **overrides
    )


DDP_MODEL_CASES = {
    # the plain contrastive (CLIP-style) objective: i2t + t2i, in-batch negatives from every process
    "cma": dict(
        use_momentum=False, num_fusion_layers=0, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0
    ),
    # plus intra-modal contrast against a second student pass of the other image view, and class positives
    "cma_imc_ids": dict(
        use_momentum=False, num_fusion_layers=0, imc_weight=1.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0
    ),
    # SigLIP's sigmoid loss (texts around the ring, the learnable bias) with class positives across ranks
    "sigmoid_ids": dict(
        use_momentum=False,
        num_fusion_layers=0,
        imc_weight=0.0,
        lmi_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        contrastive_loss="sigmoid",
        logit_bias_init=-2.0,
    ),
}
CASES_WITH_IDS = ("cma_imc_ids", "sigmoid_ids")
MOMENTUM_CONFIG = dict(itm_weight=0.0, mlm_weight=0.0, queue_size=16)


def model_batch(case: str) -> dict:
    from fixtures import tiny_batch

    batch = tiny_batch(batch=GLOBAL_BATCH, seed=3)
    if case in CASES_WITH_IDS:
        batch["positive_ids"] = IMAGE_IDS.clone()
    return batch


def build_model(seed: int, **config_overrides):
    from vlalign import TCLModel

    torch.manual_seed(seed)
    model = TCLModel(tcl_config(**config_overrides))
    model.train()
    return model


# ----------------------------------------------------------------------------------------------------------------
# workers


class _GatherRecorder:
    """Wraps `vlalign.losses._all_gather` (the real one still runs) to keep each gathered tensor and its
    gradient: the key-side gradient of this rank's loss w.r.t. the *whole* gathered batch. With ``cut=True`` the
    gathered keys are detached (what a plain, gradient-less `dist.all_gather` gives): the rank's embedding
    gradient is then the query-side term of its own loss only."""

    def __init__(self, cut: bool = False):
        import vlalign.losses as losses

        self.losses = losses
        self.original = losses._all_gather
        self.cut = cut
        self.gathered: list[torch.Tensor] = []

    def __enter__(self):
        def recording(tensor, with_grad, gather=True):
            out, offset = self.original(tensor, with_grad, gather)
            if not with_grad:
                return out, offset
            if self.cut:
                out = out.detach()
            else:
                out.retain_grad()
            self.gathered.append(out)
            return out, offset

        self.losses._all_gather = recording
        return self

    def __exit__(self, *exc):
        self.losses._all_gather = self.original


def scenario_info_nce(rank, world_size):
    from vlalign.losses import info_nce

    images, texts = embedding_pairs(seed=0)
    rows = rows_of(rank)
    results = {}
    for name, use_ids, learnable in LOSS_CASES:
        result = {}
        for cut in (False, True):
            img = images[rows].clone().requires_grad_()
            txt = texts[rows].clone().requires_grad_()
            temp = torch.tensor(LEARNABLE_TEMPERATURE, dtype=torch.float64, requires_grad=True) if learnable else 0.07
            with _GatherRecorder(cut=cut) as recorder:
                loss, i2t, t2i = info_nce(
                    img, txt, temp, IMAGE_IDS[rows] if use_ids else None, return_directions=True, gather=True
                )
            loss.backward()
            gathered_images, gathered_texts = recorder.gathered  # gathered_keys(image) first, then text
            if cut:
                result.update(query_side_image_grad=img.grad, query_side_text_grad=txt.grad)
            else:
                result.update(
                    loss=loss.detach(),
                    i2t=i2t.detach(),
                    t2i=t2i.detach(),
                    image_grad=img.grad,
                    text_grad=txt.grad,
                    temperature_grad=temp.grad if learnable else None,
                    gathered_image_grad=gathered_images.grad,
                    gathered_text_grad=gathered_texts.grad,
                    gathered_images=gathered_images.detach(),
                    gathered_texts=gathered_texts.detach(),
                )
        results[name] = result
    return results


def scenario_intra_modal(rank, world_size):
    from vlalign.losses import intra_modal_info_nce

    queries, other_view = embedding_pairs(seed=1)
    rows = rows_of(rank)
    results = {}
    for name, learnable in (("fixed_temperature", False), ("learnable_temperature", True)):
        q = queries[rows].clone().requires_grad_()
        k = other_view[rows].clone().requires_grad_()
        temp = torch.tensor(LEARNABLE_TEMPERATURE, dtype=torch.float64, requires_grad=True) if learnable else 0.07
        with _GatherRecorder() as recorder:
            loss = intra_modal_info_nce(q, k, temp, gather=True)
        loss.backward()
        (gathered_keys,) = recorder.gathered
        results[name] = dict(
            loss=loss.detach(),
            query_grad=q.grad,
            key_grad=k.grad,
            temperature_grad=temp.grad if learnable else None,
            gathered_key_grad=gathered_keys.grad,
        )
    return results


QUEUE_SIZE = 10
QUEUE_DIM = 4
# per-rank batch of each enqueue step, and whether ids are given: 3+3 rows fill 0..5, the next 6 wrap around
# (6..9, 0..1), then a step without ids, then a global batch (12) larger than the queue (only the last 10 stay)
QUEUE_STEPS = ((3, True), (3, True), (2, False), (6, True))


def queue_step_inputs(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    per_rank, with_ids = QUEUE_STEPS[step]
    g = torch.Generator().manual_seed(100 * step + rank)
    features = F.normalize(torch.randn(per_rank, QUEUE_DIM, generator=g), dim=1)
    ids = torch.arange(per_rank) + 1000 * step + 100 * rank if with_ids else None
    return features, ids


def scenario_feature_queue(rank, world_size):
    from vlalign.momentum import FeatureQueue

    torch.manual_seed(0)  # identical initial contents on every rank
    queue = FeatureQueue(QUEUE_SIZE, QUEUE_DIM)
    states = [dict(features=queue.features.clone(), ids=queue.ids.clone(), ptr=queue.ptr.clone())]
    for step in range(len(QUEUE_STEPS)):
        features, ids = queue_step_inputs(step, rank)
        queue.enqueue(features, ids, gather=True)
        states.append(dict(features=queue.features.clone(), ids=queue.ids.clone(), ptr=queue.ptr.clone()))
    return states


def scenario_ddp_model(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for case, overrides in DDP_MODEL_CASES.items():
        model = build_model(seed=0, **overrides)
        ddp = DistributedDataParallel(model)
        batch = {k: v[rows_of(rank)] for k, v in model_batch(case).items()}
        out = ddp(**batch, return_loss=True)
        out.loss.backward()
        results[case] = dict(
            loss=out.loss.detach(),
            grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            components=out.loss_components(),
        )
        # gradient caching under DDP, as ContrastiveTrainer.training_step does it: chunks without DDP's
        # per-backward all-reduce, then one averaging of the gradients
        model = build_model(seed=0, **overrides)
        ddp = DistributedDataParallel(model)
        with ddp.no_sync():
            out = model.gradient_cached_backward(**batch, chunk_size=3)
        for parameter in model.parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad.div_(world_size)
        results[f"{case}_grad_cache"] = dict(
            loss=out.loss.detach(),
            grads={n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            components=out.loss_components(),
        )
    return results


MOMENTUM_POSITIVE_IDS = (torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 0]))


def scenario_momentum(rank, world_size):
    from fixtures import tiny_batch
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(seed=0, **MOMENTUM_CONFIG)
    initial = dict(image=model.image_queue.features.clone(), text=model.text_queue.features.clone())
    # the fusion layers are unused when itm and mlm are off, as under the Trainer's DDP
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = tiny_batch(batch=GLOBAL_BATCH // world_size, seed=10 + rank)  # different inputs per rank
    batch["positive_ids"] = MOMENTUM_POSITIVE_IDS[rank]
    out = ddp(**batch, return_loss=True, alpha=0.4)
    out.loss.backward()
    optimizer.step()
    with torch.no_grad():
        # the step's teacher pass ran after its EMA update; the optimizer step only moved the students
        teacher_image = model._image_feature(model._encode_image(batch["pixel_values_view2"], momentum=True)[1], True)
        teacher_text = model._text_feature(
            model._encode_text(batch["input_ids"], batch["attention_mask"], momentum=True)[1], True
        )
    payload = dict(
        initial=initial,
        teacher_image=teacher_image,
        teacher_text=teacher_text,
        loss=out.loss.detach(),
        **{
            f"{which}_queue": dict(features=q.features.clone(), ids=q.ids.clone(), ptr=q.ptr.clone())
            for which, q in (("image", model.image_queue), ("text", model.text_queue))
        },
    )
    return payload


UNEQUAL_ROWS = (slice(0, 5), slice(5, 8))  # rank 0 holds 5 pairs, rank 1 holds 3 (e.g. after dropped images)


def scenario_unequal_batches(rank, world_size):
    """Processes holding different numbers of rows: gathers must not fail, and weighting each process's mean loss
    by its share of the rows gives back the full-batch loss and gradients."""
    from vlalign.losses import info_nce
    from vlalign.momentum import FeatureQueue

    images, texts = embedding_pairs(seed=0)
    rows = UNEQUAL_ROWS[rank]
    img, txt = images[rows].clone().requires_grad_(), texts[rows].clone().requires_grad_()
    loss = info_nce(img, txt, 0.07, gather=True)
    share = img.shape[0] / images.shape[0]
    (loss * share).backward()
    torch.manual_seed(0)
    queue = FeatureQueue(10, images.shape[1])
    queue.enqueue(images[rows].float(), torch.arange(8)[rows], gather=True)
    local_queue = FeatureQueue(10, images.shape[1])
    local_queue.enqueue(images[rows].float(), torch.arange(8)[rows])  # gather=False: this rank's rows only
    return dict(
        weighted_loss=(loss * share).detach(),
        image_grad=img.grad,
        text_grad=txt.grad,
        queue_ids=queue.ids.clone(),
        queue_ptr=queue.ptr.clone(),
        local_loss=info_nce(images[rows], texts[rows], 0.07),
        local_queue_ids=local_queue.ids.clone(),
    )


# ----------------------------------------------------------------------------------------------------------------
# SigLIP's sigmoid loss: text blocks passed around the ring of processes

SIGMOID_BATCH = 12
# class-level positives within and across ranks for every split below (0: rows 0, 5, 11; 1: rows 1, 7; 2: 2, 9)
SIGMOID_IDS = torch.tensor([0, 1, 2, 3, 4, 0, 6, 1, 8, 2, 10, 0])
# rank r's rows of the 12, per world size: equal shares (the shift exchange with 2 processes, the bidirectional
# one with 3), and unequal shares (e.g. after dropped images)
SIGMOID_SPLITS = {
    2: {"equal": (slice(0, 6), slice(6, 12)), "unequal": (slice(0, 5), slice(5, 12))},
    3: {"equal": (slice(0, 4), slice(4, 8), slice(8, 12))},
}
SIGMOID_TEMPERATURE, SIGMOID_BIAS = 0.1, -2.0
# (name, use SIGMOID_IDS)
SIGMOID_CASES = (("pairs", False), ("positive_ids", True))


def sigmoid_leaves(rows=slice(None)):
    """float64 (images, texts, temperature, bias) leaves of the shared inputs, the features restricted to `rows`."""
    images, texts = embedding_pairs(seed=5, batch=SIGMOID_BATCH)
    return (
        images[rows].clone().requires_grad_(),
        texts[rows].clone().requires_grad_(),
        torch.tensor(SIGMOID_TEMPERATURE, dtype=torch.float64, requires_grad=True),
        torch.tensor([SIGMOID_BIAS], dtype=torch.float64, requires_grad=True),
    )


def scenario_sigmoid(rank, world_size):
    """Each rank's sigmoid loss over its images and the texts of every rank (gather=True), and the gradients of
    its loss (weighted by the rank's share of rows with unequal shares) w.r.t. its features, the temperature and
    the bias; plus the local-only loss's gradients (gather=False), which must differ."""
    from vlalign.losses import sigmoid_contrastive_loss

    results = {}
    for split, all_rows in SIGMOID_SPLITS[world_size].items():
        rows = all_rows[rank]
        for name, use_ids in SIGMOID_CASES:
            ids = SIGMOID_IDS[rows] if use_ids else None
            result = {}
            for gather in (True, False):
                img, txt, temp, bias = sigmoid_leaves(rows)
                saved = []  # what autograd keeps for the backward: the local rows only, whatever the world size

                def pack(tensor, saved=saved):
                    saved.append(tensor.numel())
                    return tensor

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                    loss = sigmoid_contrastive_loss(img, txt, temp, bias, ids, gather=gather)
                result[f"{'' if gather else 'local_'}saved_numel"] = sum(saved)
                weight = img.shape[0] / SIGMOID_BATCH if split == "unequal" else 1.0
                (loss * weight).backward()
                prefix = "" if gather else "local_"
                result.update(
                    {
                        f"{prefix}loss": loss.detach(),
                        f"{prefix}image_grad": img.grad,
                        f"{prefix}text_grad": txt.grad,
                        f"{prefix}temperature_grad": temp.grad,
                        f"{prefix}bias_grad": bias.grad,
                    }
                )
            results[(split, name)] = result
    return results


# ----------------------------------------------------------------------------------------------------------------
# CODIS: OT code assignment over the teacher features of every rank

# rank r's rows of the global batch: halves, and unequal shares (e.g. after dropped images)
CODE_ASSIGNMENT_SPLITS = {"halves": (slice(0, 4), slice(4, 8)), "unequal": (slice(0, 5), slice(5, 8))}
CODE_ASSIGNMENT_SOLVERS = {"ipot": dict(beta=0.5, iterations=50), "sinkhorn": dict(epsilon=0.05, iterations=50)}
CODEBOOK_SIZE = 5


def code_assignment_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (GLOBAL_BATCH, EMBED_DIM) teacher features (not normalised) and a (CODEBOOK_SIZE, EMBED_DIM)
    codebook, identical on every rank."""
    g = torch.Generator().manual_seed(42)
    features = torch.randn(GLOBAL_BATCH, EMBED_DIM, generator=g, dtype=torch.float64) * 2.0
    codebook = torch.randn(CODEBOOK_SIZE, EMBED_DIM, generator=g, dtype=torch.float64)
    return features, codebook


def scenario_code_assignment(rank, world_size):
    from vlalign.losses import code_assignment_targets

    features, codebook = code_assignment_inputs()
    results = {}
    for split, rows in CODE_ASSIGNMENT_SPLITS.items():
        for solver, kwargs in CODE_ASSIGNMENT_SOLVERS.items():
            for dtype in (torch.float64, torch.float32):
                local = features[rows[rank]].to(dtype).requires_grad_()  # no gradient may flow, gathered or not
                targets = code_assignment_targets(local, codebook.to(dtype), solver, gather=True, **kwargs)
                results[(split, solver, str(dtype))] = dict(targets=targets, requires_grad=targets.requires_grad)
    return results
