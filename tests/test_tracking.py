"""``--tracking mlflow`` (MONAI's default MLflow settings) on a two-iteration run: the run holds the parameters, one
value per iteration of every loss term, the validation Dice the log prints and the best model; evaluation logs its
metrics to the same experiment. The store is a SQLite file under tmp_path (``MLFLOW_TRACKING_URI``), no server."""

from __future__ import annotations

import re

import pytest
from helpers import REPO_ROOT, TINY_NETWORK, run_python

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

EXPERIMENT = "pathology_mpamatch_segmentation"
TERMS = ("loss", "loss_x", "loss_u", "loss_img", "loss_txt")


def _overrides(tmp_path, data) -> list[str]:
    values = {
        "bundle_root": REPO_ROOT,
        "dataset_dir": data,
        "output_dir": tmp_path / "out",
        "ckpt_dir": tmp_path / "models",
        "batch_size": 2,
        "patch_size": "[64,64]",
        "cache_rate": 0.0,
        "sw_batch_size": 2,
        "log_interval": 1,
        "learning_rate": 0.002,
        "supervised_warmup_fraction": 0,  # every iteration semi-supervised: each term logged at every step
        "seed": 3,
        **{key: str(value).replace(" ", "") for key, value in TINY_NETWORK.items()},
    }
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def _bundle(tmp_path, data, workflow, files, *args):
    configs = "[" + ",".join(f"'{REPO_ROOT / 'configs' / name}'" for name in files) + "]"
    argv = ["-m", "monai.bundle", "run", workflow, "--config_file", configs, *_overrides(tmp_path, data), *args]
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return run_python(argv, tmp_path, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, synthetic_dir):
    tmp_path = tmp_path_factory.mktemp("tracking")
    done = _bundle(
        tmp_path, synthetic_dir, "training", ["train.json", "tiny.json"],
        "--max_epochs", "1", "--epoch_length", "2", "--val_interval", "1", "--tracking", "mlflow",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    return tmp_path, done, client, run


def test_training_run_holds_params_loss_terms_validation_and_model(tracked):
    tmp_path, done, client, run = tracked
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["learning_rate"] == "0.002" and params["seed"] == "3" and params["patch_size"] == "[64, 64]"
    assert params["loss_weights"] == "[1.0, 1.0]" and params["config_file"] == "train.json,tiny.json"
    assert params["max_epochs"] == "1" and params["epoch_length"] == "2"
    for term in TERMS:
        history = client.get_metric_history(run.info.run_id, term)
        assert sorted(m.step for m in history) == [1, 2], term
    (dice,) = client.get_metric_history(run.info.run_id, "val_dice")
    printed = re.findall(r"Got new best metric of val_dice: ([0-9.eE+-]+)", done.stdout + done.stderr)
    assert printed and dice.value == pytest.approx(float(printed[-1]), abs=1e-7) and dice.step == 1
    assert "model.pt" in [a.path for a in client.list_artifacts(run.info.run_id)]
    recorded = (tmp_path / "out" / "mlflow_run_id.txt").read_text().strip()
    assert recorded == run.info.run_id


def test_evaluation_logs_its_metrics_to_the_same_experiment(tracked, synthetic_dir):
    tmp_path, _, client, train_run = tracked
    done = _bundle(tmp_path, synthetic_dir, "run", ["train.json", "tiny.json", "evaluate.json"], "--tracking", "mlflow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_id != train_run.info.run_id]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert any(name.startswith("test_") and "dice" in name for name in runs[0].data.metrics), runs[0].data.metrics


def test_resumed_training_continues_the_same_run(tracked, synthetic_dir):
    tmp_path, _, client, run = tracked
    done = _bundle(
        tmp_path, synthetic_dir, "training", ["train.json", "tiny.json"],
        "--max_epochs", "2", "--epoch_length", "2", "--val_interval", "1", "--tracking", "mlflow", "--resume", "true",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "out" / "mlflow_run_id.txt").read_text().strip() == run.info.run_id
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    for term in TERMS:  # iterations 3 and 4 appended to the first run's 1 and 2
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, term)) == [1, 2, 3, 4], term
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_dice")) == [1, 2]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    training_runs = [r for r in client.search_runs([experiment.experiment_id]) if "loss" in r.data.metrics]
    assert [r.info.run_id for r in training_runs] == [run.info.run_id]  # no second training run
