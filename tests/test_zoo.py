"""The MONAI Model Zoo's checks and the zip users download: metadata, network shape, packaging, download and use.

- ``verify_metadata`` against the schema shipped in ``docs/`` (offline), and the metadata's consistency with the
  configs and with the packages the code imports;
- ``verify_net_in_out`` on ``configs/inference.json``'s ``network_def`` as the Zoo's CI runs it (n=1: 16 x 16) and at
  256 x 256 (n=16), and that it fails when the metadata is wrong;
- ``python -m bundle.package``: the zip's member list, ``large_files.yml``, byte-identical rebuilds, input errors;
- the whole user path from the zip, offline: MONAI's ``download`` from a ``file://`` URL and ``download_large_files``
  (which downloads ``models/model.pt`` and checks its SHA-256), then, in fresh processes started in the downloaded
  folder (so that its own code is used), ``monai.bundle.load`` and ``python -m monai.bundle run`` on a real GlaS
  image.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from helpers import run_python
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser, download, download_large_files, verify_metadata, verify_net_in_out
from PIL import Image

from bundle.package import BUNDLE_NAME, LARGE_FILES_NAME, build_package, bundle_version, main

REPO_ROOT = Path(__file__).resolve().parents[1]
METADATA_JSON = REPO_ROOT / "configs" / "metadata.json"
INFERENCE_JSON = REPO_ROOT / "configs" / "inference.json"
TRAIN_JSON = REPO_ROOT / "configs" / "train.json"
SCHEMA_JSON = REPO_ROOT / "docs" / "meta_schema_20240725.json"
SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"  # see docs/meta_schema.md
CORE_PACKAGES = {"monai", "torch", "numpy"}  # versions in monai_version, pytorch_version, numpy_version
# imported only when the user selects them (text_encoder kind "conch"; --wsi_backend cucim)
OPTIONAL_MODULES = {"conch", "cucim"}
IMAGE_NAME = "testA_2"  # 589 x 453 pixels


def load_metadata() -> dict:
    return json.loads(METADATA_JSON.read_text(encoding="utf-8"))


def run_offline(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` offline with nothing of this repository on the path (the code must come from ``cwd``)."""
    done = run_python(args, cwd, repo_on_path=False, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def published_weights(tmp_path_factory) -> Path:
    """A random-init state dict of the default ``network_def`` of configs/inference.json, "published" in a folder."""
    parser = ConfigParser()
    parser.read_config(str(INFERENCE_JSON))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("published") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


# --- metadata ------------------------------------------------------------------------------------------------------


def test_metadata_validates_offline_against_the_shipped_schema(tmp_path):
    metadata = load_metadata()
    assert metadata["schema"].rsplit("/", 1)[-1] == SCHEMA_JSON.name  # the shipped file is the schema it names
    assert sha256(SCHEMA_JSON) == SCHEMA_SHA256  # and stays MONAI's, unmodified
    # a file at filepath: no download (MONAI checks its hash instead)
    verify_metadata(meta_file=str(METADATA_JSON), filepath=str(SCHEMA_JSON), hash_val=SCHEMA_SHA256, hash_type="sha256")

    for field in ("network_data_format", "numpy_version", "required_packages_version"):
        broken = {k: v for k, v in metadata.items() if k != field}
        (tmp_path / "metadata.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=field):
            verify_metadata(
                meta_file=str(tmp_path / "metadata.json"),
                filepath=str(SCHEMA_JSON),
                hash_val=SCHEMA_SHA256,
                hash_type="sha256",
            )


def test_metadata_agrees_with_the_configs():
    metadata = load_metadata()
    assert metadata["changelog"].keys() >= {metadata["version"]}
    train = ConfigParser.load_config_file(str(TRAIN_JSON))
    inference = ConfigParser.load_config_file(str(INFERENCE_JSON))
    image = metadata["network_data_format"]["inputs"]["image"]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == train["num_classes"] == inference["num_classes"]
    assert pred["channel_def"] == {str(i): name for i, name in enumerate(train["class_names"])}
    assert image["num_channels"] == train["network_def"]["in_channels"] == len(image["channel_def"])
    assert inference["network_def"] == train["network_def"]
    # the input value range is that of [0, 1] pixels after the ImageNet normalisation of the configs
    mean, std = np.array(inference["intensity_mean"]), np.array(inference["intensity_std"])
    np.testing.assert_allclose(image["value_range"], [(-mean / std).min(), ((1 - mean) / std).max()], atol=1e-3)


def test_metadata_lists_every_package_the_bundle_imports():
    """required_packages_version names every installed distribution that bundle/ imports (besides monai/torch/numpy)."""
    modules: set[str] = set()
    for path in (REPO_ROOT / "bundle").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"bundle"} | OPTIONAL_MODULES
    distributions = importlib.metadata.packages_distributions()
    unknown = sorted(m for m in modules if m not in distributions)
    assert not unknown, f"imported by bundle/ but not installed: {unknown}"
    needed = {distributions[m][0].lower() for m in modules} - CORE_PACKAGES
    listed = {name.lower() for name in load_metadata()["required_packages_version"]}
    assert needed <= listed, f"missing from required_packages_version: {sorted(needed - listed)}"
    for name in listed:  # every listed name is a real distribution (a typo would fail here)
        importlib.metadata.version(name)


# --- network input/output ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 16])  # 16 x 16 (the Zoo CI's default n=1) and 256 x 256
def test_verify_net_in_out(n):
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(METADATA_JSON),
        config_file=str(INFERENCE_JSON),
        device="cpu",
        n=n,
        bundle_root=str(REPO_ROOT),
    )


def test_verify_net_in_out_fails_when_the_metadata_is_wrong():
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(METADATA_JSON),
            config_file=str(INFERENCE_JSON),
            device="cpu",
            n=2,
            bundle_root=str(REPO_ROOT),
            **{"_meta_#network_data_format#outputs#pred#num_channels": 3},
        )


# --- packaging -----------------------------------------------------------------------------------------------------


def test_package_members_large_files_and_reproducibility(tmp_path, published_weights):
    url = published_weights.as_uri()
    zip_path = build_package(tmp_path / "dist", weights=published_weights, weights_url=url)
    assert zip_path == tmp_path / "dist" / f"{BUNDLE_NAME}_v{bundle_version()}.zip"

    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        large_files = archive.read(f"{BUNDLE_NAME}/{LARGE_FILES_NAME}").decode()
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in archive.infolist())
    assert names == sorted(names) and len(names) == len(set(names))
    assert {name.split("/", 1)[0] for name in names} == {BUNDLE_NAME}  # one top folder
    relative = {name.split("/", 1)[1] for name in names}
    expected = {
        "LICENSE",
        "README.md",
        LARGE_FILES_NAME,
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "configs/logging.conf",
        "bundle/__init__.py",
        "bundle/networks/transunet.py",
        "docs/method.md",
        f"docs/{SCHEMA_JSON.name}",
        "models/README.md",
        "setup.cfg",
        "pyproject.toml",
    }
    assert expected <= relative, sorted(expected - relative)
    assert {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "configs").glob("*.json")} <= relative
    assert {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "bundle").rglob("*.py")} <= relative
    top_level = {"LICENSE", "README.md", LARGE_FILES_NAME, "setup.cfg", "pyproject.toml", "configs", "bundle", "docs"}
    assert {name.split("/", 1)[0] for name in relative} <= top_level | {"models"}
    for name in relative:  # no tests, caches, data, outputs, weights
        parts = PurePosixPath(name).parts
        assert not set(parts) & {"tests", "__pycache__", ".git", ".venv", "runs", "eval", "dist"}, name
        assert parts[0] != "data" and PurePosixPath(name).suffix not in {".pt", ".ts", ".onnx", ".pyc"}, name
    assert [name for name in relative if name.startswith("models/")] == ["models/README.md"]

    # the listing MONAI's download_large_files reads: path, url, hash_val, hash_type
    (tmp_path / LARGE_FILES_NAME).write_text(large_files)
    listing = ConfigParser.load_config_file(str(tmp_path / LARGE_FILES_NAME))["large_files"]
    assert listing == [
        {"path": "models/model.pt", "url": url, "hash_val": sha256(published_weights), "hash_type": "sha256"}
    ]

    again = build_package(tmp_path / "again", weights=published_weights, weights_url=url)
    assert again.read_bytes() == zip_path.read_bytes()


def test_package_command_line_errors(tmp_path, capsys, published_weights):
    assert main(["--output", str(tmp_path), "--weights", str(published_weights)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --weights and --weights-url go together: give both (the file to hash, its URL) or none"
    )
    checkpoint = tmp_path / "last.pt"
    torch.save({"network": {"w": torch.zeros(1)}, "epoch": 3}, checkpoint)
    assert main(["--output", str(tmp_path), "--weights", str(checkpoint), "--weights-url", checkpoint.as_uri()]) == 2
    assert capsys.readouterr().err.startswith(f"error: --weights {checkpoint} is not a plain state dict")
    assert main(["--output", str(tmp_path), "--weights", str(published_weights), "--weights-url", "model.pt"]) == 2
    assert "is not an http(s):// or file:// URL" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.zip"))

    assert main(["--output", str(tmp_path / "dist")]) == 0  # no weights: configs and code only
    printed = Path(capsys.readouterr().out.strip())
    assert printed == tmp_path / "dist" / f"{BUNDLE_NAME}_v{bundle_version()}.zip"
    with zipfile.ZipFile(printed) as archive:
        assert f"{BUNDLE_NAME}/{LARGE_FILES_NAME}" not in archive.namelist()


# --- download and use ----------------------------------------------------------------------------------------------

LOAD_SCRIPT = """
import sys, torch, bundle
from pathlib import Path, PurePosixPath
from monai.bundle import load, verify_metadata
bundle_dir, name, weights = sys.argv[1:4]
root = Path(bundle_dir, name).resolve()
assert Path(bundle.__file__).resolve().is_relative_to(root), bundle.__file__  # the downloaded copy's code
verify_metadata(meta_file=str(root / "configs/metadata.json"), filepath=str(root / "docs/meta_schema_20240725.json"))
net = load(name=name, bundle_dir=bundle_dir, workflow_type="inference", device="cpu")
expected = torch.load(weights, weights_only=True)
state = net.state_dict()
assert type(net).__name__ == "TransUNet" and state.keys() == expected.keys()
assert all(torch.equal(state[k], expected[k]) for k in expected)
print("loaded", len(expected), "tensors")
"""


@pytest.mark.filterwarnings("ignore:No hash value provided")  # MONAI's download(url=...) never checks the zip's hash
def test_download_load_and_infer_from_the_zip(tmp_path, glas_dir, published_weights):
    zip_path = build_package(tmp_path / "dist", weights=published_weights, weights_url=published_weights.as_uri())
    bundles = tmp_path / "bundles"
    downloaded = bundles / BUNDLE_NAME

    # what `python -m monai.bundle download --name NAME --url file://ZIP --bundle_dir DIR` and
    # `python -m monai.bundle download_large_files --bundle_path DIR/NAME` run (in-process: a Python start-up is ~10 s)
    download(name=BUNDLE_NAME, url=zip_path.as_uri(), bundle_dir=str(bundles), progress=False)
    assert (downloaded / "configs" / "inference.json").is_file()
    assert not (downloaded / "models" / "model.pt").exists()
    download_large_files(bundle_path=str(downloaded))
    assert sha256(downloaded / "models" / "model.pt") == sha256(published_weights)
    tampered = tmp_path / "tampered"  # the same listing with another hash: the download is refused
    tampered.mkdir()
    listing = (downloaded / LARGE_FILES_NAME).read_text().replace(sha256(published_weights), "0" * 64)
    (tampered / LARGE_FILES_NAME).write_text(listing)
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(tampered))
    assert not (tampered / "models" / "model.pt").exists()

    # load and run in fresh processes, from the downloaded folder: its own code, not this repository's
    loaded = run_offline(["-c", LOAD_SCRIPT, str(bundles), BUNDLE_NAME, str(published_weights)], cwd=downloaded)
    assert "loaded" in loaded.stdout

    images = tmp_path / "images"
    images.mkdir()
    source = glas_dir / "images" / f"{IMAGE_NAME}.png"
    (images / source.name).write_bytes(source.read_bytes())
    output_dir = tmp_path / "out"
    run_offline(
        [
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            str(images),
            "--output_dir",
            str(output_dir),
            "--progress",
            "False",
        ],
        cwd=downloaded,
    )
    mask = np.asarray(Image.open(output_dir / f"{IMAGE_NAME}_mask.png"))
    assert mask.shape == (453, 589)
    assert set(np.unique(mask)) <= {0, 255}
