"""Sliding-window inference throughput (megapixels per second) and peak memory on a large image.

The image (default a synthetic 4000 x 3000 H&E-like RGB image: one 512-pixel tile of the embedded synthetic
generator, mirrored up to the size; with ``--glas DIR`` the first GlaS image of ``DIR/images`` mirrored instead)
is written once as a tiled TIFF. Three methods segment it with the same network (``configs/inference.json``'s
``network_def``), weights, magnification (the config's ``image_scale``: the network sees the image resized by it,
as ``ScaledInferer`` does, and its logits are resized back) and window (``--roi`` pixels at that scale,
``--overlap``). The config's clean-up is switched off (``min_object_area`` 0, ``fill_holes`` false) so that the
three class maps compare the network's decisions only. The weights are ``--weights`` if given (e.g. a trained
``models/model.pt``), else a seeded initialisation fitted for ``--fit-steps`` (100) AdamW steps (learning rate
``--fit-lr``, 3e-3, decaying linearly to 0; batch 4; CE + Dice) on random windows of exactly what inference feeds
the network (the image through the config's preprocessing, resized by ``image_scale``) and of its gland mask resized
to the same size (nearest, as training's ``Zoomd`` resizes labels), so that the network makes confident, spatially
varying decisions as a trained one does (random weights predict one class everywhere; weak weights give logits so
close that the blending weights flip many pixels). The table shows each prediction's foreground share and its
agreement with the image's own mask ("vs mask": what the fit learnt).

- ``sliding-window``: the bundle's whole-image path: the config's preprocessing (without ``LoadImaged``) on the
  image, the config's ``inferer`` (MONAI ``SlidingWindowInferer``, Gaussian blending, ``--sw-batch-size`` windows
  per forward) on the whole image, softmax and argmax (what the evaluator does for images up to
  ``large_image_pixels``);
- ``blocks``: the bundle's large-image path (``LargeImageSegmenter`` from the config, forced whatever the size):
  TIFF read block by block, the same inferer inside each block, the mask written as a tiled TIFF;
- ``naive``: a tile-by-tile loop written here: the preprocessed image resized by ``image_scale`` (as
  ``ScaledInferer`` resizes it), one window at a time (batch 1) at MONAI's window positions, logits summed and
  divided by the number of windows covering each pixel (uniform averaging), resized back (bilinear), argmax.

Timed: from the RGB image in memory (``blocks``: the TIFF on disk) to the class map in memory (``blocks``: the
mask TIFF on disk), after a warm-up forward. Peak memory: on a CPU each method runs in its own child process
(``--child METHOD``), which reports its resident memory after loading the network and the image (baseline) and
its peak RSS during the run (Linux ``VmHWM``, reset before the run); "+run" is the difference. The children
alternate (sliding-window, blocks, naive, sliding-window, ...) for ``--repeats`` rounds. On CUDA the methods
alternate in this process and peak memory is ``torch.cuda.max_memory_allocated`` (reset before each run).

The predictions of both bundle paths are compared with the naive one (share of pixels with the same class; target
> 99 %: only the blending weights differ, Gaussian against uniform). The comparison only means something when the
naive prediction is neither (nearly) all background nor all foreground - a constant map agrees with any other
constant map - so a second check requires its foreground share to lie in [5 %, 95 %]; a failed check prints FAIL
with its reason (the exit status stays 0). The bundle paths run the same windows as the naive loop (the block path
more: its blocks overlap by their margins; the table counts them, at the network's scale); they save time by
running ``--sw-batch-size`` windows per forward.

Figures for ``docs/benchmarks.md`` (2 CPU cores, default network, 128-pixel windows, overlap 0.25):

    python benchmarks/inference.py --threads 2 --json runs/inference.json
    python benchmarks/inference.py --threads 2 --glas ../shared/data/glas --json runs/inference_glas.json

Smoke test: ``--network tiny --height 300 --width 400 --roi 64`` (the image must be at least ``--roi`` pixels
on each side at the network's scale).
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
import torch.nn.functional as F  # noqa: E402
from monai.data import MetaTensor  # noqa: E402

from benchmarks.network_sizes import TINY_NETWORK  # noqa: E402
from benchmarks.process_memory import peak_rss_mb, reset_peak_rss, rss_mb, sync  # noqa: E402

METHODS = ("sliding-window", "blocks", "naive")
MIN_AGREEMENT = 0.99
# the naive prediction's foreground share must lie in this range for the agreement to mean something
FOREGROUND_RANGE = (0.05, 0.95)
CONFIG_FILE = BUNDLE_ROOT / "configs" / "inference.json"


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


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The size the network sees an image of ``height`` x ``width`` at (``ScaledInferer``'s rounding)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def to_network_scale(batch: torch.Tensor, scale: float, mode: str | None = None) -> torch.Tensor:
    """[N, C, H, W] resized by ``scale`` as ``bundle.inference.ScaledInferer`` resizes its input (``area`` down,
    bilinear up; ``mode`` overrides it, e.g. ``nearest-exact`` for a mask); ``scale`` 1 returns ``batch``."""
    if scale == 1.0:
        return batch
    mode = mode or ("area" if scale < 1.0 else "bilinear")
    options = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(batch, size=scaled_size(*batch.shape[2:], scale), mode=mode, **options)


def naive_logits(
    network: torch.nn.Module, image: torch.Tensor, roi: int, overlap: float, scale: float, autocast=nullcontext
) -> torch.Tensor:
    """Logits [C, H, W] of a preprocessed [3, H, W] image: resized by ``scale``, one window at a time, logits averaged
    uniformly over the overlaps, resized back to H x W (bilinear, as ``ScaledInferer`` does)."""
    _, height, width = image.shape
    scaled = to_network_scale(image[None], scale)[0]
    _, rows, cols = scaled.shape
    total, count = None, torch.zeros(1, rows, cols, device=image.device)
    with torch.no_grad():
        for top in tile_starts(rows, roi, overlap):
            for left in tile_starts(cols, roi, overlap):
                with autocast():
                    logits = network(scaled[None, :, top : top + roi, left : left + roi])[0].float()
                if total is None:
                    total = torch.zeros(logits.shape[0], rows, cols, device=image.device)
                total[:, top : top + roi, left : left + roi] += logits
                count[:, top : top + roi, left : left + roi] += 1
    average = total / count
    if scale == 1.0:
        return average
    return F.interpolate(average[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def config_parser(args: argparse.Namespace, **updates):
    """``configs/inference.json`` with the benchmark's window, network size and clean-up off, plus ``updates``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIG_FILE))
    parser.update(
        {
            "bundle_root": str(BUNDLE_ROOT),
            "patch_size": [args.roi, args.roi],
            "min_object_area": 0,  # no clean-up: the three class maps compare the network's decisions only
            "fill_holes": False,
            **(TINY_NETWORK if args.network == "tiny" else {}),
            **updates,
        }
    )
    return parser


def preprocessing_without_loading(parser):
    """The config's preprocessing without ``LoadImaged`` (what ``LargeImageSegmenter`` applies to each block)."""
    from monai.transforms import Compose, LoadImaged

    return Compose([t for t in parser.get_parsed_content("preprocessing").transforms if not isinstance(t, LoadImaged)])


def preprocess(transform, image: np.ndarray, filename: str) -> torch.Tensor:
    """[3, H, W] float tensor of an (H, W, 3) image, as ``transform`` (the config's preprocessing) gives it."""
    meta = {"original_channel_dim": -1, "spatial_shape": image.shape[:2], "filename_or_obj": filename}
    data = transform({"image": MetaTensor(torch.from_numpy(image.astype(np.float32)), meta=meta)})
    return torch.as_tensor(data["image"].as_tensor() if isinstance(data["image"], MetaTensor) else data["image"])


class Bench:
    """The config's network (with weights), inferer, large-image segmenter and preprocessing."""

    def __init__(self, args: argparse.Namespace, image_file: str, weights_file: str, out_dir: str) -> None:
        from bundle.inference import load_network_weights

        parser = config_parser(
            args,
            dataset_dir=image_file,
            output_dir=out_dir,
            ckpt_path=weights_file,
            device=f"$torch.device({args.device!r})",
            amp=bool(args.amp),
            sw_batch_size=args.sw_batch_size,
            sw_overlap=args.overlap,
            progress=False,
            mask_scale=1,
            large_image_pixels=1,  # the block path takes the image whatever its size
        )
        self.args, self.image_file = args, image_file
        self.device = torch.device(args.device)
        self.network = load_network_weights(parser.get_parsed_content("network"), weights_file).eval()
        self.inferer = parser.get_parsed_content("inferer")  # ScaledInferer(SlidingWindowInferer)
        self.scale = float(parser.get_parsed_content("image_scale"))
        self.segmenter = parser.get_parsed_content("large_images")
        self.transform = self.segmenter.block_transform  # the config's preprocessing without LoadImaged

    def autocast(self):
        amp = self.args.amp and self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.float16) if amp else nullcontext()

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """[3, H, W] float tensor, as the config's preprocessing gives it."""
        return preprocess(self.transform, image, self.image_file)

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
            args = self.args
            classes = naive_logits(self.network, tensor, args.roi, args.overlap, self.scale, self.autocast).argmax(0)
        else:
            with torch.no_grad(), self.autocast():
                logits = self.inferer(tensor[None], self.network)
            classes = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0].argmax(0)
        return classes.to(torch.uint8).cpu().numpy()


def window_count(
    method: str, height: int, width: int, args: argparse.Namespace, block: int, margin: int, scale: float
) -> int:
    """Network windows a method runs on the image, at the network's scale (the block path: per block with its
    margins, each block resized on its own; a block smaller than a window is padded to one)."""

    def windows(rows: int, cols: int) -> int:
        rows, cols = scaled_size(rows, cols, scale)
        starts = [tile_starts(max(n, args.roi), args.roi, args.overlap) for n in (rows, cols)]
        return len(starts[0]) * len(starts[1])

    if method != "blocks":
        return windows(height, width)
    total = 0
    for top in range(0, height, block):
        rows = min(height, top + block + margin) - max(0, top - margin)
        for left in range(0, width, block):
            total += windows(rows, min(width, left + block + margin) - max(0, left - margin))
    return total


# ------------------------------------------------------------------------------------------------ measuring


def measure(bench: Bench, method: str, image: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """Time one run of ``method``; memory: RSS (baseline and peak) and on CUDA the allocator's peak."""
    device = bench.device
    reset_peak_rss()  # the peak starts over from the RSS now, the baseline
    result: dict = {"baseline_rss_mb": rss_mb()}
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


def fit(network: torch.nn.Module, image: torch.Tensor, mask: torch.Tensor, roi: int, steps: int, lr: float) -> None:
    """``steps`` supervised AdamW steps (batch 4, CE + Dice) on random windows of the [3, h, w] network input (the
    preprocessed image at the network's scale) and its [h, w] mask, so that the network makes confident, spatially
    varying decisions like a trained one (random weights predict one class everywhere; a few SGD steps leave
    logits so close that the blending weights flip many pixels)."""
    from monai.losses import DiceCELoss

    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr)
    # the learning rate decays linearly to 0: the last steps settle the decisions instead of moving them about
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
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
        schedule.step()
    network.eval()


def network_inputs(args: argparse.Namespace, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What inference feeds the network for ``image`` - the config's preprocessing (without ``LoadImaged``), then
    resized by ``image_scale`` - as [3, h, w], and ``mask`` (H, W) resized to the same h x w (nearest, as training's
    ``Zoomd`` resizes labels) as [h, w] bool."""
    parser = config_parser(args)
    scale = float(parser.get_parsed_content("image_scale"))
    tensor = preprocess(preprocessing_without_loading(parser), image, "image.tif")
    scaled_mask = to_network_scale(torch.from_numpy(mask).float()[None, None], scale, mode="nearest-exact")
    return to_network_scale(tensor[None], scale)[0], scaled_mask[0, 0] > 0.5


def prepare_weights(args: argparse.Namespace, image: np.ndarray, mask: np.ndarray, folder: str) -> tuple[str, str]:
    """The weights file every method loads, and what it holds."""
    if args.weights:
        return args.weights, args.weights
    torch.manual_seed(0)
    network = config_parser(args).get_parsed_content("network_def")
    inputs, target = network_inputs(args, image, mask)
    fit(network, inputs, target, args.roi, args.fit_steps, args.fit_lr)
    path = os.path.join(folder, "fitted_weights.pt")
    torch.save(network.state_dict(), path)
    return path, f"seed 0 + {args.fit_steps} AdamW steps (lr {args.fit_lr:g} -> 0) on the image at the network's scale"


def run_benchmark(args: argparse.Namespace, folder: str) -> dict:
    image, mask, description = source_image(args)
    image_file = os.path.join(folder, "image.tif")
    tifffile.imwrite(image_file, image, tile=(256, 256), photometric="rgb")
    weights_file, weights = prepare_weights(args, image, mask, folder)
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
    config = json.loads(CONFIG_FILE.read_text())
    scale = float(config["image_scale"])
    # LargeImageSegmenter's default margin: half the window measured in image pixels (ScaledInferer.roi_size)
    margin = config["large_image_margin"]
    margin = int(margin) if margin is not None else int(round(args.roi / scale)) // 2
    methods = {}
    for method, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        methods[method] = {
            "median_s": seconds,
            "mp_per_s": megapixels / seconds,
            "seconds": [r["seconds"] for r in results],
            "windows": window_count(method, args.height, args.width, args, config["large_image_block"], margin, scale),
            **{key: max(r[key] for r in results) for key in memory_keys},
        }
    return {
        "image": {"source": description, "height": args.height, "width": args.width, "megapixels": megapixels},
        "image_scale": scale,
        "cli_uses_blocks": args.height * args.width > config["large_image_pixels"],
        "weights": weights,
        "methods": methods,
        "speedup_vs_naive": {m: methods[m]["mp_per_s"] / methods["naive"]["mp_per_s"] for m in METHODS[:2]},
        "agreement_with_naive": {m: float((masks[m] == masks["naive"]).mean()) for m in METHODS[:2]},
        "foreground_share": {m: float((masks[m] > 0).mean()) for m in METHODS},  # a constant map agrees trivially
        "mask_foreground_share": float(mask.mean()),
        "agreement_with_mask": {m: float(((masks[m] > 0) == mask).mean()) for m in METHODS},
    }


def print_table(figures: dict) -> None:
    print(
        f"{'method':<15} {'windows':>7} {'s':>8} {'MP/s':>7} {'x naive':>8} {'peak MB':>8} {'+run MB':>8} "
        f"{'agrees':>8} {'foregr.':>8} {'vs mask':>8}"
    )
    for method, r in figures["methods"].items():
        peak = r.get("peak_mb", r.get("peak_rss_mb"))
        above = r.get("above_baseline_mb")
        speedup = figures["speedup_vs_naive"].get(method, 1.0)
        agree = figures["agreement_with_naive"].get(method)
        print(
            f"{method:<15} {r['windows']:>7} {r['median_s']:>8.2f} {r['mp_per_s']:>7.3f} {speedup:>8.2f} "
            f"{'-' if peak is None else f'{peak:.0f}':>8} {'-' if above is None else f'{above:.0f}':>8} "
            f"{'-' if agree is None else f'{100 * agree:.2f}%':>8} {100 * figures['foreground_share'][method]:>7.1f}% "
            f"{100 * figures['agreement_with_mask'][method]:>7.1f}%"
        )
    image = figures["image"]
    print(
        f"({image['height']}x{image['width']} {image['source']}; {figures['network']} network, weights "
        f"{figures['weights']}; image_scale {figures['image_scale']}, roi {figures['roi']} at that scale, overlap "
        f"{figures['overlap']}, sw_batch_size "
        f"{figures['sw_batch_size']}; device {figures['device']}{' fp16' if figures['amp'] else ''}, torch threads "
        f"{figures['threads']}; median of {figures['repeats']}; memory: {figures['memory']}; the CLI uses the "
        f"block path for this size: {'yes' if figures['cli_uses_blocks'] else 'no'}; the image's own mask: "
        f"{100 * figures['mask_foreground_share']:.1f}% foreground)"
    )
    for check in figures["checks"]:
        why = "" if check["pass"] else f" - {check['fails_because']}"
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {100 * check['value']:.2f}%{why}")


def checks(figures: dict) -> list[dict]:
    """The script's own checks: both bundle paths agree with the naive loop, on a prediction that is informative."""
    low, high = FOREGROUND_RANGE
    result = [
        {
            "name": f"{m} agrees with naive (> {100 * MIN_AGREEMENT:.0f} %)",
            "value": v,
            "pass": bool(v > MIN_AGREEMENT),
            "fails_because": "the bundle path and the naive loop make different decisions",
        }
        for m, v in figures["agreement_with_naive"].items()
    ]
    share = figures["foreground_share"]["naive"]
    result.append(
        {
            "name": f"naive foreground share in [{100 * low:.0f} %, {100 * high:.0f} %]",
            "value": share,
            "pass": bool(low <= share <= high),
            "fails_because": "a (nearly) constant prediction agrees with any other one trivially, so the agreement "
            "above says nothing; fit longer (--fit-steps, --fit-lr) or give trained --weights",
        }
    )
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--glas", help="a GlaS folder (images/*.png): its first image, mirrored, instead")
    parser.add_argument("--roi", type=int, default=128, help="window side at the network's scale (divisible by 16)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=8, help="windows per forward of the bundle's inferer")
    parser.add_argument("--network", choices=["default", "tiny"], default="default")
    parser.add_argument("--weights", help="network weights, e.g. models/model.pt (default: fitted, see above)")
    parser.add_argument("--fit-steps", type=int, default=100, help="AdamW steps of the default weights on the image")
    parser.add_argument("--fit-lr", type=float, default=3e-3, help="their initial learning rate (decays linearly to 0)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--amp", action="store_true", help="float16 autocast on CUDA (all methods)")
    parser.add_argument("--in-process", action="store_true", help="no child processes on a CPU (no RSS figures)")
    parser.add_argument("--json", help="also write the figures to this file")
    for hidden in ("--child", "--image-file", "--weights-file", "--mask-out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scale = float(json.loads(CONFIG_FILE.read_text())["image_scale"])
    if min(scaled_size(args.height, args.width, scale)) < args.roi or args.roi % 16:
        parser.error(
            f"--roi must be divisible by 16 and at most --height and --width times the config's image_scale ({scale})"
        )
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
    figures["checks"] = checks(figures)
    print_table(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
