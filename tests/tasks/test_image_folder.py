"""Image classification from folders of class folders: reading, sizes and channels, held-out
splits, clear errors, and a run whose student records what its inputs are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import IMAGE_CLASSES, write_image_folder
from PIL import Image

import distill
from distill.config import DataSpec, parse_recipe
from distill.errors import DataError, RecipeError
from distill.images import read_image_folder
from distill.tasks import build_task


def _task(path, **fields):
    return build_task("classification", DataSpec(format="image-folder", path=path, **fields))


def test_splits_classes_channels_and_per_channel_statistics(tmp_path, data_dir):
    root = write_image_folder(tmp_path / "images", data_dir, {"train": 20, "test": 5})
    task = _task(root)
    assert task.label_names == sorted(IMAGE_CLASSES) and task.num_classes == 3
    # 60 training images: 10% held out for validation, the test set is test/.
    assert (len(task.train), len(task.splits["eval"]), len(task.splits["test"])) == (54, 6, 15)
    assert tuple(task.train.images.shape[1:]) == (3, 28, 28)
    # Standardised with the training pixels' own per-channel mean and std.
    pixels = task.train.images.numpy() / 255.0
    assert task.train.mean.flatten().tolist() == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist(), abs=1e-4)
    x = task.train.batch(range(len(task.train)))["inputs"]["x"]
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-3 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    assert task.splits["test"].mean is not None and torch.equal(task.splits["test"].std, task.train.std)
    # The labels are the folders the images came from.
    bags = task.splits["test"].images[task.splits["test"].labels == task.label_names.index("bag")]
    assert len(bags) == 5
    pre = task.preprocessing()
    assert pre["channels"] == 3 and pre["size"] == [28, 28] and pre["labels"] == ["bag", "sneaker", "trouser"]


def test_grayscale_images_read_as_one_channel_and_sizes_are_made_equal(tmp_path, data_dir):
    root = write_image_folder(tmp_path / "gray", data_dir, {"train": 4}, rgb=False)
    folder, size, channels = read_image_folder(root / "train")
    assert (size, channels, folder.images.shape) == ((28, 28), 1, (12, 1, 28, 28))
    Image.new("RGB", (40, 32), (200, 10, 10)).save(root / "train" / "bag" / "big.png")
    with pytest.raises(DataError, match=r"big.png is 40x32, but .* is 28x28: set data.image_size"):
        read_image_folder(root / "train")
    folder, size, channels = read_image_folder(root / "train", (16, 16))
    assert (size, channels, folder.images.shape) == ((16, 16), 3, (13, 3, 16, 16))  # one colour image: RGB
    red = folder.images[folder.files.index(root / "train" / "bag" / "big.png")]
    assert red[0].min() > 150 and red[1].max() < 50
    gray = folder.images[0]
    assert np.array_equal(gray[0], gray[1])  # grayscale images repeated into the three channels


def test_one_folder_of_classes_is_split_by_a_seeded_shuffle(tmp_path, data_dir):
    root = write_image_folder(tmp_path / "images", data_dir, {"train": 30})
    task = _task(root / "train", eval_fraction=0.2)
    again = _task(root / "train", eval_fraction=0.2)
    # test: 20% of the 90 images; eval: 20% of the 72 left.
    assert (len(task.train), len(task.splits["eval"]), len(task.splits["test"])) == (58, 14, 18)
    assert torch.equal(task.splits["test"].images, again.splits["test"].images)
    train = {bytes(x.numpy()) for x in task.train.images}
    assert not train & {bytes(x.numpy()) for x in task.splits["test"].images}
    assert set(task.splits["test"].labels.tolist()) == {0, 1, 2}  # shuffled, not the last class's files


def test_bad_folders_and_files_are_named(tmp_path, data_dir):
    with pytest.raises(DataError, match="image folder not found"):
        _task(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match=r"no class folders .*\(images directly in it: a.png; put each class"):
        _task(tmp_path / "flat")
    root = write_image_folder(tmp_path / "images", data_dir, {"train": 3, "test": 1})
    (root / "train" / "bag" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken.png: not an image that can be read"):
        _task(root)
    (root / "train" / "bag" / "broken.png").unlink()
    (root / "test" / "shirt").mkdir()
    Image.new("L", (28, 28)).save(root / "test" / "shirt" / "0.png")
    with pytest.raises(DataError, match=r"the test set has classes the training set does not have: \['shirt'\]"):
        _task(root)
    with pytest.raises(distill.RecipeError, match="image_size"):
        parse_recipe({"name": "x", "task": "classification",
                                       "teacher": {"kind": "torch", "arch": "convnet"},
                                       "student": {"arch": "convnet"},
                                       "data": {"format": "image-folder", "path": str(root), "image_size": 0}})


def test_a_run_on_an_image_folder_fits_the_architectures_to_the_data(tmp_path, data_dir):
    root = write_image_folder(tmp_path / "images", data_dir, {"train": 40, "test": 10})
    recipe = {"name": "folder", "task": "classification", "output_dir": str(tmp_path / "run"),
              "teacher": {"kind": "torch", "arch": "convnet", "arch_args": {"width": 4, "num_classes": 3,
                                                                           "in_channels": 3}},
              "student": {"arch": "mlp", "arch_args": {"hidden": 16, "depth": 1}},
              "data": {"format": "image-folder", "path": str(root)}, "losses": [{"name": "kd"}],
              "task_loss_weight": 0.5, "baseline": False, "cache": {"dir": str(tmp_path / "cache")},
              "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3},
              "evaluate": {"latency_repeats": 1, "throughput_repeats": 1, "warmup": 0, "batch_size": 16}}
    result = distill.run(recipe)
    # num_classes and the input size come from the data: 3 classes of 3 x 28 x 28 images.
    config = json.loads((tmp_path / "run/student/config.json").read_text())
    assert config["arch_args"] == {"num_classes": 3, "in_features": 3 * 28 * 28, "hidden": 16, "depth": 1}
    assert config["preprocessing"]["labels"] == ["bag", "sneaker", "trouser"]
    assert config["preprocessing"]["channels"] == 3 and len(config["preprocessing"]["mean"]) == 3
    # Three well-separated classes: the student learns them.
    assert result.models["student"]["accuracy"] > 80


def test_images_from_a_hugging_face_dataset_read_as_a_folder_of_them_does(tmp_path, data_dir):
    datasets = pytest.importorskip("datasets")
    root = write_image_folder(tmp_path / "images", data_dir, {"train": 20, "test": 5})
    splits = {}
    for split in ("train", "test"):
        files = sorted((root / split).rglob("*.png"))
        splits[split] = datasets.Dataset.from_dict(
            {"img": [str(f) for f in files], "label": [f.parent.name for f in files]},
            features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("string")}))
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dataset"))
    from_folder = _task(root)
    from_dataset = build_task("classification", DataSpec(format="hf-dataset", path=tmp_path / "dataset",
                                                          image_column="img"))
    assert from_dataset.label_names == from_folder.label_names
    for split in ("test",):
        assert torch.equal(from_dataset.splits[split].images, from_folder.splits[split].images)
        assert torch.equal(from_dataset.splits[split].labels, from_folder.splits[split].labels)
    assert torch.equal(from_dataset.train.mean, from_folder.train.mean)
    # A ClassLabel column: its ids, in its own order, and its names.
    names = list(reversed(from_folder.label_names))
    files = sorted((root / "train").rglob("*.png"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"img": [str(f) for f in files], "label": [names.index(f.parent.name) for f in files]},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)}))}
    ).save_to_disk(str(tmp_path / "labelled"))
    labelled = build_task("classification",
                          DataSpec(format="hf-dataset", path=tmp_path / "labelled", image_column="img"))
    assert labelled.label_names == names
    with pytest.raises(DataError, match=r"no field \['picture'\]"):
        build_task("classification", DataSpec(format="hf-dataset", path=tmp_path / "dataset", image_column="picture"))
    recipe = {"name": "x", "task": "classification", "teacher": {"kind": "hf-classifier", "source": "x"},
              "student": {"derive": {"layers": [0]}}, "losses": [{"name": "kd"}],
              "data": {"format": "hf-dataset", "path": str(tmp_path / "dataset"), "image_column": "img"}}
    with pytest.raises(RecipeError, match="is images, so the models are 'torch'"):
        parse_recipe(recipe)
    recipe["data"] = {"format": "csv", "path": "x.csv", "image_column": "img"}
    with pytest.raises(RecipeError, match="data.image_column: images are read from an hf-dataset"):
        parse_recipe(recipe)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    for name in ("dark", "light"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / name / "0.png")
    assert Image.open(tmp_path / "dark" / "0.png").mode == "I;16"
    folder, _, channels = read_image_folder(tmp_path)
    row = folder.images[0, 0, 0].astype(int)
    assert channels == 1 and row[1] == round(1000 * 255 / 65535) and folder.images.max() < 255
    assert (np.diff(row) > 0).all()  # still increasing: nothing clipped to white
