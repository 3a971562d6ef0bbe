"""Ablation of MPAMatch's terms on real GlaS: the presets, the 10 % and 20 % splits, equal schedules, 3 seeds.

Every run goes through the bundle's own commands, as subprocesses:

    python -m bundle.prepare glas --source SRC --output DATA/glas_split10 --split 10
    python -m monai.bundle run training --config_file "['configs/train.json','configs/<preset>.json']" \
        --bundle_root . --dataset_dir DATA/glas_split10 --output_dir RUN --ckpt_dir RUN/models --seed S \
        --max_epochs E --epoch_length L --val_interval 1 ...
    python -m monai.bundle run --config_file "['configs/train.json','configs/<preset>.json','configs/evaluate.json']" \
        ... --output_dir RUN --ckpt_dir RUN/models          # -> RUN/eval/metrics.json

for the presets supervised, unimatch, image_prototypes, text_prototypes and mpamatch (and, when asked for,
``mpamatch_random_text``, the text control, and ``supervised_equal_time``, configs/supervised.json trained for
``--equal-time-iterations``, as long as a semi-supervised run takes), each split and each seed, with the same
number of iterations. It records each training's wall time, evaluates each best network (by validation gland Dice)
on the 80 GlaS test images at their original resolution, after the configs' clean-up, and writes, in ``--output``
(after every run, so a stopped experiment loses nothing):

- ``results.md`` (printed as written), ``results.csv``, ``results.json``: per split and preset, test mDice and
  gland Dice as per-image means and pooled over the test set, object F1 (mean and spread over the seeds; Jaccard in
  the CSV), iterations, wall time per training run and seconds per iteration; ``runs.csv``: every run;
- ``curves_10.png``, ``curves_20.png``: validation gland Dice and supervised loss (``loss_x``) against iteration,
  one line per preset, mean over seeds (read from each run's TensorBoard events; the values are also written to
  ``curves_<split>.csv``; the PNGs need matplotlib);
- ``runs/split<P>/<preset>/seed<S>/``: each run's ``train.log``, TensorBoard events, ``models/model.pt``,
  ``eval/`` (metrics.json, per-image CSV, overlays), console output and ``commands.txt``.

The experiment resumes: a run whose ``eval/metrics.json`` exists is not redone (a trained but unevaluated run is
only evaluated), so a killed experiment continues where it stopped when the same command is run again, and more
presets, seeds or splits can be added to the same ``--output`` later by other commands: the results files always
summarise every finished run in ``--output``, whichever command trained it. A run that was killed during training
starts again from scratch, so every recorded wall time is one uninterrupted training. A results folder copied
elsewhere without its run folders (``results.*``, ``runs.csv``, ``curves_*``, ``settings.json``, as committed under
docs/ablation/) continues with ``--earlier FOLDER``: its recorded runs join the summary and are not redone
(``curves_runs.csv`` keeps every run's curves; the mean curves are kept for runs recorded before it existed).

CPU default (``python benchmarks/ablation.py --glas /path/to/glas --output runs/ablation``): the defaults of
``configs/train.json`` (the CPU recipe: ``image_scale`` 0.5, the 0.9 M-parameter network, AdamW, the first 5/6 of a
semi-supervised preset's iterations supervised), 600 iterations per run, validation every 50, seeds 0 1 2. On 2 idle
cores a supervised iteration takes about 0.25 s and a semi-supervised one about 1.3 s; ``--extra
"--supervised_warmup_fraction 0"`` makes every iteration of the semi-supervised presets semi-supervised (the
committed 600-iteration experiment); ``--dry-run`` lists the commands.

GPU full protocol (``--gpu``: the paper's setting, ``configs/uni.json`` merged on top of each preset: UNI ViT-L/16 at
0.1x learning rate, 256 px crops, full-resolution images, batch 8 + 8, 8,000 iterations, validation every 500,
seeds 0 1 2; needs the UNI weights, ``models/uni/pytorch_model.bin`` or ``--extra "--uni_checkpoint PATH"``):

    python benchmarks/ablation.py --gpu --glas /data/glas --output runs/ablation_gpu \
        --extra "--uni_checkpoint /data/uni/pytorch_model.bin"

Its duration is 30 runs x 8,000 iterations divided by the iterations per second that ``benchmarks/gpu_check.py``
prints, plus 16 validations and one evaluation per run. Each run's ``checkpoints/`` (``last.pt`` and ``best.pt``,
about 2.5 GB each with UNI: weights and SGD momentum) is deleted after its evaluation unless ``--keep-checkpoints``;
``models/model.pt`` is kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("supervised", "unimatch", "image_prototypes", "text_prototypes", "mpamatch")
# the text control (fixed random vectors in place of the text encoder's features), and the supervised preset trained
# for --equal-time-iterations (as long as a semi-supervised run takes), run when asked for
EQUAL_TIME = "supervised_equal_time"
ALL_PRESETS = PRESETS + ("mpamatch_random_text", EQUAL_TIME)
PRESET_CONFIG = {EQUAL_TIME: "supervised"}
SPLITS = (10, 20)
# test metric key in metrics.json -> column title: per-image means and dataset-pooled scores, object F1
TABLE_METRICS = {
    "mdice": "mDice",
    "pooled_mdice": "pooled mDice",
    "dice": "gland Dice",
    "pooled_dice": "pooled gland Dice",
    "object_f1": "object F1",
}
RECORD_METRICS = tuple(TABLE_METRICS) + ("mjaccard", "pooled_mjaccard")
CPU_DEFAULTS = {"iterations": 600, "val_every": 50, "patch_size": None, "seeds": [0, 1, 2]}
GPU_DEFAULTS = {"iterations": 8000, "val_every": 500, "patch_size": 256, "seeds": [0, 1, 2]}
# per run: training wall and CPU seconds (start-up and validations included), median seconds per iteration, the
# seconds of the training iterations alone (see iteration_seconds), evaluation
TIMINGS = ("train_wall_s", "train_cpu_s", "s_per_iteration", "iteration_s", "eval_wall_s", "eval_cpu_s")
SETTINGS_FILE = "settings.json"
TRAIN_RECORD = "train_time.json"
EVAL_RECORD = "eval_time.json"
RUN_CURVES = "curves_runs.csv"  # every run's validation Dice and loss_x, so a copied results folder keeps them


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glas", required=True, help="GlaS folder (images/ + masks/, or the official release)")
    parser.add_argument("--output", default="runs/ablation", help="experiment folder (runs/ablation)")
    parser.add_argument(
        "--data-dir",
        default=os.path.join(tempfile.gettempdir(), "mpamatch_ablation_data"),
        help="where the prepared datalists go (a temporary folder by default)",
    )
    parser.add_argument("--splits", type=int, nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=ALL_PRESETS)
    parser.add_argument("--seeds", type=int, nargs="+", help="0 1 2")
    parser.add_argument("--iterations", type=int, help="training iterations per run (CPU: 600; --gpu: 8000)")
    parser.add_argument(
        "--equal-time-iterations",
        type=int,
        help=f"iterations of {EQUAL_TIME} (configs/supervised.json trained as long as a semi-supervised run)",
    )
    parser.add_argument("--val-every", type=int, help="iterations between validations (CPU: 50; --gpu: 500)")
    parser.add_argument(
        "--patch-size", type=int, help="training crop and sliding window, px (CPU: train.json's; --gpu: 256)"
    )
    parser.add_argument("--extra", default="", help='more overrides for every command, e.g. "--batch_size 8"')
    parser.add_argument("--max-test-images", type=int, help="evaluate on this many test images only (for tests)")
    parser.add_argument("--gpu", action="store_true", help="the paper's setting (configs/uni.json), for a GPU")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints/ folder")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--earlier",
        help="results folder of earlier runs of the same settings whose run folders are gone (e.g. docs/ablation): "
        "its runs.csv joins the summary and those runs are not redone",
    )
    args = parser.parse_args(argv)
    for key, value in (GPU_DEFAULTS if args.gpu else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for option, value in (("--iterations", args.iterations), ("--equal-time-iterations", args.equal_time_iterations)):
        if value is not None and (value < args.val_every or value % args.val_every):
            parser.error(f"{option} {value} must be a positive multiple of --val-every {args.val_every}")
    if (EQUAL_TIME in args.presets) != (args.equal_time_iterations is not None):
        parser.error(f"--presets {EQUAL_TIME} and --equal-time-iterations go together")
    if args.patch_size is not None and (args.patch_size < 16 or args.patch_size % 16):
        parser.error("--patch-size must be a positive multiple of 16")
    args.output = Path(args.output).resolve()
    args.data_dir = Path(args.data_dir).resolve()
    args.glas = Path(args.glas).resolve()
    args.earlier = Path(args.earlier).resolve() if args.earlier else None
    return args


def experiment_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs comparable; an output folder holds runs of one setting only."""
    return {
        "gpu": args.gpu,
        "iterations": args.iterations,
        "val_every": args.val_every,
        "options": shared_options(args),
        "max_test_images": args.max_test_images,
    }


# ---------------------------------------------------------------------------------------------------- data
def cut_test_list(dataset_dir: Path, target: Path, count: int) -> None:
    """A copy of ``dataset_dir``'s datalist whose test list keeps ``count`` images, alternating GlaS parts."""
    datalist = json.loads((dataset_dir / "datalist.json").read_text())
    rank: dict[str, int] = {}
    ordered = []
    for item in datalist["test"]:
        part = item.get("part", "")
        rank[part] = rank.get(part, -1) + 1
        ordered.append((rank[part], len(ordered), item))
    datalist["test"] = [item for _, _, item in sorted(ordered, key=lambda entry: entry[:2])][:count]
    target.mkdir(parents=True, exist_ok=True)
    (target / "datalist.json").write_text(json.dumps(datalist, indent=4))


def prepare_data(args: argparse.Namespace, commands: list[str]) -> dict[int, tuple[Path, Path]]:
    """Per split: (training dataset_dir, evaluation dataset_dir), prepared with ``python -m bundle.prepare glas``."""
    source = args.glas
    tag = "glas"
    folders = {}
    for split in args.splits:
        train_dir = args.data_dir / f"{tag}_split{split}"
        command = [sys.executable, "-m", "bundle.prepare", "glas", "--source", str(source)]
        command += ["--output", str(train_dir), "--split", str(split)]
        commands.append(shlex.join(command))
        if not args.dry_run and not (train_dir / "datalist.json").is_file():
            subprocess.run(command, cwd=BUNDLE_ROOT, env=subprocess_env(), check=True, stdout=subprocess.DEVNULL)
        eval_dir = train_dir
        if args.max_test_images:
            eval_dir = args.data_dir / f"{tag}_split{split}_test{args.max_test_images}"
            commands.append(f"# test list cut to {args.max_test_images} images -> {eval_dir}")
            if not args.dry_run:
                cut_test_list(train_dir, eval_dir, args.max_test_images)
        folders[split] = (train_dir, eval_dir)
    return folders


# ---------------------------------------------------------------------------------------------------- commands
def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BUNDLE_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def config_files(args: argparse.Namespace, preset: str, evaluate: bool = False) -> str:
    names = (
        ["train", PRESET_CONFIG.get(preset, preset)]
        + (["uni"] if args.gpu else [])
        + (["evaluate"] if evaluate else [])
    )
    return json.dumps([str(BUNDLE_ROOT / "configs" / f"{name}.json") for name in names])


def extra_overrides(text: str) -> dict[str, str]:
    """``--extra "--key value ..."`` as {key: value}."""
    tokens = shlex.split(text)
    if len(tokens) % 2 or not all(key.startswith("--") for key in tokens[0::2]):
        raise SystemExit(f'error: --extra must be pairs of "--key value", got {text!r}')
    return {key[2:]: value for key, value in zip(tokens[0::2], tokens[1::2])}


def shared_options(args: argparse.Namespace) -> dict[str, Any]:
    """The crop and ``--extra`` options of every command of the experiment (the rest is the configs' defaults)."""
    options: dict[str, Any] = {} if args.patch_size is None else {"patch_size": [args.patch_size, args.patch_size]}
    return {**options, **extra_overrides(args.extra)}


def overrides(args: argparse.Namespace, run_dir: Path, dataset_dir: Path, **specific: Any) -> list[str]:
    """Command-line overrides: paths, ``specific`` ones (schedule, seed), then the shared options."""
    values: dict[str, Any] = {"bundle_root": BUNDLE_ROOT, "dataset_dir": dataset_dir, "output_dir": run_dir}
    values.update(ckpt_dir=run_dir / "models", **specific)
    values.update(shared_options(args))
    return [item for key, value in values.items() for item in (f"--{key}", as_argument(value))]


def as_argument(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def iterations_of(args: argparse.Namespace, preset: str) -> int:
    return args.equal_time_iterations if preset == EQUAL_TIME else args.iterations


def training_command(args: argparse.Namespace, preset: str, seed: int, dataset_dir: Path, run_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config_files(args, preset)]
    iterations = iterations_of(args, preset)
    schedule = {"max_epochs": iterations // args.val_every, "epoch_length": args.val_every, "val_interval": 1}
    return command + overrides(args, run_dir, dataset_dir, seed=seed, **schedule)


def evaluation_command(args: argparse.Namespace, preset: str, dataset_dir: Path, run_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_files(args, preset, True)]
    return command + overrides(args, run_dir, dataset_dir)


def run_logged(command: list[str], log_path: Path) -> dict[str, float]:
    """Run ``command`` with its output in ``log_path``; return its wall and CPU seconds. Exits if it fails."""
    cpu_before = children_cpu_seconds()
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        done = subprocess.run(command, cwd=BUNDLE_ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    timing = {"wall_s": time.perf_counter() - start, "cpu_s": children_cpu_seconds() - cpu_before}
    if done.returncode != 0:
        print(log_path.read_text(encoding="utf-8", errors="replace")[-3000:], file=sys.stderr)
        raise SystemExit(f"error: command failed with exit status {done.returncode} (output: {log_path}):\n"
                         f"{shlex.join(command)}")  # fmt: skip
    return timing


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------------------------------- one run
def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_folder(args: argparse.Namespace, split: int, preset: str, seed: int) -> Path:
    return args.output / "runs" / f"split{split}" / preset / f"seed{seed}"


def finished_runs(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(split, seed, preset) of every trained and evaluated run in ``--output``."""
    found = []
    for split in SPLITS:
        for preset in ALL_PRESETS:
            for seed_dir in (args.output / "runs" / f"split{split}" / preset).glob("seed*"):
                seed = seed_dir.name[len("seed") :]
                done = (seed_dir / TRAIN_RECORD).is_file() and (seed_dir / "eval" / "metrics.json").is_file()
                if seed.isdigit() and done:
                    found.append((split, int(seed), preset))
    return sorted(found)


def validation_images(args: argparse.Namespace, split: int) -> int | None:
    """Validation images of a split, from its prepared datalist (None when this command did not prepare it)."""
    datalist = read_json(args.data_dir / f"glas_split{split}" / "datalist.json")
    return len(datalist["validation"]) if datalist else None


def run_one(
    args: argparse.Namespace, preset: str, split: int, seed: int, dirs: tuple[Path, Path] | None, label: str
) -> dict:
    """Train (unless trained) and evaluate (unless evaluated) one run; return its record."""
    run_dir = run_folder(args, split, preset, seed)
    metrics_path = run_dir / "eval" / "metrics.json"
    train_record = read_json(run_dir / TRAIN_RECORD)
    if train_record is not None and metrics_path.is_file():
        print(f"{label} {preset} split {split} % seed {seed}: done before, skipped", flush=True)
    else:
        train = training_command(args, preset, seed, dirs[0], run_dir)
        evaluate = evaluation_command(args, preset, dirs[1], run_dir)
        if train_record is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # a killed training starts again: clean logs and wall time
            run_dir.mkdir(parents=True)
            (run_dir / "commands.txt").write_text(shlex.join(train) + "\n" + shlex.join(evaluate) + "\n")
            iterations = iterations_of(args, preset)
            print(f"{label} {preset} split {split} % seed {seed}: training {iterations} iterations", flush=True)
            train_record = run_logged(train, run_dir / "train_console.txt")
            train_record.update(iterations=iterations, epoch_length=args.val_every)
            (run_dir / TRAIN_RECORD).write_text(json.dumps(train_record, indent=4))
            print(f"{label} trained in {train_record['wall_s'] / 60:.1f} min", flush=True)
        print(f"{label} {preset} split {split} % seed {seed}: evaluating", flush=True)
        eval_record = run_logged(evaluate, run_dir / "eval_console.txt")
        (run_dir / EVAL_RECORD).write_text(json.dumps(eval_record, indent=4))
        if not args.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    metrics = json.loads(metrics_path.read_text())
    eval_record = read_json(run_dir / EVAL_RECORD) or {"wall_s": math.nan, "cpu_s": math.nan}
    scalars = read_scalars(run_dir / "tensorboard")
    record = {
        "split": split,
        "preset": preset,
        "seed": seed,
        "iterations": train_record["iterations"],
        "supervised_iterations": supervised_iterations(run_dir / "train_console.txt", train_record["iterations"]),
        "train_wall_s": train_record["wall_s"],
        "train_cpu_s": train_record["cpu_s"],
        "s_per_iteration": median_step_seconds(scalars.get("loss_x", {})),
        "iteration_s": iteration_seconds(scalars.get("loss_x", {}), args.val_every),
        "eval_wall_s": eval_record["wall_s"],
        "eval_cpu_s": eval_record["cpu_s"],
        "test_images": metrics["num_images"],
        **{key: metrics["overall"][key] for key in RECORD_METRICS},
        "postprocessing": metrics.get("postprocessing", "none"),
        "tta": metrics.get("tta", "none"),
        "best_val_dice": max((value for _, value in scalars.get("val_dice", {}).values()), default=math.nan),
        "run_dir": str(run_dir),
    }
    record["curves"] = {
        "val_dice": {epoch * train_record["epoch_length"]: v for epoch, (_, v) in scalars.get("val_dice", {}).items()},
        "loss_x": {step: value for step, (_, value) in scalars.get("loss_x", {}).items()},
    }
    shown = "  ".join(f"{title} {record[key]:.4f}" for key, title in TABLE_METRICS.items())
    print(f"{label} test ({record['test_images']} images): {shown}", flush=True)
    return record


WARMUP_LINE = re.compile(r"labelled batches alone for the first (\d+) iterations")


def supervised_iterations(console: Path, iterations: int) -> int | None:
    """How many of a run's iterations were supervised ones, from the trainer's first line in its console output:
    all of them without unlabelled data, the supervised warm-up of a semi-supervised run (the default 5/6 of the
    schedule); None when the output is missing."""
    if not console.is_file():
        return None
    text = console.read_text(encoding="utf-8", errors="replace")
    if "no unlabelled data: supervised training" in text:
        return iterations
    found = WARMUP_LINE.search(text)
    if found:
        return int(found.group(1))
    return 0 if "labelled and unlabelled batches each iteration" in text else None


def read_scalars(tensorboard_dir: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """Every scalar of a run's TensorBoard event files: tag -> step -> (wall time, value); later files win."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps = scalars.setdefault(tag, {})
            steps.update({event.step: (event.wall_time, event.value) for event in accumulator.Scalars(tag)})
    return scalars


def median_step_seconds(events: dict[int, tuple[float, float]]) -> float:
    """Median seconds between consecutive iterations (validation pauses fall out of the median)."""
    steps = sorted(events)
    gaps = [events[b][0] - events[a][0] for a, b in zip(steps, steps[1:]) if b == a + 1]
    return statistics.median(gaps) if gaps else math.nan


# ---------------------------------------------------------------------------------------------------- summary
def iteration_seconds(events: dict[int, tuple[float, float]], val_every: int) -> float:
    """Seconds of a run's training iterations alone, the time to compare at equal training time: the sum of the gaps
    between consecutive iterations, where the first iteration and each gap that spans a validation (after every
    ``val_every``-th iteration) count as the median gap. Unlike ``iterations x s_per_iteration`` it holds for a
    schedule whose iterations differ in cost (``supervised_warmup_iterations``)."""
    steps = sorted(events)
    gaps = {b: events[b][0] - events[a][0] for a, b in zip(steps, steps[1:]) if b == a + 1}
    if not gaps:
        return math.nan
    median = statistics.median(gaps.values())
    counted = [median if (step - 1) % val_every == 0 else gaps.get(step, median) for step in steps]
    return math.fsum(counted)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(records: list[dict]) -> list[dict]:
    """One row per (split, preset): metric mean/std/min/max over seeds, iterations, mean wall times."""
    rows = []
    for split in sorted({r["split"] for r in records}):
        for preset in ALL_PRESETS:
            runs = [r for r in records if r["split"] == split and r["preset"] == preset]
            if not runs:
                continue
            row: dict[str, Any] = {"split": split, "preset": preset, "seeds": [r["seed"] for r in runs]}
            row["iterations"] = runs[0]["iterations"]
            row["supervised_iterations"] = runs[0].get("supervised_iterations")  # None: recorded before it was
            row["postprocessing"] = runs[0]["postprocessing"]
            row["tta"] = runs[0].get("tta") or "none"  # runs recorded before --tta existed had none
            for key in RECORD_METRICS:
                row[key] = spread([r[key] for r in runs])
            for key in TIMINGS:  # runs recorded before a timing existed lack it: nan
                row[key] = statistics.fmean(as_number(r.get(key)) for r in runs)
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], args: argparse.Namespace) -> str:
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    test_images = f"{args.max_test_images}" if args.max_test_images else "the 80"
    cleanup = sorted({row["postprocessing"] for row in rows})
    tta = sorted({row["tta"] for row in rows})
    configs = "configs/train.json + preset" + (" + configs/uni.json" if args.gpu else "")
    options = " ".join(f"--{key} {as_argument(value)}" for key, value in shared_options(args).items())
    lines = [
        "# Ablation on GlaS",
        "",
        f"Test set: {test_images} GlaS test images, scored at their original resolution after post-processing "
        f"({'; '.join(cleanup)}; test-time augmentation: {', '.join(tta)}). Every run: validation every "
        f"{args.val_every} iterations, seeds "
        f"{', '.join(map(str, seeds))}; {configs}" + (f" with `{options}`." if options else " (their defaults)."),
        "Scores: mean ± sample standard deviation over seeds (min and max in results.csv); mDice and gland Dice are "
        "per-image means, pooled ones pool every pixel of the test set (the UniMatch-family convention). Wall and CPU "
        "time: one training run (start-up and validations included; CPU time is the process's, all threads, and "
        "is less changed than wall time by other work on the machine); s / it: median seconds per training "
        "iteration; iteration time: the training iterations alone (no start-up, no validation), the time to compare "
        "at equal training time.",
        "",
        "| split | preset | seeds | iterations | supervised iterations | "
        + " | ".join(TABLE_METRICS.values())
        + " | wall time / run | CPU time / run | iteration time / run | s / it |",
        "|---|---|---|---|---|" + "---|" * len(TABLE_METRICS) + "---|---|---|---|",
    ]
    for row in rows:
        scores = [f"{row[key]['mean']:.4f} ± {row[key]['std']:.4f}" for key in TABLE_METRICS]
        lines.append(
            f"| {row['split']} % | {row['preset']} | {len(row['seeds'])} | {row['iterations']} | "
            + f"{supervised_count(row.get('supervised_iterations'))} | "
            + " | ".join(scores)
            + f" | {row['train_wall_s'] / 60:.1f} min | {row['train_cpu_s'] / 60:.1f} min"
            + (f" | {row['iteration_s'] / 60:.1f} min" if math.isfinite(row["iteration_s"]) else " | n/a")
            + f" | {row['s_per_iteration']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def supervised_count(value: Any) -> str:
    """A row's supervised iterations; runs recorded before the column existed (read back from a CSV) show n/a."""
    number = as_number(value) if value not in (None, "") else math.nan
    return f"{int(number)}" if math.isfinite(number) else "n/a"


def write_results(rows: list[dict], records: list[dict], args: argparse.Namespace) -> str:
    table = markdown_table(rows, args)
    (args.output / "results.md").write_text(table, encoding="utf-8")
    flat_rows = []
    for row in rows:
        flat = {key: row[key] for key in ("split", "preset", "iterations", "supervised_iterations")}
        flat["seeds"] = " ".join(map(str, row["seeds"]))
        for key in RECORD_METRICS:
            flat.update({f"{key}_{stat}": value for stat, value in row[key].items()})
        flat.update({key: row[key] for key in TIMINGS})
        flat_rows.append(flat)
    write_csv(args.output / "results.csv", flat_rows)
    per_run = [{**r, "run_dir": relative(r["run_dir"], args.output)} for r in records]
    for run in per_run:
        del run["curves"]
    write_csv(args.output / "runs.csv", per_run)
    curve_rows = [
        {"split": r["split"], "preset": r["preset"], "seed": r["seed"], "curve": name, "iteration": step, "value": v}
        for r in records
        for name, curve in r["curves"].items()
        for step, v in sorted(curve.items())
    ]
    if curve_rows:
        write_csv(args.output / RUN_CURVES, curve_rows)
    summary = {"settings": experiment_settings(args), "summary": rows, "runs": records}
    (args.output / "results.json").write_text(json.dumps(summary, indent=4, default=str))
    return table


def relative(path: str, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (runs.csv stays valid when the folder is copied)."""
    return os.path.relpath(path, root) if Path(path).resolve().is_relative_to(root) else path


def write_csv(path: Path, rows: list[dict]) -> None:
    """Every row's columns in first-seen order (runs recorded by an older script lack the newer columns: empty)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows({k: format(v, ".6g") if isinstance(v, float) else v for k, v in row.items()} for row in rows)


# ---------------------------------------------------------------------------------------------------- curves
def mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """The mean over seeds at the iterations every seed has."""
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    return steps, [statistics.fmean(curve[step] for curve in curves) for step in steps]


def moving_average(values: list[float], width: int) -> list[float]:
    """Each value averaged with up to ``width - 1`` values before it."""
    return [statistics.fmean(values[max(0, i + 1 - width) : i + 1]) for i in range(len(values))]


def write_curves(
    records: list[dict], split: int, output: Path, validation_images: int | None, earlier: dict | None = None
) -> Path | None:
    """``curves_<split>.csv`` and, with matplotlib, ``curves_<split>.png``; returns the PNG path or None.

    A preset's curve is the mean over its runs whose curves are recorded; where none are (earlier runs known only
    from a results folder without per-run curves), the earlier folder's mean curve is kept.
    """
    series = {}
    for preset in ALL_PRESETS:
        runs = [r for r in records if r["split"] == split and r["preset"] == preset and r["curves"].get("loss_x")]
        if runs:
            series[preset] = {name: mean_curve([r["curves"][name] for r in runs]) for name in ("val_dice", "loss_x")}
        elif earlier and (split, preset) in earlier:
            series[preset] = earlier[(split, preset)]
    rows = [
        {"preset": preset, "curve": name, "iteration": step, "mean_over_seeds": value}
        for preset, curves in series.items()
        for name, (steps, values) in curves.items()
        for step, value in zip(steps, values)
    ]
    if not rows:
        return None
    write_csv(output / f"curves_{split}.csv", rows)
    try:
        import matplotlib
    except ImportError:
        print(f"notice: matplotlib is not installed: curves_{split}.png not drawn (values in curves_{split}.csv)")
        return None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (dice_axis, loss_axis) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for preset, curves in series.items():
        dice_axis.plot(*curves["val_dice"], marker="o", markersize=3, label=preset)
        steps, losses = curves["loss_x"]
        loss_axis.plot(steps, moving_average(losses, max(1, len(losses) // 20)), label=preset)
    dice_axis.set(
        xlabel="iteration",
        ylabel="validation gland Dice",
        title=f"GlaS {split} %: validation" + (f" ({validation_images} images)" if validation_images else ""),
    )
    loss_axis.set(xlabel="iteration", ylabel="supervised loss L_x (moving average)", title="training")
    for axis in (dice_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle("mean over seeds")
    figure.tight_layout()
    path = output / f"curves_{split}.png"
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------- earlier runs
def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def as_value(text: str) -> Any:
    """A CSV cell back as int, float or text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def as_number(value: Any) -> float:
    """A timing as a float; missing (a run recorded before the timing existed) or empty: nan."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def earlier_runs(args: argparse.Namespace) -> dict[tuple[int, int, str], dict]:
    """(split, seed, preset) -> record of each run in ``--earlier``'s runs.csv, with its curves where recorded."""
    if args.earlier is None:
        return {}
    folder = args.earlier
    stored = read_json(folder / SETTINGS_FILE)
    if stored is None or not (folder / "runs.csv").is_file():
        raise SystemExit(f"error: --earlier {folder}: not a results folder (needs runs.csv and {SETTINGS_FILE})")
    if stored != json.loads(json.dumps(experiment_settings(args))):
        changed = sorted(key for key in stored if stored.get(key) != experiment_settings(args).get(key))
        raise SystemExit(f"error: --earlier {folder} holds runs with other settings ({', '.join(changed)})")
    curves: dict[tuple[int, int, str], dict] = {}
    for row in read_csv(folder / RUN_CURVES):
        run = curves.setdefault((int(row["split"]), int(row["seed"]), row["preset"]), {"val_dice": {}, "loss_x": {}})
        run[row["curve"]][int(row["iteration"])] = float(row["value"])
    records = {}
    for row in read_csv(folder / "runs.csv"):
        record = {key: as_value(value) for key, value in row.items()}
        key = (record["split"], record["seed"], record["preset"])
        record["curves"] = curves.get(key, {"val_dice": {}, "loss_x": {}})
        records[key] = record
    return records


def earlier_mean_curves(args: argparse.Namespace) -> dict[tuple[int, str], dict]:
    """(split, preset) -> {curve: (iterations, means)} from ``--earlier``'s curves_<split>.csv."""
    series: dict[tuple[int, str], dict] = {}
    for split in SPLITS if args.earlier else ():
        for row in read_csv(args.earlier / f"curves_{split}.csv"):
            curve = series.setdefault((split, row["preset"]), {"val_dice": ([], []), "loss_x": ([], [])})[row["curve"]]
            curve[0].append(int(row["iteration"]))
            curve[1].append(float(row["mean_over_seeds"]))
    return series


# ---------------------------------------------------------------------------------------------------- main
def check_settings(args: argparse.Namespace) -> None:
    """Refuse to mix settings in one output folder (resumed runs would otherwise be compared unfairly)."""
    path = args.output / SETTINGS_FILE
    settings = json.loads(json.dumps(experiment_settings(args)))
    stored = read_json(path)
    if stored is not None and stored != settings:
        changed = sorted(key for key in settings if stored.get(key) != settings[key])
        raise SystemExit(f"error: {args.output} holds runs with other settings ({', '.join(changed)}); "
                         "use another --output")  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=4))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commands: list[str] = []
    if not args.dry_run:
        check_settings(args)
    folders = prepare_data(args, commands)
    plan = [(split, seed, preset) for split in args.splits for seed in args.seeds for preset in args.presets]
    if args.dry_run:
        for split, seed, preset in plan:
            run_dir = run_folder(args, split, preset, seed)
            commands.append(shlex.join(training_command(args, preset, seed, folders[split][0], run_dir)))
            commands.append(shlex.join(evaluation_command(args, preset, folders[split][1], run_dir)))
        print("\n".join(commands))
        return {"commands": commands}

    start = time.perf_counter()
    found = finished_runs(args)
    recorded = {key: run for key, run in earlier_runs(args).items() if key not in found}  # a run folder wins
    earlier = [run for run in found if run not in plan]  # trained by other commands in this folder
    records = [run_one(args, preset, split, seed, None, "[earlier]") for split, seed, preset in earlier]
    records += [run for key, run in recorded.items() if key not in plan]
    for index, (split, seed, preset) in enumerate(plan, start=1):
        if (split, seed, preset) in recorded:
            print(f"[{index}/{len(plan)}] {preset} split {split} % seed {seed}: in {args.earlier}, skipped", flush=True)
            records.append(recorded[(split, seed, preset)])
        else:
            records.append(run_one(args, preset, split, seed, folders[split], f"[{index}/{len(plan)}]"))
        records.sort(key=lambda r: (r["split"], r["seed"], ALL_PRESETS.index(r["preset"])))
        rows = summarise(records)
        table = write_results(rows, records, args)  # after every run: a stopped experiment loses nothing
    splits = sorted({record["split"] for record in records})
    earlier_curves = earlier_mean_curves(args)
    plots = [
        write_curves(records, split, args.output, validation_images(args, split), earlier_curves) for split in splits
    ]
    print(table, end="")
    print(f"experiment: {len(plan)} runs in {(time.perf_counter() - start) / 60:.1f} min; results in {args.output}")
    return {"summary": rows, "runs": records, "table": table, "plots": [str(p) for p in plots if p is not None]}


if __name__ == "__main__":
    main()
