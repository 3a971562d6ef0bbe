"""Small copies of the real dataset layouts (folder and file names, formats) for the preparation tests.

Images are smaller than the real ones except where the size matters (one 2048x2048 KPI patch for tiling); the
label quirks are reproduced: anti-aliased EBHI-Seg label edges, JPEG noise in KPI masks, Aperio XML for MoNuSeg.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw

from bundle.prepare import main

EBHI_FOLDER = "EBHI-SEG"
# images with a label per class, and the names of images without one
EBHI_COUNTS = {
    "Normal": 5,
    "Polyp": 6,
    "Low-grade IN": 7,
    "High-grade IN": 5,
    "Serrated adenoma": 4,
    "Adenocarcinoma": 8,
}
EBHI_UNLABELLED = {"Polyp": ["GT2012-0099-400-050"], "Low-grade IN": ["GT2013-0042-400-051"]}
KPI_TRAINING = "KPIs24 Training Data/Task1_patch_level/train"
KPI_VALIDATION = "KPIs24 Validation Data/Task1_patch_level/validation"
KPI_TESTING = "KPIs24 Testing Data/Task1_patch_level/test"
MONUSEG_TRAINING = "MoNuSeg 2018 Training Data"
MONUSEG_TEST = "MoNuSegTestData"


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    entries = {".": (0, folder.stat().st_mtime_ns)}
    for path in folder.rglob("*"):
        stat = path.lstat()
        entries[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return entries


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_datalist(folder: Path) -> dict:
    return json.loads((folder / "datalist.json").read_text())


def tissue(size: tuple[int, int], seed: int) -> np.ndarray:
    """An RGB (height, width, 3) uint8 image with smooth pink/purple tissue-like colour (compresses fast)."""
    height, width = size
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    columns = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    base = np.array([200, 120, 170], dtype=np.float32) + rng.uniform(-30, 30, 3).astype(np.float32)
    wave = 25 * np.sin(6 * rows + rng.uniform(0, 3)) * np.cos(5 * columns + rng.uniform(0, 3))
    return np.clip(base + wave[..., None], 0, 255).astype(np.uint8)


def anti_aliased_blob(size: tuple[int, int], seed: int, factor: int = 4) -> np.ndarray:
    """A grey 0/255 mask of two ellipses with anti-aliased edges (drawn ``factor`` times larger, box-downsampled)."""
    height, width = size
    rng = np.random.default_rng(seed)
    large = Image.new("L", (width * factor, height * factor), 0)
    draw = ImageDraw.Draw(large)
    for _ in range(2):
        x, y = rng.uniform(0.15, 0.6, 2) * np.array([width, height]) * factor
        w, h = rng.uniform(0.25, 0.4, 2) * np.array([width, height]) * factor
        draw.ellipse([x, y, x + w, y + h], fill=255)
    return np.asarray(large.resize((width, height), Image.Resampling.BOX))


def write_ebhi(root: Path, size: int = 32, counts: dict[str, int] | None = None) -> Path:
    """``root/EBHI-SEG/<class>/image/*.png`` (RGB) with ``label/*.png`` (grey, anti-aliased); returns the class root."""
    data = root / EBHI_FOLDER
    seed = 0
    for part, count in (counts or EBHI_COUNTS).items():
        (data / part / "image").mkdir(parents=True)
        (data / part / "label").mkdir()
        names = [f"GT2012-{index:04d}-400-{index:03d}" for index in range(1, count + 1)]
        for name in names + EBHI_UNLABELLED.get(part, []):
            seed += 1
            Image.fromarray(tissue((size, size), seed)).save(data / part / "image" / f"{name}.png")
            if name in names:
                Image.fromarray(anti_aliased_blob((size, size), seed)).save(data / part / "label" / f"{name}.png")
    return data


def kpi_mask(size: tuple[int, int], seed: int) -> np.ndarray:
    """A 0/255 mask of a few round glomeruli."""
    height, width = size
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(3):
        radius = rng.uniform(0.05, 0.15) * min(size)
        x, y = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
    return np.asarray(mask)


def write_kpi_patch(slide_folder: Path, name: str, size: tuple[int, int], seed: int, with_mask: bool = True) -> None:
    """``<slide>/img/<name>_img.jpg`` and ``<slide>/mask/<name>_mask.jpg`` (JPEG, so the mask has JPEG noise)."""
    (slide_folder / "img").mkdir(parents=True, exist_ok=True)
    (slide_folder / "mask").mkdir(exist_ok=True)
    Image.fromarray(tissue(size, seed)).save(slide_folder / "img" / f"{name}_img.jpg", quality=90)
    if with_mask:
        Image.fromarray(kpi_mask(size, seed)).save(slide_folder / "mask" / f"{name}_mask.jpg", quality=75)


KPI_DISEASES = ("56Nx", "DN", "NEP25", "normal")
KPI_UNMASKED = "normal/11_131/normal_11_131_4096_12288"  # a training patch without a mask


def kpi_slide(split_index: int, disease: str, slide_index: int) -> str:
    """Slide folder names like the release's ``12_116``: unique over splits and diseases."""
    return f"{11 + split_index}_{100 + 10 * KPI_DISEASES.index(disease) + slide_index}"


def write_kpi(root: Path, size: int = 64, test: bool = True) -> Path:
    """Training (two slides per disease, three for DN, two patches each), validation and test folders (one slide per
    disease) as in the KPIs 2024 release; the patch :data:`KPI_UNMASKED` has no mask."""
    seed = 0
    splits = [KPI_TRAINING, KPI_VALIDATION] + ([KPI_TESTING] if test else [])
    for split_index, split in enumerate(splits):
        for disease in KPI_DISEASES:
            slides = 1 if split_index else 3 if disease == "DN" else 2
            for slide_index in range(slides):
                slide = kpi_slide(split_index, disease, slide_index)
                for patch in range(2):
                    seed += 1
                    name = f"{disease}_{slide}_{4096 * patch}_12288"
                    unmasked = f"{disease}/{slide}/{name}" == KPI_UNMASKED
                    write_kpi_patch(root / split / disease / slide, name, (size, size), seed, with_mask=not unmasked)
    return root


def aperio_xml(polygons: list[list[tuple[float, float]]]) -> str:
    """An Aperio ImageScope annotation file (as in MoNuSeg) with one region per polygon of (X, Y) vertices."""
    regions = []
    for index, vertices in enumerate(polygons, start=1):
        points = "\n".join(f'<Vertex X="{x:.6f}" Y="{y:.6f}" Z="0"/>' for x, y in vertices)
        regions.append(
            f'<Region Id="{index}" Type="0" Zoom="0.042148" Selected="0" ImageLocation="" ImageFocus="0" '
            f'Length="73.2" Area="398.1" LengthMicrons="18.5" AreaMicrons="25.3" Text="" NegativeROA="0" '
            f'InputRegionId="0" Analyze="1" DisplayId="{index}">\n<Attributes/>\n<Vertices>\n{points}\n</Vertices>\n'
            "</Region>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Annotations MicronsPerPixel="0.252100">\n'
        '<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" Incremental="0" Type="4" '
        'LineColor="65280" Visible="1" Selected="1" MarkupImagePath="" MacroName="">\n'
        '<Attributes>\n<Attribute Name="Description" Id="0" Value=""/>\n</Attributes>\n'
        "<Regions>\n<RegionAttributeHeaders>\n"
        '<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>\n'
        '<AttributeHeader Id="9997" Name="Length" ColumnWidth="-1"/>\n'
        '<AttributeHeader Id="9996" Name="Area" ColumnWidth="-1"/>\n'
        '<AttributeHeader Id="9998" Name="Text" ColumnWidth="-1"/>\n'
        '<AttributeHeader Id="1" Name="Description" ColumnWidth="-1"/>\n'
        "</RegionAttributeHeaders>\n" + "\n".join(regions) + "\n</Regions>\n<Plots/>\n</Annotation>\n</Annotations>\n"
    )


def nucleus_polygons(seed: int, size: int, count: int = 4) -> list[list[tuple[float, float]]]:
    """``count`` octagonal nuclei (X, Y vertices) inside an image of ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    polygons = []
    for _ in range(count):
        radius = rng.uniform(2.5, 5.0)
        x, y = rng.uniform(radius + 1, size - radius - 1, 2)
        angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
        polygons.append([(x + radius * np.cos(a), y + radius * np.sin(a)) for a in angles])
    return polygons


def write_monuseg_case(image_folder: Path, annotation_folder: Path, name: str, size: int, seed: int) -> None:
    image_folder.mkdir(parents=True, exist_ok=True)
    annotation_folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(image_folder / f"{name}.tif", tissue((size, size), seed), photometric="rgb")
    (annotation_folder / f"{name}.xml").write_text(aperio_xml(nucleus_polygons(seed, size)))


def monuseg_name(index: int) -> str:
    return f"TCGA-{index:02d}-{1000 + index}-01Z-00-DX1"


def write_monuseg(root: Path, train: int = 10, test: int = 4, size: int = 40) -> tuple[Path, Path]:
    """``MoNuSeg 2018 Training Data/{Tissue Images,Annotations}`` and ``MoNuSegTestData`` (tif + xml together)."""
    training, testing = root / MONUSEG_TRAINING, root / MONUSEG_TEST
    for index in range(train):
        write_monuseg_case(training / "Tissue Images", training / "Annotations", monuseg_name(index), size, index)
    for index in range(train, train + test):
        write_monuseg_case(testing, testing, monuseg_name(index), size, index)
    return training, testing


def write_folders(root: Path, labelled: int = 8, unlabelled: int = 3, size: int = 24, suffix: str = "") -> Path:
    """``root/images/case_NN.png`` (RGB) with ``root/masks/case_NN<suffix>.png`` (0/255) for the first ``labelled``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(labelled + unlabelled):
        Image.fromarray(tissue((size, size), index)).save(root / "images" / f"case_{index:02d}.png")
        if index < labelled:
            mask = np.where(anti_aliased_blob((size, size), index) > 127, 255, 0).astype(np.uint8)
            Image.fromarray(mask).save(root / "masks" / f"case_{index:02d}{suffix}.png")
    return root
