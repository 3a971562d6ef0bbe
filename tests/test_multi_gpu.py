"""``configs/multi_gpu_train.json`` under ``torchrun`` with two CPU processes and the gloo backend.

Checks what distributed training must guarantee: both ranks train the same number of iterations on different
shards, the network, the prompt context (averaged by ``GradientAllReduce``) and the image prototype bank stay
identical on both ranks, and only rank 0 validates, logs and writes checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, run_python, small_overrides

from bundle.prepare.synthetic import generate_synthetic_dataset

# after training, every rank writes its own state (and the samples it drew) for the test to compare
DUMP_STATES = {
    "finalize": [
        "$torch.save({'network': @network_def.state_dict(), 'criterion': @criterion.state_dict(), "
        "'iteration': @train#trainer.state.iteration, 'draws': list(@train#sampler), "
        "'unlabeled': [item['image'] for item in @train#unlabeled#dataset#data]}, "
        "os.path.join(@output_dir, f'rank{dist.get_rank()}.pt'))",
        "$dist.destroy_process_group()",
    ]
}


@pytest.mark.slow
@pytest.mark.parametrize("preset, warmup", [("mpamatch", 0), ("unimatch", 0), ("mpamatch", 2)])
def test_two_process_torchrun_on_cpu(tmp_path, preset, warmup):
    data = tmp_path / "data"
    generate_synthetic_dataset(data, image_size=96, num_labeled=4, num_unlabeled=4, num_validation=2, num_test=1)
    dump = tmp_path / "dump.json"
    states = dict(DUMP_STATES)
    if preset == "mpamatch":  # rank 1 starts from other prompt context vectors: rank 0's must reach it
        states["criterion"] = (
            "$(@loss.to(@device), torch.nn.init.normal_(@loss.prompt_learner.ctx, std=1.0) "
            "if torch.distributed.get_rank() == 1 else None)[0]"
        )
    dump.write_text(json.dumps(states))
    configs = [str(REPO_ROOT / "configs" / name) for name in ("train.json", f"{preset}.json", "multi_gpu_train.json")]
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += ["-m", "monai.bundle", "run", "training", "--config_file", repr(configs + [str(dump)])]
    overrides = small_overrides(tmp_path, data, max_epochs=2, epoch_length=2, batch_size=2)
    # a supervised warm-up leaves the projection head unused in its iterations: DDP must be told (or it stops)
    overrides["supervised_warmup_iterations"] = warmup
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    tracked = preset == "unimatch" and importlib.util.find_spec("mlflow") is not None
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"} if tracked else {}
    done = run_python(
        args + (["--tracking", "mlflow"] if tracked else []), tmp_path, timeout=900, OMP_NUM_THREADS="1", **env
    )
    assert done.returncode == 0, done.stderr[-4000:]
    if tracked:  # rank 0 alone logs: one run, each iteration once
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        (run,) = client.search_runs([client.get_experiment_by_name("pathology_mpamatch_segmentation").experiment_id])
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_dice")) == [1, 2]

    out = tmp_path / "out"
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["iteration"] == rank1["iteration"] == 4
    # the ranks' labelled draws of an epoch interleave: together 2 whole passes over the 4 images, seeds all distinct
    draws = rank0["draws"] + rank1["draws"]
    assert len(rank0["draws"]) == len(rank1["draws"]) == 4 and sorted(i for i, _ in draws) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len({seed for _, seed in draws}) == 8
    # each rank cached its own half of the unlabelled pool
    assert len(rank0["unlabeled"]) == len(rank1["unlabeled"]) == 2
    pool = [Path(item["image"]).name for item in json.loads((data / "datalist.json").read_text())["unlabeled"]]
    assert sorted(Path(image).name for image in rank0["unlabeled"] + rank1["unlabeled"]) == sorted(pool)
    for part in ("network", "criterion"):
        assert rank0[part].keys() == rank1[part].keys()
        for name, tensor in rank0[part].items():
            if name.endswith("running_mean") or name.endswith("running_var") or "num_batches_tracked" in name:
                continue  # batch-norm statistics are per rank on a CPU (SyncBatchNorm needs CUDA)
            torch.testing.assert_close(rank1[part][name], tensor, msg=f"{part}.{name} differs between ranks")
    if preset == "mpamatch":
        assert bool(rank0["criterion"]["image_prototypes.initialized"].all())
        assert "prompt_learner.ctx" in rank0["criterion"]

    # rank 0 alone validated and wrote the checkpoints and the log
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 4
    assert not any(key.startswith("module.") for key in last["network"])
    model = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert set(model) == set(rank0["network"])
    log = (out / "train.log").read_text()
    assert log.count("Epoch[2] Metrics") == 1, log
