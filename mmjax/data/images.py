"""The one image decoder of mmjax: encoded bytes -> uint8 RGB [H, W, 3], whatever the file.

Every read path (training sources, evaluation splits, the preview, the dataset builder)
decodes with `decode_image`; TFDS is always asked for the encoded bytes. Pillow opens the
file; what it returns is then made RGB by rules that keep what the image shows:

* EXIF orientation (tags 2-8) is applied, so a phone photo stands the way it was taken.
* Animated GIF / PNG / WebP and multi-page TIFF: the first frame.
* Transparency (RGBA, LA, PA, a palette or a grey/RGB colour marked transparent) is
  composited onto WHITE. Transparent pixels often hold arbitrary colours (commonly black),
  which a plain drop of alpha would show; white is what a transparent logo, icon or
  product shot is drawn on by the web pages those images come from, and it is what the
  image-text corpora open_clip trains on were built with (img2dataset composites alpha
  onto white), so models and evaluations see the same pictures.
* Palette (P), bilevel (1), grey (L), CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
  CMYK JPEGs are read with Adobe's inverted polarity (what Photoshop writes; Pillow assumes
  it for every CMYK JPEG) and converted as R = (255 - C)(255 - K) / 255, etc.; embedded ICC
  profiles are not applied (as in TFDS, tf.image and torchvision decoding).
* 16-bit samples (I;16, I;16B, I;16L and 16-bit-per-channel PNGs) keep their high byte
  (v >> 8, as libpng's strip_16 and Pillow's 16-bit RGB reader do): the full 16-bit range
  maps onto the full 8-bit range, nothing is clipped.
* 32-bit integer grey (I): values inside [0, 65535] are 16-bit data (how Pillow and many
  TIFF writers store it) and are scaled as above; any other range is 32-bit data and maps
  linearly from [-2**31, 2**31 - 1].
* 32-bit float grey (F): values inside [0, 1] are scaled by 255 (the float-image
  convention); any other range is stretched linearly from its own [min, max] (a constant
  image becomes black); NaN becomes 0.

Anything Pillow cannot decode completely (zero bytes, not an image, truncated, a
decompression bomb) raises; callers skip such a record and count it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# What transparent pixels are composited onto (see the module docstring for why white).
ALPHA_BACKGROUND = 255
_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def decode_image(encoded: bytes) -> np.ndarray:
  """Decodes an encoded image (JPEG, PNG, GIF, WebP, BMP, TIFF, ...) to uint8 [H, W, 3] RGB.

  Raises ValueError for zero bytes, and Pillow's error for data it cannot fully decode.
  """
  if not encoded:
    raise ValueError("zero-byte image")
  with Image.open(io.BytesIO(encoded)) as img:
    img.load()  # the first frame, fully: a truncated file raises here
    return pil_to_rgb(img)


def pil_to_rgb(img: Image.Image) -> np.ndarray:
  """An opened Pillow image -> uint8 [H, W, 3], EXIF orientation applied (as decode_image)."""
  return np.ascontiguousarray(_orient(to_rgb(img), _orientation(img)))


def to_rgb(img: Image.Image) -> np.ndarray:
  """A decoded Pillow image of any mode -> uint8 [H, W, 3] (rules in the module docstring)."""
  mode = img.mode
  if mode == "RGB" and "transparency" not in img.info:
    return np.asarray(img)
  if mode.startswith("I;16"):
    return _grey(np.asarray(img).astype(np.uint16) >> 8)
  if mode == "I":
    return _grey(_scale_int32(np.asarray(img)))
  if mode == "F":
    return _grey(_scale_float(np.asarray(img)))
  if mode in _ALPHA_MODES or "transparency" in img.info or _palette_has_alpha(img):
    return _composite(np.asarray(img.convert("RGBA")))
  return np.asarray(img.convert("RGB"))


def _palette_has_alpha(img: Image.Image) -> bool:
  return img.mode == "P" and img.palette is not None and "A" in img.palette.mode


def _grey(values: np.ndarray) -> np.ndarray:
  return np.repeat(values.astype(np.uint8)[..., None], 3, axis=-1)


def _scale_int32(values: np.ndarray) -> np.ndarray:
  values = values.astype(np.int64)
  if values.size and values.min() >= 0 and values.max() <= 0xFFFF:
    return values >> 8
  return (values + 2**31) >> 24


def _scale_float(values: np.ndarray) -> np.ndarray:
  values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
  if lo >= 0.0 and hi <= 1.0:
    return np.round(values * 255.0)
  if hi == lo:
    return np.zeros_like(values)
  return np.round((values - lo) * (255.0 / (hi - lo)))


def _composite(rgba: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 4] -> [H, W, 3] over ALPHA_BACKGROUND, rounded to nearest."""
  rgb = rgba[..., :3].astype(np.uint32)
  alpha = rgba[..., 3:].astype(np.uint32)
  mixed = rgb * alpha + ALPHA_BACKGROUND * (255 - alpha)
  return ((mixed + 127) // 255).astype(np.uint8)


def _orientation(img: Image.Image) -> int:
  try:
    return int(img.getexif().get(_ORIENTATION_TAG, 1))
  except Exception:  # a malformed EXIF block does not make the pixels unreadable
    return 1


def _orient(rgb: np.ndarray, orientation: int) -> np.ndarray:
  """Applies EXIF orientation 2-8 (the transform a viewer applies to display the image)."""
  if orientation == 2:
    return rgb[:, ::-1]
  if orientation == 3:
    return rgb[::-1, ::-1]
  if orientation == 4:
    return rgb[::-1]
  if orientation == 5:
    return rgb.transpose(1, 0, 2)
  if orientation == 6:
    return np.rot90(rgb, k=-1)  # 90 degrees clockwise
  if orientation == 7:
    return rgb[::-1, ::-1].transpose(1, 0, 2)
  if orientation == 8:
    return np.rot90(rgb, k=1)  # 90 degrees counter-clockwise
  return rgb
