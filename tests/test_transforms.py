"""Tests of the bundle's readers and transforms, and of the MONAI training pipeline built from them: formats and
colour modes, mask -> class conversion, stain/colour/blur augmentation, and image/label alignment after every chain
(on real GlaS and on synthetic images whose pixels encode their mask)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from helpers import boundary
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandGaussianSmoothd
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

import bundle.data.readers  # noqa: F401  (makes ``bundle.data.readers`` resolvable in configs)
import bundle.data.transforms  # noqa: F401
from bundle.data.readers import ImageFileReader, TiffReader, image_readers, mask_readers, to_label_image, to_rgb
from bundle.data.transforms import (
    MaskToClassd,
    RandColorJitter,
    RandColorJitterd,
    RandGaussianBlurd,
    RandGrayscaled,
    RandHEDJitterd,
    RandZoomCropd,
    hed_jitter,
)
from bundle.errors import BundleInputError, find_input_error

H, W = 12, 17  # not square, so a transposed load cannot pass


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _load(path: Path, readers) -> MetaTensor:
    chain = Compose([LoadImaged("x", reader=readers, image_only=True), EnsureChannelFirstd("x")])
    return chain({"x": str(path)})["x"]


def _input_error(call) -> BundleInputError:
    with pytest.raises(Exception) as info:
        call()
    error = find_input_error(info.value)
    assert error is not None, f"no BundleInputError in the chain of {info.value!r}"
    assert "\n" not in str(error)
    return error


# ----------------------------------------------------------------------------------------------------- readers


def _write_image(kind: str, folder: Path) -> tuple[Path, np.ndarray, float]:
    """Write an image in format/mode ``kind``; return (path, expected (H, W, 3) uint8 RGB, tolerance)."""
    rgb = _rgb()
    gray = rgb[..., 0]
    gray3 = np.repeat(gray[..., None], 3, axis=-1)
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:, :5] = 0
    alpha[:, 5:9] = 128
    weight = alpha[..., None] / 255.0
    over_white = np.rint(rgb * weight + 255 * (1 - weight)).astype(np.uint8)
    path = folder / {"jpeg": "x.jpg", "jpeg_gray": "x.jpeg"}.get(kind, f"x_{kind}.png")
    if kind == "png_rgb":
        Image.fromarray(rgb).save(path)
        return path, rgb, 0
    if kind == "png_gray":
        Image.fromarray(gray).save(path)
        return path, gray3, 0
    if kind == "png_rgba":
        Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(path)
        return path, over_white, 0
    if kind == "png_palette":
        palette_image = Image.fromarray(rgb).quantize(colors=16)
        palette_image.save(path)
        return path, np.asarray(palette_image.convert("RGB")), 0
    if kind == "png_16bit":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # 257 * v / 65535 * 255 == v
        return path, gray3, 0
    if kind == "jpeg":
        smooth = np.tile(np.linspace(40, 200, W, dtype=np.uint8)[None, :, None], (H, 1, 3))
        Image.fromarray(smooth).save(path, quality=95)
        return path, smooth, 6
    if kind == "jpeg_gray":
        smooth = np.tile(np.linspace(40, 200, W, dtype=np.uint8)[None, :], (H, 1))
        Image.fromarray(smooth).save(path, quality=95)
        return path, np.repeat(smooth[..., None], 3, axis=-1), 6
    if kind == "bmp":
        path = folder / "x.bmp"
        Image.fromarray(rgb).save(path)
        return path, rgb, 0
    path = folder / f"x_{kind}.tif"
    if kind == "tiff_rgb":
        tifffile.imwrite(path, rgb, photometric="rgb")
        return path, rgb, 0
    if kind == "tiff_planar":
        tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
        return path, rgb, 0
    if kind == "tiff_gray":
        tifffile.imwrite(path, gray, photometric="minisblack")
        return path, gray3, 0
    if kind == "tiff_rgba":
        tifffile.imwrite(path, np.dstack([rgb, alpha]), photometric="rgb", extrasamples=["unassalpha"])
        return path, over_white, 0
    if kind == "tiff_rgb16":
        tifffile.imwrite(path, rgb.astype(np.uint16) * 257, photometric="rgb")
        return path, rgb, 0
    if kind == "tiff_float":
        tifffile.imwrite(path, rgb.astype(np.float32) / 255.0, photometric="rgb")
        return path, rgb, 0
    raise AssertionError(kind)


IMAGE_KINDS = [
    "png_rgb",
    "png_gray",
    "png_rgba",
    "png_palette",
    "png_16bit",
    "jpeg",
    "jpeg_gray",
    "bmp",
    "tiff_rgb",
    "tiff_planar",
    "tiff_gray",
    "tiff_rgba",
    "tiff_rgb16",
    "tiff_float",
]


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_readers_give_rgb_in_row_column_order(kind, tmp_path):
    path, expected, tolerance = _write_image(kind, tmp_path)
    image = _load(path, image_readers())
    assert tuple(image.shape) == (3, H, W)
    assert image.dtype == torch.float32
    assert image.meta["filename_or_obj"] == str(path)
    assert image.meta["spatial_shape"].tolist() == [H, W]
    assert image.meta["original_channel_dim"] == -1
    difference = np.abs(image.numpy().transpose(1, 2, 0) - expected.astype(np.float32))
    assert difference.max() <= tolerance


def test_png_and_tiff_meta_have_the_same_keys_so_mixed_batches_collate(tmp_path):
    png, _, _ = _write_image("png_rgb", tmp_path)
    tif, _, _ = _write_image("tiff_rgb", tmp_path)
    chain = Compose([LoadImaged("image", reader=image_readers(), image_only=True), EnsureChannelFirstd("image")])
    loader = DataLoader(Dataset([{"image": str(png)}, {"image": str(tif)}], chain), batch_size=2)
    batch = next(iter(loader))["image"]
    assert tuple(batch.shape) == (2, 3, H, W)
    assert torch.equal(batch[0], batch[1])  # same pixels written in both formats


def test_to_rgb_composites_transparency_on_white():
    pixel = Image.new("RGBA", (1, 1), (100, 50, 0, 128))
    # 100 * 128/255 + 255 * 127/255 = 177.2; 50 * 128/255 + 127 = 152.1; 0 + 127 = 127
    assert to_rgb(pixel).getpixel((0, 0)) == (177, 152, 127)
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)


def _write_mask(kind: str, folder: Path) -> tuple[Path, np.ndarray]:
    labels = np.zeros((H, W), np.uint8)
    labels[2:7, 3:9] = 255
    if kind == "png_binary":
        path = folder / "m.png"
        Image.fromarray(labels).save(path)
        return path, labels
    if kind == "png_palette":
        path = folder / "m_palette.png"
        indices = (labels // 255 * 2).astype(np.uint8)
        mask = Image.fromarray(indices, mode="P")
        mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
        mask.save(path)
        return path, indices  # palette indices, not colours
    if kind == "png_rgb_equal":
        path = folder / "m_rgb.png"
        Image.fromarray(np.dstack([labels] * 3)).save(path)
        return path, labels
    if kind == "png_1bit":
        path = folder / "m_1bit.png"
        Image.fromarray(labels > 0).save(path)
        return path, labels
    if kind == "png_16bit_instances":
        path = folder / "m_inst.png"
        instances = np.zeros((H, W), np.uint16)
        instances[1:4, 1:4] = 1
        instances[6:10, 10:15] = 300
        Image.fromarray(instances).save(path)
        return path, instances
    if kind == "bmp":
        path = folder / "m.bmp"
        Image.fromarray(labels).save(path)
        return path, labels
    if kind == "tiff_binary":
        path = folder / "m.tif"
        tifffile.imwrite(path, labels)
        return path, labels
    if kind == "tiff_instances":
        path = folder / "m_inst.tiff"
        instances = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 100
        tifffile.imwrite(path, instances)
        return path, instances
    if kind == "tiff_rgb_equal":
        path = folder / "m_rgb.tif"
        tifffile.imwrite(path, np.dstack([labels] * 3), photometric="rgb")
        return path, labels
    raise AssertionError(kind)


MASK_KINDS = [
    "png_binary",
    "png_palette",
    "png_rgb_equal",
    "png_1bit",
    "png_16bit_instances",
    "bmp",
    "tiff_binary",
    "tiff_instances",
    "tiff_rgb_equal",
]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_readers_keep_the_stored_values(kind, tmp_path):
    path, expected = _write_mask(kind, tmp_path)
    mask = _load(path, mask_readers())
    assert tuple(mask.shape) == (1, H, W)
    assert mask.meta["original_channel_dim"] == "no_channel"
    assert np.array_equal(mask[0].numpy(), expected.astype(np.float32))


def test_colour_mask_with_different_channels_is_refused(tmp_path):
    path = tmp_path / "colour_mask.png"
    colours = np.zeros((H, W, 3), np.uint8)
    colours[2:5, 2:5] = (255, 0, 0)
    Image.fromarray(colours).save(path)
    error = _input_error(lambda: _load(path, mask_readers()))
    assert str(path) in str(error) and "differ" in str(error)
    tif = tmp_path / "colour_mask.tif"
    tifffile.imwrite(tif, colours, photometric="rgb")
    assert str(tif) in str(_input_error(lambda: _load(tif, mask_readers())))
    assert to_label_image(Image.fromarray(np.dstack([colours[..., 0]] * 3))).mode == "L"


@pytest.mark.parametrize("suffix", ["png", "jpg", "bmp", "tif"])
def test_truncated_or_garbage_files_end_in_one_line_error_naming_the_file(suffix, tmp_path):
    good = tmp_path / f"good.{suffix}"
    Image.fromarray(_rgb()).save(good) if suffix != "tif" else tifffile.imwrite(good, _rgb(), photometric="rgb")
    data = good.read_bytes()
    truncated = tmp_path / f"truncated.{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / f"garbage.{suffix}"
    garbage.write_bytes(b"this is not an image")
    for readers in (image_readers(), mask_readers()):
        for path in (truncated, garbage):
            error = _input_error(lambda p=path, r=readers: _load(p, r))
            assert str(path) in str(error)


def test_missing_and_unsupported_files_are_input_errors(tmp_path):
    missing = tmp_path / "missing.png"
    assert str(_input_error(lambda: _load(missing, image_readers()))) == f"image file {missing} does not exist"
    gif = tmp_path / "x.gif"
    Image.fromarray(_rgb()).save(gif)
    error = _input_error(lambda: _load(gif, mask_readers()))
    assert str(gif) in str(error) and "unsupported type '.gif'" in str(error)


def test_tiff_reader_contract_and_layouts(tmp_path):
    reader = TiffReader(rgb=False)
    assert reader.verify_suffix("a.TIF") and reader.verify_suffix(["a.tif", "b.tiff"])
    assert not reader.verify_suffix("a.png")
    with pytest.raises(ValueError):
        reader.read("a.png")  # lets LoadImage move on to another reader
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((6, H, W), np.uint8))  # six pages: not a 2D image
    with pytest.raises(BundleInputError, match="stack.tif"):
        reader.get_data(reader.read(str(stack)))
    labels = np.arange(H * W, dtype=np.uint16).reshape(H, W)
    single = tmp_path / "single.tif"
    tifffile.imwrite(single, labels[None, None])  # size-1 axes are squeezed
    array, meta = reader.get_data(reader.read(str(single)))
    assert array.dtype == np.uint16 and np.array_equal(array, labels)
    assert meta["spatial_shape"].tolist() == [H, W] and meta["mode"] == "I;16"


def test_palette_tiff_is_read_through_its_colour_map(tmp_path):
    indices = (np.arange(H * W) % 3).astype(np.uint8).reshape(H, W)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1] = (65535, 0, 0)  # index 1 -> red
    colormap[:, 2] = (0, 0, 65535)  # index 2 -> blue
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, indices, photometric="palette", colormap=colormap)
    reader = TiffReader(rgb=True)
    array, _ = reader.get_data(reader.read(str(path)))
    assert array.shape == (H, W, 3) and array.dtype == np.uint8
    assert np.array_equal(array[indices == 1], np.tile([255, 0, 0], ((indices == 1).sum(), 1)))
    assert np.array_equal(array[indices == 2], np.tile([0, 0, 255], ((indices == 2).sum(), 1)))
    assert not array[indices == 0].any()


def test_reader_read_never_fails_so_load_image_cannot_fall_back(tmp_path):
    reader = ImageFileReader(rgb=True)
    pending = reader.read(str(tmp_path / "anything.xyz"))  # decoding (and failing) happens in get_data
    with pytest.raises(BundleInputError, match="unsupported type"):
        reader.get_data(pending)


# ----------------------------------------------------------------------------------------------------- masks


def _mask_tensor(values: np.ndarray, name: str = "/data/masks/a.png") -> MetaTensor:
    return MetaTensor(torch.as_tensor(values, dtype=torch.float32)[None], meta={"filename_or_obj": name})


def test_mask_to_class_nonzero_binary_and_instances():
    binary = np.array([[0, 255, 255], [0, 0, 255]])
    out = MaskToClassd("label")({"label": _mask_tensor(binary)})["label"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.int64
    assert out.meta["filename_or_obj"] == "/data/masks/a.png"
    assert out[0].tolist() == [[0, 1, 1], [0, 0, 1]]
    instances = np.array([[0, 1, 2], [7, 0, 300]])
    assert MaskToClassd("label")({"label": _mask_tensor(instances)})["label"][0].tolist() == [[0, 1, 1], [1, 0, 1]]


def test_mask_to_class_values_mode():
    mask = np.array([[0, 128, 255], [255, 128, 0]])
    out = MaskToClassd("label", mode="values", class_values=[0, 128, 255])({"label": _mask_tensor(mask)})["label"]
    assert out[0].tolist() == [[0, 1, 2], [2, 1, 0]]


def test_mask_to_class_unexpected_values_name_the_file_and_list_five():
    mask = np.array([[0, 255, 3, 5, 7], [9, 11, 13, 3, 255]])
    transform = MaskToClassd("label", mode="values", class_values=[0, 255])
    with pytest.raises(BundleInputError) as info:
        transform({"label": _mask_tensor(mask, "/data/masks/b.png")})
    assert str(info.value) == (
        "mask /data/masks/b.png has 6 unexpected value(s) 3, 5, 7, 9, 11, ... (7 pixels); class_values are 0, 255"
    )


def test_mask_to_class_reduces_equal_colour_channels_and_refuses_others():
    grey = np.array([[0, 255], [255, 0]])
    colour = MetaTensor(torch.as_tensor(np.stack([grey] * 3), dtype=torch.float32))
    assert tuple(MaskToClassd("label")({"label": colour})["label"].shape) == (1, 2, 2)
    colour[1, 0, 0] = 7
    with pytest.raises(BundleInputError, match="channels that differ"):
        MaskToClassd("label")({"label": colour})


def test_mask_to_class_threshold_mode_binarises_anti_aliased_edges():
    grey = np.array([[0, 3, 127, 128], [200, 255, 90, 254]])
    out = MaskToClassd("label", mode="threshold")({"label": _mask_tensor(grey)})["label"]
    assert out.dtype == torch.int64 and out.meta["filename_or_obj"] == "/data/masks/a.png"
    assert out[0].tolist() == [[0, 0, 0, 1], [1, 1, 0, 1]]
    lower = MaskToClassd("label", mode="threshold", threshold=50)({"label": _mask_tensor(grey)})["label"]
    assert lower[0].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    # the default mode is unchanged: every non-zero value is foreground
    assert MaskToClassd("label")({"label": _mask_tensor(grey)})["label"][0].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "other"},
        {"mode": "values"},
        {"mode": "values", "class_values": [0, 0, 255]},
        {"mode": "threshold", "threshold": "127"},
        {"mode": "threshold", "threshold": float("nan")},
    ],
)
def test_mask_to_class_bad_options(options):
    with pytest.raises(BundleInputError):
        MaskToClassd("label", **options)


# ----------------------------------------------------------------------------------------------------- stain / colour


def _stain_image(seed: int = 0, size: int = 24) -> np.ndarray:
    """RGB (H, W, 3) in (0, 1] made from non-negative stain amounts, so skimage's clipping of stains is inactive."""
    stains = np.random.default_rng(seed).uniform(0.0, 0.08, (size, size, 3))
    return hed2rgb(stains)


def test_hed_jitter_identity_is_exact():
    image = torch.rand(3, 64, 48, dtype=torch.float64).clamp_min(1e-3)
    out = hed_jitter(image, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert torch.allclose(out, image, atol=1e-10)
    # skimage agrees for the identity round trip
    rgb = _stain_image()
    assert np.allclose(hed2rgb(rgb2hed(rgb)), rgb, atol=1e-10)


def test_hed_jitter_matches_skimage_for_known_factors():
    rgb = _stain_image(1)
    scale = np.array([1.04, 0.96, 1.02])
    shift = np.array([0.03, -0.02, 0.01])  # natural optical density units
    expected = hed2rgb(rgb2hed(rgb) * scale + shift / -np.log(1e-6))
    out = hed_jitter(torch.as_tensor(rgb).permute(2, 0, 1), scale, shift).permute(1, 2, 0).numpy()
    assert np.allclose(out, expected, atol=1e-10)
    assert np.abs(out - rgb).max() > 0.01  # the factors do change the colours


def test_rand_hed_jitter_draws_within_bounds_and_keeps_meta():
    image = MetaTensor(torch.as_tensor(_stain_image(2), dtype=torch.float32).permute(2, 0, 1), meta={"k": "v"})
    transform = RandHEDJitterd("image", prob=1.0, alpha=0.05, beta=0.05).set_random_state(3)
    out = transform({"image": image})["image"]
    drawn = transform.transform
    assert np.all(np.abs(drawn.scale - 1) <= 0.05) and np.all(np.abs(drawn.shift) <= 0.05)
    assert isinstance(out, MetaTensor) and out.meta["k"] == "v" and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    expected = hed_jitter(image.as_tensor(), drawn.scale, drawn.shift)
    assert torch.allclose(out.as_tensor(), expected)
    assert torch.equal(RandHEDJitterd("image", prob=0.0)({"image": image})["image"], image)
    rerun = RandHEDJitterd("image", prob=1.0, alpha=0.05, beta=0.05).set_random_state(3)({"image": image})["image"]
    assert torch.equal(out, rerun)


def _colour_image(seed: int = 0) -> MetaTensor:
    generator = torch.Generator().manual_seed(seed)
    image = MetaTensor(torch.rand(3, 20, 24, generator=generator), meta={"filename_or_obj": "/x/a.png"})
    image.push_applied_operation({"class": "RandFlip"})  # the geometric history must survive colour ops
    return image


@pytest.mark.parametrize(
    "transform",
    [
        RandColorJitterd("image", prob=1.0),
        RandGrayscaled("image", prob=1.0),
        RandHEDJitterd("image", prob=1.0),
        RandGaussianBlurd("image", prob=1.0),
    ],
    ids=["colour_jitter", "grayscale", "hed", "blur"],
)
def test_colour_ops_keep_shape_range_meta_and_follow_set_random_state(transform):
    image = _colour_image()
    outputs = []
    for seed in (5, 5, 6):
        outputs.append(copy.deepcopy(transform).set_random_state(seed)({"image": image})["image"])
    out = outputs[0]
    assert isinstance(out, MetaTensor) and tuple(out.shape) == (3, 20, 24) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == "/x/a.png" and len(out.applied_operations) == 1
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, image)
    assert torch.equal(outputs[0], outputs[1])
    if not isinstance(transform, RandGrayscaled):  # grayscale has no parameters to draw
        assert not torch.equal(outputs[0], outputs[2])


def test_colour_ops_with_zero_strength_are_the_identity():
    image = _colour_image()
    zero = RandColorJitterd("image", brightness=0, contrast=0, saturation=0, hue=0, prob=1.0)
    assert torch.equal(zero({"image": image})["image"], image)
    unjittered = RandHEDJitterd("image", prob=1.0, alpha=0, beta=0)({"image": image})["image"]
    assert torch.allclose(unjittered, image, atol=2e-5)  # float32 log/exp round trip
    for transform in (RandColorJitterd("image", prob=0), RandGrayscaled("image", prob=0)):
        assert torch.equal(transform({"image": image})["image"], image)


def test_colour_jitter_factors_follow_torchvision_rules():
    image = _colour_image()
    half = RandColorJitterd("image", brightness=(0.5, 0.5), contrast=0, saturation=0, hue=0, prob=1.0)
    assert torch.allclose(half({"image": image})["image"], image * 0.5)
    jitter = RandColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25, prob=1.0).set_random_state(0)
    for _ in range(50):
        jitter.randomize()
        brightness, contrast, saturation, hue = jitter.factors
        assert 0.5 <= brightness <= 1.5 and 0.5 <= contrast <= 1.5 and 0.5 <= saturation <= 1.5
        assert -0.25 <= hue <= 0.25
        assert sorted(jitter.order) == [0, 1, 2, 3]
    with pytest.raises(BundleInputError, match="hue"):
        RandColorJitter(hue=0.7)


def test_grayscale_is_luminance_on_three_channels():
    image = _colour_image()
    out = RandGrayscaled("image", prob=1.0)({"image": image})["image"]
    luminance = 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    for channel in range(3):
        assert torch.allclose(out[channel].as_tensor(), luminance.as_tensor(), atol=1e-6)


def test_blur_keeps_constant_images_where_monai_smoothing_darkens_the_border():
    constant = MetaTensor(torch.full((3, 32, 40), 0.8))
    blurred = RandGaussianBlurd("image", sigma=(2.0, 2.0), prob=1.0)({"image": constant})["image"]
    assert torch.allclose(blurred.as_tensor(), constant.as_tensor(), atol=1e-6)
    # MONAI's RandGaussianSmoothd also works on [3, H, W] 2D images, but zero-pads: corners drop from 0.8 to ~0.29
    smooth = RandGaussianSmoothd("image", sigma_x=(2.0, 2.0), sigma_y=(2.0, 2.0), prob=1.0)({"image": constant})
    assert tuple(smooth["image"].shape) == (3, 32, 40)
    assert float(smooth["image"][0, 0, 0]) < 0.3 and abs(float(smooth["image"][0, 16, 20]) - 0.8) < 1e-4
    # a blur spreads an impulse symmetrically and keeps its mass away from the border
    impulse = torch.zeros(3, 32, 40)
    impulse[:, 16, 20] = 1.0
    spread = RandGaussianBlurd("image", sigma=(1.0, 1.0), prob=1.0)({"image": MetaTensor(impulse)})["image"]
    assert abs(float(spread[0].sum()) - 1.0) < 1e-5 and float(spread[0, 16, 20]) < 0.2
    assert torch.allclose(spread[0, 15, 20], spread[0, 17, 20]) and torch.allclose(spread[0, 16, 19], spread[0, 16, 21])


# ------------------------------------------------------------------------------------------------- zoom and crop


def _ramp(height: int, width: int) -> MetaTensor:
    """Channel 0 is the row number, channel 1 the column number."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return MetaTensor(torch.stack([rows, cols]).float())


def test_zoom_crop_at_zoom_one_is_a_plain_crop_and_every_key_gets_the_same_window():
    image, label = _ramp(40, 50), MetaTensor((torch.arange(40 * 50).reshape(1, 40, 50) % 2).long())
    crop = RandZoomCropd(["image", "label"], roi_size=(16, 24), mode=["bilinear", "nearest-exact"])
    for seed in range(5):
        out = crop.set_random_state(seed)({"image": image, "label": label})
        top, left = int(out["image"][0, 0, 0]), int(out["image"][1, 0, 0])
        assert torch.equal(out["image"].as_tensor(), image[:, top : top + 16, left : left + 24].as_tensor())
        assert torch.equal(out["label"].as_tensor(), label[:, top : top + 16, left : left + 24].as_tensor())


def test_zoom_crop_scales_by_the_zoom_factor():
    """A ramp of slope 1 comes out with slope 1 / zoom: 0.5 at zoom 2, 2 at zoom 0.5 (bilinear, away from borders)."""
    for zoom, slope in ((2.0, 0.5), (0.5, 2.0)):
        crop = RandZoomCropd("image", roi_size=(16, 16), min_zoom=zoom, max_zoom=zoom)
        out = crop.set_random_state(1)({"image": _ramp(200, 200)})["image"]
        assert tuple(out.shape) == (2, 16, 16)
        torch.testing.assert_close(out[0, 2:-2, 5].diff(), torch.full((11,), slope), atol=1e-4, rtol=0)
        torch.testing.assert_close(out[1, 5, 2:-2].diff(), torch.full((11,), slope), atol=1e-4, rtol=0)


def test_zoom_crop_pads_small_images_symmetrically():
    small = torch.arange(30, dtype=torch.float32).reshape(1, 5, 6)
    out = RandZoomCropd("image", roi_size=(9, 10))({"image": MetaTensor(small)})["image"]
    expected = np.pad(small.numpy(), ((0, 0), (2, 2), (2, 2)), mode="symmetric")
    assert np.array_equal(out.numpy(), expected)
    tiny = RandZoomCropd("image", roi_size=(8, 8), min_zoom=20.0, max_zoom=20.0)(
        {"image": MetaTensor(torch.ones(3, 1, 1))}
    )
    assert tuple(tiny["image"].shape) == (3, 8, 8) and bool((tiny["image"] == 1).all())


def test_zoom_crop_settings_are_checked():
    with pytest.raises(BundleInputError, match="zoom_range must satisfy 0 < min <= max"):
        RandZoomCropd("image", roi_size=(8, 8), min_zoom=1.5, max_zoom=0.5)
    with pytest.raises(BundleInputError, match="patch_size must be two positive sizes"):
        RandZoomCropd("image", roi_size=(8, 0))


# ----------------------------------------------------------------------------------------------------- pipeline

PATCH = [96, 96]


def weak_transforms(image_keys: list[str], label_keys: list[str], patch: list[int]) -> list[dict]:
    """The weak (geometric) training chain as MONAI config JSON, as in ``configs/train.json``."""
    keys = image_keys + label_keys
    chain = [
        {
            "_target_": "LoadImaged",
            "keys": image_keys,
            "reader": "$bundle.data.readers.image_readers()",
            "image_only": True,
        },
    ]
    if label_keys:
        chain.append(
            {
                "_target_": "LoadImaged",
                "keys": label_keys,
                "reader": "$bundle.data.readers.mask_readers()",
                "image_only": True,
            }
        )
    chain.append({"_target_": "EnsureChannelFirstd", "keys": keys})
    if label_keys:
        chain.append({"_target_": "bundle.data.transforms.MaskToClassd", "keys": label_keys, "mode": "nonzero"})
    chain += [
        {
            "_target_": "ScaleIntensityRanged",
            "keys": image_keys,
            "a_min": 0.0,
            "a_max": 255.0,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
        {
            "_target_": "bundle.data.transforms.RandZoomCropd",
            "keys": keys,
            "roi_size": patch,
            "min_zoom": 0.5,
            "max_zoom": 2.0,
            "mode": ["bilinear"] * len(image_keys) + ["nearest-exact"] * len(label_keys),
        },
        {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 0},
        {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 1},
        {"_target_": "RandRotate90d", "keys": keys, "prob": 0.5, "max_k": 3},
    ]
    if label_keys:
        chain.append({"_target_": "EnsureTyped", "keys": label_keys, "dtype": "$torch.int64"})
    return chain


def strong_transforms(weak_key: str = "image", blur: bool = True, hed: bool = True) -> list[dict]:
    """Two strong views copied from the weak one, each with its own colour transforms (independent draws)."""
    chain: list[dict] = [{"_target_": "CopyItemsd", "keys": weak_key, "times": 2, "names": ["image_s1", "image_s2"]}]
    for view in ("image_s1", "image_s2"):
        if hed:
            chain.append(
                {
                    "_target_": "bundle.data.transforms.RandHEDJitterd",
                    "keys": view,
                    "prob": 0.5,
                    "alpha": 0.05,
                    "beta": 0.05,
                }
            )
        chain += [
            {
                "_target_": "bundle.data.transforms.RandColorJitterd",
                "keys": view,
                "brightness": 0.5,
                "contrast": 0.5,
                "saturation": 0.5,
                "hue": 0.25,
                "prob": 0.8,
            },
            {"_target_": "bundle.data.transforms.RandGrayscaled", "keys": view, "prob": 0.2},
        ]
        if blur:
            chain.append(
                {"_target_": "bundle.data.transforms.RandGaussianBlurd", "keys": view, "sigma": [0.1, 2.0], "prob": 0.5}
            )
    return chain


def build(chain: list[dict]) -> Compose:
    parser = ConfigParser({"transforms": chain}, globals={"bundle": "bundle", "torch": "torch"})
    return Compose(parser.get_parsed_content("transforms"))


def assert_same_geometry(*tensors: MetaTensor) -> None:
    first = tensors[0]
    for other in tensors[1:]:
        assert other.shape[1:] == first.shape[1:]
        assert torch.allclose(other.affine, first.affine)


def _synthetic_case(folder: Path, seed: int) -> dict:
    """An image whose channels are all ``mask * 255`` (black/white) and its mask, as PNG files."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:70, 0:110]
    mask = np.zeros((70, 110), np.uint8)
    for _ in range(4):
        cy, cx, r = rng.integers(0, 70), rng.integers(0, 110), rng.integers(6, 20)
        mask[(yy - cy) ** 2 + ((xx - cx) * 0.7) ** 2 < r**2] = 255
    mask[5:12, 80:100] = 255  # straight edges too
    image_path, mask_path = folder / f"syn_{seed}.png", folder / f"syn_{seed}_mask.png"
    Image.fromarray(np.dstack([mask] * 3)).save(image_path)
    Image.fromarray(mask).save(mask_path)
    return {"image": str(image_path), "label": str(mask_path)}


def test_weak_chain_keeps_synthetic_image_and_label_aligned(tmp_path):
    chain = build(weak_transforms(["image"], ["label"], PATCH))
    for case_seed in range(3):
        case = _synthetic_case(tmp_path, case_seed)
        for seed in range(12):
            out = chain.set_random_state(seed)(dict(case))
            image, label = out["image"], out["label"]
            assert tuple(image.shape) == (3, *PATCH) and tuple(label.shape) == (1, *PATCH)
            assert label.dtype == torch.int64 and set(torch.unique(label).tolist()) <= {0, 1}
            assert_same_geometry(image, label)
            decoded = (image[0] > 0.5).to(torch.int64)
            wrong = (decoded != label[0]) & ~boundary(label)
            assert int(wrong.sum()) == 0, f"case {case_seed}, seed {seed}: {int(wrong.sum())} misaligned pixels"


def test_plain_nearest_label_interpolation_is_misaligned_with_bilinear_images():
    """Why the chain uses ``nearest-exact`` for labels: torch's ``nearest`` shifts labels by up to half a pixel
    relative to ``bilinear`` images, so many more boundary pixels disagree."""
    yy, xx = np.mgrid[0:120, 0:150]
    mask = (((yy - 60) ** 2 + (xx - 70) ** 2) < 40**2).astype(np.float32)
    data = {"image": MetaTensor(torch.as_tensor(mask)[None]), "label": MetaTensor(torch.as_tensor(mask)[None])}
    counts = {"nearest": 0, "nearest-exact": 0}
    for mode in counts:
        for factor in (0.63, 0.77):
            zoom = build(
                [
                    {
                        "_target_": "RandZoomd",
                        "keys": ["image", "label"],
                        "prob": 1.0,
                        "min_zoom": factor,
                        "max_zoom": factor,
                        "keep_size": False,
                        "mode": ["bilinear", mode],
                    }
                ]
            )
            out = zoom(dict(data))
            counts[mode] += int(((out["image"][0] > 0.5).float() != out["label"][0]).sum())
    assert counts["nearest"] > 4 * counts["nearest-exact"] + 20, counts


def test_reflect_padding_fails_on_small_images_where_symmetric_works():
    """Why the chain pads with ``symmetric``: MONAI sends ``reflect`` to torch, which needs pad < image size (a zoomed
    out image smaller than a third of the patch fails); ``symmetric`` goes through numpy and pads any amount."""
    small = {"image": MetaTensor(torch.rand(3, 20, 25)), "label": MetaTensor(torch.ones(1, 20, 25))}
    with pytest.raises(RuntimeError):
        build([{"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": [64, 64], "mode": "reflect"}])(
            dict(small)
        )
    out = build(
        [{"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": [64, 64], "mode": "symmetric"}]
    )(dict(small))
    assert tuple(out["image"].shape) == (3, 64, 64) and bool((out["label"] == 1).all())


def test_weak_and_strong_chain_on_real_glas_stays_aligned(glas_dir):
    name = "train_17"
    image_path, mask_path = glas_dir / "images" / f"{name}.png", glas_dir / "masks" / f"{name}.png"
    # "code" is the mask read as an RGB image: it rides along with the real image through the same transforms
    chain = build(weak_transforms(["image", "code"], ["label"], [256, 256]) + strong_transforms("image"))
    original = np.asarray(Image.open(image_path))
    loaded = _load(image_path, image_readers())
    assert np.array_equal(loaded.numpy().transpose(1, 2, 0), original)  # row/column order, not transposed
    strong_differs = 0
    for seed in range(8):
        out = chain.set_random_state(seed)({"image": str(image_path), "code": str(mask_path), "label": str(mask_path)})
        image, code, label = out["image"], out["code"], out["label"]
        assert tuple(image.shape) == (3, 256, 256) and tuple(label.shape) == (1, 256, 256)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert_same_geometry(image, code, label, out["image_s1"], out["image_s2"])
        assert len(out["image_s1"].applied_operations) == len(image.applied_operations)
        wrong = ((code[0] > 0.5).to(torch.int64) != label[0]) & ~boundary(label)
        assert int(wrong.sum()) == 0
        strong_differs += int(not torch.equal(out["image_s1"], out["image_s2"]))
    assert strong_differs >= 6  # each view has its own colour draws


def _pointwise(weak: torch.Tensor, strong: torch.Tensor) -> bool:
    """True when ``strong`` is a per-pixel function of ``weak``: equal weak colours map to equal strong colours."""
    colours, groups = torch.unique(weak.reshape(3, -1).T, dim=0, return_inverse=True)
    values = strong.reshape(3, -1).T
    index = groups[:, None].expand(-1, 3)
    high = torch.full((len(colours), 3), -math.inf).scatter_reduce(0, index, values, "amax")
    low = torch.full((len(colours), 3), math.inf).scatter_reduce(0, index, values, "amin")
    return bool((high - low).max() < 1e-5)


def _block_image(folder: Path) -> str:
    """A PNG of 8x8-pixel blocks in six colours: after zoom most pixels still share a colour with distant pixels."""
    rng = np.random.default_rng(0)
    palette = rng.integers(20, 236, (6, 3), dtype=np.uint8)
    blocks = rng.integers(0, 6, (12, 16))
    path = folder / "blocks.png"
    Image.fromarray(palette[np.kron(blocks, np.ones((8, 8), dtype=np.int64))]).save(path)
    return str(path)


def test_strong_views_differ_from_the_weak_view_only_in_colour(tmp_path):
    chain = build(weak_transforms(["image"], [], PATCH) + strong_transforms("image", blur=False))
    changed = 0
    for seed in range(10):
        out = chain.set_random_state(seed)({"image": _block_image(tmp_path)})
        weak = out["image"].as_tensor()
        _, counts = torch.unique(weak.reshape(3, -1).T, dim=0, return_counts=True)
        assert int(counts[counts > 1].sum()) > weak[0].numel() // 3  # enough repeated colours to test
        for view in ("image_s1", "image_s2"):
            strong = out[view]
            assert_same_geometry(out["image"], strong)
            assert _pointwise(weak, strong.as_tensor())
            changed += int(not torch.equal(strong.as_tensor(), weak))
        # a moved copy is not a per-pixel function of the weak view: the check can fail
        assert not _pointwise(weak, torch.roll(weak, shifts=3, dims=2))
    assert changed >= 12


def test_strong_views_with_blur_keep_the_encoded_mask_in_place(tmp_path):
    case = _synthetic_case(tmp_path, 7)
    chain = build(weak_transforms(["image"], ["label"], PATCH) + strong_transforms("image"))
    for seed in range(10):
        out = chain.set_random_state(seed)(dict(case))
        label = out["label"][0]
        far = ~boundary(out["label"], width=7)  # 3 * max sigma (2) + interpolation border
        if not bool((label[far] == 1).any() and (label[far] == 0).any()):
            continue
        for view in ("image_s1", "image_s2"):
            grey = out[view].mean(0)
            foreground, background = grey[far & (label == 1)], grey[far & (label == 0)]
            assert float(foreground.min()) > float(background.max())  # black/white order survives every colour op
            threshold = (float(foreground.min()) + float(background.max())) / 2
            assert torch.equal((grey > threshold)[far], (label == 1)[far])


def test_copy_items_makes_independent_views():
    image = MetaTensor(torch.rand(3, 8, 8), meta={"filename_or_obj": "a"})
    out = build([{"_target_": "CopyItemsd", "keys": "image", "times": 2, "names": ["image_s1", "image_s2"]}])(
        {"image": image}
    )
    out["image_s1"].add_(1.0)
    assert torch.equal(out["image_s2"], image) and out["image_s2"].meta["filename_or_obj"] == "a"


def test_reader_error_inside_the_pipeline_names_the_file(tmp_path):
    case = _synthetic_case(tmp_path, 0)
    Path(case["label"]).write_bytes(b"broken")
    error = _input_error(lambda: build(weak_transforms(["image"], ["label"], PATCH))(dict(case)))
    assert str(error).startswith(f"cannot read mask file {case['label']}: ")
