"""One training per ``output_dir`` (``bundle.engine.run_lock``): a second training on a folder whose run still lives
stops before any work with one ``error:`` line naming that run; a lock left by a killed run is taken over with a
notice, so ``--resume true`` works; the lock is released when the process exits, normally or by an exception."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONFIGS, REPO_ROOT, run_python

from bundle.engine.run_lock import LOCK_FILENAME, RunLock, acquire_run_lock, release_run_lock
from bundle.errors import BundleInputError

STARTED = "2024-05-01T10:00:00+00:00"
HOST = socket.gethostname()
HAS_PROC = os.path.exists("/proc/self/stat")


def write_lock(folder: Path, pid: int, host: str = HOST, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILENAME
    path.write_text(json.dumps({"pid": pid, "host": host, "started": STARTED, **extra}))
    return path


def dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_process():
    """Another process that runs until the test ends."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield child
    child.stdin.close()
    child.wait()


def in_use(folder: Path, pid: int) -> str:
    return (
        f"--output_dir {folder} is in use by another training run (pid {pid} on host {HOST}, started {STARTED}; "
        f"lock file {folder / LOCK_FILENAME}): wait for it to end or pass another --output_dir"
    )


def test_the_lock_holds_pid_host_and_start_and_is_given_back(tmp_path):
    folder = tmp_path / "out"
    lock = acquire_run_lock(folder)
    content = json.loads((folder / LOCK_FILENAME).read_text())
    assert (content["pid"], content["host"]) == (os.getpid(), HOST)
    assert content["started"]
    assert acquire_run_lock(folder).path == lock.path  # a later workflow of the same process
    release_run_lock(folder)
    assert not (folder / LOCK_FILENAME).exists()
    release_run_lock(folder)  # nothing held: nothing to do


def test_a_lock_of_a_live_run_is_refused_naming_it(tmp_path, live_process):
    folder = tmp_path / "out"
    path = write_lock(folder, live_process.pid)
    before = path.read_bytes()
    with pytest.raises(BundleInputError) as error:
        acquire_run_lock(folder)
    assert str(error.value) == in_use(folder, live_process.pid)
    assert path.read_bytes() == before


def test_a_stale_lock_is_taken_over_with_one_notice(tmp_path, capsys):
    folder = tmp_path / "out"
    pid = dead_pid()
    write_lock(folder, pid)
    lock = acquire_run_lock(folder)
    err = capsys.readouterr().err
    assert err == (
        f"notice: taking over the run lock {folder / LOCK_FILENAME} of a run that is no longer running "
        f"(pid {pid} on host {HOST}, started {STARTED})\n"
    )
    assert json.loads((folder / LOCK_FILENAME).read_text())["pid"] == os.getpid()
    assert sorted(os.listdir(folder)) == [LOCK_FILENAME]
    lock.release()


@pytest.mark.skipif(not HAS_PROC, reason="process start times come from /proc")
def test_a_pid_reused_by_another_process_is_stale(tmp_path, live_process, capsys):
    with open(f"/proc/{live_process.pid}/stat") as stream:
        start = int(stream.read().rpartition(")")[2].split()[19])
    folder = tmp_path / "out"
    write_lock(folder, live_process.pid, pid_start=start)
    with pytest.raises(BundleInputError):
        acquire_run_lock(folder)
    write_lock(folder, live_process.pid, pid_start=start + 1)  # the lock's process started at another time
    acquire_run_lock(folder).release()
    assert "notice: taking over the run lock" in capsys.readouterr().err


def test_a_lock_from_another_host_or_unreadable_is_refused(tmp_path):
    folder = tmp_path / "out"
    write_lock(folder, 12345, host="another-host.example")
    with pytest.raises(BundleInputError) as error:
        acquire_run_lock(folder)
    assert str(error.value) == (
        f"--output_dir {folder} is in use by a training run on another host (pid 12345 on host another-host.example, "
        f"started {STARTED}; lock file {folder / LOCK_FILENAME}): this host cannot tell whether it still runs; if it "
        "has ended, delete the lock file, else wait for it or pass another --output_dir"
    )
    (folder / LOCK_FILENAME).write_text("")
    with pytest.raises(BundleInputError) as error:
        acquire_run_lock(folder)
    assert str(error.value) == (
        f"--output_dir {folder} is locked by {folder / LOCK_FILENAME}, which cannot be read (it is empty); if no "
        "training runs in this folder, delete the lock file"
    )


def test_release_leaves_a_lock_another_run_took_over(tmp_path):
    folder = tmp_path / "out"
    lock = RunLock(folder).acquire()
    path = write_lock(folder, 4242)
    lock.release()
    assert json.loads(path.read_text())["pid"] == 4242


@pytest.mark.parametrize("ending, code", [("pass", 0), ("raise SystemExit('stopped')", 1), ("1 / 0", 1)])
def test_the_lock_is_released_when_the_process_exits(tmp_path, ending, code):
    folder = tmp_path / "out"
    lock = folder / LOCK_FILENAME
    script = f"from bundle.engine import acquire_run_lock\nacquire_run_lock({str(folder)!r})\n"
    script += f"print(open({str(lock)!r}).read())\n{ending}\n"
    done = run_python(["-c", script], tmp_path, timeout=120)
    assert done.returncode == code, done.stderr
    assert json.loads(done.stdout)["host"] == HOST  # held while the process ran
    assert folder.is_dir() and not lock.exists()


def test_multi_gpu_training_takes_the_lock_on_rank_0_only():
    for name in ("train.json", "multi_gpu_train.json"):
        entries = json.loads((CONFIGS / name).read_text())["initialize"]
        locks = [e for e in entries if isinstance(e, dict) and e.get("_target_") == "bundle.engine.acquire_run_lock"]
        assert len(locks) == 1 and locks[0]["folder"] == "@run_lock_dir", name
        assert locks[0].get("_disabled_") == ("$dist.get_rank() > 0" if name.startswith("multi") else None), name


# the command a user types, shrunk to seconds
def train_command(tmp_path: Path, dataset_dir: Path, *options: str) -> list[str]:
    files = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'tiny.json'}']"
    return [
        "-m", "monai.bundle", "run", "training", "--config_file", files, "--bundle_root", str(REPO_ROOT),
        "--dataset_dir", str(dataset_dir), "--output_dir", str(tmp_path / "out"),
        "--ckpt_dir", str(tmp_path / "models"),
        "--epoch_length", "1", "--batch_size", "2", "--patch_size", "[64,64]", "--cache_rate", "0.0",
        "--sw_batch_size", "2", *options,
    ]  # fmt: skip


def test_a_second_training_on_a_running_output_dir_stops_before_any_work(tmp_path, synthetic_dir):
    """This test process stands for the running training: its pid is alive."""
    out = tmp_path / "out"
    path = write_lock(out, os.getpid())
    before = path.read_bytes()
    done = run_python(train_command(tmp_path, synthetic_dir, "--max_epochs", "1"), tmp_path, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {in_use(out, os.getpid())}"], done.stderr[-3000:]
    assert os.listdir(out) == [LOCK_FILENAME] and path.read_bytes() == before  # nothing else written
    assert not (tmp_path / "models").exists() or not os.listdir(tmp_path / "models")


def test_a_killed_run_is_taken_over_and_resumed_and_each_run_gives_the_lock_back(tmp_path, synthetic_dir):
    out = tmp_path / "out"
    pid = dead_pid()
    write_lock(out, pid)
    first = run_python(train_command(tmp_path, synthetic_dir, "--max_epochs", "1"), tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    notice = (
        f"notice: taking over the run lock {out / LOCK_FILENAME} of a run that is no longer running "
        f"(pid {pid} on host {HOST}, started {STARTED})"
    )
    assert notice in first.stderr.splitlines()
    assert not (out / LOCK_FILENAME).exists()
    assert (out / "checkpoints" / "last.pt").is_file()

    resumed = run_python(
        train_command(tmp_path, synthetic_dir, "--max_epochs", "2", "--resume", "true"), tmp_path, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "notice:" not in resumed.stderr
    assert f"resumed from {out / 'checkpoints' / 'last.pt'}: epoch 1" in resumed.stdout + resumed.stderr
    assert not (out / LOCK_FILENAME).exists()
