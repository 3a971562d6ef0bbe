"""Seconds per training iteration and peak memory of the default configuration, beside its ablation presets.

Each preset runs in its own process (so that peak memory is its own) on the embedded synthetic dataset with the
default ``configs/train.json`` settings; validation and checkpoints are switched off, the first iterations are
discarded as warm-up, and the median of the rest is reported. The supervised warm-up is switched off
(``supervised_warmup_fraction`` 0), so that every timed iteration is the preset's own. The supervised preset is the
reference: the table gives each preset's time as a ratio to it, measured in the same run.

    python benchmarks/default_config.py [--iterations 12] [--warmup 2] [--presets mpamatch unimatch supervised]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def measure(preset: str, iterations: int, warmup: int, dataset_dir: str) -> dict:
    """Run ``iterations`` training iterations of ``preset`` in this process; return timings and peak memory."""
    sys.path.insert(0, str(BUNDLE_ROOT))
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    files = [str(BUNDLE_ROOT / "configs" / "train.json"), str(BUNDLE_ROOT / "configs" / f"{preset}.json")]
    with tempfile.TemporaryDirectory() as out:
        workflow = ConfigWorkflow(
            config_file=files,
            workflow_type="train",
            logging_file=False,
            bundle_root=str(BUNDLE_ROOT),
            dataset_dir=dataset_dir,
            output_dir=out,
            ckpt_dir=out,
            max_epochs=1,
            epoch_length=iterations + warmup,
            val_interval=10**6,
            supervised_warmup_fraction=0,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        stamps: list[float] = []
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: stamps.append(time.perf_counter()))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
        workflow.run()
    durations = [end - start for start, end in zip(stamps[0::2], stamps[1::2])][warmup:]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "preset": preset,
        "iterations": len(durations),
        "median_s": statistics.median(durations),
        "peak_rss_mb": peak_kb / 1024,
        "threads": torch.get_num_threads(),
        "batch": "{}+{}".format(
            *(workflow.parser.get_parsed_content(k) for k in ("batch_size", "unlabeled_batch_size"))
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=["mpamatch", "unimatch", "supervised"])
    parser.add_argument("--dataset_dir", default=str(BUNDLE_ROOT / "data" / "synthetic"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.iterations, args.warmup, args.dataset_dir)))
        return 0

    sys.path.insert(0, str(BUNDLE_ROOT))
    from bundle.prepare.synthetic import ensure_dataset

    ensure_dataset(args.dataset_dir, BUNDLE_ROOT / "data" / "synthetic")
    results = []
    for preset in args.presets:
        command = [sys.executable, __file__, "--child", preset, "--iterations", str(args.iterations)]
        command += ["--warmup", str(args.warmup), "--dataset_dir", args.dataset_dir]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = next((r for r in results if r["preset"] == "supervised"), results[-1])
    print(f"{'preset':<12} {'batch':>6} {'s/iter (median)':>16} {'x ' + reference['preset']:>14} {'peak RSS MB':>12}")
    for r in results:
        ratio = r["median_s"] / reference["median_s"]
        print(f"{r['preset']:<12} {r['batch']:>6} {r['median_s']:>16.3f} {ratio:>14.2f} {r['peak_rss_mb']:>12.0f}")
    print(
        f"({results[0]['iterations']} timed iterations each after {args.warmup} warm-up; torch threads: "
        f"{results[0]['threads']}; patch and network from configs/train.json)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
