"""The objectives' claims at small scale: every method against its own baseline, seeds, spread and tuning shown.

    python benchmarks/objectives.py            # the full table (about an hour on 2 CPU cores)
    python benchmarks/objectives.py --quick    # one seed of the main rows, clean scenes and digits, untuned (minutes)
    python benchmarks/objectives.py --only infonce_b32,infonce_b32_patch_dropout_0.5   # patch dropout's cost

Datasets (all built offline from scikit-learn's real handwritten scans):
- digits: the embedded demo (1,437 training scans, 360 test scans, captions name the class; positives by label).
  Metric: zero-shot accuracy on the test scans.
- scenes: `vlalign.data.digit_scenes`, an instance-level set: every image holds two real scans, each with its own
  quadrant, size and ink colour, and one caption that describes exactly that image (4,000 training scenes, 400
  validation, 500 test; the scans of the validation and test scenes are never seen in training). Positives by
  image. Metric: mean R@1 of image->text and text->image retrieval over the 500 test scenes (chance 0.2%).
- scenes-noisy: the same scenes with 30% of the training captions swapped for another training image's caption.

Protocol:
- Every run trains small towers from scratch (ViT and BERT with 2 layers of width 64, + 1 fusion layer for the
  models with fusion; see SMALL_TOWERS) with batch 32 for a fixed number of steps (scenes 400, digits 300), one
  CPU thread per run, `--jobs` runs at a time, each through `training/train.py` exactly as a user runs it.
- Tuning: each row of a main pair (ALBEF ITC, full TCL, the CODIS four-term baseline, full CODIS) gets the same
  3-point learning-rate grid on the clean scenes, seed 0, selected on the *validation* split by mean R@1; the
  ablation rows (+IMC, +IMC+LMI) use full TCL's choice; the noisy scenes reuse each row's clean choice. The digits
  rows all use the demo's learning rate (none is tuned), and each regulariser is swept over three weights, every
  weight shown.
- Patch dropout (FLIP): plain CLIP on digits (`infonce_b32`, `infonce_b64`: in-batch InfoNCE, no EMA teachers, IMC /
  LMI / ITM / MLM off, no fusion layers) against the same with half of each image's patch tokens dropped in training
  (`infonce_b32_patch_dropout_0.5`, `infonce_b64_patch_dropout_0.5`, FLIP's main setting), same seeds and steps;
  evaluation sees every patch, and the training seconds show what the dropped tokens save.
- Reported: 3 seeds (0, 1, 2) per row on the test split, mean +- sample standard deviation, plus the training
  seconds per run. The ALBEF ITC baseline is also run at TCL's wall-clock budget (more steps, same time).

Run folders (each with the run's eval_results.json) are kept under `--work_dir`, so an interrupted table resumes
where it stopped. The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "training" / "configs"

SMALL_TOWERS = [
    "--model.vision_config.hidden_size",
    "64",
    "--model.vision_config.intermediate_size",
    "128",
    "--model.vision_config.num_attention_heads",
    "2",
    "--model.vision_config.num_hidden_layers",
    "2",
    "--model.text_config.hidden_size",
    "64",
    "--model.text_config.intermediate_size",
    "128",
    "--model.text_config.num_attention_heads",
    "2",
    "--model.embed_dim",
    "64",
]
NO_EXTRA_TERMS = ["--imc_weight", "0", "--lmi_weight", "0", "--itm_weight", "0", "--mlm_weight", "0"]
IN_BATCH_ONLY = ["--use_momentum", "false", *NO_EXTRA_TERMS, "--num_fusion_layers", "0"]
LEARNING_RATES = (5e-4, 1e-3, 2e-3)
DEFAULT_LEARNING_RATE = 5e-4
SEEDS = (0, 1, 2)
STEPS = {"digits": 300, "scenes": 400, "scenes-noisy": 400}


@dataclass(frozen=True)
class Row:
    name: str
    description: str
    datasets: tuple[str, ...]
    args: tuple[str, ...]
    config: str = "tcl_digits.yaml"
    tuned: bool = False  # gets the learning-rate grid (main pairs)
    lr_from: str | None = None  # uses that row's tuned learning rate
    main: bool = False  # part of --quick
    batch_size: int = 32


SCENES = ("scenes", "scenes-noisy")
ROWS = [
    # TCL against its contrastive-only baseline, with the ablation ITC -> +IMC -> +LMI -> +ITM/MLM
    Row("albef_itc", "ALBEF ITC (momentum distillation + queue)", SCENES, tuple(NO_EXTRA_TERMS), tuned=True, main=True),
    Row("itc_imc", "+ IMC", SCENES, ("--lmi_weight", "0", "--itm_weight", "0", "--mlm_weight", "0"), lr_from="tcl"),
    Row("itc_imc_lmi", "+ IMC + LMI", SCENES, ("--itm_weight", "0", "--mlm_weight", "0"), lr_from="tcl"),
    Row("tcl", "+ IMC + LMI + ITM + MLM (full TCL)", SCENES, (), tuned=True, main=True),
    # CODIS against its four-term baseline (CMA + IMC + ITM + MLM, no codebook terms)
    Row(
        "codis_base",
        "CODIS four-term baseline (no codebook terms)",
        SCENES,
        ("--code_weight", "0", "--ot_weight", "0"),
        config="codis_digits.yaml",
        tuned=True,
        main=True,
    ),
    Row(
        "codis",
        "full CODIS (codebook + OT, swapped targets)",
        SCENES,
        (),
        config="codis_digits.yaml",
        tuned=True,
        main=True,
    ),
    # the decomposable loss at a small batch against InfoNCE at the small and at a large batch
    Row("infonce_b32", "InfoNCE, batch 32", ("digits",), tuple(IN_BATCH_ONLY), main=True),
    Row("infonce_b256", "InfoNCE, batch 256", ("digits",), tuple(IN_BATCH_ONLY), batch_size=256),
    # patch dropout's accuracy cost: plain CLIP (infonce_b32) with half of the patch tokens dropped in training
    Row(
        "infonce_b32_patch_dropout_0.5",
        "InfoNCE, batch 32, patch dropout 0.5 (FLIP)",
        ("digits",),
        (*IN_BATCH_ONLY, "--model.patch_dropout", "0.5"),
    ),
    Row(
        "decomposable_b32_running",
        "decomposable, batch 32, running-average Z",
        ("digits",),
        (*IN_BATCH_ONLY, "--contrastive_loss", "decomposable", "--z_estimate", "running"),
        main=True,
    ),
    Row(
        "decomposable_b32_queue",
        "decomposable, batch 32, queue Z (1024)",
        ("digits",),
        (*IN_BATCH_ONLY, "--contrastive_loss", "decomposable", "--z_estimate", "queue"),
    ),
    # the latent-modality-structure regularisers on top of InfoNCE, each at three weights
    Row("infonce_b64", "InfoNCE, batch 64", ("digits",), tuple(IN_BATCH_ONLY), batch_size=64),
    Row(
        "infonce_b64_patch_dropout_0.5",
        "InfoNCE, batch 64, patch dropout 0.5 (FLIP)",
        ("digits",),
        (*IN_BATCH_ONLY, "--model.patch_dropout", "0.5"),
        batch_size=64,
    ),
    *[
        Row(
            f"infonce_b64_{short}_{weight:g}",
            f"InfoNCE b64 + {label}, weight {weight:g}",
            ("digits",),
            (*IN_BATCH_ONLY, f"--use_{flag}", "true", f"--{flag}_weight", str(weight)),
            batch_size=64,
        )
        for short, label, flag, weights in (
            ("sep", "feature separation", "feature_separation", (0.1, 0.3, 1.0)),
            ("bridge", "Brownian bridge", "brownian_bridge", (0.1, 0.3, 1.0)),
            ("gc", "geometric consistency", "geometric_consistency", (0.05, 0.25, 1.0)),
        )
        for weight in weights
    ],
]
ROWS_BY_NAME = {row.name: row for row in ROWS}
EQUAL_TIME_PAIR = ("albef_itc", "tcl")  # the baseline is also run at the method's wall-clock budget


@dataclass
class Job:
    row: Row
    dataset: str
    learning_rate: float
    seed: int
    split: str  # "validation" (tuning) or "test"
    steps: int

    @property
    def key(self) -> str:
        return f"{self.row.name}__{self.dataset}__lr{self.learning_rate:g}__s{self.seed}__{self.split}__{self.steps}"


@dataclass
class Table:
    work_dir: Path
    jobs: int
    results: dict[str, dict] = field(default_factory=dict)

    def data_args(self, dataset: str, split: str) -> list[str]:
        if dataset == "digits":
            return []  # the demo's own data section (eval on its test split)
        folder = self.work_dir / "data" / dataset
        return [
            "--dataset_name",
            "imagefolder",
            "--data_dir",
            str(folder),
            "--label_column",
            "null",
            "--positives_by",
            "image",
            "--processor_name_or_path",
            str(folder / "processor"),
            "--eval_split",
            split,
        ]

    def command(self, job: Job, output_dir: Path) -> list[str]:
        return [
            sys.executable,
            str(REPO / "training" / "train.py"),
            "--config",
            str(CONFIGS / job.row.config),
            *self.data_args(job.dataset, job.split),
            *SMALL_TOWERS,
            *job.row.args,
            "--output_dir",
            str(output_dir),
            "--max_steps",
            str(job.steps),
            "--seed",
            str(job.seed),
            "--learning_rate",
            str(job.learning_rate),
            "--per_device_train_batch_size",
            str(job.row.batch_size),
            "--alpha_ramp_steps",
            str(max(1, job.steps // 8)),
            "--logging_steps",
            str(max(1, job.steps // 8)),
            "--cpu_threads",
            "1",
            "--disable_tqdm",
            "true",
        ]

    def run_one(self, job: Job) -> dict:
        folder = self.work_dir / "runs" / job.key
        result_file = folder / "eval_results.json"
        if result_file.exists():
            return json.loads(result_file.read_text())
        scratch = folder.with_name(folder.name + ".running")
        shutil.rmtree(scratch, ignore_errors=True)
        start = time.time()
        process = subprocess.run(
            self.command(job, scratch),
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        if process.returncode != 0:
            raise RuntimeError(f"run {job.key} failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
        result = json.loads((scratch / "eval_results.json").read_text())
        result["wall_seconds"] = round(time.time() - start, 1)
        result["alignment_warning"] = result.get("alignment_started") is False
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.log").write_text(process.stderr[-20000:])
        result_file.write_text(json.dumps(result, indent=2))
        shutil.rmtree(scratch, ignore_errors=True)  # the weights are not needed: only the figures are kept
        return result

    def run_all(self, jobs: list[Job]) -> None:
        todo = [job for job in jobs if job.key not in self.results]
        if not todo:
            return
        print(f"-- {len(todo)} runs, {self.jobs} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            futures = {pool.submit(self.run_one, job): job for job in todo}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                self.results[job.key] = result = future.result()
                print(
                    f"   {job.key}: {score(job.dataset, result):.1f} ({result['train_runtime_seconds']:.0f} s)",
                    flush=True,
                )


def score(dataset: str, result: dict) -> float:
    """The headline figure: zero-shot accuracy on digits, mean R@1 of both directions on the scenes."""
    if dataset == "digits":
        return float(result["zero_shot_accuracy"])
    return (float(result["i2t_recall@1"]) + float(result["t2i_recall@1"])) / 2


def build_data(work_dir: Path) -> None:
    from vlalign.data.digit_scenes import write_digit_scenes_imagefolder

    for name, noise in (("scenes", 0.0), ("scenes-noisy", 0.3)):
        folder = work_dir / "data" / name
        if not (folder / "processor" / "processor_config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            write_digit_scenes_imagefolder(folder, noisy_fraction=noise, seed=0)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed of the main rows, no tuning")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--work_dir", default="outputs/objectives_benchmark")
    parser.add_argument("--only", default="", help="comma-separated row names (default: all)")
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.quick or r.main]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = sorted(wanted - set(ROWS_BY_NAME))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS_BY_NAME)}")
        rows = [r for r in rows if r.name in wanted]
    seeds = SEEDS[:1] if args.quick else SEEDS
    work_dir = Path(args.work_dir) / ("quick" if args.quick else "full")
    table = Table(work_dir, args.jobs)
    started = time.time()
    build_data(work_dir)

    # 1. learning-rate grid for the main pairs (validation split), together with the untuned digits rows
    learning_rate = {r.name: DEFAULT_LEARNING_RATE for r in ROWS}
    tuning = (
        []
        if args.quick
        else [Job(r, "scenes", lr, 0, "validation", STEPS["scenes"]) for r in rows if r.tuned for lr in LEARNING_RATES]
    )
    digits = [
        Job(r, "digits", DEFAULT_LEARNING_RATE, s, "test", STEPS["digits"])
        for r in rows
        if "digits" in r.datasets
        for s in seeds
    ]
    table.run_all(tuning + digits)
    tuning_scores: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.tuned and not args.quick:
            scores = {
                lr: score("scenes", table.results[Job(r, "scenes", lr, 0, "validation", STEPS["scenes"]).key])
                for lr in LEARNING_RATES
            }
            tuning_scores[r.name] = {f"{lr:g}": round(v, 2) for lr, v in scores.items()}
            learning_rate[r.name] = max(scores, key=scores.get)
    for r in rows:
        if r.lr_from:
            learning_rate[r.name] = learning_rate[r.lr_from]

    # 2. every scenes row at its learning rate, each seed, test split
    scene_sets = ("scenes",) if args.quick else SCENES
    scenes = [
        Job(r, d, learning_rate[r.name], s, "test", STEPS[d])
        for r in rows
        for d in r.datasets
        if d in scene_sets
        for s in seeds
    ]
    table.run_all(scenes)

    # 3. the baseline at the method's wall-clock budget
    baseline, method = (ROWS_BY_NAME[n] for n in EQUAL_TIME_PAIR)
    equal_time = []
    if not args.quick and baseline in rows and method in rows:

        def seconds(row, dataset):
            return statistics.median(
                table.results[Job(row, dataset, learning_rate[row.name], s, "test", STEPS[dataset]).key][
                    "train_runtime_seconds"
                ]
                for s in seeds
            )

        for d in SCENES:
            steps = round(STEPS[d] * seconds(method, d) / seconds(baseline, d))
            equal_time += [Job(baseline, d, learning_rate[baseline.name], s, "test", steps) for s in seeds]
        table.run_all(equal_time)

    # 4. the table
    summary = []
    for job_list, label in ((digits, None), (scenes, None), (equal_time, "at the wall-clock budget of full TCL")):
        groups: dict[tuple[str, str, int], list[Job]] = {}
        for job in job_list:
            groups.setdefault((job.row.name, job.dataset, job.steps), []).append(job)
        for (name, dataset, steps), group in groups.items():
            results = [table.results[j.key] for j in group]
            values = [score(dataset, r) for r in results]
            mean, std = mean_std(values)
            summary.append(
                {
                    "row": name,
                    "description": ROWS_BY_NAME[name].description + (f", {label}" if label else ""),
                    "dataset": dataset,
                    "steps": steps,
                    "batch_size": ROWS_BY_NAME[name].batch_size,
                    "learning_rate": group[0].learning_rate,
                    "seeds": [j.seed for j in group],
                    "metric": "zero-shot accuracy" if dataset == "digits" else "mean R@1",
                    "mean": round(mean, 2),
                    "std": None if len(values) < 2 else round(std, 2),
                    "values": [round(v, 2) for v in values],
                    "i2t_recall@1": round(statistics.fmean(r["i2t_recall@1"] for r in results), 2),
                    "t2i_recall@1": round(statistics.fmean(r["t2i_recall@1"] for r in results), 2),
                    "train_seconds": round(statistics.fmean(r["train_runtime_seconds"] for r in results), 1),
                    "alignment_warnings": sum(bool(r.get("alignment_warning")) for r in results),
                    "alignment_judged": sum(
                        "alignment_started" in r for r in results
                    ),  # never for the decomposable loss
                }
            )
    print(
        f"\nObjectives at small scale ({len(seeds)} seed(s) per row; mean +- std over seeds; "
        f"{time.time() - started:.0f} s for this invocation)"
    )
    print("| dataset | row | steps | lr | metric | mean +- std | i2t R@1 | t2i R@1 | train s | alignment not started |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        stuck = f"{s['alignment_warnings']} of {s['alignment_judged']}" if s["alignment_judged"] else "-"
        spread = f"{s['mean']:.1f}" + ("" if s["std"] is None else f" +- {s['std']:.1f}")
        print(
            f"| {s['dataset']} | {s['description']} | {s['steps']} | {s['learning_rate']:g} | {s['metric']} | "
            f"{spread} | {s['i2t_recall@1']:.1f} | {s['t2i_recall@1']:.1f} | "
            f"{s['train_seconds']:.0f} | {stuck} |"
        )
    if tuning_scores:
        print(
            "\nLearning-rate grid (scenes, seed 0, validation mean R@1): "
            + "; ".join(f"{n}: {v}" for n, v in tuning_scores.items())
        )
    print(
        json.dumps(
            {
                "quick": args.quick,
                "seeds": list(seeds),
                "steps": STEPS,
                "tuning": tuning_scores,
                "learning_rates": {r.name: learning_rate[r.name] for r in rows},
                "rows": summary,
            }
        )
    )


if __name__ == "__main__":
    main()
