"""Hand-made bad images: each breaks exactly one thing a real image has."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np


def png_bytes(width: int, height: int) -> bytes:
    ok, buffer = cv2.imencode(".png", np.full((height, width, 3), 127, np.uint8))
    assert ok
    return buffer.tobytes()


def jpeg_bytes(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    ok, buffer = cv2.imencode(".jpg", rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    assert ok
    return buffer.tobytes()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims width x height (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\x00\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def gif_bytes() -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


def solid_png(width: int, height: int, colour: tuple[int, int, int] = (120, 30, 200)) -> bytes:
    """A flat-coloured PNG of any size: Pillow writes sides OpenCV's encoder refuses."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def mpo_bytes(image: bytes) -> bytes:
    """The image as a multi-picture JPEG, as phones write it: an APP2 MPF index, a 2nd image."""
    from io import BytesIO

    from PIL import Image

    first = Image.open(BytesIO(image)).convert("RGB")
    buffer = BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[first.resize((32, 24))])
    return buffer.getvalue()


def png_with_chunk_claiming(length: int) -> bytes:
    """A 45-byte PNG whose IEND chunk claims `length` bytes (OpenCV allocated that much)."""
    header = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + struct.pack(">I", length)
        + b"IEND\xaeB`\x82"
    )
