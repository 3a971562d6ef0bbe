"""Seconds per training iteration of ``SemiSupervisedTrainer`` against a plain PyTorch UniMatch iteration.

Both sides train the same network (a fresh ``network_def`` of the same parsed config, loaded with the trainer's
initial weights) with SGD (the config's learning rate, momentum 0.9, weight decay) on the same fixed tensors
(random but seeded, already on the device: data loading is excluded from both), ``--batch-size`` labelled plus
``--unlabeled-batch-size`` unlabelled images of ``--image-size`` pixels. The pseudo-label threshold is the config's
final ``confidence_threshold`` (the trainer's iteration counter is set past its warm-ups).

Reference (``UniMatchReference``, a transcription of the iteration of UniMatch's ``unimatch.py``, Yang et al.,
CVPR 2023):

1. CutMix boxes drawn per sample as UniMatch's ``obtain_cutmix_box`` does (probability and area of the config);
2. ``model.eval()``; no-grad forward of a *second* unlabelled batch (weak view): the pseudo-labels and confidences
   inside the boxes; both strong views get that batch's strong images inside their boxes;
3. ``model.train()``; one forward of ``cat(labelled, weak)`` with the feature-perturbation (FP) stream over the
   *whole* batch (``network(x, perturb_from=0)``, as UniMatch decodes clean and dropped-out features of every
   sample), keeping the weak part of ``logits_fp``; one forward of ``cat(strong 1, strong 2)`` (batch-norm running
   statistics updated, as in UniMatch);
4. ``loss_x = (CE + Dice) / 2`` (``monai.losses.DiceCELoss``, identical to the bundle's ``SupervisedLoss``),
   ``loss_u = 0.25 CE(s1) + 0.25 CE(s2) + 0.5 CE(fp)``, each CE masked by confidence >= threshold and divided by
   the number of pixels; ``loss = (loss_x + loss_u) / 2``; ``zero_grad``, backward, ``step``; the logged values
   are read with ``.item()`` as UniMatch's loop does.

Ours (``trainer._iteration(trainer, batch)`` of the trainer built from ``configs/train.json`` + a preset by
``monai.bundle.ConfigWorkflow``, its unlabelled batch supplied by replacing ``trainer._next_unlabeled``): the same
losses (``MPAMatchLoss``; the ``mpamatch`` preset adds the image and text prototype terms, the text encoder run
once per iteration), and the same backward and step (plus a finite-loss check and every term logged as a float).
Where it saves work:

- the CutMix source is the same unlabelled batch rolled by one (``cutmix_source: rolled``): no second batch, no
  eval-mode forward;
- the FP stream is decoded for the unlabelled part only (``perturb_from=len(labelled)``): the decoder runs on
  ``B_x + 2 B_u`` samples instead of ``2 (B_x + B_u)``, and the backward pass does not go through the labelled
  part's perturbed copy, whose output UniMatch discards.

Not savings: pseudo-labels and confidences are computed under ``no_grad`` (the reference detaches them, which
keeps no graph either); the strong views' forward leaves batch-norm running statistics alone
(``frozen_norm_statistics``, a few attribute writes). Both set gradients to None before the backward pass. Ours
pays a little more for a finite-loss check and for logging every term (one device-to-host transfer for all of
them); the box sampling (on the CPU, moved to the device) and the masking cost about the same on both sides. With
``--amp`` both sides run the forward passes under bf16 autocast and step through a ``GradScaler``, as MONAI's
``Trainer`` does. The methods run alternately (ours unimatch, reference, ours mpamatch, ...); warm-up iterations are
dropped and the median is reported. Both sides start from the same weights and batch; their first ``loss_x`` is
printed as a sanity check (close, not equal: the decoder's batch norm normalises the clean and the dropped-out
samples together, and the two sides perturb different numbers of samples with different dropout draws).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each call; "+iter" is the peak above what
was allocated before the call); on a CPU every method runs 3 iterations alone in a child process
(``--measure-memory METHOD``) that reports its resident memory after building (network, optimizer, inputs: the
baseline) and its peak RSS during the iterations (Linux ``VmHWM``, reset after building); "+iter" is the
difference. Images per second count the ``B_x + B_u`` training images of an iteration. Targets: ours unimatch
<= 0.9 x reference; ours mpamatch <= 1.1 x ours unimatch.

README figures (2 CPU cores, default network, batch 4 + 4, 128 px):

    python benchmarks/train_step.py --threads 2 --json runs/train_step.json

On a GPU: ``python benchmarks/train_step.py --device cuda --amp``. Smoke test on a CPU: ``--network tiny
--image-size 32 --batch-size 2 --unlabeled-batch-size 2 --iterations 2 --warmup 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402

from benchmarks.network_sizes import TINY_NETWORK  # noqa: E402
from benchmarks.process_memory import peak_rss_mb, reset_peak_rss, rss_mb, sync  # noqa: E402

REFERENCE = "reference"
MEMORY_ITERATIONS = 3
TARGET_VS_REFERENCE = 0.9
TARGET_MPAMATCH_VS_UNIMATCH = 1.1


def obtain_cutmix_box(
    height: int, width: int, rng: random.Random, prob: float, area: tuple[float, float]
) -> torch.Tensor:
    """UniMatch's ``obtain_cutmix_box`` (height/width ratio in [0.3, 1/0.3]) for one sample: a bool [H, W] mask."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    if rng.random() > prob:
        return mask
    size = rng.uniform(*area) * height * width
    while True:
        ratio = rng.uniform(0.3, 1 / 0.3)
        box_w, box_h = int((size / ratio) ** 0.5), int((size * ratio) ** 0.5)
        left, top = rng.randrange(width), rng.randrange(height)
        if left + box_w <= width and top + box_h <= height:
            break
    mask[top : top + box_h, left : left + box_w] = True
    return mask


class UniMatchReference:
    """One UniMatch training iteration in plain PyTorch (see the module docstring), on a bundle ``TransUNet``."""

    def __init__(
        self,
        network: torch.nn.Module,
        lr: float,
        weight_decay: float,
        threshold: float,
        cutmix_prob: float = 0.5,
        cutmix_area: tuple[float, float] = (0.02, 0.4),
        amp_dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        self.network = network
        self.optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        self.criterion_x = DiceCELoss(
            include_background=True, to_onehot_y=True, softmax=True, batch=True, lambda_dice=0.5, lambda_ce=0.5
        )
        self.threshold = threshold
        self.cutmix_prob, self.cutmix_area = cutmix_prob, tuple(cutmix_area)
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype is not None else None
        self.rng = random.Random(seed)

    def boxes(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        boxes = [obtain_cutmix_box(height, width, self.rng, self.cutmix_prob, self.cutmix_area) for _ in range(batch)]
        return torch.stack(boxes).to(device)

    def step(self, labelled: dict, unlabelled: dict, mix: dict) -> dict[str, float]:
        """One iteration; ``mix`` is the second unlabelled batch (CutMix source). Returns the logged values."""
        net = self.network
        img_x, mask_x = labelled["image"], labelled["label"]
        img_u_w, img_u_s1, img_u_s2 = unlabelled["image"], unlabelled["image_s1"], unlabelled["image_s2"]
        num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
        height, width = img_u_w.shape[-2:]
        box1, box2 = (self.boxes(num_ulb, height, width, img_u_w.device) for _ in range(2))
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

        with torch.no_grad():
            net.eval()
            with autocast:
                pred_u_w_mix = net(mix["image"]).detach()
            conf_u_w_mix, mask_u_w_mix = pred_u_w_mix.float().softmax(dim=1).max(dim=1)
        # UniMatch pastes in place into the loader's tensors; the fixed inputs are reused, so torch.where
        img_u_s1 = torch.where(box1[:, None], mix["image_s1"], img_u_s1)
        img_u_s2 = torch.where(box2[:, None], mix["image_s2"], img_u_s2)

        net.train()
        with autocast:
            out = net(torch.cat((img_x, img_u_w)), perturb_from=0)  # FP stream over the whole batch
            pred_x, pred_u_w = out["logits"].split([num_lb, num_ulb])
            pred_u_w_fp = out["logits_fp"][num_lb:]
            pred_u_s1, pred_u_s2 = net(torch.cat((img_u_s1, img_u_s2))).chunk(2)

        pred_u_w = pred_u_w.detach().float()
        conf_u_w, mask_u_w = pred_u_w.softmax(dim=1).max(dim=1)
        mask_u_w_cutmixed1 = torch.where(box1, mask_u_w_mix, mask_u_w)
        conf_u_w_cutmixed1 = torch.where(box1, conf_u_w_mix, conf_u_w)
        mask_u_w_cutmixed2 = torch.where(box2, mask_u_w_mix, mask_u_w)
        conf_u_w_cutmixed2 = torch.where(box2, conf_u_w_mix, conf_u_w)

        loss_x = self.criterion_x(pred_x.float(), mask_x)
        loss_u_s1 = self._masked_ce(pred_u_s1, mask_u_w_cutmixed1, conf_u_w_cutmixed1)
        loss_u_s2 = self._masked_ce(pred_u_s2, mask_u_w_cutmixed2, conf_u_w_cutmixed2)
        loss_u_w_fp = self._masked_ce(pred_u_w_fp, mask_u_w, conf_u_w)
        loss = (loss_x + loss_u_s1 * 0.25 + loss_u_s2 * 0.25 + loss_u_w_fp * 0.5) / 2.0

        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return {
            "loss": loss.item(),
            "loss_x": loss_x.item(),
            "loss_u_s1": loss_u_s1.item(),
            "loss_u_s2": loss_u_s2.item(),
            "loss_u_fp": loss_u_w_fp.item(),
            "mask_ratio": (conf_u_w >= self.threshold).float().mean().item(),
        }

    def _masked_ce(self, logits: torch.Tensor, target: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), target, reduction="none") * (conf >= self.threshold)
        return loss.sum() / target.numel()  # UniMatch: / (ignore_mask != 255).sum(); no ignored pixels here


# ------------------------------------------------------------------------------------------------ building


def make_inputs(args: argparse.Namespace, num_classes: int, device: torch.device) -> tuple[dict, dict, dict]:
    """Fixed, seeded batches on ``device``: labelled, unlabelled (weak + 2 strong), a second unlabelled batch."""
    gen = torch.Generator().manual_seed(1234)
    size = args.image_size

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, size, size, generator=gen)

    def unlabelled() -> dict:
        weak = images(args.unlabeled_batch_size)
        strong = [weak + 0.5 * torch.randn(weak.shape, generator=gen) for _ in range(2)]
        return {"image": weak.to(device), "image_s1": strong[0].to(device), "image_s2": strong[1].to(device)}

    coarse = torch.randint(0, num_classes, (args.batch_size, 1, max(size // 16, 1), max(size // 16, 1)), generator=gen)
    label = F.interpolate(coarse.float(), size=(size, size), mode="nearest").long()
    labelled = {"image": images(args.batch_size).to(device), "label": label.to(device)}
    return labelled, unlabelled(), unlabelled()


def make_workflow(preset: str, args: argparse.Namespace, out_dir: str):
    from monai.bundle import ConfigWorkflow

    overrides = {
        "bundle_root": str(BUNDLE_ROOT),
        "output_dir": out_dir,
        "ckpt_dir": out_dir,
        "device": f"$torch.device({args.device!r})",
        "amp": bool(args.amp),
        "batch_size": args.batch_size,
        "unlabeled_batch_size": args.unlabeled_batch_size,
        "patch_size": [args.image_size, args.image_size],
        # no loaders, handlers (validation, checkpoints, logging) or LR schedule: only the iteration is timed
        "train#handlers": [],
        "train#trainer#train_data_loader": "$[None]",
        "train#trainer#unlabeled_data_loader": "$[None]",
        "supervised_warmup_fraction": 0,  # every timed iteration a semi-supervised one
        **(TINY_NETWORK if args.network == "tiny" else {}),
    }
    if args.amp:
        overrides["train#trainer#amp_kwargs"] = "${'dtype': torch.bfloat16}"
    files = [str(BUNDLE_ROOT / "configs" / "train.json"), str(BUNDLE_ROOT / "configs" / f"{preset}.json")]
    workflow = ConfigWorkflow(config_file=files, workflow_type="train", logging_file=False, **overrides)
    workflow.initialize()
    return workflow


def build_ours(workflow, unlabelled: dict, state: dict | None) -> Callable[[dict], dict]:
    """The config's trainer, ready for ``_iteration`` calls; returns ``step(labelled) -> loss terms``."""
    parser = workflow.parser
    trainer = parser.get_parsed_content("train#trainer")
    if state is not None:
        trainer.network.load_state_dict(state)
    trainer.scaler = torch.amp.GradScaler("cuda") if trainer.amp else None  # what Trainer.run() sets up
    warmups = [parser.get_parsed_content(k) for k in ("threshold_warmup_iterations", "prototype_warmup_iterations")]
    trainer.state.iteration = max(warmups)  # past both warm-ups: final threshold, full prototype weights
    trainer._next_unlabeled = lambda: unlabelled

    def step(labelled: dict) -> dict:
        trainer.state.iteration += 1
        return dict(trainer._iteration(trainer, labelled)["loss_terms"])

    step.trainer = trainer  # type: ignore[attr-defined]
    return step


def build_reference(workflow, state: dict | None, args: argparse.Namespace, unlabelled: dict, mix: dict):
    parser = workflow.parser
    # a fresh instance of the config's network (lazy=False re-parses; objects built before are kept)
    network = parser.get_parsed_content("network_def", lazy=False).to(torch.device(args.device))
    if state is not None:
        network.load_state_dict(state)
    reference = UniMatchReference(
        network,
        lr=parser.get_parsed_content("learning_rate"),
        weight_decay=parser.get_parsed_content("weight_decay"),
        threshold=parser.get_parsed_content("confidence_threshold"),
        cutmix_prob=parser.get_parsed_content("cutmix_prob"),
        cutmix_area=tuple(parser.get_parsed_content("cutmix#area")),
        amp_dtype=torch.bfloat16 if args.amp else None,
    )

    def step(labelled: dict) -> dict:
        return reference.step(labelled, unlabelled, mix)

    step.reference = reference  # type: ignore[attr-defined]
    return step


def build_methods(args: argparse.Namespace, names: list[str], out_dir: str) -> tuple[dict, dict]:
    """``{name: step}`` for the wanted methods (presets and/or "reference"), all with the first trainer's weights."""
    presets = [name for name in names if name != REFERENCE] or args.presets[:1]
    workflows = {preset: make_workflow(preset, args, out_dir) for preset in presets}
    first = workflows[presets[0]]
    num_classes = first.parser.get_parsed_content("num_classes")
    labelled, unlabelled, mix = make_inputs(args, num_classes, torch.device(args.device))
    steps, state = {}, None
    for name in names:
        if name != REFERENCE:
            steps[name] = build_ours(workflows[name], unlabelled, state)
            if state is None:
                state = {k: v.detach().clone() for k, v in steps[name].trainer.network.state_dict().items()}
    if REFERENCE in names:
        steps[REFERENCE] = build_reference(first, state, args, unlabelled, mix)
    return {name: steps[name] for name in names}, labelled


# ------------------------------------------------------------------------------------------------ measuring


def measure_memory(args: argparse.Namespace, method: str) -> dict:
    """Peak RSS of ``MEMORY_ITERATIONS`` iterations of one method alone (this process builds only that method)."""
    with tempfile.TemporaryDirectory() as out:
        steps, labelled = build_methods(args, [method], out)
        build_peak = peak_rss_mb()
        reset_peak_rss()  # the peak starts over from the RSS now, the baseline
        baseline = rss_mb()
        for _ in range(MEMORY_ITERATIONS):
            steps[method](labelled)
        peak = peak_rss_mb()
        return {
            "method": method,
            "baseline_rss_mb": baseline,
            "build_peak_rss_mb": build_peak,
            "peak_rss_mb": peak,
            "iteration_mb": peak - baseline,
        }


def memory_in_children(args: argparse.Namespace, methods: list[str]) -> dict[str, dict]:
    results = {}
    for method in methods:
        command = [sys.executable, str(Path(__file__).resolve()), "--measure-memory", method, "--device", args.device]
        command += ["--batch-size", str(args.batch_size), "--unlabeled-batch-size", str(args.unlabeled_batch_size)]
        command += ["--image-size", str(args.image_size), "--network", args.network, "--presets", *args.presets]
        if args.threads:
            command += ["--threads", str(args.threads)]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def run_benchmark(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    methods = [p for p in args.presets if p == "unimatch"] + [REFERENCE] + [p for p in args.presets if p != "unimatch"]
    with tempfile.TemporaryDirectory() as out:
        steps, labelled = build_methods(args, methods, out)
        times: dict[str, list[float]] = {m: [] for m in methods}
        cuda_peak: dict[str, dict] = {m: {"peak_mb": 0.0, "iteration_mb": 0.0} for m in methods}
        first_terms: dict[str, dict] = {}
        for i in range(args.warmup + args.iterations):
            for method in methods:  # alternating: ours unimatch, reference, ours mpamatch, ...
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                sync(device)
                start = time.perf_counter()
                terms = steps[method](labelled)
                sync(device)
                elapsed = time.perf_counter() - start
                if i == 0:
                    first_terms[method] = terms
                if i >= args.warmup:
                    times[method].append(elapsed)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**20
                    cuda_peak[method]["peak_mb"] = max(cuda_peak[method]["peak_mb"], peak)
                    cuda_peak[method]["iteration_mb"] = max(cuda_peak[method]["iteration_mb"], peak - before / 2**20)
    images = args.batch_size + args.unlabeled_batch_size
    results: dict = {}
    for method in methods:
        median = statistics.median(times[method])
        results[method] = {
            "median_s": median,
            "images_per_s": images / median,
            "times_s": times[method],
            "first_iteration_terms": first_terms[method],
        }
        if device.type == "cuda":
            results[method].update(cuda_peak[method])
    if device.type != "cuda" and not args.skip_memory:
        for method, memory in memory_in_children(args, methods).items():
            results[method].update({k: v for k, v in memory.items() if k.endswith("_mb")})  # iteration_mb included
    return results


def targets(results: dict) -> tuple[dict, list[dict]]:
    ref = results[REFERENCE]["median_s"]
    ratios = {f"{m}/reference": r["median_s"] / ref for m, r in results.items() if m != REFERENCE}
    checks = []
    if "unimatch" in results:
        checks.append({"name": "ours unimatch <= 0.9 x reference", "limit": TARGET_VS_REFERENCE})
        checks[-1]["value"] = ratios["unimatch/reference"]
    if "unimatch" in results and "mpamatch" in results:
        ratios["mpamatch/unimatch"] = results["mpamatch"]["median_s"] / results["unimatch"]["median_s"]
        checks.append({"name": "ours mpamatch <= 1.1 x ours unimatch", "limit": TARGET_MPAMATCH_VS_UNIMATCH})
        checks[-1]["value"] = ratios["mpamatch/unimatch"]
    for check in checks:
        check["pass"] = bool(check["value"] <= check["limit"])
    return ratios, checks


def print_table(figures: dict) -> None:
    results, ref = figures["methods"], figures["methods"][REFERENCE]["median_s"]
    memory = "peak MB (+iter)"
    print(f"{'method':<16} {'s/iter':>8} {'x ref':>6} {'img/s':>7} {memory:>17} {'loss_x@1':>10}")
    for method, r in results.items():
        name = method if method == REFERENCE else f"ours {method}"
        peak = r.get("peak_mb", r.get("peak_rss_mb"))
        mem = f"{peak:.0f} (+{r['iteration_mb']:.0f})" if peak is not None else "-"
        loss_x = r["first_iteration_terms"]["loss_x"]
        print(
            f"{name:<16} {r['median_s']:>8.3f} {r['median_s'] / ref:>6.2f} {r['images_per_s']:>7.1f} {mem:>17} "
            f"{loss_x:>10.5f}"
        )
    if "mpamatch/unimatch" in figures["ratios"]:
        print(f"ours mpamatch / ours unimatch: {figures['ratios']['mpamatch/unimatch']:.3f}")
    print(
        f"(device {figures['device']}{' bf16' if figures['amp'] else ''}, {figures['network']} network, batch "
        f"{figures['batch']}, {figures['image_size']} px, median of {figures['iterations']} after {figures['warmup']} "
        f"warm-up, torch threads {figures['threads']}; memory: {figures['memory']})"
    )
    for check in figures["targets"]:
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {check['value']:.3f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per method first")
    parser.add_argument("--batch-size", type=int, default=4, help="labelled images per iteration")
    parser.add_argument("--unlabeled-batch-size", type=int, default=4, help="unlabelled images per iteration")
    parser.add_argument("--image-size", type=int, default=128, help="crop side (divisible by 16)")
    parser.add_argument("--presets", nargs="+", default=["unimatch", "mpamatch"], choices=["unimatch", "mpamatch"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--network", choices=["default", "tiny"], default="default")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (both sides)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--skip-memory", action="store_true", help="no CPU memory children (tests)")
    parser.add_argument("--measure-memory", metavar="METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        parser.error("--amp needs a CUDA device")
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")
    args.presets = list(dict.fromkeys(args.presets))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        result = measure_memory(args, args.measure_memory)
        print(json.dumps(result))
        return result
    results = run_benchmark(args)
    ratios, checks = targets(results)
    if args.device.startswith("cuda"):
        memory = "torch.cuda.max_memory_allocated"
    else:
        memory = "not measured (--skip-memory)" if args.skip_memory else "RSS, one child process per method"
    figures = {
        "device": args.device,
        "amp": bool(args.amp),
        "network": args.network,
        "batch": f"{args.batch_size}+{args.unlabeled_batch_size}",
        "image_size": args.image_size,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "memory": memory,
        "methods": results,
        "ratios": ratios,
        "targets": checks,
    }
    print_table(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
