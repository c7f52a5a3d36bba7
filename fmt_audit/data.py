"""Labelled image data for a model: ``.npz`` files and image folders, validated against the model.

Everything inside the tool works on float32 NCHW images in [0, 1] pixel space:
perturbation budgets (eps, alpha) are defined there. A model that expects
normalised input gets ``(x - mean) / std`` applied by :class:`Preprocessing`
at the last moment, never twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmt_audit.errors import ConfigError, DataError, first_line
from fmt_audit.model.graph import ImageInput

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm")


SEED_MAX = 2**32 - 1     # a choice, not a generator's limit: the common range, which every seeded generator takes


def check_seed(seed: int, option: str = "--seed") -> None:
    """Refuse a seed no generator takes (negative, past 2^32 - 1, or not a whole number) with the option's name."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"{option} must be a whole number in 0..{SEED_MAX}; got {seed!r}")


@dataclass(frozen=True)
class Dataset:
    """Images as float32 NCHW in [0, 1] and integer labels."""

    x: np.ndarray
    y: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int | None, seed: int = 0) -> Dataset:
        """The first ``n`` images of a seeded shuffle (all of them, shuffled, for ``None``)."""
        order = np.random.default_rng(seed).permutation(len(self))
        if n is not None:
            order = np.sort(order[:n])
        return Dataset(self.x[order], self.y[order], self.source)

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """A seeded split into (the rest, a held-back ``fraction``); each keeps the original order."""
        held = round(len(self) * fraction)
        if fraction > 0:
            held = min(max(held, 1), len(self) - 1)
        order = np.random.default_rng(seed).permutation(len(self))
        rest, back = np.sort(order[held:]), np.sort(order[:held])
        return (Dataset(self.x[rest], self.y[rest], self.source), Dataset(self.x[back], self.y[back], self.source))


# the pixel ranges models are trained on: [0, 1] images are mapped to the range, then normalised by mean/std
INPUT_RANGES = {"0-1": (0.0, 1.0), "0-255": (0.0, 255.0), "-1-1": (-1.0, 1.0)}


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of an image in [0, 1]: mapped to its ``input_range``, then per-channel
    ``(x - mean) / std`` (``mean``/``std`` in the range's units, e.g. 127.5 for 0-255)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_range: str = "0-1"

    def __post_init__(self):
        if self.input_range not in INPUT_RANGES:
            raise DataError(f"--input-range must be one of {', '.join(INPUT_RANGES)}; got {self.input_range!r}")
        if (self.mean is None) != (self.std is None):
            raise DataError("--mean and --std go together: give both or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise DataError(f"--std values must be positive; got {','.join(map(str, self.std))}")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise DataError(f"--mean has {len(self.mean)} values but --std has {len(self.std)}")

    @property
    def identity(self) -> bool:
        return self.mean is None and self.input_range == "0-1"

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, offset)`` per channel (or one value for all), float64: the model takes ``x * scale + offset``."""
        low, high = INPUT_RANGES[self.input_range]
        mean = np.asarray(self.mean if self.mean is not None else (0.0,), np.float64)
        std = np.asarray(self.std if self.std is not None else (1.0,), np.float64)
        return (high - low) / std, (low - mean) / std

    def check_channels(self, channels: int | None) -> None:
        if self.mean is not None and channels is not None and len(self.mean) not in (1, channels):
            raise DataError(f"--mean/--std need 1 or {channels} values for this {channels}-channel model; "
                            f"got {len(self.mean)}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise a float NCHW batch in [0, 1] for the model."""
        if self.identity:
            return x
        scale, offset = (v.astype(x.dtype).reshape(1, -1, 1, 1) for v in self.affine())
        return x * scale + offset

    def to_dict(self) -> dict:
        return {"mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "input_range": self.input_range}


def parse_channel_values(text: str | Sequence[float] | None, option: str = "--mean") -> tuple[float, ...] | None:
    """``"0.4914,0.4822,0.4465"`` -> a tuple of floats (``None`` stays ``None``)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return tuple(float(v) for v in text)
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise DataError(f"{option} expects comma-separated numbers, one per channel; got {text!r}") from None
    if not all(np.isfinite(values)):
        raise DataError(f"{option} values must be finite; got {text!r}")
    return values


def _to_nchw_unit(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 NHWC / NHW -> float NCHW in [0,1]; float NCHW in [0,1] passes through."""
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[:, None, :, :]
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"{where}: uint8 images must be NHWC (4-D) or NHW (3-D, grayscale); "
                            f"got shape {x.shape}")
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255)
    if x.dtype in (np.float32, np.float64, np.float16):
        if x.ndim != 4:
            raise DataError(f"{where}: float images must be NCHW (4-D); got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: images contain NaN or Inf")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise DataError(f"{where}: float images must lie in [0, 1] (uint8 for 0..255); "
                            f"got values in [{x.min():.3g}, {x.max():.3g}]")
        return x
    raise DataError(f"{where}: 'x' must be uint8 (0..255) or float32 in [0, 1]; got dtype {x.dtype}")


def load_npz(path: Path) -> Dataset:
    """An ``.npz`` with arrays ``x`` (images) and ``y`` (integer labels); never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; expected 'x' (images) and "
                                f"'y' (labels), found {', '.join(archive.files) or 'none'}")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: the arrays it declares do not fit in memory") from None
    except Exception as error:  # any failure to parse an untrusted file (zip, zlib, header) is the file's fault
        message = first_line(error)
        if "pickle" in message.lower():
            message = "it holds object arrays, which are refused (no pickle)"
        raise DataError(f"{path} is not a readable .npz data file: {message}") from error
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'y' must be a 1-D integer label array; got {y.dtype} shape {y.shape}")
    x = _to_nchw_unit(x, str(path))
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return Dataset(x, y.astype(np.int64), str(path))


def load_image_folder(root: Path, channels: int, size: tuple[int, int]) -> Dataset:
    """ImageFolder layout ``root/<class>/<image>``; class index = position of the sorted folder name."""

    try:
        return _read_image_folder(root, channels, size)
    except OSError as error:    # a folder that cannot be listed: permissions, a broken link
        raise DataError(f"cannot read the image folder {root}: {error.strerror or error}") from error


def _read_image_folder(root: Path, channels: int, size: tuple[int, int]) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders; expected root/<class>/<image files>")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DataError(f"image folders need a 1- or 3-channel model; this one has {channels} channels")
    images, labels = [], []
    height, width = size
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
                continue
            try:
                with Image.open(file) as image:
                    image = image.convert(mode)
                    if image.size != (width, height):
                        image = image.resize((width, height), Image.BILINEAR)
                    pixels = np.asarray(image, dtype=np.uint8)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
                raise DataError(f"cannot read image {file}: {first_line(error)}") from error
            images.append(pixels if pixels.ndim == 3 else pixels[:, :, None])
            labels.append(label)
    if not images:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    x = np.stack(images)
    return Dataset(_to_nchw_unit(x, str(root)), np.asarray(labels, dtype=np.int64), str(root))


def load_data(path: str | os.PathLike, image: ImageInput, num_classes: int | None = None) -> Dataset:
    """Load labelled images for a model with input ``image`` and check that they fit it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}")
    if path.is_dir():
        if image.height is None or image.width is None:
            raise DataError("image folders need a model with a static input height and width")
        data = load_image_folder(path, image.channels or 3, (image.height, image.width))
    elif path.suffix.lower() == ".npz":
        data = load_npz(path)
    else:
        raise DataError(f"{path}: expected an .npz file (arrays x, y) or an image folder (root/<class>/*.png)")
    check_fits(data, image, num_classes)
    return data


def check_fits(data: Dataset, image: ImageInput, num_classes: int | None) -> None:
    """Raise :class:`DataError` unless ``data`` has images and labels this model can take."""
    where = data.source or "data"
    if len(data) == 0:
        raise DataError(f"{where}: the data set is empty")
    _, c, h, w = data.x.shape
    expected = (image.channels, image.height, image.width)
    for got, want, what in zip((c, h, w), expected, ("channels", "height", "width")):
        if want is not None and got != want:
            raise DataError(f"{where}: images are {c}x{h}x{w} (CxHxW) but the model's input "
                            f"{image.name!r} takes {'x'.join(str(d) if d else '?' for d in expected)}; "
                            f"{what} differ")
    if data.y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0; found {int(data.y.min())}")
    if num_classes is not None and data.y.max() >= num_classes:
        raise DataError(f"{where}: label {int(data.y.max())} is outside the model's {num_classes} classes "
                        f"(0..{num_classes - 1})")
