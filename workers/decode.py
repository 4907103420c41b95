"""Bytes to an upright RGB uint8 image, or a reason why not. Nothing is decoded before its size is known."""

from __future__ import annotations

import functools
import io
import math
import os
import re
import stat
import warnings

import pyarrow.fs as pafs
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

MAX_PIXELS = 64_000_000  # larger headers are refused unread (decompression bombs)
MAX_BYTES = 512 * 2**20  # larger files are refused unread: a 64 MP image needs less even as 16-bit TIFF
EXIF_ORIENTATION = 0x0112
TORCHVISION_ORIENTS = ("JPEG", "PNG")  # the formats whose EXIF orientation torchvision applies itself
# The raster formats photo collections hold, and the only ones PIL is let open: never EPS or PostScript (PIL has
# Ghostscript render them: an interpreter run on an untrusted file), nor the dozens of rarer plugins. A file is
# known by its bytes, whatever its name: PostScript named .jpg is refused, not rendered.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "JPEG2000", "PPM")


class DecodeError(ValueError):
    pass


def read_bytes(path: str) -> bytes:
    """A local path's or a URI's bytes. Only a regular file of at most MAX_BYTES is read: a FIFO, a device
    (/dev/zero in a manifest) or a huge file would block or fill the worker. A URI's key is read as written,
    not percent-decoded (keys hold spaces, '%', '?' and '#'), through one filesystem per bucket and process."""
    path = path.removeprefix("file://")
    if "://" in path:  # s3://, gs://: pyarrow's filesystems
        scheme, rest = path.split("://", 1)
        bucket, _, key = rest.partition("/")
        fs, inner = _bucket_filesystem(f"{scheme}://{bucket}"), f"{bucket.rpartition('@')[2]}/{key}"
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such object: {path}")
        _check_readable(info.type == pafs.FileType.File, info.size)
        with fs.open_input_stream(inner) as f:
            return f.read()
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # a FIFO opens without blocking
        found = os.fstat(f.fileno())
        _check_readable(stat.S_ISREG(found.st_mode), found.st_size)
        return f.read()


@functools.lru_cache(maxsize=16)
def _bucket_filesystem(root: str) -> pafs.FileSystem:
    """The filesystem of a bucket's URI (with its credentials, if it holds any). Made once: S3's is made by
    asking the bucket's region, a round trip each image paid when every URI made its own."""
    return pafs.FileSystem.from_uri(root)[0]


def _check_readable(regular: bool, size: int | None) -> None:
    if not regular:
        raise OSError("not a regular file (a folder, a FIFO or a device)")
    if size is not None and size > MAX_BYTES:
        raise OSError(f"refused: {size:,} bytes is over the {MAX_BYTES:,}-byte limit")


def _opened(data: bytes) -> Image.Image:
    """data opened by PIL as one of FORMATS, whatever its name; anything else raises."""
    return Image.open(io.BytesIO(data), formats=FORMATS)


def _header(data: bytes) -> tuple[int, int, str | None, int, bool]:
    """(width, height, format, EXIF orientation 1-8, whether it has transparency) from the header alone."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _opened(data) as im:
                return (*im.size, im.format, im.getexif().get(EXIF_ORIENTATION, 1), _transparent(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's limits lie above ours (its warning, raised as an error here, at 89 MP; its error at 179 MP):
        # the reason names ours, as `_decode`'s own check does
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise DecodeError(f"refused: {int(pixels[1]):,} pixels is over the {MAX_PIXELS:,}-pixel limit" if pixels
                          else f"refused: {exc}") from exc
    except Exception as exc:
        size = _png_size(data) if isinstance(exc, ValueError) else None
        if size is not None:  # PIL's guard on a PNG's metadata (its message varies by version), not on its pixels
            return (*size, "PNG", 1, False)
        raise DecodeError(f"not a readable image ({type(exc).__name__}: {_without_address(exc)})") from exc


def _png_size(data: bytes) -> tuple[int, int] | None:
    """An opaque PNG's (width, height) from its IHDR chunk; None for any other file. PIL will not open a PNG
    whose compressed text or ICC profile inflates past 1 MB (its guard against a bomb in the metadata; real
    PNGs carry that much, Pillow#8363), while libpng, which torchvision decodes with, skips such a chunk: the
    pixels are the photo's. One that may be transparent (an alpha channel, colour types 4 and 6, or a tRNS chunk
    before its pixels) is left to PIL, which refuses it: torchvision would drop its transparency (`_rgb_tensor`)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 26 or data[25] in (4, 6):
        return None
    if b"tRNS" in data[: data.find(b"IDAT")]:
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def decode(data: bytes, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """uint8 [3, H, W], EXIF orientation applied; grey, bilevel, palette, CMYK and 16-bit made RGB, transparency
    laid over white; 32-bit pixels refused.

    torchvision decodes JPEG, PNG and WEBP; PIL handles the rest, GIF's first frame among them.
    """
    return _decode(data, _header(data), max_pixels)


def _decode(data: bytes, header: tuple[int, int, str | None, int, bool], max_pixels: int) -> torch.Tensor:
    width, height, fmt, orientation, transparent = header
    if width * height > max_pixels:
        raise DecodeError(f"refused: {width}x{height} is over the {max_pixels:,}-pixel limit")
    if fmt == "GIF" or transparent or (orientation != 1 and fmt not in TORCHVISION_ORIENTS):
        # torchvision decodes every frame of a GIF (a small file of many frames fills the worker), drops alpha
        # (its RGB_ALPHA garbles palette PNGs) and would turn a rotated WebP sideways
        image = _decode_with_pil(data)
    else:
        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                 apply_exif_orientation=True)
        except Exception:
            image = _decode_with_pil(data)
    if image.dim() == 4:  # animated: the first frame
        image = image[0]
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8 or image.shape[0] != 3 or min(image.shape[-2:]) < 1:
        raise DecodeError(f"unsupported pixel layout {tuple(image.shape)} {image.dtype}")
    return image


def decode_reduced(data: bytes, shortest: int, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, tuple[int, int]]:
    """(image, its original upright (width, height)). A JPEG whose shorter side is at least twice
    `shortest` (what the largest input scale needs) is decoded in PIL's draft mode: libjpeg's DCT
    scaling (1/2, 1/4, 1/8) straight to a shorter side of at least `shortest`, never at full size (a
    12 MP phone photo decodes several times faster; boxes stay in original pixels)."""
    header = _header(data)
    width, height, fmt, orientation, _ = header
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if fmt != "JPEG" or min(width, height) < 2 * shortest or width * height > max_pixels:
        return _decode(data, header, max_pixels), upright
    scale = shortest / min(width, height)
    try:
        with _opened(data) as im:
            im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            return _rgb_tensor(ImageOps.exif_transpose(im)), upright
    except Exception:  # a JPEG libjpeg cannot scale (progressive oddities): decode it whole
        return _decode(data, header, max_pixels), upright


def _transparent(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _rgb_tensor(im: Image.Image) -> torch.Tensor:
    """im as uint8 [3,H,W], transparent pixels laid over white, as a viewer shows them: the colour under a
    transparent pixel is anything (black, white, a cut-out's old background), so dropping the alpha would give
    a cut-out whatever background its file happens to hold."""
    if _transparent(im):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    rgb = im.convert("RGB")
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(
        rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def _decode_with_pil(data: bytes) -> torch.Tensor:
    try:
        with _opened(data) as im:
            if im.mode == "F" or 32 in getattr(im, "tag_v2", {}).get(258, ()):  # TIFF's BitsPerSample
                # 0-1, 0-255 or any range (PIL's mode I holds 16-bit PGMs too): a guess makes some black, unnoticed
                raise DecodeError("32-bit pixels (floating-point or integer) have no fixed range: save it as 8 or "
                                  "16 bits")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            return _rgb_tensor(im)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"cannot decode ({type(exc).__name__}: {_without_address(exc)})") from exc


def _without_address(exc: Exception) -> str:
    """An exception's message without the repr of the in-memory file PIL was given (`<_io.BytesIO object at
    0x7f...>`): an error row should read the same in every run."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
