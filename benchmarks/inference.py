"""Sliding-window inference throughput (megapixels per second) and peak memory on a large image.

The image (default a synthetic 4000 x 3000 H&E-like RGB image: one 512-pixel tile of the embedded synthetic
generator, mirrored up to the size; with ``--glas DIR`` the first GlaS image of ``DIR/images`` mirrored instead)
is written once as a tiled TIFF. Three methods segment it with the same network (``configs/inference.json``'s
``network_def``), weights and window (``--roi``, ``--overlap``). The weights are ``--weights`` if given (e.g. a
trained ``models/model.pt``), else a seeded initialisation fitted for ``--fit-steps`` (30) SGD steps on random
windows of the image and its gland mask, so that the network makes confident decisions as a trained one does and
the agreement check compares real decisions (random weights predict one class everywhere); the table shows the
foreground share of each prediction.

- ``sliding-window``: the bundle's whole-image path: the config's preprocessing (without ``LoadImaged``) on the
  image, the config's ``inferer`` (MONAI ``SlidingWindowInferer``, Gaussian blending, ``--sw-batch-size`` windows
  per forward) on the whole image, softmax and argmax (what the evaluator does for images up to
  ``large_image_pixels``);
- ``blocks``: the bundle's large-image path (``LargeImageSegmenter`` from the config, forced whatever the size):
  TIFF read block by block, the same inferer inside each block, the mask written as a tiled TIFF;
- ``naive``: a tile-by-tile loop written here: one window at a time (batch 1), at MONAI's window positions,
  logits summed and divided by the number of windows covering each pixel (uniform averaging), argmax.

Timed: from the RGB image in memory (``blocks``: the TIFF on disk) to the class map in memory (``blocks``: the
mask TIFF on disk), after a warm-up forward. Peak memory: on a CPU each method runs in its own child process
(``--child METHOD``), which reports its resident memory after loading the network and the image (baseline) and
its peak RSS during the run (Linux ``VmHWM``, reset before the run); "+run" is the difference. The children
alternate (sliding-window, blocks, naive, sliding-window, ...) for ``--repeats`` rounds. On CUDA the methods
alternate in this process and peak memory is ``torch.cuda.max_memory_allocated`` (reset before each run).

The predictions of both bundle paths are compared with the naive one (share of pixels with the same class; target
> 99 %: only the blending weights differ, Gaussian against uniform). The bundle paths run the same windows as the
naive loop (the block path more: its blocks overlap by their margins; the table counts them); they save time by
running ``--sw-batch-size`` windows per forward.

README figures (2 CPU cores, default network, 128-pixel windows, overlap 0.25):

    python benchmarks/inference.py --threads 2 --json runs/inference.json
    python benchmarks/inference.py --threads 2 --glas ../shared/data/glas --json runs/inference_glas.json

Smoke test: ``--network tiny --height 300 --width 400 --roi 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

from benchmarks.network_sizes import TINY_NETWORK  # noqa: E402
from benchmarks.process_memory import peak_rss_mb, reset_peak_rss, rss_mb, sync  # noqa: E402

METHODS = ("sliding-window", "blocks", "naive")
MIN_AGREEMENT = 0.99


# ------------------------------------------------------------------------------------------------ the image


def mirror_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` (H, W, 3) mirrored (symmetric padding, repeated as needed) and cut to ``height`` x ``width``."""
    pad = ((0, max(height - image.shape[0], 0)), (0, max(width - image.shape[1], 0)), (0, 0))
    return np.ascontiguousarray(np.pad(image, pad, mode="symmetric")[:height, :width])


def source_image(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """The large RGB image, its gland mask (for fitting the default weights) and a description."""
    if args.glas:
        from PIL import Image

        root = Path(args.glas)
        files = sorted((root / "images").glob("*.png")) + sorted((root / "images").glob("*.bmp"))
        if not files or not (root / "masks" / files[0].name).is_file():
            raise SystemExit(f"error: {root} needs images/*.png and masks/<same name> (this repository's GlaS copy)")
        tile = np.asarray(Image.open(files[0]).convert("RGB"))
        mask = np.asarray(Image.open(root / "masks" / files[0].name).convert("L"))
        description = f"{files[0].name} of {root} mirrored"
    else:
        from bundle.prepare.synthetic import render_synthetic_case

        tile, mask = render_synthetic_case(seed=0, index=0, image_size=512)
        description = "synthetic 512 px tile mirrored"
    image = mirror_to(tile, args.height, args.width)
    return image, mirror_to(mask[..., None], args.height, args.width)[..., 0] > 0, description


# ------------------------------------------------------------------------------------------------ the methods


def tile_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI's ``dense_patch_slices``: a step of ``int(roi * (1 - overlap))``,
    the last window aligned with the end."""
    step, starts, pos = max(int(roi * (1 - overlap)), 1), [], 0
    while True:
        starts.append(min(pos, size - roi))
        if pos + roi >= size:
            return starts
        pos += step


def naive_tiles(network: torch.nn.Module, image: torch.Tensor, roi: int, overlap: float, autocast) -> torch.Tensor:
    """Class map [H, W] of a [3, H, W] image: one window at a time, logits averaged uniformly over the overlaps."""
    _, height, width = image.shape
    total, count = None, torch.zeros(1, height, width, device=image.device)
    with torch.no_grad():
        for top in tile_starts(height, roi, overlap):
            for left in tile_starts(width, roi, overlap):
                with autocast():
                    logits = network(image[None, :, top : top + roi, left : left + roi])[0].float()
                if total is None:
                    total = torch.zeros(logits.shape[0], height, width, device=image.device)
                total[:, top : top + roi, left : left + roi] += logits
                count[:, top : top + roi, left : left + roi] += 1
    return (total / count).argmax(0)


class Bench:
    """The config's network (with weights), inferer, large-image segmenter and preprocessing."""

    def __init__(self, args: argparse.Namespace, image_file: str, weights_file: str, out_dir: str) -> None:
        from monai.bundle import ConfigParser

        from bundle.inference import load_network_weights

        parser = ConfigParser()
        parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
        parser.update(
            {
                "bundle_root": str(BUNDLE_ROOT),
                "dataset_dir": image_file,
                "output_dir": out_dir,
                "ckpt_path": weights_file,
                "device": f"$torch.device({args.device!r})",
                "amp": bool(args.amp),
                "patch_size": [args.roi, args.roi],
                "sw_batch_size": args.sw_batch_size,
                "sw_overlap": args.overlap,
                "progress": False,
                "mask_scale": 1,
                "large_image_pixels": 1,  # the block path takes the image whatever its size
                **(TINY_NETWORK if args.network == "tiny" else {}),
            }
        )
        self.args, self.image_file = args, image_file
        self.device = torch.device(args.device)
        self.network = load_network_weights(parser.get_parsed_content("network"), weights_file).eval()
        self.inferer = parser.get_parsed_content("inferer")
        self.segmenter = parser.get_parsed_content("large_images")
        self.transform = self.segmenter.block_transform  # the config's preprocessing without LoadImaged

    def autocast(self):
        amp = self.args.amp and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext()

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """[3, H, W] float tensor on the device, as the config's preprocessing gives it."""
        meta = {"original_channel_dim": -1, "spatial_shape": image.shape[:2], "filename_or_obj": self.image_file}
        data = self.transform({"image": MetaTensor(torch.from_numpy(image.astype(np.float32)), meta=meta)})
        return torch.as_tensor(data["image"].as_tensor() if isinstance(data["image"], MetaTensor) else data["image"])

    def warm_up(self) -> None:
        with torch.no_grad(), self.autocast():
            for batch in (1, self.args.sw_batch_size):
                self.network(torch.zeros(batch, 3, self.args.roi, self.args.roi, device=self.device))

    def run(self, method: str, image: np.ndarray | None) -> np.ndarray | str:
        """The class map (H, W) uint8 of ``method`` (``blocks``: the path of the mask TIFF it wrote)."""
        if method == "blocks":
            return self.segmenter.segment(self.image_file)
        tensor = self.preprocess(image).to(self.device)
        if method == "naive":
            classes = naive_tiles(self.network, tensor, self.args.roi, self.args.overlap, self.autocast)
        else:
            with torch.no_grad(), self.autocast():
                logits = self.inferer(tensor[None], self.network)
            classes = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].argmax(0)
        return classes.to(torch.uint8).cpu().numpy()


def window_count(method: str, height: int, width: int, args: argparse.Namespace, block: int, margin: int) -> int:
    """Network windows a method runs on the image (the block path: per block with its margins)."""
    if method != "blocks":
        return len(tile_starts(height, args.roi, args.overlap)) * len(tile_starts(width, args.roi, args.overlap))
    total = 0
    for top in range(0, height, block):
        rows = min(height, top + block + margin) - max(0, top - margin)
        for left in range(0, width, block):
            cols = min(width, left + block + margin) - max(0, left - margin)
            total += len(tile_starts(max(rows, args.roi), args.roi, args.overlap)) * len(
                tile_starts(max(cols, args.roi), args.roi, args.overlap)
            )
    return total


# ------------------------------------------------------------------------------------------------ measuring


def measure(bench: Bench, method: str, image: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """Time one run of ``method``; memory: RSS (baseline and peak) and on CUDA the allocator's peak."""
    device = bench.device
    result: dict = {"baseline_rss_mb": rss_mb()}
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    sync(device)
    start = time.perf_counter()
    classes = bench.run(method, image)
    sync(device)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = peak_rss_mb()
    if isinstance(classes, str):  # the block path's mask file, read back outside the timing
        classes = tifffile.imread(classes)
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["above_baseline_mb"] = result["peak_mb"] - before / 2**20
    else:
        result["above_baseline_mb"] = result["peak_rss_mb"] - result["baseline_rss_mb"]
    return result, classes


def child(args: argparse.Namespace) -> dict:
    """One method in this (child) process: build, load the image, warm up, measure; the class map to a .npy."""
    with tempfile.TemporaryDirectory() as out:
        bench = Bench(args, args.image_file, args.weights_file, out)
        image = None if args.child == "blocks" else tifffile.imread(args.image_file)
        bench.warm_up()
        result, classes = measure(bench, args.child, image)
    if args.mask_out:
        np.save(args.mask_out, classes)
    return result


def child_command(args: argparse.Namespace, method: str, image_file: str, weights_file: str, mask_out: str) -> list:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--image-file", image_file]
    command += ["--weights-file", weights_file, "--mask-out", mask_out, "--device", args.device]
    command += ["--roi", str(args.roi), "--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size)]
    command += ["--network", args.network, "--height", str(args.height), "--width", str(args.width)]
    command += ["--threads", str(args.threads)] if args.threads else []
    return command + (["--amp"] if args.amp else [])


def fit(network: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, roi: int, steps: int) -> None:
    """A few supervised SGD steps (batch 4, CE + Dice) on random windows of the normalised [3, H, W] image and its
    [H, W] mask, so that the network makes confident decisions like a trained one (random weights predict one
    class everywhere, or, re-centred, flip at the window borders)."""
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    network.train()
    for _ in range(steps):
        tops = torch.randint(0, image.shape[1] - roi + 1, (4,), generator=gen).tolist()
        lefts = torch.randint(0, image.shape[2] - roi + 1, (4,), generator=gen).tolist()
        x = torch.stack([image[:, t : t + roi, u : u + roi] for t, u in zip(tops, lefts)])
        y = torch.stack([mask[None, t : t + roi, u : u + roi] for t, u in zip(tops, lefts)]).long()
        loss = loss_function(network(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()


def prepare_weights(args: argparse.Namespace, image: np.ndarray, mask: np.ndarray, folder: str) -> tuple[str, str]:
    """The weights file every method loads, and what it holds."""
    from monai.bundle import ConfigParser

    if args.weights:
        return args.weights, args.weights
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update({"patch_size": [args.roi, args.roi], **(TINY_NETWORK if args.network == "tiny" else {})})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    mean, std = (torch.tensor(parser.get_parsed_content(k)).view(3, 1, 1) for k in ("intensity_mean", "intensity_std"))
    normalised = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    fit(network, normalised, torch.from_numpy(mask), args.roi, args.fit_steps)
    path = os.path.join(folder, "fitted_weights.pt")
    torch.save(network.state_dict(), path)
    return path, f"seed 0 + {args.fit_steps} SGD steps on the image"


def run_benchmark(args: argparse.Namespace, folder: str) -> dict:
    image, mask, description = source_image(args)
    image_file = os.path.join(folder, "image.tif")
    tifffile.imwrite(image_file, image, tile=(256, 256), photometric="rgb")
    weights_file, weights = prepare_weights(args, image, mask, folder)
    del mask
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    masks: dict[str, np.ndarray] = {}
    in_process = args.in_process or args.device.startswith("cuda")
    bench = Bench(args, image_file, weights_file, folder) if in_process else None
    if bench is not None:
        bench.warm_up()
    for _ in range(args.repeats):
        for method in METHODS:
            if bench is not None:
                result, classes = measure(bench, method, None if method == "blocks" else image)
                masks.setdefault(method, classes)
            else:
                mask_out = os.path.join(folder, f"{method}.npy")
                command = child_command(args, method, image_file, weights_file, mask_out)
                env = dict(os.environ, HF_HUB_OFFLINE="1")
                done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                masks.setdefault(method, np.load(mask_out))
            runs[method].append(result)
    megapixels = args.height * args.width / 1e6
    if args.device.startswith("cuda"):
        memory_keys: tuple[str, ...] = ("peak_mb", "above_baseline_mb")
    else:  # RSS only means something in a child process of its own
        memory_keys = () if in_process else ("baseline_rss_mb", "peak_rss_mb", "above_baseline_mb")
    config = json.loads((BUNDLE_ROOT / "configs" / "inference.json").read_text())
    margin = config["large_image_margin"] if config["large_image_margin"] is not None else args.roi // 2
    methods = {}
    for method, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        methods[method] = {
            "median_s": seconds,
            "mp_per_s": megapixels / seconds,
            "seconds": [r["seconds"] for r in results],
            "windows": window_count(method, args.height, args.width, args, config["large_image_block"], margin),
            **{key: max(r[key] for r in results) for key in memory_keys},
        }
    return {
        "image": {"source": description, "height": args.height, "width": args.width, "megapixels": megapixels},
        "cli_uses_blocks": args.height * args.width > 2048 * 2048,
        "weights": weights,
        "methods": methods,
        "speedup_vs_naive": {m: methods[m]["mp_per_s"] / methods["naive"]["mp_per_s"] for m in METHODS[:2]},
        "agreement_with_naive": {m: float((masks[m] == masks["naive"]).mean()) for m in METHODS[:2]},
        "foreground_share": {m: float((masks[m] > 0).mean()) for m in METHODS},  # a constant map agrees trivially
    }


def print_table(figures: dict) -> None:
    print(
        f"{'method':<15} {'windows':>7} {'s':>8} {'MP/s':>7} {'x naive':>8} {'peak MB':>8} {'+run MB':>8} "
        f"{'agrees':>8} {'foregr.':>8}"
    )
    for method, r in figures["methods"].items():
        peak = r.get("peak_mb", r.get("peak_rss_mb"))
        above = r.get("above_baseline_mb")
        speedup = figures["speedup_vs_naive"].get(method, 1.0)
        agree = figures["agreement_with_naive"].get(method)
        print(
            f"{method:<15} {r['windows']:>7} {r['median_s']:>8.2f} {r['mp_per_s']:>7.3f} {speedup:>8.2f} "
            f"{'-' if peak is None else f'{peak:.0f}':>8} {'-' if above is None else f'{above:.0f}':>8} "
            f"{'-' if agree is None else f'{100 * agree:.2f}%':>8} {100 * figures['foreground_share'][method]:>7.1f}%"
        )
    image = figures["image"]
    print(
        f"({image['height']}x{image['width']} {image['source']}; {figures['network']} network, weights "
        f"{figures['weights']}; roi {figures['roi']}, overlap {figures['overlap']}, sw_batch_size "
        f"{figures['sw_batch_size']}; device {figures['device']}{' fp16' if figures['amp'] else ''}, torch threads "
        f"{figures['threads']}; median of {figures['repeats']}; memory: {figures['memory']}; the CLI uses the "
        f"block path for this size: {'yes' if figures['cli_uses_blocks'] else 'no'})"
    )
    for check in figures["checks"]:
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {100 * check['value']:.2f}%")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--glas", help="a GlaS folder (images/*.png): its first image, mirrored, instead")
    parser.add_argument("--roi", type=int, default=128, help="window side (divisible by 16)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=8, help="windows per forward of the bundle's inferer")
    parser.add_argument("--network", choices=["default", "tiny"], default="default")
    parser.add_argument("--weights", help="network weights, e.g. models/model.pt (default: fitted, see above)")
    parser.add_argument("--fit-steps", type=int, default=30, help="SGD steps of the default weights on the image")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="float16 autocast on CUDA (all methods)")
    parser.add_argument("--in-process", action="store_true", help="no child processes on a CPU (no RSS figures)")
    parser.add_argument("--json", help="also write the figures to this file")
    for hidden in ("--child", "--image-file", "--weights-file", "--mask-out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.height, args.width) < args.roi or args.roi % 16:
        parser.error("--roi must be divisible by 16 and at most --height and --width")
    if not 0 <= args.overlap < 1 or args.repeats < 1:
        parser.error("--overlap must be in [0, 1) and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = child(args)
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as folder:
        figures = run_benchmark(args, folder)
    figures.update(
        device=args.device,
        amp=bool(args.amp),
        network=args.network,
        roi=args.roi,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        repeats=args.repeats,
        threads=torch.get_num_threads(),
        in_process=bool(args.in_process or args.device.startswith("cuda")),
        memory=(
            "torch.cuda.max_memory_allocated"
            if args.device.startswith("cuda")
            else ("not measured (--in-process)" if args.in_process else "RSS, one child process per run")
        ),
        torch=torch.__version__,
    )
    figures["checks"] = [
        {"name": f"{m} agrees with naive (> 99 %)", "value": v, "pass": bool(v > MIN_AGREEMENT)}
        for m, v in figures["agreement_with_naive"].items()
    ]
    print_table(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
