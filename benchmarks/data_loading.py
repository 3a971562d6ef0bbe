"""How fast the training loaders feed an iteration (one labelled and one unlabelled batch), without any network.

    python benchmarks/data_loading.py [--glas /data/glas] [--preset uni] [--workers 0 1 2] [--iterations 24]

Builds ``train#dataloader`` and ``train#unlabeled#dataloader`` from ``configs/train.json`` + ``configs/<preset>.json``
(default ``uni``, the GPU setting: 256 px crops, batch 8 + 8, zoom 0.5-2, full-resolution GlaS 10 %: 7 labelled and
66 unlabelled images) with ``num_workers`` set to each of ``--workers``, and draws ``--epochs`` epochs of
``--iterations`` batch pairs the way the trainer does (both loaders restarted every epoch, the unlabelled one also
when it runs dry). The caching of the datasets is done before the clock starts. Two loader set-ups are timed in the
same run at every worker count:

- ``before``: the loaders as they were (a shuffling ``DataLoader`` of the cached dataset restarted whenever it runs
  dry, which with 7 labelled images and batch 8 is every iteration; workers not persistent, so each restart starts
  new worker processes; ``RandZoomd`` zooms the whole image before ``SpatialPadd`` + ``RandSpatialCropd``);
- ``now``: the config as shipped (``EpochSampler``: one restart per epoch; ``persistent_workers``;
  ``RandZoomCropd``: crop first, then resize).

It prints batch pairs per second for each, the ratio now / before, and the milliseconds one sample of each pipeline
costs in this process (``--workers 0``). A GPU iteration slower than the loaders' pair time is not data-bound;
``benchmarks/gpu_check.py`` prints both figures for the real run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]

# the loaders and the zoom and crop as train.json had them before EpochSampler and RandZoomCropd
BEFORE = {
    "zoom_and_crop": [
        {
            "_target_": "RandZoomd",
            "keys": "@geometry_keys",
            "prob": 1.0,
            "min_zoom": "$@zoom_range[0]",
            "max_zoom": "$@zoom_range[1]",
            "keep_size": False,
            "mode": "@geometry_modes",
            "allow_missing_keys": True,
        },
        {
            "_target_": "SpatialPadd",
            "keys": "@geometry_keys",
            "spatial_size": "@patch_size",
            "mode": "symmetric",
            "allow_missing_keys": True,
        },
        {
            "_target_": "RandSpatialCropd",
            "keys": "@geometry_keys",
            "roi_size": "@patch_size",
            "random_size": False,
            "allow_missing_keys": True,
        },
    ],
    "train#dataloader": {
        "_target_": "DataLoader",
        "dataset": "@train#dataset",
        "batch_size": "@batch_size",
        "shuffle": True,
        "num_workers": "@num_workers",
    },
    "train#unlabeled#dataloader": {
        "_target_": "DataLoader",
        "dataset": "@train#unlabeled#dataset",
        "batch_size": "@unlabeled_batch_size",
        "shuffle": True,
        "num_workers": "@num_workers",
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glas", default=os.environ.get("MPAMATCH_GLAS_DIR", ""), help="GlaS folder (optional)")
    parser.add_argument("--preset", default="uni", help="config merged on train.json (uni); 'none' for train.json")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values (0 1 2)")
    parser.add_argument("--iterations", type=int, default=24, help="batch pairs per epoch (24)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs drawn per set-up (2)")
    parser.add_argument("--samples", type=int, default=16, help="samples timed per pipeline for ms/sample (16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (1)")
    parser.add_argument("--output", help="folder for the prepared datalist (a temporary folder by default)")
    parser.add_argument("--extra", default="{}", help="more config overrides as a JSON object")
    return parser.parse_args(argv)


def dataset_dir(args: argparse.Namespace, output: Path) -> tuple[Path, str]:
    sys.path.insert(0, str(BUNDLE_ROOT))
    if args.glas and Path(args.glas, "images").is_dir():
        from bundle.prepare.glas import prepare_glas

        target = output / "glas_10"
        prepare_glas(args.glas, target, 10, force=True)
        return target, f"GlaS 10 % split from {args.glas}"
    from bundle.prepare.synthetic import generate_synthetic_dataset

    target = output / "synthetic"
    generate_synthetic_dataset(str(target))
    return target, "embedded synthetic set (no GlaS copy given)"


def parser_for(args: argparse.Namespace, data: Path, workers: int, before: bool) -> Any:
    from monai.bundle import ConfigParser

    files = [BUNDLE_ROOT / "configs" / "train.json"]
    if args.preset != "none":
        files.append(BUNDLE_ROOT / "configs" / f"{args.preset}.json")
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    overrides = {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(data),
        "device": "$torch.device('cpu')",
        "num_workers": workers,
        "epoch_length": args.iterations,
        "train#dataset#progress": False,
        "train#unlabeled#dataset#progress": False,
        **json.loads(args.extra),
    }
    if before:
        geometry = parser["weak_geometry"]
        assert geometry[0]["_target_"].endswith("RandZoomCropd"), geometry[0]
        overrides["weak_geometry"] = BEFORE["zoom_and_crop"] + geometry[1:]
        overrides.update({key: value for key, value in BEFORE.items() if key != "zoom_and_crop"})
    for key, value in overrides.items():
        parser[key] = value
    return parser


def draw(labelled: Any, unlabeled: Any, iterations: int, epochs: int) -> float:
    """Seconds to draw ``epochs`` x ``iterations`` (labelled, unlabelled) batch pairs as the trainer does
    (labelled batches only when ``unlabeled`` is None)."""
    start = time.perf_counter()
    for epoch in range(epochs):
        loaders = [labelled] if unlabeled is None else [labelled, unlabeled]
        for loader in loaders:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
        iterators = [iter(loader) for loader in loaders]
        for _ in range(iterations):
            for slot, loader in enumerate(loaders):
                try:
                    next(iterators[slot])
                except StopIteration:  # ran dry: restart (ignite does so for the labelled loader)
                    iterators[slot] = iter(loader)
                    next(iterators[slot])
    return time.perf_counter() - start


def ms_per_sample(dataset: Any, samples: int) -> float:
    times = []
    for index in range(samples):
        start = time.perf_counter()
        dataset[index % len(dataset)]
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(args: argparse.Namespace, data: Path) -> list[dict]:
    results = []
    for workers in args.workers:
        for name in ("before", "now"):
            parser = parser_for(args, data, workers, before=name == "before")
            labelled = parser.get_parsed_content("train#dataloader")
            unlabeled = parser.get_parsed_content("train#unlabeled#dataloader")
            seconds = draw(labelled, unlabeled, args.iterations, args.epochs)
            row = {"setup": name, "workers": workers, "pairs": args.iterations * args.epochs, "seconds": seconds}
            row["pairs_per_s"] = row["pairs"] / seconds
            if workers == 0:
                row["labeled_ms"] = ms_per_sample(parser.get_parsed_content("train#dataset"), args.samples)
                row["unlabeled_ms"] = ms_per_sample(parser.get_parsed_content("train#unlabeled#dataset"), args.samples)
            row["batch"] = (
                f"{parser.get_parsed_content('batch_size')}+{parser.get_parsed_content('unlabeled_batch_size')}"
            )
            results.append(row)
            del labelled, unlabeled  # persistent workers end with their loaders
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    output = Path(args.output or tempfile.mkdtemp(prefix="mpamatch_data_loading_")).resolve()
    output.mkdir(parents=True, exist_ok=True)
    data, note = dataset_dir(args, output)
    results = measure(args, data)
    print(
        f"data loading: {note}; preset {args.preset}; {os.cpu_count()} CPUs; main-process torch threads {args.threads}"
    )
    header = ("workers", "set-up", "batch", "pairs/s", "x before", "ms/labelled", "ms/unlabelled")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, (7, 7, 6, 8, 9, 12, 14), strict=True)))
    for row in results:
        before = next(r for r in results if r["workers"] == row["workers"] and r["setup"] == "before")
        row["x_before"] = row["pairs_per_s"] / before["pairs_per_s"]
        per_sample = [f"{row[k]:.1f}" if k in row else "-" for k in ("labeled_ms", "unlabeled_ms")]
        print(
            f"{row['workers']:>7} {row['setup']:>7} {row['batch']:>6} {row['pairs_per_s']:>8.2f} "
            f"{row['x_before']:>9.2f} {per_sample[0]:>12} {per_sample[1]:>14}"
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
