"""``benchmarks/ablation.py`` end to end on real GlaS (tiny network, two presets, a few iterations), its resumption,
its dry run (CPU and ``--gpu`` command sets) and ``benchmarks/gpu_check.py`` (without a GPU, and its code path on the
CPU with a small ViT in place of UNI)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_script

TINY_NETWORK = (
    "--encoder_kwargs \"{'embed_dim': 32, 'depth': 1, 'num_heads': 2, 'stem_channels': [8, 16, 32]}\" "
    "--head_channels 32 --decoder_channels [32,16,16,8] --embedding_dim 16 --batch_size 2"
)


@pytest.fixture(scope="module")
def ablation():
    return load_script("ablation")


@pytest.mark.slow
def test_iteration_time_counts_the_iterations_and_not_the_validations(ablation):
    # iterations 1-6, validation after every 3rd: the gap from 3 to 4 (8 s) holds a validation
    events = {step: (wall, 0.5) for step, wall in zip(range(1, 7), [0.0, 1.0, 2.0, 10.0, 11.5, 13.0])}
    # gaps 1, 1, 8, 1.5, 1.5 (median 1.5); the first iteration and the validation gap count as 1.5 each
    assert ablation.iteration_seconds(events, val_every=3) == pytest.approx(1.5 + 1 + 1 + 1.5 + 1.5 + 1.5)
    assert math.isnan(ablation.iteration_seconds({1: (0.0, 0.5)}, val_every=3))
    # a schedule whose first iterations are cheap (a supervised warm-up): not iterations x median
    cheap_then_dear = {step: (wall, 0.5) for step, wall in zip(range(1, 6), [0.0, 0.2, 0.4, 0.6, 1.6])}
    assert ablation.iteration_seconds(cheap_then_dear, val_every=10) == pytest.approx(0.2 + 0.2 * 3 + 1.0)


def test_ablation_runs_evaluates_writes_the_table_and_resumes(tmp_path, glas_dir, ablation, capsys):
    output = tmp_path / "ablation"
    argv = ["--glas", str(glas_dir), "--output", str(output), "--data-dir", str(tmp_path / "data")]
    argv += ["--splits", "10", "--presets", "supervised", "mpamatch", "supervised_equal_time", "--seeds", "0"]
    argv += ["--iterations", "4"]
    argv += ["--val-every", "2", "--patch-size", "64", "--max-test-images", "4", "--equal-time-iterations", "6"]
    argv += ["--extra", TINY_NETWORK + " --supervised_warmup_min_schedule 0"]  # a warm-up in a 4-iteration run
    result = ablation.main(argv)

    table = (output / "results.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out  # printed exactly as written
    presets = [(row["split"], row["preset"], row["iterations"]) for row in result["summary"]]
    assert presets == [(10, "supervised", 4), (10, "mpamatch", 4), (10, "supervised_equal_time", 6)]
    # every iteration of the supervised presets, the default warm-up of mpamatch's (round(4 x 0.8333) = 3)
    assert [row["supervised_iterations"] for row in result["summary"]] == [4, 3, 6]
    assert "| 10 % | mpamatch | 1 | 4 | 3 | " in table
    for row in result["summary"]:
        assert row["seeds"] == [0] and row["postprocessing"] == "objects under 2000 px removed, holes filled"
        assert row["tta"] == "none"
        for key in ("mdice", "pooled_mdice", "mjaccard", "pooled_mjaccard", "dice", "pooled_dice", "object_f1"):
            assert 0.0 <= row[key]["mean"] <= 1.0 and row[key]["std"] == 0.0
        assert row["train_wall_s"] > 0 and math.isfinite(row["s_per_iteration"])
        assert 0 < row["iteration_s"] < row["train_wall_s"]  # start-up and validations left out
        assert f"| {row['split']} % | {row['preset']} | 1 | {row['iterations']} |" in table
    assert "after post-processing (objects under 2000 px removed, holes filled; test-time augmentation: none)" in table
    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(0.0 <= float(row["pooled_mdice_mean"]) <= 1.0 for row in rows)
    assert json.loads((output / "results.json").read_text())["settings"]["iterations"] == 4
    for run in result["runs"]:
        assert run["test_images"] == 4
        steps = list(range(1, run["iterations"] + 1))
        assert sorted(run["curves"]["val_dice"]) == steps[1::2] and sorted(run["curves"]["loss_x"]) == steps
        assert not (Path(run["run_dir"]) / "checkpoints").exists() and (Path(run["run_dir"]) / "models").is_dir()
    with open(output / "curves_10.csv", newline="") as handle:
        curves = list(csv.DictReader(handle))
    assert {(row["preset"], row["curve"]) for row in curves} == {
        (preset, curve)
        for preset in ("supervised", "mpamatch", "supervised_equal_time")
        for curve in ("val_dice", "loss_x")
    }
    if importlib.util.find_spec("matplotlib") is not None:
        assert (output / "curves_10.png").stat().st_size > 0

    # resumption: a finished run is skipped; a trained but unevaluated run is evaluated, not trained again
    assert "configs/supervised.json" in (Path(result["runs"][2]["run_dir"]) / "commands.txt").read_text()
    runs = {run["preset"]: Path(run["run_dir"]) for run in result["runs"][:2]}
    trained = {preset: (folder / "train_time.json").stat().st_mtime_ns for preset, folder in runs.items()}
    evaluated = (runs["mpamatch"] / "eval" / "metrics.json").stat().st_mtime_ns
    (runs["supervised"] / "eval" / "metrics.json").unlink()
    again = ablation.main(argv)
    printed = capsys.readouterr().out
    assert "mpamatch split 10 % seed 0: done before, skipped" in printed
    assert "] supervised split 10 % seed 0: evaluating" in printed and "training 4 iterations" not in printed
    assert {preset: (folder / "train_time.json").stat().st_mtime_ns for preset, folder in runs.items()} == trained
    assert (runs["mpamatch"] / "eval" / "metrics.json").stat().st_mtime_ns == evaluated
    assert again["summary"][1]["mdice"] == result["summary"][1]["mdice"]

    # a command for one preset still summarises every finished run of the folder
    alone = argv[: argv.index("--presets") + 1] + ["supervised", "--seeds", "0", "--iterations", "4"]
    alone += ["--val-every", "2", "--patch-size", "64", "--max-test-images", "4", "--extra", argv[-1]]
    summary = ablation.main(alone)["summary"]
    assert [row["preset"] for row in summary] == ["supervised", "mpamatch", "supervised_equal_time"]
    assert [row["mdice"] for row in summary] == [row["mdice"] for row in again["summary"]]
    assert "| 10 % | mpamatch | 1 | 4 |" in (output / "results.md").read_text(encoding="utf-8")
    assert "[earlier] mpamatch split 10 % seed 0: done before, skipped" in capsys.readouterr().out

    # an output folder holds one setting only
    changed = list(argv)
    changed[changed.index("--iterations") + 1] = "6"
    with pytest.raises(SystemExit, match="other settings"):
        ablation.main(changed)

    # results copied elsewhere (run folders gone) join a new experiment: recorded runs are not redone
    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("runs.csv", "settings.json", "curves_runs.csv", "curves_10.csv"):
        (copied / name).write_bytes((output / name).read_bytes())
    with open(copied / "curves_runs.csv", newline="") as handle:
        recorded_curves = list(csv.DictReader(handle))
    assert len(recorded_curves) == sum(len(run["curves"]["val_dice"]) + run["iterations"] for run in result["runs"])
    (copied / "curves_runs.csv").unlink()  # as in a folder from before per-run curves: its mean curves are kept
    joined = argv[:] + ["--earlier", str(copied)]
    joined[joined.index("--output") + 1] = str(tmp_path / "joined")
    joined[joined.index("--presets") + 1 : joined.index("--seeds")] = ["mpamatch"]
    del joined[joined.index("--equal-time-iterations") : joined.index("--equal-time-iterations") + 2]
    merged = ablation.main(joined)
    printed = capsys.readouterr().out
    assert f"mpamatch split 10 % seed 0: in {copied}, skipped" in printed and "iterations\n" not in printed
    assert [row["preset"] for row in merged["summary"]] == ["supervised", "mpamatch", "supervised_equal_time"]
    assert [row["mdice"]["mean"] for row in merged["summary"]] == pytest.approx(
        [row["mdice"]["mean"] for row in again["summary"]], abs=1e-6
    )
    assert [row["supervised_iterations"] for row in merged["summary"]] == [4, 3, 6]  # read back from runs.csv
    assert (tmp_path / "joined" / "curves_10.csv").read_text() == (copied / "curves_10.csv").read_text()
    assert not (tmp_path / "joined" / "runs").exists()  # nothing trained or evaluated
    (copied / "settings.json").write_text(json.dumps({"iterations": 8}))
    with pytest.raises(SystemExit, match="other settings"):
        ablation.main(joined)


def test_dry_run_prints_the_documented_commands(tmp_path, ablation, capsys):
    common = ["--glas", str(tmp_path / "glas"), "--output", str(tmp_path / "out"), "--data-dir", str(tmp_path / "d")]
    commands = ablation.main(common + ["--dry-run"])["commands"]
    assert capsys.readouterr().out.split("\n")[:-1] == commands
    training = [c for c in commands if " run training " in c]
    evaluation = [c for c in commands if "evaluate.json" in c]
    assert len(training) == len(evaluation) == 5 * 2 * 3  # presets x splits x seeds (CPU default)
    for preset in ablation.PRESETS:
        assert sum(f"configs/{preset}.json" in c for c in training) == 6
    assert all("--max_epochs 12 --epoch_length 50" in c and "--patch_size" not in c for c in training)
    assert not (tmp_path / "out").exists() and not (tmp_path / "d").exists()  # nothing written

    gpu = ablation.main(common + ["--dry-run", "--gpu", "--splits", "10", "--presets", "mpamatch"])["commands"]
    gpu_training = [c for c in gpu if " run training " in c]
    assert len(gpu_training) == 3 and all("configs/uni.json" in c and "--head_channels" not in c for c in gpu_training)
    assert all("--max_epochs 16 --epoch_length 500" in c and "--patch_size '[256, 256]'" in c for c in gpu_training)
    with pytest.raises(SystemExit):  # the equal-time preset needs its iterations
        ablation.main(common + ["--dry-run", "--presets", "supervised_equal_time"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_gpu_check_exits_cleanly_without_a_gpu(capsys):
    assert load_script("gpu_check").main([]) == 0
    assert "no GPU found" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_check_code_path_trains_and_evaluates_on_the_cpu(tmp_path, capsys):
    small = (
        "--encoder timm --encoder_kwargs \"{'model_name': 'vit_tiny_patch16_224', 'depth': 2}\" --batch_size 1 "
        "--patch_size [64,64] --head_channels 32 --decoder_channels [32,16,16,8] --embedding_dim 16 "
        "--num_workers 0 --sw_batch_size 8"
    )
    argv = ["--device", "cpu", "--glas", "", "--iterations", "3", "--warmup", "1", "--test-images", "2"]
    assert load_script("gpu_check").main(argv + ["--output", str(tmp_path), "--extra", small]) == 0
    printed = [line for line in capsys.readouterr().out.strip().split("\n") if line.startswith(("gpu_check", "{"))]
    assert "encoder from --extra: timm" in printed[0] and "float32, 0 loader workers" in printed[0]
    result = json.loads(printed[-1])
    assert result["iterations"] == 3 and result["test_images"] == 2 and result["precision"] == "float32"
    assert math.isclose(result["iterations_per_s"] * result["median_iteration_s"], 1.0)
    assert "data_loading_iterations_per_s" in result and "loaders alone" in printed[-2]
    assert 0.0 <= result["test_gland_dice"] <= 1.0 and result["peak_gpu_memory_gib_training"] is None
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "run" / "eval" / "metrics.json").is_file()
