"""Real image files of every mode, written with Pillow from scikit-image's sample photos, each
with the RGB it must decode to, computed here with NumPy independently of the decoder.

`image_zoo()` -> list of ImageFile(name, data, expected); `bad_files()` -> undecodable ones.
The photos are shrunk to a few dozen pixels (non-square, so a wrong transpose shows).
"""
import dataclasses
import io
import struct
import zlib

import numpy as np
import skimage.data
from PIL import Image

H, W = 24, 36  # stored size of every image (before EXIF orientation)


@dataclasses.dataclass
class ImageFile:
  name: str  # file name with the extension a user would give it
  data: bytes
  expected: np.ndarray  # uint8 [h, w, 3]


def _small(photo: np.ndarray, h: int = H, w: int = W) -> np.ndarray:
  return np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))


def photos() -> dict[str, np.ndarray]:
  return {"astronaut": _small(skimage.data.astronaut()), "coffee": _small(skimage.data.coffee()),
          "chelsea": _small(skimage.data.chelsea()), "rocket": _small(skimage.data.rocket())}


def grey_photo() -> np.ndarray:
  return _small(skimage.data.camera())


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """Float reference of compositing onto white, rounded to nearest."""
  a = alpha.astype(np.float64)[..., None] / 255.0
  return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def grey3(v: np.ndarray) -> np.ndarray:
  return np.repeat(v.astype(np.uint8)[..., None], 3, axis=-1)


def png16(samples: np.ndarray) -> bytes:
  """A 16-bit-per-sample PNG (Pillow cannot write 16-bit RGB/RGBA): uint16 [H, W, C]."""
  h, w, c = samples.shape
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type,
                                                            0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def with_orientation(img: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return encode(img, fmt, exif=exif, **kwargs)


# The stored pixels for EXIF orientation o are the inverse of the viewer's transform, so the
# decoded image must be the original photo.
_STORE_FOR_ORIENTATION = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, k=1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, k=-1)}


def _palette_lookup(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
  palette = np.array(img.getpalette(), np.uint8).reshape(-1, 3)
  return palette, np.asarray(img)


def image_zoo() -> list[ImageFile]:
  p = photos()
  rgb, coffee, chelsea, rocket = p["astronaut"], p["coffee"], p["chelsea"], p["rocket"]
  grey = grey_photo()
  rng = np.random.default_rng(0)
  files = []
  add = lambda name, data, expected: files.append(ImageFile(name, data, np.asarray(expected)))

  # Plain RGB, lossless and lossy containers.
  add("rgb.png", encode(Image.fromarray(rgb), "PNG"), rgb)
  add("rgb.bmp", encode(Image.fromarray(coffee), "BMP"), coffee)
  add("rgb.tif", encode(Image.fromarray(chelsea), "TIFF"), chelsea)
  add("rgb_lossless.webp", encode(Image.fromarray(rocket), "WEBP", lossless=True), rocket)
  jpeg = encode(Image.fromarray(coffee), "JPEG", quality=90)
  add("rgb.jpg", jpeg, np.asarray(Image.open(io.BytesIO(jpeg))))  # the JPEG decoder's output

  # EXIF orientation 2..8 (PNG: exact) and the common phone case, a rotated JPEG.
  for o, store in _STORE_FOR_ORIENTATION.items():
    add(f"exif_orientation_{o}.png",
        with_orientation(Image.fromarray(np.ascontiguousarray(store(chelsea))), "PNG", o),
        chelsea)
  rotated = encode(Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1))), "JPEG",
                   quality=95)
  stored = np.asarray(Image.open(io.BytesIO(rotated)))
  add("exif_orientation_6.jpg",
      with_orientation(Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1))), "JPEG", 6,
                       quality=95),
      np.rot90(stored, k=-1))

  # Grey, bilevel.
  add("grey_L.png", encode(Image.fromarray(grey), "PNG"), grey3(grey))
  bits = grey > 110
  add("bilevel_1.png", encode(Image.fromarray(bits), "PNG"), grey3(bits * 255))
  grey_jpeg = encode(Image.fromarray(grey), "JPEG", quality=90)
  add("grey_L.jpg", grey_jpeg, grey3(np.asarray(Image.open(io.BytesIO(grey_jpeg)))))

  # Palette: none, one transparent index, per-entry alpha; GIF (animated: first frame).
  pal = Image.fromarray(rgb).quantize(64)
  palette, index = _palette_lookup(pal)
  add("palette_P.png", encode(pal, "PNG"), palette[index])
  hole = int(index[H // 2, W // 2])
  add("palette_P_transparent_index.png", encode(pal, "PNG", transparency=hole),
      np.where((index == hole)[..., None], 255, palette[index]))
  entry_alpha = rng.integers(0, 256, len(palette)).astype(np.uint8)
  add("palette_P_alpha_per_entry.png", encode(pal, "PNG", transparency=entry_alpha.tobytes()),
      over_white(palette[index], entry_alpha[index]))
  frame0 = Image.fromarray(coffee).quantize(128)
  frame1 = Image.fromarray(rocket).quantize(128)
  palette0, index0 = _palette_lookup(frame0)
  add("animated.gif", encode(frame0, "GIF", save_all=True, append_images=[frame1],
                             duration=100, loop=0, optimize=False), palette0[index0])
  hole0 = int(index0[0, 0])
  add("transparent.gif", encode(frame0, "GIF", transparency=hole0, optimize=False),
      np.where((index0 == hole0)[..., None], 255, palette0[index0]))

  # Alpha: grey + alpha, RGBA (a real transparent logo and a photo with an alpha ramp).
  ramp = np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))
  la = np.stack([grey, ramp], -1)
  add("grey_alpha_LA.png", encode(Image.fromarray(la, "LA"), "PNG"), over_white(grey3(grey), ramp))
  # A cut-out: opaque inside an ellipse, a soft edge, fully transparent (and black, as
  # cut-outs often store it) outside.
  yy, xx = np.mgrid[:H, :W]
  radius = np.hypot((yy - H / 2) / (H / 2.2), (xx - W / 2) / (W / 2.2))
  cut_alpha = np.clip((1.15 - radius) * 255 / 0.3, 0, 255).round().astype(np.uint8)
  cutout = np.where((cut_alpha == 0)[..., None], 0, rgb).astype(np.uint8)
  add("cutout_RGBA.png", encode(Image.fromarray(np.concatenate([cutout, cut_alpha[..., None]],
                                                              -1)), "PNG"),
      over_white(cutout, cut_alpha))
  rgba = np.concatenate([rocket, ramp[..., None]], -1)
  add("rgba_ramp.png", encode(Image.fromarray(rgba), "PNG"), over_white(rocket, ramp))
  add("rgba_ramp_lossless.webp", encode(Image.fromarray(rgba), "WEBP", lossless=True, exact=True),
      over_white(rocket, ramp))
  key = tuple(int(v) for v in rgb[0, 0])  # PNG tRNS on RGB: this colour is transparent
  add("rgb_transparent_colour.png", encode(Image.fromarray(rgb), "PNG", transparency=key),
      np.where((rgb == key).all(-1)[..., None], 255, rgb))

  # CMYK with real black: TIFF (exact) and JPEG (Adobe inverted, as Pillow and Photoshop
  # write it).
  cmyk = rgb_to_cmyk(coffee)
  add("cmyk.tif", encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), cmyk_to_rgb(cmyk))
  cmyk_jpeg = encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
  add("cmyk_adobe.jpg", cmyk_jpeg,
      cmyk_to_rgb(np.asarray(Image.open(io.BytesIO(cmyk_jpeg)))))

  # 16 bits: full range grey (PNG, TIFF little and big endian), RGB and RGBA PNGs.
  grey16 = (grey.astype(np.uint32) * 257 + rng.integers(0, 257, grey.shape)).clip(0, 65535)
  grey16 = grey16.astype(np.uint16)
  grey16[0, 0], grey16[0, 1] = 0, 65535  # the full range
  add("grey16_I16.png", encode(Image.fromarray(grey16), "PNG"), grey3(grey16 >> 8))
  add("grey16_I16.tif", encode(Image.fromarray(grey16), "TIFF"), grey3(grey16 >> 8))
  big_endian = Image.frombytes("I;16B", (W, H), grey16.astype(">u2").tobytes())
  add("grey16_I16B.tif", encode(big_endian, "TIFF"), grey3(grey16 >> 8))
  rgb16 = (chelsea.astype(np.uint32) * 257 + rng.integers(0, 257, chelsea.shape)).astype(np.uint16)
  add("rgb16.png", png16(rgb16), (rgb16 >> 8).astype(np.uint8))
  rgba16 = np.concatenate([rgb16, (ramp.astype(np.uint16) * 257)[..., None]], -1)
  add("rgba16.png", png16(rgba16), over_white((rgb16 >> 8).astype(np.uint8), ramp))
  add("grey16_alpha.png", png16(np.stack([grey16, ramp.astype(np.uint16) * 257], -1)),
      over_white(grey3(grey16 >> 8), ramp))

  # 32 bits: integer grey holding 16-bit data or the 32-bit range, float grey.
  i32 = grey16.astype(np.int32)
  add("grey_I32_16bit_values.tif", encode(Image.fromarray(i32), "TIFF"), grey3(i32 >> 8))
  wide = grey.astype(np.int64) * 16843009 - 2**31  # 0..255 -> the whole int32 range
  wide = wide.clip(-2**31, 2**31 - 1).astype(np.int32)
  add("grey_I32_full_range.tif", encode(Image.fromarray(wide), "TIFF"),
      grey3((wide.astype(np.int64) + 2**31) >> 24))
  unit = grey.astype(np.float32) / 255
  add("grey_F_unit.tif", encode(Image.fromarray(unit), "TIFF"),
      grey3(np.round(unit.astype(np.float64) * 255)))
  hdr = (grey.astype(np.float32) / 20 - 3)  # [-3, 9.75]: stretched from its min..max
  lo, hi = float(hdr.min()), float(hdr.max())
  add("grey_F_range.tif", encode(Image.fromarray(hdr), "TIFF"),
      grey3(np.round((hdr.astype(np.float64) - lo) * (255 / (hi - lo)))))
  return files


def rgb_to_cmyk(rgb: np.ndarray) -> np.ndarray:
  """Full black generation: K = 255 - max(R, G, B), C = 255 (255 - R - K) / (255 - K), ..."""
  rgb = rgb.astype(np.float64)
  k = 255 - rgb.max(-1, keepdims=True)
  cmy = np.where(k < 255, 255 * (255 - rgb - k) / np.maximum(255 - k, 1), 0)
  return np.round(np.concatenate([cmy, k], -1)).astype(np.uint8)


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
  c = cmyk.astype(np.float64)
  return np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)


def bad_files() -> dict[str, bytes]:
  """Files a user's folder really holds that are not decodable images."""
  png = encode(Image.fromarray(photos()["astronaut"]), "PNG")
  jpeg = encode(Image.fromarray(photos()["coffee"]), "JPEG", quality=90)
  return {"truncated.png": png[:len(png) // 2], "truncated.jpg": jpeg[:len(jpeg) // 2],
          "empty.jpg": b"", "not_an_image.jpg": b"<html><body>404 Not Found</body></html>\n"}
