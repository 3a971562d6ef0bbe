"""MoNuSeg-style preparation (``python -m bundle.prepare monuseg``): Aperio XML parsing and polygon rasterisation,
instance and binary masks, a separate test source or a seeded test split, mask files instead of XML."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from dataset_fixtures import (
    MONUSEG_TEST,
    MONUSEG_TRAINING,
    aperio_xml,
    monuseg_name,
    read_datalist,
    run_cli,
    snapshot,
    tissue,
    write_monuseg,
)
from PIL import Image

from bundle.errors import BundleInputError
from bundle.prepare.monuseg import (
    build_monuseg_datalist,
    find_monuseg_cases,
    rasterise_annotation,
    read_aperio_polygons,
)
from bundle.prepare.output import GeneratedFolders

LISTS = ("training", "validation", "unlabeled", "test")
SQUARE = [(2.0, 2.0), (6.0, 2.0), (6.0, 6.0), (2.0, 6.0)]  # (X, Y): pixel centres 2..6 on both axes -> 5 x 5


@pytest.fixture(scope="module")
def monuseg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("monuseg_source")
    write_monuseg(root)
    return root


def test_square_polygon_rasterises_to_the_hand_counted_pixels(tmp_path):
    path = tmp_path / "square.xml"
    shifted = [(x + 10.5, y + 0.5) for x, y in SQUARE]  # pixel centres 13..16 (X) and 3..6 (Y) inside -> 4 x 4
    path.write_text(aperio_xml([SQUARE, shifted]))
    polygons, skipped = read_aperio_polygons(str(path))
    assert skipped == [] and [polygon.tolist() for polygon in polygons][0] == [[2, 2], [2, 6], [6, 6], [6, 2]]
    instances = rasterise_annotation(polygons, (20, 10))
    assert instances.dtype == np.uint16 and instances.shape == (10, 20)
    assert np.count_nonzero(instances == 1) == 25 and np.count_nonzero(instances == 2) == 16
    assert (instances[2:7, 2:7] == 1).all() and (instances[3:7, 13:17] == 2).all()
    assert np.count_nonzero(instances) == 41


def test_later_regions_overwrite_earlier_ones_and_outside_vertices_are_clipped():
    polygons = [np.array([[0.0, 0.0], [0, 4], [4, 4], [4, 0]]), np.array([[2.0, 2.0], [2, 9], [9, 9], [9, 2]])]
    instances = rasterise_annotation(polygons, (6, 6))
    assert instances[1, 1] == 1 and instances[3, 3] == 2 and instances[5, 5] == 2
    assert np.count_nonzero(instances == 2) == 16  # rows/columns 2..5 of the 6 x 6 image


def test_degenerate_regions_are_skipped_and_reported(tmp_path, capsys):
    source = tmp_path / "source"
    source.mkdir()
    for index in range(5):
        tifffile.imwrite(source / f"{monuseg_name(index)}.tif", tissue((20, 20), index), photometric="rgb")
        (source / f"{monuseg_name(index)}.xml").write_text(aperio_xml([SQUARE, [(1.0, 1.0), (3.0, 1.0)]]))
    code, _, err = run_cli(
        capsys, "monuseg", "--source", source, "--output", tmp_path / "out", "--labeled-percent", 100
    )
    assert code == 0, err
    first = source / f"{monuseg_name(0)}.xml"
    assert err.splitlines() == [
        f"notice: 5 annotation regions with fewer than 3 vertices were skipped: {first} region 2, "
        f"{source / (monuseg_name(1) + '.xml')} region 2, {source / (monuseg_name(2) + '.xml')} region 2 and 2 more"
    ]


def test_training_and_test_sources_from_the_command_line(monuseg_root, tmp_path, capsys):
    before = snapshot(monuseg_root)
    out = tmp_path / "out"
    training, testing = monuseg_root / MONUSEG_TRAINING, monuseg_root / MONUSEG_TEST
    args = ["monuseg", "--source", training, "--test-source", testing, "--output", out, "--labeled-percent", 30]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and err == ""
    # 10 training images: 1 validation, 3 of the other 9 labelled (2.7), 6 unlabelled; 4 test images
    assert stdout.splitlines()[1:] == [
        "training: 3 images",
        "validation: 1 images",
        "unlabeled: 6 images",
        "test: 4 images",
    ]
    datalist = read_datalist(out)
    assert (datalist["source"], datalist["test_source"]) == (str(training), str(testing))
    assert [item["name"] for item in datalist["test"]] == [monuseg_name(index) for index in range(10, 14)]
    for key in ("training", "validation", "test"):
        for item in datalist[key]:
            assert item["label"] == str(out / "masks" / "binary" / f"{item['name']}.png")
            assert item["instance_label"] == str(out / "masks" / "instances" / f"{item['name']}.png")
            instances = np.asarray(Image.open(item["instance_label"]))
            binary = np.asarray(Image.open(item["label"]))
            assert instances.dtype == np.uint16 and binary.dtype == np.uint8
            assert set(np.unique(instances).tolist()) <= {0, 1, 2, 3, 4} and instances.max() >= 3
            assert np.array_equal(binary, np.where(instances > 0, 255, 0))
            assert instances.shape == (40, 40)
    assert datalist["training"][0]["image"].startswith(str(training / "Tissue Images"))
    assert all(set(item) == {"image", "name"} for item in datalist["unlabeled"])
    assert snapshot(monuseg_root) == before


def test_instance_mask_is_read_back_by_the_bundle_reader(monuseg_root, tmp_path):
    from bundle.data.readers import ImageFileReader

    with GeneratedFolders(str(tmp_path / "out"), ("masks",)) as folders:
        datalist = build_monuseg_datalist(monuseg_root / MONUSEG_TRAINING, folders, labeled_percent=100)
    assert datalist["settings"]["min_object_area"] == 30  # nuclei: the gland model's clean-up would delete them
    item = datalist["training"][0]
    polygons, _ = read_aperio_polygons(str(monuseg_root / MONUSEG_TRAINING / "Annotations" / f"{item['name']}.xml"))
    values, _ = ImageFileReader(rgb=False).load_file(item["instance_label"])
    assert np.array_equal(values, rasterise_annotation(polygons, (40, 40)))


def test_seeded_test_split_without_test_source(monuseg_root, tmp_path, capsys):
    training = monuseg_root / MONUSEG_TRAINING
    outputs = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        args = ["monuseg", "--source", training, "--output", tmp_path / run, "--labeled-percent", 50, "--seed", seed]
        assert run_cli(capsys, *args)[0] == 0
        text = (tmp_path / run / "datalist.json").read_text()
        outputs[run] = json.loads(text.replace(str(tmp_path / run), "OUT"))
    first = outputs["a"]
    assert {key: len(first[key]) for key in LISTS} == {"training": 4, "validation": 1, "unlabeled": 3, "test": 2}
    assert first == outputs["b"] and first["test_fraction"] == 0.2
    names = [item["name"] for key in LISTS for item in first[key]]
    assert sorted(names) == [monuseg_name(index) for index in range(10)]
    assert [item["name"] for item in first["test"]] != [item["name"] for item in outputs["c"]["test"]]


def test_nested_official_folder_and_mask_files_instead_of_xml(tmp_path):
    data = tmp_path / "download" / "nuclei"
    (data / "images").mkdir(parents=True)
    (data / "Masks").mkdir()
    for index in range(6):
        tifffile.imwrite(data / "images" / f"{monuseg_name(index)}.tif", tissue((16, 16), index), photometric="rgb")
        mask = np.zeros((16, 16), dtype=np.uint16)
        mask[2:6, 2:6], mask[8:12, 8:12] = 1, 300
        if index == 5:
            mask = np.where(mask > 0, 255, 0).astype(np.uint8)
        Image.fromarray(mask).save(data / "Masks" / f"{monuseg_name(index)}.png")
    cases = find_monuseg_cases(tmp_path / "download")
    assert [case.mask for case in cases] == [str(data / "Masks" / f"{monuseg_name(i)}.png") for i in range(6)]
    with GeneratedFolders(str(tmp_path / "out"), ("masks",)) as folders:
        datalist = build_monuseg_datalist(tmp_path / "download", folders, labeled_percent=100, test_fraction=0.2)
    items = {item["name"]: item for key in LISTS for item in datalist[key]}
    assert items[monuseg_name(0)]["instance_label"] == items[monuseg_name(0)]["label"]
    assert "instance_label" not in items[monuseg_name(5)]  # a 0/255 mask: objects come from connected components
    assert not (tmp_path / "out" / "masks").exists()


def test_malformed_xml_is_named(tmp_path):
    write_monuseg(tmp_path, train=3, test=0)
    path = tmp_path / MONUSEG_TRAINING / "Annotations" / f"{monuseg_name(1)}.xml"
    path.write_text(aperio_xml([SQUARE])[:-40])
    with pytest.raises(BundleInputError) as error:
        read_aperio_polygons(str(path))
    assert str(error.value).startswith(f"annotation {path} is not valid XML: ")
    with pytest.raises(BundleInputError, match=r"^annotation .*TCGA-01-1001-01Z-00-DX1\.xml is not valid XML"):
        with GeneratedFolders(str(tmp_path / "out"), ("masks",)) as folders:
            build_monuseg_datalist(tmp_path / MONUSEG_TRAINING, folders, labeled_percent=100, val_fraction=0.4)


def test_non_numeric_vertex_and_wrong_root_are_named(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(aperio_xml([SQUARE]).replace('X="6.000000" Y="2.000000"', 'X="six" Y="2.000000"'))
    with pytest.raises(BundleInputError) as error:
        read_aperio_polygons(str(path))
    assert str(error.value) == f"annotation {path}: region 1 has a vertex with X='six'; expected a number"
    path.write_text('<?xml version="1.0"?><annotation><object/></annotation>')
    with pytest.raises(BundleInputError, match=r"has a <annotation> root; expected an Aperio <Annotations> file"):
        read_aperio_polygons(str(path))


def test_annotation_without_image_and_both_xml_and_mask_are_named(tmp_path):
    training, _ = write_monuseg(tmp_path, train=3, test=0)
    orphan = training / "Annotations" / "TCGA-99-0000-01Z-00-DX1.xml"
    orphan.write_text(aperio_xml([SQUARE]))
    with pytest.raises(BundleInputError) as error:
        find_monuseg_cases(training)
    assert str(error.value) == (
        f"annotation {orphan} has no image: expected {training / 'Tissue Images' / 'TCGA-99-0000-01Z-00-DX1'}.tif"
    )
    orphan.unlink()
    (training / "Masks").mkdir()
    mask = training / "Masks" / f"{monuseg_name(2)}.png"
    Image.new("L", (40, 40)).save(mask)
    with pytest.raises(BundleInputError) as error:
        find_monuseg_cases(training)
    assert str(error.value) == (
        f"two annotations for image {training / 'Tissue Images' / (monuseg_name(2) + '.tif')}: "
        f"{training / 'Annotations' / (monuseg_name(2) + '.xml')} and {mask}; keep only one"
    )


def test_test_source_needs_annotations_and_distinct_names(monuseg_root, tmp_path):
    training = monuseg_root / MONUSEG_TRAINING
    with GeneratedFolders(str(tmp_path / "out"), ("masks",)) as folders:
        with pytest.raises(BundleInputError, match=r"^two images named TCGA-00-1000-01Z-00-DX1: "):
            build_monuseg_datalist(training, folders, labeled_percent=50, test_source=training)
    testing = tmp_path / "test"
    testing.mkdir()
    tifffile.imwrite(testing / "TCGA-77-0001-01Z-00-DX1.tif", tissue((40, 40), 1), photometric="rgb")
    with GeneratedFolders(str(tmp_path / "out"), ("masks",)) as folders:
        with pytest.raises(BundleInputError) as error:
            build_monuseg_datalist(training, folders, labeled_percent=50, test_source=testing)
    assert str(error.value) == (
        f"test image {testing / 'TCGA-77-0001-01Z-00-DX1.tif'} has no annotation: expected "
        "TCGA-77-0001-01Z-00-DX1.xml (or a mask file) next to it"
    )
    with pytest.raises(BundleInputError, match=r"^pass either --test-source or --test-fraction, not both$"):
        build_monuseg_datalist(training, None, labeled_percent=50, test_source=testing, test_fraction=0.2)
