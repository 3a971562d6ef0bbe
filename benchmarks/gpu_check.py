"""GPU check of the paper's setting: the uni preset trains and evaluates end to end, in the precision it trains in.

    python benchmarks/gpu_check.py [--glas /data/glas] [--iterations 20] [--preset mpamatch] [--uni-checkpoint FILE]

Merges ``configs/train.json`` + ``configs/<preset>.json`` + ``configs/uni.json`` (UNI ViT-L/16 at 0.1x learning rate,
256 px crops, batch 8 + 8, full CUP decoder, the loaders' GPU settings), trains ``--iterations`` iterations as one
epoch (its validation writes ``models/model.pt``), evaluates that network with ``configs/evaluate.json`` on
``--test-images`` images, and prints:

- training iterations per second: the median time from one ``ITERATION_COMPLETED`` to the next after ``--warmup``
  iterations, so waiting for the loaders counts (the GPU work is finished at every stamp);
- beside it, the loaders alone: the same trainer's labelled and unlabelled loaders drawing ``--iterations`` batch
  pairs with no GPU work (if that rate is close to the training rate, training is data-bound: raise
  ``num_workers``);
- the precision the preset trains in (``amp`` and ``amp_dtype`` of the config: bfloat16 autocast where the GPU
  supports it, else float16 with a gradient scaler), validation and evaluation times and the peak GPU memory of
  training and of evaluation.

Both workflows run in this process (``monai.bundle.ConfigWorkflow``, what ``python -m monai.bundle run`` builds) so
that the GPU memory can be read.

UNI weights: ``--uni-checkpoint FILE``, else ``models/uni/pytorch_model.bin``. When that file is absent,
``encoder_kwargs`` is overridden to ``{}``: ``bundle.networks`` then builds UNI's ViT-L/16 with random weights
(same architecture, speed and memory; the scores mean nothing), instead of stopping with "encoder checkpoint ... does
not exist".

Data: the GlaS 10 % split when ``--glas`` (or ``$MPAMATCH_GLAS_DIR``) names a GlaS copy, else the embedded synthetic
set (generated in the output folder).

Without a GPU it prints one line and exits with status 0. ``--device cpu --extra "--encoder timm --encoder_kwargs
{'model_name': 'vit_tiny_patch16_224'}"`` runs the same code path on a CPU with a small ViT (a smoke test only).

The full-protocol ablation on a GPU (5 presets x 2 splits x 3 seeds, 8,000 iterations each; see
``benchmarks/ablation.py``):

    python benchmarks/ablation.py --gpu --glas /data/glas --output runs/ablation_gpu \
        --extra "--uni_checkpoint /data/uni/pytorch_model.bin"
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glas", default=os.environ.get("MPAMATCH_GLAS_DIR", ""), help="GlaS folder (optional)")
    parser.add_argument("--preset", default="mpamatch", help="ablation preset merged before uni.json (mpamatch)")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations (20)")
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out of the speed (5)")
    parser.add_argument("--test-images", type=int, default=4, help="test images evaluated (4)")
    parser.add_argument("--uni-checkpoint", help="UNI pytorch_model.bin (default: models/uni/pytorch_model.bin)")
    parser.add_argument("--output", help="folder for data, logs and weights (a temporary folder by default)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: smoke test of the code path")
    parser.add_argument("--extra", default="", help='more overrides, "--key value ..."')
    args = parser.parse_args(argv)
    if args.iterations <= args.warmup:
        parser.error("--iterations must be larger than --warmup")
    return args


def extra_overrides(text: str) -> dict[str, Any]:
    """``--key value`` pairs as config overrides, values read as Python literals where they are (as fire does)."""
    tokens = shlex.split(text)
    if len(tokens) % 2 or not all(key.startswith("--") for key in tokens[0::2]):
        raise SystemExit(f'error: --extra must be pairs of "--key value", got {text!r}')

    def literal(value: str) -> Any:
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value

    return {key[2:]: literal(value) for key, value in zip(tokens[0::2], tokens[1::2])}


def prepare_dataset(args: argparse.Namespace, output: Path) -> tuple[Path, str]:
    """A dataset folder whose test list holds ``--test-images`` images; returns it and a description."""
    sys.path.insert(0, str(BUNDLE_ROOT))
    if args.glas and Path(args.glas, "images").is_dir():
        from bundle.prepare.glas import prepare_glas

        dataset_dir = output / "glas_10"
        datalist = prepare_glas(args.glas, dataset_dir, 10, force=True)
        by_part = [[item for item in datalist["test"] if item["part"] == part] for part in ("testA", "testB")]
        datalist["test"] = [item for pair in zip(*by_part) for item in pair][: args.test_images]
        (dataset_dir / "datalist.json").write_text(json.dumps(datalist, indent=4))
        return dataset_dir, f"GlaS 10 % split from {args.glas}"
    from bundle.prepare.synthetic import generate_synthetic_dataset

    dataset_dir = output / "synthetic"
    generate_synthetic_dataset(str(dataset_dir), num_test=args.test_images)
    return dataset_dir, "embedded synthetic set (no GlaS copy given)"


def uni_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    checkpoint = Path(args.uni_checkpoint or BUNDLE_ROOT / "models" / "uni" / "pytorch_model.bin")
    if checkpoint.is_file():
        return {"uni_checkpoint": str(checkpoint)}, f"UNI weights {checkpoint}"
    return {"encoder_kwargs": {}}, f"random UNI-size weights ({checkpoint} not found; scores mean nothing)"


def workflow(files: list[str], run_id: str, overrides: dict[str, Any]):
    from monai.bundle import ConfigWorkflow

    configs = [str(BUNDLE_ROOT / "configs" / f"{name}.json") for name in files]
    flow = ConfigWorkflow(config_file=configs, workflow_type=None, run_id=run_id, **overrides)
    flow.initialize()
    return flow


def sync_clock(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def iteration_intervals(engine, device: str) -> list[float]:
    """Seconds from one ``ITERATION_COMPLETED`` of ``engine`` to the next (loader waits included), appended while it
    runs; the first interval starts at ``EPOCH_STARTED``."""
    from ignite.engine import Events

    intervals: list[float] = []
    last: list[float] = []

    def stamp(_) -> None:
        now = sync_clock(device)
        intervals.append(now - last[-1])
        last.append(now)

    engine.add_event_handler(Events.EPOCH_STARTED, lambda _: last.append(sync_clock(device)))
    engine.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    return intervals


def run_seconds(engine, device: str) -> list[float]:
    """Seconds of each run of ``engine`` (``STARTED`` to ``COMPLETED``), appended while it runs."""
    from ignite.engine import Events

    seconds: list[float] = []
    started: list[float] = []
    engine.add_event_handler(Events.STARTED, lambda _: started.append(sync_clock(device)))
    engine.add_event_handler(Events.COMPLETED, lambda _: seconds.append(sync_clock(device) - started[-1]))
    return seconds


def precision(parser, device: str) -> str:
    """What the trainer's autocast runs in, from the parsed config (the trainer turns AMP off on a CPU)."""
    import torch

    if device != "cuda" or not parser.get_parsed_content("amp"):
        return "float32"
    dtype = parser.get_parsed_content("amp_dtype")
    return {torch.bfloat16: "bfloat16 AMP", torch.float16: "float16 AMP with a gradient scaler"}.get(dtype, str(dtype))


def peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from data_loading import draw

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no GPU found (torch.cuda.is_available() is False); nothing was run")
        return 0
    output = Path(args.output or tempfile.mkdtemp(prefix="mpamatch_gpu_check_")).resolve()
    output.mkdir(parents=True, exist_ok=True)
    dataset_dir, data_note = prepare_dataset(args, output)
    weights, weights_note = uni_overrides(args)
    extra = extra_overrides(args.extra)
    if "encoder" in extra or "encoder_kwargs" in extra:
        weights_note = f"encoder from --extra: {extra.get('encoder', 'uni')} {extra.get('encoder_kwargs', {})}"
    common = {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(output / "run"),
        "ckpt_dir": str(output / "models"),
        "device": f"$torch.device('{args.device}')",
        **weights,
        **extra,
    }
    schedule = {"max_epochs": 1, "epoch_length": args.iterations, "val_interval": 1}
    trainer_flow = workflow(["train", args.preset, "uni"], "training", {**common, **schedule})
    trainer = trainer_flow.parser.get_parsed_content("train#trainer")
    evaluator = trainer_flow.parser.get_parsed_content("validate#evaluator")
    trained_in = precision(trainer_flow.parser, args.device)
    workers = trainer_flow.parser.get_parsed_content("num_workers")
    print(
        f"gpu_check: {args.preset} + uni preset on {args.device}, {trained_in}, {workers} loader workers; {data_note}; "
        f"{weights_note}",
        flush=True,
    )
    intervals = iteration_intervals(trainer, args.device)
    validation_seconds = run_seconds(evaluator, args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer_flow.run()
    train_peak = peak_gib(args.device)
    # the same loaders, warm, with nothing else to do
    loading_s = draw(trainer.data_loader, trainer.unlabeled_data_loader, args.iterations, epochs=1)
    trainer_flow.finalize()
    del trainer_flow, trainer, evaluator
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    eval_flow = workflow(["train", args.preset, "uni", "evaluate"], "run", common)
    test_seconds = run_seconds(eval_flow.parser.get_parsed_content("test#evaluator"), args.device)
    eval_flow.run()
    eval_peak = peak_gib(args.device)
    metrics = json.loads((output / "run" / "eval" / "metrics.json").read_text())

    median_s = statistics.median(intervals[args.warmup :])
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "preset": args.preset,
        "precision": trained_in,
        "num_workers": workers,
        "iterations": len(intervals),
        "iterations_per_s": 1.0 / median_s,
        "median_iteration_s": median_s,
        "data_loading_iterations_per_s": args.iterations / loading_s,
        "validation_s": sum(validation_seconds),
        "test_images": metrics["num_images"],
        "evaluation_s": sum(test_seconds),
        "peak_gpu_memory_gib_training": train_peak,
        "peak_gpu_memory_gib_evaluation": eval_peak,
        "test_gland_dice": metrics["overall"]["dice"],
        "output": str(output),
    }
    memory = "n/a (CPU)" if train_peak is None else f"{train_peak:.1f} GiB training, {eval_peak:.1f} GiB evaluation"
    print(
        f"gpu_check: {result['iterations_per_s']:.2f} iterations/s (median of {len(intervals) - args.warmup} "
        f"after {args.warmup} warm-up, loader waits included); the loaders alone "
        f"{result['data_loading_iterations_per_s']:.2f} batch pairs/s; validation {result['validation_s']:.1f} s; "
        f"evaluation of {result['test_images']} images {result['evaluation_s']:.1f} s; peak GPU memory {memory}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
