"""Image preprocessing for calibration, as MindSpore Lite's ``[data_preprocess_param]`` defines it.

The order is fixed: colour format, resize, centre crop, normalize; then the layout and dtype
of the model input. OpenCV decodes (jpg, png, bmp, webp, ...) and resizes. Pixels are
converted to float32 *before* resizing, so no uint8 rounding happens between the steps.
The coordinate rules are OpenCV's: pixel centres at +0.5 for LINEAR and CUBIC, and
``floor(dst * scale)`` for NEAREST.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LowbitError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class BadSampleError(LowbitError):
    """A calibration file that cannot be read; --skip-bad-samples turns it into a warning."""


@dataclass(frozen=True)
class ImagePreprocess:
    """The preprocessing of one model input. Unset steps are skipped."""

    to_format: str | None = None  # RGB, BGR or GRAY (decoded images are BGR)
    resize: tuple[int, int] | None = None  # (width, height)
    resize_method: str = "LINEAR"
    center_crop: tuple[int, int] | None = None  # (width, height)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def decode(path: Path) -> np.ndarray:
    """Decode an image file to an HxWx3 BGR uint8 array (OpenCV's convention)."""
    import cv2

    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise BadSampleError(f"{path}: cannot read ({exc.strerror})") from None
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if image is None:
        raise BadSampleError(f"{path}: not a readable image (corrupt or of an unknown format)")
    return image


def preprocess(image_bgr: np.ndarray, steps: ImagePreprocess, path: Path) -> np.ndarray:
    """format -> resize -> centre crop -> normalize; returns HxWxC float32."""
    import cv2

    image = image_bgr
    if steps.to_format == "RGB":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif steps.to_format == "GRAY":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    x = image.astype(np.float32)
    if x.ndim == 2:
        x = x[:, :, np.newaxis]
    if steps.resize is not None:
        methods = {"LINEAR": cv2.INTER_LINEAR, "NEAREST": cv2.INTER_NEAREST, "CUBIC": cv2.INTER_CUBIC}
        x = cv2.resize(x, steps.resize, interpolation=methods[steps.resize_method])
        if x.ndim == 2:
            x = x[:, :, np.newaxis]
    if steps.center_crop is not None:
        width, height = steps.center_crop
        h, w = x.shape[:2]
        if width > w or height > h:
            raise LowbitError(f"{path}: center crop {width}x{height} is larger than the image ({w}x{h} after resize)")
        top, left = (h - height) // 2, (w - width) // 2
        x = x[top:top + height, left:left + width]
    channels = x.shape[2]
    for name, values in (("normalize_mean", steps.mean), ("normalize_std", steps.std)):
        if values is not None and len(values) not in (1, channels):
            raise LowbitError(f"{name} has {len(values)} values, the image has {channels} channels")
    if steps.mean is not None:
        x = x - np.asarray(steps.mean, np.float32)
    if steps.std is not None:
        std = np.asarray(steps.std, np.float32)
        if np.any(std == 0):
            raise LowbitError("normalize_std contains 0")
        x = x / std
    return np.ascontiguousarray(x, dtype=np.float32)
