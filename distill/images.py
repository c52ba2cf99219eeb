"""Images in folders, one folder per class (the layout of torchvision's ``ImageFolder``), or
in a Hugging Face dataset's image column.

``data.path`` holds ``train/`` and optionally ``test/`` and ``val/`` (or ``valid``,
``validation``, ``dev``), each with a folder per class; or it holds the class folders itself,
and the test and validation sets are then held out of it. Every image is read into memory as
``uint8`` pixels of one size and one channel count.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from distill.data import dataset_rows, expand_path
from distill.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "image_folder_splits", "read_image_folder", "read_image_records"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File endings read as images; other files in a class folder (a README, say) are skipped."""

_EVAL_NAMES = ("val", "valid", "validation", "dev")
_GRAY = ("1", "L", "I", "I;16", "F")


class ImageFolder:
    """The images of one split: ``images`` ``(N, C, H, W)`` uint8, ``labels`` the class folder
    of each, ``files`` where each came from."""

    def __init__(self, images: np.ndarray, labels: list[str], files: list[Path]) -> None:
        self.images = images
        self.labels = labels
        self.files = files


def image_folder_splits(path: Path) -> dict[str, Path | None]:
    """The folders of the train, test and validation splits (``None``: hold it out of train)."""
    path = expand_path(path)
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    if not (path / "train").is_dir():
        return {"train": path, "test": None, "eval": None}
    dev = next((path / name for name in _EVAL_NAMES if (path / name).is_dir()), None)
    return {"train": path / "train", "test": path / "test" if (path / "test").is_dir() else None, "eval": dev}


def _class_files(folder: Path) -> list[tuple[Path, str]]:
    found = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in class_dir.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        found.extend((f, class_dir.name) for f in files)
    if not found:
        loose = [f.name for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES][:3]
        where = f" (images directly in it: {', '.join(loose)}; put each class's images in a folder named after it)" \
            if loose else ""
        raise DataError(f"{folder}: no class folders holding images ({', '.join(IMAGE_SUFFIXES)}){where}")
    return found


def read_image_folder(folder: Path, size: tuple[int, int] | None = None, channels: int | None = None
                      ) -> tuple[ImageFolder, tuple[int, int], int]:
    """Read every image under ``folder/CLASS/``.

    Args:
        folder: The split's folder of class folders.
        size: ``(height, width)`` every image is resized to; ``None``: the first image's size,
            which every other image must have.
        channels: 1 (grayscale) or 3 (RGB); ``None``: 1 when every image is grayscale, else 3.

    Returns:
        The images, and the size and channel count they were read at (to read the other
        splits alike).

    Raises:
        DataError: A file that is not an image, an image of another size (without ``size``),
            or a folder without class folders.
    """
    found = _class_files(folder)
    return _decoded([(f, f, label) for f, label in found], size, channels)


def read_image_records(source: str, split: str, image_column: str, label_column: str,
                       size: tuple[int, int] | None = None, channels: int | None = None
                       ) -> tuple[ImageFolder, tuple[int, int], int]:
    """Read the images and labels of one split of a Hugging Face dataset (a ``save_to_disk``
    folder or a Hub id), as :func:`read_image_folder` reads a folder. An image is what
    ``datasets`` decodes (a PIL image), or ``{"bytes": ..., "path": ...}``, bytes or a file path."""
    items = []
    for record, where in dataset_rows(source, split):
        missing = [c for c in (image_column, label_column) if c not in record]
        if missing:
            raise DataError(f"{where}: no field {missing} (found {sorted(record)}); set data.image_column and "
                            "data.label_column")
        items.append((record[image_column], where, str(record[label_column]).strip()))
    if not items:
        raise DataError(f"{source}[{split}]: no examples")
    return _decoded(items, size, channels)


def _open(value: Any) -> Any:
    """A PIL image from what a dataset or folder holds."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        return Image.open(io.BytesIO(value))
    return Image.open(Path(value))


def _deep_to_8_bit(image: Any) -> Any:
    """A grayscale image of 16-bit or float pixels as 8-bit, scaled rather than clipped (a
    conversion to ``L`` would turn every value above 255 white)."""
    from PIL import Image

    image.load()
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if pixels.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(pixels * scale, 0, 255).round().astype(np.uint8), "L")


def _decoded(items: list[tuple[Any, Any, str]], size: tuple[int, int] | None, channels: int | None
             ) -> tuple[ImageFolder, tuple[int, int], int]:
    """``(image or file, where it is, label)`` items as one array of pixels."""
    from PIL import Image, UnidentifiedImageError

    pixels, labels, places = [], [], []
    resize = size is not None
    for value, where, label in items:
        try:
            image = _deep_to_8_bit(_open(value))
            gray = image.mode in _GRAY
            image = image.convert("L" if (channels == 1 or (channels is None and gray)) else "RGB")
        except (UnidentifiedImageError, OSError, ValueError, TypeError) as exc:
            raise DataError(f"{where}: not an image that can be read ({exc})") from None
        if size is None:
            size = (image.height, image.width)
        if (image.height, image.width) != size:
            if not resize:
                raise DataError(f"{where} is {image.width}x{image.height}, but {places[0]} is {size[1]}x{size[0]}: "
                                "set data.image_size (every image is resized to it)")
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        pixels.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        labels.append(label)
        places.append(where)
    assert size is not None
    if channels is None:
        channels = max(p.shape[0] for p in pixels)
    stacked = np.stack([np.repeat(p, channels, axis=0) if p.shape[0] != channels else p for p in pixels])
    return ImageFolder(stacked, labels, places), size, channels
