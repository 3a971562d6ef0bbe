"""Disk faults stop the commands with one ``error:`` line naming the path, and never leave a half-written file.

Training checks up front that ``output_dir`` and ``ckpt_dir`` can be created and written, evaluation that its
``eval/`` folder can (``ckpt_dir`` is only read there); a checkpoint or ``model.pt`` that cannot be written (a full
disk, no permission) keeps the previous file; ``python -m bundle.prepare`` exits with status 2 for an output it
cannot create or write.

Read-only folders are made with ``chmod``. Root writes into them all the same; there the child processes refuse
writes into the folder themselves (:data:`CHILD`), and in-process tests patch the call that would fail, so every
case runs as root too.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch
from dataset_fixtures import run_cli, write_folders
from helpers import CONFIGS, REPO_ROOT, TINY_NETWORK, run_python
from ignite.engine import Engine
from monai.bundle import ConfigParser

from bundle.engine.checkpoint import TrainingCheckpointSaver
from bundle.engine.run_lock import LOCK_FILENAME, acquire_run_lock
from bundle.errors import BundleInputError
from bundle.options import check_writable_dirs
from bundle.prepare import output as prepare_output

DENIED = os.strerror(errno.EACCES)  # "Permission denied"
DISK_FULL = os.strerror(errno.ENOSPC)  # "No space left on device"

# ``python -c CHILD ARGS``: ``python -m monai.bundle ARGS`` with two faults the test can switch on. TEST_READ_ONLY:
# writes into that folder are refused (for root, whom chmod does not stop); TEST_DISK_FULL: writing ``last.pt`` again
# (epoch 2) fills the disk after a few bytes.
CHILD = """
import errno, os, runpy, sys

read_only = os.environ.get("TEST_READ_ONLY")
if read_only:
    _open, _mkdir = os.open, os.mkdir

    def _check(path):
        if os.path.dirname(os.path.abspath(os.fsdecode(path))) == read_only:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def _refusing_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            _check(path)
        return _open(path, flags, *args, **kwargs)

    def _refusing_mkdir(path, *args, **kwargs):
        _check(path)
        return _mkdir(path, *args, **kwargs)

    os.open, os.mkdir = _refusing_open, _refusing_mkdir

if os.environ.get("TEST_DISK_FULL"):
    import torch

    _save = torch.save

    def _filling_save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        again = os.path.exists(os.path.join(os.path.dirname(name), "last.pt"))
        if os.path.basename(name).startswith(".last.pt.") and again:
            f.write(b"PK half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _save(obj, f, *args, **kwargs)

    torch.save = _filling_save

runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""

SMALL = ["--epoch_length", "1", "--batch_size", "2", "--patch_size", "[64,64]", "--cache_rate", "0.0",
         "--sw_batch_size", "2"]  # fmt: skip


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only: ``chmod``, and for root (whom chmod does not stop) the environment variable that
    :data:`CHILD` reads (returned per folder) and a patched ``tempfile.mkstemp``/``os.access`` in this process."""
    changed: list[Path] = []
    refused: set[str] = set()

    def make(folder: Path) -> dict[str, str]:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        changed.append(folder)
        try:  # does the kernel refuse this process?
            tempfile.TemporaryFile(dir=folder).close()
        except PermissionError:
            return {}
        refused.add(str(folder))
        return {"TEST_READ_ONLY": str(folder)}

    real_mkstemp, real_access = tempfile.mkstemp, os.access

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) in refused:
            raise PermissionError(errno.EACCES, DENIED, os.path.join(dir, "tmpfile"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def access(path, mode, *args, **kwargs):
        if os.path.abspath(path) in refused and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "access", access)
    yield make
    for folder in changed:
        folder.chmod(stat.S_IRWXU)


def run_bundle(files: list[str], run_id: str, tmp_path: Path, *options: str, **env: str):
    config = "[" + ",".join(f"'{CONFIGS / name}'" for name in files) + "]"
    args = ["-c", CHILD, "run", run_id, "--config_file", config, "--bundle_root", str(REPO_ROOT), *options]
    return run_python(args, tmp_path, timeout=600, **env)


def one_error_line(done) -> str:
    """The command's only ``error:`` line (exit status 1, no traceback), on a line of its own: a progress bar cut
    short by the error is closed first."""
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("error: ") == 1, done.stderr[-3000:]
    lines = [line for line in done.stderr.split("\n") if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


# ---- up-front checks of the folders


def test_check_writable_dirs_creates_folders_and_leaves_nothing(tmp_path):
    folders = {"output_dir": tmp_path / "runs" / "a", "ckpt_dir": tmp_path / "models"}
    check_writable_dirs(folders)
    assert all(folder.is_dir() and not os.listdir(folder) for folder in folders.values())


def test_check_writable_dirs_names_the_folder_and_why(tmp_path, read_only):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(BundleInputError) as error:
        check_writable_dirs({"output_dir": blocker / "runs"})
    assert str(error.value) == f"--output_dir {blocker / 'runs'}: cannot create the folder ({blocker} is a file)"
    with pytest.raises(BundleInputError) as error:
        check_writable_dirs({"ckpt_dir": blocker})
    assert str(error.value) == f"--ckpt_dir {blocker} is a file, not a folder"

    models = tmp_path / "models"
    read_only(models)
    with pytest.raises(BundleInputError) as error:
        check_writable_dirs({"output_dir": tmp_path / "runs", "ckpt_dir": models})
    assert str(error.value) == f"--ckpt_dir {models} is not writable ({DENIED}); pass a folder you can write to"


def test_training_into_a_read_only_ckpt_dir_stops_with_one_line(tmp_path, synthetic_dir, read_only):
    models = tmp_path / "models"
    env = read_only(models)
    options = ["--dataset_dir", str(synthetic_dir), "--output_dir", str(tmp_path / "out"), "--ckpt_dir", str(models)]
    done = run_bundle(["train.json", "tiny.json"], "training", tmp_path, *options, *SMALL, **env)
    assert (
        one_error_line(done) == f"error: --ckpt_dir {models} is not writable ({DENIED}); pass a folder you can write to"
    )
    assert not os.listdir(models) and not os.listdir(tmp_path / "out")  # nothing trained, no lock left


def test_training_into_an_output_dir_below_a_file_stops_with_one_line(tmp_path, synthetic_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "runs"
    options = ["--dataset_dir", str(synthetic_dir), "--output_dir", str(out), "--ckpt_dir", str(tmp_path / "models")]
    done = run_bundle(["train.json", "tiny.json"], "training", tmp_path, *options, *SMALL)
    assert one_error_line(done) == f"error: --output_dir {out}: cannot create the folder ({blocker} is a file)"


def tiny_model(path: Path) -> None:
    """A ``model.pt`` of the tiny network at 64 px crops (what a short training writes)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "tiny.json")])
    parser.update({"bundle_root": str(REPO_ROOT), "patch_size": [64, 64], **TINY_NETWORK})
    network = parser.get_parsed_content("network_def")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)


def test_evaluation_needs_a_writable_eval_folder_but_only_reads_ckpt_dir(tmp_path, synthetic_dir, read_only):
    models, out = tmp_path / "models", tmp_path / "out"
    tiny_model(models / "model.pt")
    files = ["train.json", "tiny.json", "evaluate.json"]
    options = ["--dataset_dir", str(synthetic_dir), "--ckpt_dir", str(models), *SMALL]

    env = read_only(out)
    done = run_bundle(files, "run", tmp_path, "--output_dir", str(out), *options, **env)
    assert one_error_line(done) == f"error: --eval_output_dir {out / 'eval'}: cannot create the folder ({DENIED})"

    env = read_only(models)  # a bundle installed read-only: its model.pt is evaluated all the same
    done = run_bundle(files, "run", tmp_path, "--output_dir", str(tmp_path / "writable"), *options, **env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "writable" / "eval" / "metrics.json").is_file()


def test_evaluation_checks_its_own_folder_and_takes_no_lock(tmp_path):
    """evaluate.json keeps train.json's ``initialize`` (every option check) and only names other folders: its own
    output folder instead of ``output_dir``/``ckpt_dir``, and no run lock (evaluating while training runs is fine)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    parser.update({"bundle_root": str(CONFIGS.parent), "output_dir": str(tmp_path / "run")})
    assert "initialize" not in json.loads((CONFIGS / "evaluate.json").read_text())
    assert parser.get_parsed_content("writable_dirs") == {"eval_output_dir": str(tmp_path / "run" / "eval")}
    assert parser.get_parsed_content("run_lock_dir") is None
    assert acquire_run_lock(None) is None
    training = ConfigParser()
    training.read_config(str(CONFIGS / "train.json"))
    training.update({"bundle_root": str(CONFIGS.parent), "output_dir": str(tmp_path / "run")})
    assert training.get_parsed_content("run_lock_dir") == str(tmp_path / "run")
    assert set(training.get_parsed_content("writable_dirs")) == {"output_dir", "ckpt_dir"}


# ---- checkpoints that cannot be written


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)


def _saver(tmp_path: Path) -> tuple[TrainingCheckpointSaver, Engine, Engine]:
    evaluator = Engine(lambda engine, batch: None)
    saver = TrainingCheckpointSaver(
        str(tmp_path / "checkpoints"),
        {"network": _Holder()},
        evaluator=evaluator,
        model_path=str(tmp_path / "models" / "model.pt"),
    )
    trainer = Engine(lambda engine, batch: None)
    saver.attach(trainer)
    trainer.state.epoch = 1
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.5, 1
    evaluator.state.key_metric_name = "val_dice"
    return saver, trainer, evaluator


def _fill_disk_on(prefix: str):
    """A ``torch.save`` that writes a few bytes of files starting with ``prefix``, then finds the disk full."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if os.path.basename(str(getattr(f, "name", f))).startswith(prefix):
            f.write(b"PK half a checkpoint")
            raise OSError(errno.ENOSPC, DISK_FULL)
        return real_save(obj, f, *args, **kwargs)

    return save


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "name, folder", [("last.pt", "checkpoints"), ("best.pt", "checkpoints"), ("model.pt", "models")]
)
def test_a_full_disk_keeps_the_previous_file_and_names_the_one_not_written(tmp_path, monkeypatch, name, folder):
    saver, trainer, _ = _saver(tmp_path)
    saver.save_last(trainer)
    saver.save_best(trainer)
    before = _files(tmp_path / folder)
    assert name in before
    monkeypatch.setattr(torch, "save", _fill_disk_on(f".{name}."))
    with pytest.raises(BundleInputError) as error:
        saver.save_last(trainer) if name == "last.pt" else saver.save_best(trainer)
    assert str(error.value) == f"cannot write {tmp_path / folder / name}: {DISK_FULL} (the file was left as it was)"
    assert _files(tmp_path / folder) == before  # the previous complete file, no temporary file


def test_a_checkpoint_folder_without_permission_is_named(tmp_path, monkeypatch):
    saver, trainer, _ = _saver(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, DENIED, str(tmp_path / "checkpoints" / "tmpfile"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(BundleInputError) as error:
        saver.save_last(trainer)
    assert str(error.value) == (
        f"cannot write {tmp_path / 'checkpoints' / 'last.pt'}: {DENIED} (the file was left as it was)"
    )
    assert not os.listdir(tmp_path / "checkpoints")


def test_training_that_fills_the_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, synthetic_dir):
    out = tmp_path / "out"
    options = ["--dataset_dir", str(synthetic_dir), "--output_dir", str(out), "--ckpt_dir", str(tmp_path / "models")]
    done = run_bundle(
        ["train.json", "tiny.json"], "training", tmp_path, *options, *SMALL, "--max_epochs", "2", TEST_DISK_FULL="1"
    )
    last = out / "checkpoints" / "last.pt"
    assert one_error_line(done) == f"error: cannot write {last}: {DISK_FULL} (the file was left as it was)"
    assert torch.load(last, weights_only=True, map_location="cpu")["trainer"]["iteration"] == 1  # epoch 1, whole
    assert sorted(os.listdir(last.parent)) == ["best.pt", "last.pt"]  # no temporary file
    assert not (out / LOCK_FILENAME).exists()  # released although training failed


# ---- python -m bundle.prepare


@pytest.fixture
def images(tmp_path) -> Path:
    return write_folders(tmp_path / "source", labelled=6, unlabelled=1)


def prepare(capsys, images: Path, output: Path) -> tuple[int, str, str]:
    return run_cli(capsys, "folders", "--images", images / "images", "--masks", images / "masks", "--output", output)


def test_prepare_into_an_output_below_a_file_exits_2(tmp_path, images):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = blocker / "prepared"
    args = ["-m", "bundle.prepare", "folders", "--images", str(images / "images"), "--masks", str(images / "masks")]
    done = run_python(args + ["--output", str(output)], tmp_path, timeout=300)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"error: output {output} cannot be created: {blocker} is a file, not a folder\n"


def test_prepare_into_a_read_only_output_or_parent_exits_2(tmp_path, capsys, images, read_only):
    parent = tmp_path / "read-only"
    read_only(parent)
    code, out, err = prepare(capsys, images, parent)
    assert (code, out) == (2, "")
    assert err == f"error: output {parent} is not writable (no permission); choose a folder you can write to\n"
    code, out, err = prepare(capsys, images, parent / "prepared")
    assert (code, out) == (2, "")
    prepared = parent / "prepared"
    assert err == f"error: output {prepared} cannot be created: its parent {parent} is not writable (no permission)\n"
    assert not os.listdir(parent)


def test_prepare_that_fills_the_disk_exits_2_naming_the_file(tmp_path, capsys, images, monkeypatch):
    def full(content, path):
        raise OSError(errno.ENOSPC, DISK_FULL)

    monkeypatch.setattr(prepare_output, "write_datalist", full)
    output = tmp_path / "prepared"
    code, out, err = prepare(capsys, images, output)
    assert (code, out) == (2, "")
    assert err == f"error: cannot write {output / 'dataset.json'}: {DISK_FULL}\n"
