"""A live MONAI Label 0.8.5 server with this bundle, driven over HTTP the way a client drives it (127.0.0.1 only).

The steps are the README's MONAI Label commands (docs/deployment.md), run as written: the ``monaibundle`` sample app
is downloaded, the bundle's zoo zip (``python -m bundle.package``) is unpacked into the app's ``model/`` folder with
a trained ``models/model.pt``, and ``monailabel start_server`` serves a studies folder of real GlaS images. Over HTTP:
``/info/`` lists the model and the training options the bundle declares; ``/infer`` returns a label of exactly the
image's size that equals the bundle's own CLI mask and matches the ground truth (Dice); ``PUT /datastore/label``
stores two labels; ``/train`` with the client's options (``epoch_length`` among them) trains on those labels plus
the studies folder as the unlabelled pool; the next ``/infer`` is served by the new model.

MONAI Label needs its own virtual environment (numpy<2, jsonschema<4, pydicom<3 do not fit the main one):
``MPAMATCH_MONAILABEL_ENV`` names it (``python -m venv ENV && ENV/bin/pip install -e ".[monailabel]"``, as ``.ci/run``
does). Without it the test is skipped, unless ``MPAMATCH_REQUIRE_MONAILABEL=1`` (CI) turns the skip into a failure.
The server is stopped (its whole process group) whatever happens.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, cli_mask, config_files, make_workflow
from PIL import Image

from bundle.prepare.cli import main as prepare_main

MODEL = "pathology_mpamatch_segmentation"
ENV_VARIABLE = "MPAMATCH_MONAILABEL_ENV"
INFER_IMAGES = ("testA_10", "testA_2")  # 775 x 522 and 589 x 453: neither square
LABELLED = ("train_1", "train_2")
POOL = ("testA_5", "testB_3")
# measured with the fixture's model (100 supervised iterations of the default recipe, seed 0): gland Dice of the
# served label against the ground truth 0.784 (testA_10) and 0.914 (testA_2); the same label flipped upside down
# 0.594 / 0.264, shifted right by 40 px 0.667 / 0.591 (a transposed label has the wrong size)
MIN_DICE = 0.7

pytestmark = pytest.mark.slow


def monailabel_env() -> Path:
    value = os.environ.get(ENV_VARIABLE)
    if not value:
        if os.environ.get("MPAMATCH_REQUIRE_MONAILABEL") == "1":
            pytest.fail(f"MPAMATCH_REQUIRE_MONAILABEL=1 but {ENV_VARIABLE} is not set")
        pytest.skip(f"set {ENV_VARIABLE} to a virtual environment with `pip install -e '.[monailabel]'`")
    env = Path(value)
    if not (env / "bin" / "monailabel").is_file():
        pytest.fail(f"{ENV_VARIABLE}={value} has no bin/monailabel")
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


class Server:
    """``monailabel start_server`` in its own process group, output in ``log``; HTTP helpers."""

    def __init__(self, env: Path, app: Path, studies: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [str(env / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies)]
        command += ["--conf", "models", MODEL, "--conf", "zoo_source", "github", "--conf", "sam2", "false"]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command,
            stdout=open(log, "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            env=child_env(env),
            cwd=app.parent,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                self.request("GET", "/info/")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.tail()}")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, response.read()

    def json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        status, content = self.request(method, path, body, {"Content-Type": "application/json"} if body else None)
        assert status == 200, content[:500]
        return json.loads(content)

    def infer(self, image: str) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        status, content = self.request("POST", f"/infer/{MODEL}?image={image}&output=image")
        seconds = time.perf_counter() - start
        assert status == 200, content[:500]
        return np.asarray(Image.open(io.BytesIO(content))), seconds

    def put_label(self, image: str, label: Path) -> dict:
        boundary = "mpamatchboundary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="label"; filename="{label.name}"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        body += label.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, content = self.request("PUT", f"/datastore/label?image={image}", body, headers)
        assert status == 200, content[:500]
        return json.loads(content)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def child_env(env: Path) -> dict[str, str]:
    variables = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    variables.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VIRTUAL_ENV=str(env))
    variables["PATH"] = os.pathsep.join([str(env / "bin"), variables.get("PATH", "")])
    return variables


def run_in(env: Path, args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, glas_dir) -> Path:
    """100 supervised iterations of the default recipe on the 7 labelled images of GlaS 10 % (the learning test's
    run): a model good enough that a transposed, flipped or shifted label shows in the Dice."""
    folder = tmp_path_factory.mktemp("model")
    data = folder / "glas10"
    assert prepare_main(["glas", "--source", str(glas_dir), "--output", str(data), "--split", "10"]) == 0
    overrides = {"bundle_root": str(REPO_ROOT), "output_dir": str(folder / "out"), "ckpt_dir": str(folder / "models")}
    workflow = make_workflow(
        config_files("supervised") + [str(data / "dataset.json")], max_epochs=1, epoch_length=100, **overrides
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return folder / "models" / "model.pt"


def test_live_server_segments_stores_labels_and_trains(tmp_path, glas_dir, trained_model, capsys):
    env = monailabel_env()
    apps = tmp_path / "apps"
    # the README's commands
    run_in(env, [str(env / "bin" / "monailabel"), "apps", "--download", "--name", "monaibundle", "--output", str(apps)],
           tmp_path)  # fmt: skip
    run_in(env, [sys.executable, "-m", "bundle.package", "--output", str(tmp_path / "dist")], REPO_ROOT)
    (apps / "monaibundle" / "model").mkdir()
    zipped = next((tmp_path / "dist").glob(f"{MODEL}_v*.zip"))
    run_in(env, [str(env / "bin" / "python"), "-m", "zipfile", "-e", str(zipped), str(apps / "monaibundle" / "model")],
           tmp_path)  # fmt: skip
    bundle = apps / "monaibundle" / "model" / MODEL
    shutil.copy(trained_model, bundle / "models" / "model.pt")
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in INFER_IMAGES + LABELLED + POOL:
        shutil.copy(glas_dir / "images" / f"{name}.png", studies)

    server = Server(env, apps / "monaibundle", studies, tmp_path / "server.log")
    try:
        server.wait_ready()
        info = server.json("GET", "/info/")
        assert info["models"][MODEL]["labels"] == {"gland": 1}
        panel = info["trainers"][MODEL]["config"]
        assert {"max_epochs", "epoch_length", "batch_size", "learning_rate", "unlabeled_dir"} <= set(panel)

        seconds, first, scores = {}, {}, {}
        server.infer(INFER_IMAGES[0])  # the first request loads the network
        for name in INFER_IMAGES:
            label, seconds[name] = server.infer(name)
            truth = np.asarray(Image.open(glas_dir / "masks" / f"{name}.png")) > 0
            assert label.shape == truth.shape and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
            scores[name] = (
                dice(label > 0, truth),
                dice(label[::-1] > 0, truth),
                dice(np.roll(label, 40, 1) > 0, truth),
            )
            assert scores[name][0] >= MIN_DICE, f"{name}: Dice {scores[name][0]:.3f}"
            expected = cli_mask(
                REPO_ROOT, glas_dir / "images" / f"{name}.png", tmp_path / "cli", ckpt_path=str(trained_model)
            )
            np.testing.assert_array_equal(label, expected)  # the same mask as the bundle's own command
            first[name] = label

        for name in LABELLED:
            mask = (np.asarray(Image.open(glas_dir / "masks" / f"{name}.png")) > 0).astype(np.uint8)
            Image.fromarray(mask).save(tmp_path / f"{name}.png")
            assert server.put_label(name, tmp_path / f"{name}.png") == {"image": name, "label": name}
            assert (studies / "labels" / "final" / f"{name}.png").is_file()

        # a client sends the whole panel (MONAI Label 0.8.5 reads every option the bundle declares from the request)
        options = {key: value[0] if isinstance(value, list) else value for key, value in panel.items()}
        options.update(max_epochs=1, epoch_length=3, batch_size=2, val_split=0.5, device="cpu", multi_gpu=False)
        options.update(unlabeled_dir=str(studies), tracking="None")
        model_time = (bundle / "models" / "model.pt").stat().st_mtime_ns
        started = time.perf_counter()
        server.json("POST", f"/train/{MODEL}", options)
        status = {}
        while time.perf_counter() - started < 900:
            status = server.json("GET", "/train/")
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                break
            time.sleep(3)
        train_seconds = time.perf_counter() - started
        assert status.get("status") == "DONE", json.dumps(status)[-3000:]
        last = torch.load(bundle / "runs" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        assert last["trainer"]["iteration"] == 3 and last["trainer"]["epoch_length"] == 3  # the client's schedule
        assert f"unlabelled pool: {len(INFER_IMAGES + LABELLED + POOL)} images in {studies}" in server.tail(100000)
        assert (bundle / "models" / "model.pt").stat().st_mtime_ns != model_time

        again, _ = server.infer(INFER_IMAGES[0])
        assert "Reload model" in server.tail(200)  # MONAI Label saw the new weights
        assert again.shape == first[INFER_IMAGES[0]].shape and not np.array_equal(again, first[INFER_IMAGES[0]])
    finally:
        server.stop()
    with capsys.disabled():
        shown = ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
        print(f"\nMONAI Label: /infer {shown}; /train 3 iterations {train_seconds:.0f} s (with start-up)")
        for name, (served, flipped, shifted) in scores.items():
            print(f"{name}: gland Dice {served:.3f}, flipped {flipped:.3f}, shifted by 40 px {shifted:.3f}")
