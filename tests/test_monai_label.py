"""The bundle driven exactly the way MONAI Label drives a bundle app (monailabel 0.8.5, the current release).

MONAI Label itself is not installed here: ``pip install monailabel`` pulls numpy<2 (a downgrade), CUDA wheels,
ITK, SAM2, mlflow and about 150 other packages. The two helpers below transcribe, call for call, what
``monailabel/tasks/infer/bundle.py`` (``BundleInferTask`` with ``BasicInferTask.__call__``) and
``monailabel/tasks/train/bundle.py`` (``BundleTrainTask.__call__`` with ``run_single_gpu``) do with a bundle:

- infer: a ``ConfigParser`` reads ``configs/inference.json`` (no ``initialize``), ``bundle_root`` is replaced by the
  bundle path, the bundle path is put on ``sys.path``; ``network_def``, ``preprocessing`` (its ``LoadImaged`` with
  ``image_only=False``, wrapped to accept arrays), ``inferer`` and ``postprocessing`` (every ``SaveImaged`` removed)
  are instantiated; ``models/model.pt`` is loaded with ``checkpoint.get("model", checkpoint)``, ``strict=False``; a
  ``Restored`` step resizes the prediction to the input's ``spatial_shape`` when they differ; the ``Writer``
  (``monailabel/transform/writer.py``) transposes every array of two or more dimensions before ITK writes it, with
  the extension ``result_extension`` or the input's.
- train: ``monai.bundle.run("run", ...)`` on ``configs/train.json`` with MONAI Label's overrides: ``bundle_root``,
  ``device``, ``train#trainer#max_epochs``, ``train#dataset#data`` / ``validate#dataset#data`` (labelled items split
  0.8/0.2), ``train#handlers`` (the bundle's own list, plus a ``CheckpointLoader`` of the existing
  ``models/model.pt``, ``strict=False``, when there is one) and ``displayable_configs`` (each key the bundle
  declares there, valued from the request, which holds the declared defaults unless the client changed them).

``tests/test_monai_label_live.py`` runs the real server.

The tests add only what keeps them small and out of the repository: a tiny network, short epochs, and
``output_dir``/``ckpt_dir``/``dataset_dir`` in a temporary folder. This module imports nothing from ``bundle`` so
that it can also run in a fresh interpreter where only MONAI Label's ``sys.path`` insertion makes ``bundle``
importable.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, cli_mask, run_python
from monai.bundle import ConfigItem, ConfigParser, ConfigWorkflow
from monai.bundle import run as bundle_run
from monai.data import MetaTensor, partition_dataset
from monai.transforms import Compose, LoadImaged, Resize, SaveImaged
from PIL import Image

TINY_NETWORK = {
    "encoder_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_channels": [8, 16, 32]},
    "head_channels": 32,
    "decoder_channels": [32, 16, 16, 8],
    "embedding_dim": 16,
}
# written into the bundle copy's train.json and inference.json: the ViT's position embedding is sized by patch_size,
# so both configs must agree on it (and on every other network option)
SMALL_NETWORK = {**TINY_NETWORK, "patch_size": [64, 64]}
SMALL_TRAINING = {
    "zoom_range": [0.25, 0.3],
    "cache_rate": 0.0,
    "sw_batch_size": 8,
    "log_interval": 1,
    "threshold_warmup_iterations": 1,
    "prototype_warmup_iterations": 1,
}


# ---------------------------------------------------------------------------------------------------------------
# MONAI Label's calls, transcribed
# ---------------------------------------------------------------------------------------------------------------


def _load_image_tensor(load_image: LoadImaged, data: dict) -> dict:
    """monailabel.transform.pre.LoadImageTensord: arrays (H, W, C) become MetaTensors, paths go to LoadImaged."""
    d = dict(data)
    if isinstance(d["image"], str):
        return load_image(d)
    meta = d.setdefault("image_meta_dict", {})
    meta.update(spatial_shape=d["image"].shape[:-1], original_channel_dim=-1, original_affine=None)
    d["image"] = MetaTensor(d["image"], meta=meta)
    return d


def _restored(data: dict, key: str = "pred", ref_image: str = "image") -> tuple[dict, bool]:
    """monailabel.transform.post.Restored (2D, channel first); also says whether it had to resize."""
    d = dict(data)
    meta = d[ref_image].meta if isinstance(d[ref_image], MetaTensor) else d.get(f"{ref_image}_meta_dict", {})
    result = d[key]
    current = tuple(result.shape[1:])
    spatial = tuple(int(s) for s in np.asarray(meta.get("spatial_shape", current)).ravel()[-len(current) :])
    resized = current != spatial
    if resized:
        result = Resize(spatial_size=spatial, mode="nearest")(result)
    d[key] = result if len(result.shape) <= 3 else result[0] if result.shape[0] == 1 else result
    return d, resized


def _written(data: dict, key: str = "pred") -> tuple[np.ndarray, str | None]:
    """monailabel.transform.writer.Writer + write_itk: the array ITK writes (rows = the file's height), extension."""
    path = data.get("image_path")
    ext = data.get("result_extension") or ("".join(Path(path).suffixes) if path else None)
    array = data[key].array if isinstance(data[key], MetaTensor) else np.asarray(data[key])
    if array.ndim >= 2:
        array = array.transpose().copy()
    return array, ext


def monailabel_infer(
    bundle_path: str, image: str | np.ndarray, device: str = "cpu", request: dict | None = None
) -> dict[str, Any]:
    """BundleInferTask(path).__call__({"image": image, "device": device}) up to the writer."""
    # BundleInferTask.__init__
    sys.path.insert(0, bundle_path)
    config = ConfigParser()
    config.read_config(os.path.join(bundle_path, "configs", "inference.json"))
    config.config.update({"bundle_root": bundle_path})
    config.config["use_click"] = False
    model_path = os.path.join(bundle_path, "models", "model.pt")
    network = config.get_parsed_content("network_def", instantiate=True)
    with open(os.path.join(bundle_path, "configs", "metadata.json")) as stream:
        metadata = json.load(stream)
    key_image, _ = next(iter(metadata["network_data_format"]["inputs"].items()))
    key_pred, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
    labels = {v.lower(): int(k) for k, v in pred.get("channel_def", {}).items() if v.lower() != "background"}
    sys.path.remove(bundle_path)

    # pre_transforms(data) with _update_device
    data = {"image": image, "image_path": image if isinstance(image, str) else None, "device": device}
    data.update(request or {})
    sys.path.insert(0, bundle_path)
    config.config.update({"device": device})
    if config.ref_resolver.items.get("device"):
        config.ref_resolver.items["device"] = ConfigItem(config=device, id="device")
    pre = config.get_parsed_content("preprocessing", instantiate=True)
    pre = list(pre.transforms) if isinstance(pre, Compose) else pre
    sys.path.remove(bundle_path)
    for transform in pre:
        if isinstance(transform, LoadImaged):
            transform._loader.image_only = False
            data = _load_image_tensor(transform, data)
        else:
            data = transform(data)

    # run_inferer: inferer(data), _get_network(device), inferer(inputs[None], network)
    sys.path.insert(0, bundle_path)
    inferer = config.get_parsed_content("inferer", instantiate=True)
    sys.path.remove(bundle_path)
    net = copy.deepcopy(network).to(torch.device(device))
    checkpoint = torch.load(model_path, map_location=torch.device(device))
    model_state_dict = checkpoint.get("model", checkpoint)
    keys_match = set(network.state_dict().keys()) == set(model_state_dict.keys())
    net.load_state_dict(model_state_dict, strict=False)
    net.eval()
    inputs = data[key_image]
    inputs = inputs if torch.is_tensor(inputs) else torch.from_numpy(inputs)
    with torch.no_grad():
        outputs = inferer(inputs[None].to(torch.device(device)), net)
    data[key_pred] = outputs[0]

    # post_transforms(data): SaveImaged filtered out, Restored appended
    sys.path.insert(0, bundle_path)
    post = config.get_parsed_content("postprocessing", instantiate=True)
    post = list(post.transforms) if isinstance(post, Compose) else post
    sys.path.remove(bundle_path)
    dropped = [type(t).__name__ for t in post if isinstance(t, SaveImaged)]
    for transform in [t for t in post if not isinstance(t, SaveImaged)]:
        data = transform(data)
    data, resized = _restored(data, key_pred, key_image)
    written, ext = _written(data, key_pred)
    return {
        "pred": data[key_pred],
        "written": written,
        "ext": ext,
        "labels": labels,
        "keys_match": keys_match,
        "resized": resized,
        "dropped": dropped,
    }


def monailabel_train(
    bundle_path: str,
    datalist: list[dict],
    request: dict,
    model_pytorch: str,
    test_overrides: dict,
) -> None:
    """BundleTrainTask(path)(request, datastore) on a single device (MONAI Label's ``run_single_gpu``).

    ``model_pytorch`` is ``<bundle>/models/<model_filename>`` in MONAI Label; ``test_overrides`` are this test's
    shrinking options (MONAI Label passes none).
    """
    config = ConfigParser()
    config_path = os.path.join(bundle_path, "configs", "train.json")
    config.read_config(config_path)
    config.config.update({"bundle_root": bundle_path})
    metadata_path = os.path.join(bundle_path, "configs", "metadata.json")

    datalist = [{"image": d["image"], "label": d["label"]} for d in datalist if d]
    val_split = request.get("val_split", 0.2)
    if val_split > 0.0:
        train_ds, val_ds = partition_dataset(datalist, ratios=[(1 - val_split), val_split], shuffle=False)
    else:
        train_ds, val_ds = datalist, (None if val_split < 0 else [])
    max_epochs = request.get("max_epochs", 50)
    pretrained = request.get("pretrained", True)
    device = request.get("device", "cpu")

    train_handlers = config.get("train#handlers", [])
    load_path = model_pytorch if pretrained else None
    if os.path.exists(load_path):
        loader = {"_target_": "CheckpointLoader", "load_path": load_path, "load_dict": {"model": "$@network"}}
        if not [t for t in train_handlers if t.get("_target_") == "CheckpointLoader"]:
            train_handlers.insert(0, {**loader, "strict": False})

    overrides = {
        "bundle_root": bundle_path,
        "train#trainer#max_epochs": max_epochs,
        "train#dataset#data": train_ds,
        "device": device,
        "train#handlers": train_handlers,
    }
    if config.get("displayable_configs"):  # the request holds the declared defaults, then the client's values
        declared = config.get_parsed_content("displayable_configs", instantiate=True)
        overrides["displayable_configs"] = {key: {**declared, **request}[key] for key in declared}
    if val_ds is not None:
        overrides["validate#dataset#data"] = val_ds

    sys.path.insert(0, bundle_path)
    try:
        bundle_run(
            run_id=request.get("run_id", "run"),
            init_id=None,
            final_id=None,
            meta_file=metadata_path,
            config_file=config_path,
            **overrides,
            **test_overrides,
        )
    finally:
        sys.path.remove(bundle_path)


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory, glas_dir) -> Path:
    """The bundle as a MONAI Label app holds it (configs + package + models/model.pt of a tiny network).

    The configs get a tiny network and small windows written into them, the way a user edits a bundle before
    serving it.
    """
    root = tmp_path_factory.mktemp("app") / "pathology_mpamatch_segmentation"
    (root / "models").mkdir(parents=True)
    (root / "configs").mkdir()
    for name in ("train.json", "inference.json", "metadata.json", "logging.conf"):
        content = (REPO_ROOT / "configs" / name).read_text()
        if name in ("train.json", "inference.json"):
            config = json.loads(content)
            config.update(SMALL_NETWORK, min_object_area=0)  # the untrained network's objects are small
            content = json.dumps(config, indent=4)
        (root / "configs" / name).write_text(content)
    (root / "bundle").symlink_to(REPO_ROOT / "bundle")
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    # an untrained network calls (almost) everything one class; centre its logits on a real image so that both
    # classes appear and a flipped or shifted label cannot match the CLI's mask
    data = parser.get_parsed_content("preprocessing")({"image": str(glas_dir / "images" / "testA_2.png")})
    with torch.no_grad():
        logits = parser.get_parsed_content("inferer")(data["image"][None], network)
        network.segmentation_head.bias[1] -= (logits[0, 1] - logits[0, 0]).median()
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, glas_dir) -> list[dict]:
    """Five labelled GlaS images as MONAI Label's datastore lists them; labels saved as class indices 0/1."""
    folder = tmp_path_factory.mktemp("labels")
    items = []
    for name in ("train_1", "train_2", "train_3", "train_4", "train_5"):
        mask = np.asarray(Image.open(glas_dir / "masks" / f"{name}.png"))
        Image.fromarray((mask > 0).astype(np.uint8)).save(folder / f"{name}.png")
        items.append({"image": str(glas_dir / "images" / f"{name}.png"), "label": str(folder / f"{name}.png")})
    return items


# ---------------------------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------------------------


def test_infer_task_on_a_real_glas_image(bundle_copy, glas_dir, tmp_path):
    """The label MONAI Label writes has the image's height x width and equals the CLI's mask pixel for pixel."""
    path = glas_dir / "images" / "testA_2.png"
    result = monailabel_infer(str(bundle_copy), str(path))
    width, height = Image.open(path).size
    assert width != height  # a transposed label could not pass the shape checks below
    assert tuple(result["pred"].shape) == (width, height)  # MONAI's (x, y) order
    assert not result["resized"]  # Restored leaves it as it is
    written = result["written"]
    assert written.shape == (height, width) and written.dtype == np.uint8 and result["ext"] == ".png"
    expected = cli_mask(bundle_copy, path, tmp_path / "cli")
    assert 0.05 < expected.mean() < 0.95  # both classes present: a flipped label would not match either
    np.testing.assert_array_equal(written, expected)
    assert result["labels"] == {"gland": 1}
    assert result["keys_match"]  # models/model.pt is a plain state dict of network_def
    assert result["dropped"] == ["SaveSegmentationd"]  # the CLI's mask writer, after the label: MONAI Label drops it

    # an image sent as an array (H, W, 3), as MONAI Label's pathology clients do with regions: the same label
    array = np.asarray(Image.open(path).convert("RGB"))
    from_array = monailabel_infer(str(bundle_copy), array)
    np.testing.assert_array_equal(np.asarray(from_array["pred"]), np.asarray(result["pred"]))


def test_infer_task_keeps_tiff_and_never_writes_a_label_as_jpeg(bundle_copy, glas_dir, tmp_path):
    image = Image.open(glas_dir / "images" / "testB_3.png").convert("RGB")
    image.save(tmp_path / "region.tif")
    image.save(tmp_path / "region.jpg", quality=95)
    tiff = monailabel_infer(str(bundle_copy), str(tmp_path / "region.tif"))
    assert tiff["ext"] == ".tif" and tiff["written"].shape == (image.height, image.width)
    jpeg = monailabel_infer(str(bundle_copy), str(tmp_path / "region.jpg"))
    assert jpeg["ext"] == ".png" and jpeg["written"].shape == (image.height, image.width)  # lossless
    asked = monailabel_infer(str(bundle_copy), str(tmp_path / "region.jpg"), request={"result_extension": ".nrrd"})
    assert asked["ext"] == ".nrrd"  # the client's choice is kept


def test_infer_task_needs_nothing_but_the_bundle_path(bundle_copy, glas_dir, tmp_path):
    """A fresh interpreter, another working directory, no PYTHONPATH, no ``initialize``: MONAI Label's
    ``sys.path.insert(0, bundle_path)`` alone decides where the bundle's components come from (the copy, even when
    the package is also pip-installed in the environment, as it is in CI)."""
    script = f"""
import importlib.util, json, sys
sys.path.append({str(Path(__file__).parent)!r})  # the tests' helpers module (no bundle code in that folder)
spec = importlib.util.spec_from_file_location("monailabel_mirror", {__file__!r})
mirror = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mirror)
result = mirror.monailabel_infer({str(bundle_copy)!r}, {str(glas_dir / "images" / "testB_3.png")!r})
print(json.dumps({{"shape": list(result["pred"].shape), "resized": result["resized"],
                  "bundle_file": sys.modules["bundle"].__file__}}))
"""
    done = run_python(["-c", script], tmp_path, repo_on_path=False, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    width, height = Image.open(glas_dir / "images" / "testB_3.png").size
    reported = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"shape": reported["shape"], "resized": reported["resized"]} == {
        "shape": [width, height],
        "resized": False,
    }
    assert Path(reported["bundle_file"]).is_relative_to(bundle_copy)  # the copy (it links to these sources)


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------


def training_overrides(tmp_path: Path, dataset_dir: Path) -> dict:
    return {
        **SMALL_TRAINING,
        "dataset_dir": str(dataset_dir),
        "output_dir": str(tmp_path / "runs"),
        "ckpt_dir": str(tmp_path / "models"),
    }


def logged_terms(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def test_train_task_without_a_pool_trains_supervised_and_feeds_the_infer_task(
    bundle_copy, labelled, tmp_path, glas_dir
):
    """MONAI Label's first training: no models/model.pt yet (no CheckpointLoader), a dataset_dir without datalist
    (empty unlabelled pool: supervised fallback); the model it writes is served by the infer task."""
    no_datalist = tmp_path / "empty"
    no_datalist.mkdir()
    request = {"max_epochs": 1, "epoch_length": 2, "batch_size": 2, "val_split": 0.2, "device": "cpu"}
    monailabel_train(
        str(bundle_copy),
        labelled,
        request,
        str(tmp_path / "models" / "model.pt"),  # does not exist yet
        training_overrides(tmp_path, no_datalist),
    )
    log = logged_terms(tmp_path / "runs" / "train.log")
    assert "loss_x" in log and "loss_u" not in log and "val_dice" in log
    assert "Epoch: 1/1, Iter: 2/2" in log and "Iter: 3/" not in log  # the request's epoch_length reached it
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True, map_location="cpu")
    served = bundle_copy.parent / "served"
    served.mkdir()
    (served / "configs").symlink_to(bundle_copy / "configs")
    (served / "bundle").symlink_to(REPO_ROOT / "bundle")
    (served / "models").mkdir()
    torch.save(state, served / "models" / "model.pt")
    result = monailabel_infer(str(served), str(glas_dir / "images" / "testA_5.png"))
    assert result["keys_match"] and not result["resized"]


def test_train_task_with_a_pool_and_an_existing_model(bundle_copy, labelled, tmp_path, glas_dir):
    """The next trainings: a model exists (MONAI Label inserts a CheckpointLoader, strict=False, that loads the plain
    state dict) and the client sets ``unlabeled_dir`` to a folder of images laid out like MONAI Label's studies
    folder (its ``labels/`` sub-folder is not part of the pool): semi-supervised training."""
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in (10, 11, 12):
        (studies / f"testA_{i}.png").symlink_to(glas_dir / "images" / f"testA_{i}.png")
    (studies / "labels" / "final" / "testA_10.png").symlink_to(glas_dir / "masks" / "testA_10.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    pretrained = torch.load(bundle_copy / "models" / "model.pt", weights_only=True)
    pretrained["segmentation_head.weight"].zero_()
    pretrained["segmentation_head.bias"] = torch.tensor([3.0, -3.0])  # recognisable after two small SGD steps
    torch.save(pretrained, tmp_path / "pretrained.pt")
    request = {"max_epochs": 1, "epoch_length": 3, "batch_size": 2, "val_split": 0.2, "device": "cpu"}
    request["unlabeled_dir"] = str(studies)
    monailabel_train(
        str(bundle_copy), labelled, request, str(tmp_path / "pretrained.pt"), training_overrides(tmp_path, empty)
    )
    log = logged_terms(tmp_path / "runs" / "train.log")
    assert "loss_u" in log and "val_dice" in log and "Epoch: 1/1, Iter: 3/3" in log
    trained = torch.load(tmp_path / "models" / "model.pt", weights_only=True, map_location="cpu")
    assert torch.allclose(trained["segmentation_head.bias"], torch.tensor([3.0, -3.0]), atol=0.5)


def test_learning_rate_schedule_follows_monailabel_max_epochs(tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(REPO_ROOT / "configs" / "train.json"),
        workflow_type="train",
        logging_file=False,
        **{"bundle_root": str(REPO_ROOT), "train#trainer#max_epochs": 50, "output_dir": str(tmp_path)},
        **TINY_NETWORK,
    )
    workflow.initialize()
    scheduler = workflow.parser.get_parsed_content("lr_scheduler")
    epoch_length = workflow.parser.get_parsed_content("epoch_length")
    assert scheduler.total_iterations == 50 * epoch_length
