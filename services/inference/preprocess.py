"""Image decoding and preprocessing: the one implementation the server, tests and benchmarks share.

Decoding checks the container header before any pixel is decoded, so a tiny file that claims to
be 30000x30000 is refused before it can allocate gigabytes.

What one accepted image can cost, at most (the bound the server's memory rests on):
- decoding: the RGB array, 3 bytes x `max_image_pixels` (120 MB at the default 40 M pixels), plus
  the codec's working memory (a progressive JPEG keeps its coefficients, up to 6 bytes a pixel);
- preprocessing: the resized image, never larger than the decoded one when shrinking and at most
  `MAX_ENLARGED_ASPECT` x `resize_short_side`^2 x 3 bytes (786 KB for a 256 short side) when
  enlarging, plus the crop. A more elongated image is enlarged only where the centre crop keeps
  (without that, a 1 x 1,000,000 PNG of 4 KB asked OpenCV for 196 GB).
An image with a side over `MAX_IMAGE_SIDE` is refused (libpng cannot decode it), and so is a PNG
whose chunk lengths run past its data (OpenCV would allocate the claimed length, up to 2 GB).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from services.inference.settings import InferenceSettings

# MPO is what many phone cameras write: a JPEG (decoded as such, its first image) followed by an
# APP2 MPF index and more JPEGs; Pillow names it by that container.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG")
DEFAULT_MAX_IMAGE_PIXELS: int = InferenceSettings.model_fields["max_image_pixels"].default
# A JPEG ends with the EOI marker, found at once in its last bytes where nothing (or a little
# padding, which some cameras append) follows; a PNG with the IEND chunk, which the walk over
# its chunks reaches (bytes after it are let be, as decoders do).
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_TAIL_SLACK = 72
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# libpng's default user limit (PNG_USER_WIDTH_MAX/HEIGHT_MAX); OpenCV's own is 2**20.
MAX_IMAGE_SIDE = 1_000_000
# Up to this aspect ratio an image that must be enlarged is resized whole, as the recipe says; a
# more elongated one only over the part the centre crop keeps (the same pixels, within one level).
MAX_ENLARGED_ASPECT = 4


class InvalidImageError(ValueError):
    """The request's bytes are not an image this service can classify; the message says why."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input: resize the short side, centre-crop, scale, normalise."""

    resize_short_side: int
    crop_size: int
    # Per-channel (R, G, B) mean and std applied to pixel values in [0, 255].
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.crop_size, self.crop_size)


def _png_header_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, or (-1, -1) for anything else.

    Pillow refuses to identify a PNG with a zero side, which would hide the reason; the IHDR
    layout is fixed (signature, length, "IHDR", width, height), so reading it is safe.
    """
    if len(data) >= 24 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return (-1, -1)


def probe_image(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Return (format, width, height) from the header alone, or raise InvalidImageError."""
    if not data:
        raise InvalidImageError("empty image: the request carried no bytes")
    if data[:2] == _JPEG_SOI:
        _check_jpeg_header(data)  # before Pillow reads the header
    with warnings.catch_warnings():
        # Our own pixel limit applies below; Pillow's bomb check would only hide the dimensions.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as header:
                image_format, (width, height) = header.format, header.size
        except Image.DecompressionBombError as exc:
            raise InvalidImageError(
                f"image dimensions exceed the limit of {max_pixels} pixels ({exc})"
            ) from None
        except Image.UnidentifiedImageError:
            png_width, png_height = _png_header_size(data)
            if png_width == 0 or png_height == 0:
                raise InvalidImageError(
                    f"zero-sized image: the PNG header says {png_width}x{png_height}"
                ) from None
            raise InvalidImageError(
                "not an image: the bytes are not a readable JPEG or PNG"
            ) from None
        except Exception as exc:  # Pillow raises several types for malformed headers
            raise InvalidImageError(f"not an image: unreadable image header ({exc})") from None
    if image_format not in ACCEPTED_FORMATS:
        raise InvalidImageError(f"unsupported image format {image_format}: send JPEG or PNG")
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"zero-sized image: header says {width}x{height}")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InvalidImageError(
            f"image dimensions {width}x{height}: a side exceeds the limit of "
            f"{MAX_IMAGE_SIDE} pixels"
        )
    if width * height > max_pixels:
        raise InvalidImageError(
            f"image dimensions {width}x{height} exceed the limit of {max_pixels} pixels"
        )
    if image_format == "PNG":
        _check_png_chunks(data)  # walks the chunks to IEND: bytes after it are let be
    elif _JPEG_EOI not in data[-_TAIL_SLACK:] and _jpeg_end(data) is None:
        raise InvalidImageError(f"truncated image: the {image_format} data has no end marker")
    return image_format, width, height


# Markers with no length field after them: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xDA)])
# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; any
# other byte after it is the next real marker. Found by the regex engine: a Python loop over
# data crafted with nothing but stuffed bytes took seconds of CPU per request.
_SCAN_END = re.compile(rb"\xff(?=[^\x00\xd0-\xd7])")
_FILL_BYTES = re.compile(rb"\xff+")
# Far more segments than an encoder writes before its first EOI (a progressive JPEG has a
# few dozen); a request of tiny segments is refused before its walk costs real CPU.
_MAX_JPEG_SEGMENTS = 10_000
_MAX_JPEG_SKIPPED = 65_536  # fill and stray bytes between header segments (encoders: a few)


def _jpeg_end(data: bytes) -> int | None:
    """Where the first JPEG image in `data` ends (after its EOI), or None if the data stops
    before it does; InvalidImageError past `_MAX_JPEG_SEGMENTS` segments.

    Walks the segments and, after each SOS, the entropy-coded data (where 0xFF is followed by
    0x00 or a restart marker). Only for a JPEG whose tail has no EOI: phones append a video
    to the JPEG (motion photos) or other trailing data, which the decoders ignore. A search for
    the EOI bytes would not do: an EXIF thumbnail in an APP1 segment has its own."""
    position = 2  # after SOI
    for _ in range(_MAX_JPEG_SEGMENTS):
        if position + 2 > len(data) or data[position] != 0xFF:
            return None
        kind = data[position + 1]
        if kind == 0xFF:  # fill bytes before a marker
            position = _FILL_BYTES.match(data, position).end() - 1
            continue
        if kind == 0xD9:  # EOI
            return position + 2
        if kind in _STANDALONE_MARKERS:
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if kind == 0xDA:  # SOS: the entropy-coded data runs to the next real marker
            found = _SCAN_END.search(data, position)
            if found is None:
                return None
            position = found.start()
    raise InvalidImageError(
        f"corrupt JPEG: more than {_MAX_JPEG_SEGMENTS} segments before its end marker"
    )


def _check_jpeg_header(data: bytes) -> None:
    """Refuse a JPEG whose header segments (up to its first scan) are apart by more than
    `_MAX_JPEG_SKIPPED` fill or stray bytes. Pillow, which reads every image's header, walks
    those one byte at a time in Python: ~0.44 CPU-s per MB, 7 CPU-s for one 16-MiB request.
    Encoders write a few at most; here they are skipped by `find` and the regex engine."""
    position, skipped = 2, 0  # after SOI
    for _ in range(_MAX_JPEG_SEGMENTS):
        marker = data.find(b"\xff", position)
        fill_end = len(data) if marker < 0 else _FILL_BYTES.match(data, marker).end()
        skipped += (len(data) if marker < 0 else marker) - position + max(0, fill_end - marker - 1)
        if skipped > _MAX_JPEG_SKIPPED:
            raise InvalidImageError(
                f"corrupt JPEG: more than {_MAX_JPEG_SKIPPED} fill or stray bytes between its "
                "header segments"
            )
        if marker < 0 or fill_end >= len(data) or data[fill_end] in (0xDA, 0xD9):
            return  # its first scan (or its end): Pillow reads no further
        kind = data[fill_end]
        if kind == 0x00 or kind in _STANDALONE_MARKERS:
            position = fill_end + 1
        else:
            position = fill_end + 1 + int.from_bytes(data[fill_end + 1 : fill_end + 3], "big")
    raise InvalidImageError(f"corrupt JPEG: more than {_MAX_JPEG_SEGMENTS} header segments")


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunk lengths run past its data (walking the 12-byte chunk headers).

    OpenCV allocates a chunk's declared length before reading it: a 45-byte PNG whose IEND
    claims 2**31 - 1 bytes made it allocate 2 GB.
    """
    offset = len(_PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        if offset + 12 + length > len(data):
            raise InvalidImageError(
                f"truncated or corrupt PNG: chunk {kind.decode('latin-1')!r} claims {length} "
                f"bytes, past the end of the data ({len(data)} bytes)"
            )
        if kind == b"IEND":
            return
        offset += 12 + length
    raise InvalidImageError("truncated image: the PNG data has no IEND chunk")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode JPEG/PNG bytes to an RGB uint8 array (H, W, 3), or raise InvalidImageError.

    The image comes upright as its EXIF orientation says (OpenCV applies it), so a phone's
    portrait photo, stored sideways with orientation 6, has its header's sides swapped.
    """
    image_format, width, height = probe_image(data, max_pixels)
    rgb = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)
    if rgb is None or rgb.shape[:2] not in ((height, width), (width, height)):
        raise InvalidImageError(f"corrupt {image_format}: OpenCV could not decode the pixel data")
    return rgb


def _resize_short_side(rgb: np.ndarray, short_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = short_side / min(height, width)
    if scale == 1.0:
        return rgb
    # Shrinking by a large factor with bilinear alone aliases; INTER_AREA is antialiased but slow
    # for fractional factors and fast for whole ones. So shrink by a whole factor first.
    factor = int(1 / scale)
    if factor >= 2:
        rgb = cv2.resize(
            rgb, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA
        )
        height, width = rgb.shape[:2]
        scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)


def _enlarge_centre_crop(rgb: np.ndarray, short_side: int, crop_size: int) -> np.ndarray:
    """The centre crop of the image enlarged to `short_side`, without enlarging the rest.

    The affine map is the one cv2.resize uses (pixel centres aligned, edges replicated), so the
    pixels equal those of resize-then-crop within one level (warpAffine quantises positions to
    1/32 pixel); only crop_size^2 pixels are ever allocated, whatever the aspect ratio.
    """
    height, width = rgb.shape[:2]
    scale = short_side / min(height, width)
    out_width, out_height = max(1, round(width * scale)), max(1, round(height * scale))
    crop = min(crop_size, out_width, out_height)
    top, left = (out_height - crop) // 2, (out_width - crop) // 2
    step_x, step_y = width / out_width, height / out_height
    to_source = np.array(
        [[step_x, 0.0, (left + 0.5) * step_x - 0.5], [0.0, step_y, (top + 0.5) * step_y - 0.5]]
    )
    return cv2.warpAffine(
        rgb,
        to_source,
        (crop, crop),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def preprocess(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize the short side, centre-crop, normalise: RGB uint8 (H, W, 3) -> float32 (3, S, S)."""
    height, width = rgb.shape[:2]
    short, long = min(height, width), max(height, width)
    if short < spec.resize_short_side and long > MAX_ENLARGED_ASPECT * short:
        cropped = _enlarge_centre_crop(rgb, spec.resize_short_side, spec.crop_size)
    else:
        resized = _resize_short_side(rgb, spec.resize_short_side)
        height, width = resized.shape[:2]
        crop = min(spec.crop_size, width, height)
        top, left = (height - crop) // 2, (width - crop) // 2
        cropped = resized[top : top + crop, left : left + crop]
    crop = cropped.shape[0]
    if crop != spec.crop_size:  # only for images smaller than the crop after resizing
        cropped = cv2.resize(cropped, (spec.crop_size, spec.crop_size))
    # Transpose while still uint8 (a quarter of the bytes), then normalise in place.
    chw = np.ascontiguousarray(cropped.transpose(2, 0, 1)).astype(np.float32)
    chw -= np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    chw *= 1.0 / np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return chw


def load_and_preprocess(
    data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode and preprocess in one call (the path benchmarks and tests use)."""
    return preprocess(decode_image(data, max_pixels), spec)
