"""Images -> Gemma 3's SigLIP input, as transformers' ``Gemma3ImageProcessor`` does it by default.

Each image is converted to RGB, resized to ``image_size x image_size`` with Pillow's bilinear
filter (``resample=BILINEAR``, no pan-and-scan crops), rescaled by 1/255 and normalised with
mean 0.5 and std 0.5 per channel, so pixels land in [-1, 1]. The batch comes back channels
last, ``(n, image_size, image_size, 3)`` float32, the layout the SigLIP convolution reads.

Accepted images: a PIL image (any mode Pillow converts to RGB: L, RGBA, P, ...), a path to an
image file, or an array ``(H, W, 3)`` (or ``(H, W)`` greyscale): uint8 in 0..255, or float
in [0, 1] (which, as in transformers, is scaled by 255 and truncated to uint8 before the
resize).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

RESCALE = 1.0 / 255.0
MEAN = 0.5
STD = 0.5


def _pil():
  try:
    from PIL import Image
  except ImportError as e:
    raise ImportError("reading images needs Pillow: pip install 'dictlearn[gemma]' "
                      "(or pip install pillow)") from e
  return Image


def to_pil(image: Any, what: str = "image"):
  """One image (PIL image, path, or array; see the module doc) as an RGB PIL image.

  Raises:
    FileNotFoundError: a path with no file.
    ValueError: an array of the wrong shape, channel count, dtype or range.
  """
  Image = _pil()
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{what}: no image file at {path!r}")
    try:
      with Image.open(path) as im:
        return im.convert("RGB")
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, ...
      raise ValueError(f"{what}: {path!r} is not an image Pillow can read ({e})") from e
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    hint = (" (channels first? pass it as (H, W, 3))" if arr.ndim == 3 and arr.shape[0] == 3
            else " (drop the alpha channel, or pass a PIL image)" if arr.ndim == 3
            and arr.shape[-1] == 4 else "")
    raise ValueError(f"{what}: an image array must be (H, W, 3) or (H, W), got shape "
                     f"{tuple(arr.shape)}{hint}")
  if arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f"{what}: the image is empty, shape {tuple(arr.shape)}")
  if arr.dtype == np.uint8:
    pass
  elif np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
      raise ValueError(f"{what}: a float image must lie in [0, 1] (got {arr.min():.3g}.."
                       f"{arr.max():.3g}); pass uint8 for 0..255 values")
    arr = (arr * 255).astype(np.uint8)  # transformers' to_pil_image: scale, then truncate.
  else:
    raise ValueError(f"{what}: image arrays must be uint8 (0..255) or float (0..1), not "
                     f"{arr.dtype}")
  return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def preprocess_images(images: Any | Sequence[Any], image_size: int) -> np.ndarray:
  """Images -> SigLIP pixels ``(n, image_size, image_size, 3)`` float32 in [-1, 1].

  Args:
    images: one image or a list of them (PIL images, paths, arrays; see the module doc).
      A single array of shape ``(n, H, W, 3)`` is taken as n images.
    image_size: the encoder's input side (896 for Gemma 3 4B+; ``SiglipConfig.image_size``).

  Raises:
    ValueError, FileNotFoundError: as ``to_pil``; also an empty list.
  """
  if isinstance(images, np.ndarray) and images.ndim == 4:
    images = list(images)
  elif not isinstance(images, (list, tuple)):
    images = [images]
  if not images:
    raise ValueError("no images given")
  Image = _pil()
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    pil = to_pil(image, what=f"image {i}")
    resized = np.asarray(pil.resize((image_size, image_size), Image.Resampling.BILINEAR))
    # transformers rescales in float64 and casts to float32, then normalises in float32.
    scaled = (resized * RESCALE).astype(np.float32)
    out[i] = (scaled - np.float32(MEAN)) / np.float32(STD)
  return out


__all__ = ["MEAN", "RESCALE", "STD", "preprocess_images", "to_pil"]
