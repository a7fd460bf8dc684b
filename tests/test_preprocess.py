"""Decoding and preprocessing, the function the server, tests and benchmarks share."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.settings import SAMPLE_VIDEO
from services.inference.models import MODELS
from services.inference.preprocess import (
    MAX_IMAGE_SIDE,
    InvalidImageError,
    PreprocessSpec,
    decode_image,
    preprocess,
    probe_image,
)
from tests.images import (
    jpeg_bytes,
    mpo_bytes,
    png_bytes,
    png_claiming_size,
    png_with_chunk_claiming,
    solid_png,
)

SPEC = MODELS["efficientnet_lite0"].preprocess


def test_decode_returns_rgb() -> None:
    bgr = np.zeros((10, 20, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR order
    _, png = cv2.imencode(".png", bgr)
    rgb = decode_image(png.tobytes())
    assert rgb.shape == (10, 20, 3)
    assert (rgb[..., 0] == 255).all() and (rgb[..., 2] == 0).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_photo_with_an_exif_orientation_decodes_upright(orientation: int) -> None:
    """Phones store portrait photos sideways with orientation 6; 5-8 swap the sides."""
    import io

    from PIL import Image, ImageOps

    stored = np.zeros((300, 400, 3), np.uint8)  # 400 wide, 300 high, as stored
    stored[:100, :100] = (255, 0, 0)  # a red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    rgb = decode_image(buffer.getvalue())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    assert rgb.shape == upright.shape == ((400, 300, 3) if orientation >= 5 else (300, 400, 3))
    assert np.abs(rgb.astype(int) - upright.astype(int)).mean() < 2  # Pillow's upright too
    assert preprocess(rgb, SPEC).shape == SPEC.input_shape


def test_probe_reads_the_header_only() -> None:
    assert probe_image(jpeg_bytes(64, 48), 10**6) == ("JPEG", 64, 48)
    assert probe_image(png_bytes(30, 40), 10**6) == ("PNG", 30, 40)


def test_pixel_limit_is_configurable() -> None:
    image = png_bytes(100, 100)
    decode_image(image, max_pixels=10_000)
    with pytest.raises(InvalidImageError, match="100x100 exceed the limit of 9999 pixels"):
        decode_image(image, max_pixels=9_999)


def test_a_header_claiming_30000x30000_is_refused_before_decoding() -> None:
    bomb = png_claiming_size(30000, 30000)
    assert len(bomb) < 100
    with pytest.raises(InvalidImageError, match="exceed the limit"):
        decode_image(bomb)


def test_preprocess_matches_the_written_recipe() -> None:
    """Short side to 256, centre crop 224, (x - 127) / 128, channels first."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)  # short side already 256
    out = preprocess(rgb, SPEC)
    expected = (rgb[16:240, 144:368].astype(np.float32) - 127.0) / 128.0
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 1500),
    height=st.integers(1, 1500),
    spec=st.sampled_from([entry.preprocess for entry in MODELS.values()]),
)
def test_preprocess_shape_for_any_size(width: int, height: int, spec: PreprocessSpec) -> None:
    rgb = np.full((height, width, 3), 200, np.uint8)
    out = preprocess(rgb, spec)
    assert out.shape == spec.input_shape and out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    expected = (200 - np.asarray(spec.mean)) / np.asarray(spec.std)
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-5)


def _resize_whole_then_crop(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The written recipe done naively (enlarges the whole image), normalised, for reference."""
    height, width = rgb.shape[:2]
    scale = spec.resize_short_side / min(height, width)
    out_width, out_height = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(rgb, (out_width, out_height), interpolation=cv2.INTER_LINEAR)
    top, left = (out_height - spec.crop_size) // 2, (out_width - spec.crop_size) // 2
    crop = resized[top : top + spec.crop_size, left : left + spec.crop_size]
    normalised = (crop.astype(np.float32) - np.asarray(spec.mean, np.float32)) / np.asarray(
        spec.std, np.float32
    )
    return normalised.transpose(2, 0, 1)


@settings(max_examples=60, deadline=None)
@given(
    short=st.integers(1, 255),
    aspect=st.floats(1.0, 40.0),
    wide=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_enlarging_an_elongated_image_keeps_the_recipe_within_one_level(
    short: int, aspect: float, wide: bool, seed: int
) -> None:
    """Only the part the centre crop keeps is enlarged, with the same pixels (one level at most)."""
    long = max(short, round(short * aspect))
    height, width = (short, long) if wide else (long, short)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = preprocess(rgb, SPEC)
    expected = _resize_whole_then_crop(rgb, SPEC)
    assert out.shape == expected.shape
    # One level of 0-255, after (x - 127) / 128.
    np.testing.assert_allclose(out, expected, atol=1.0 / 128 + 1e-6)


@pytest.mark.parametrize(("width", "height"), [(1024, 768), (1920, 1080), (600, 2000)])
def test_shrinking_a_large_photo_keeps_the_recipe(width: int, height: int) -> None:
    """Large images shrink by a whole factor first (INTER_AREA), then to the short side: the
    result is the written recipe's (one antialiased resize, then the crop) within a few levels.
    Found in review (stop 57): no test took this path on real content; the other checks use a
    short side of 256 or less, or one colour, where a wrong size or factor looks right."""
    low = np.random.default_rng(width).integers(0, 256, (height // 32, width // 32, 3), np.uint8)
    rgb = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)  # a photo's detail
    out = preprocess(rgb, SPEC)
    scale = SPEC.resize_short_side / min(height, width)
    size = (round(width * scale), round(height * scale))
    resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    top, left = (size[1] - SPEC.crop_size) // 2, (size[0] - SPEC.crop_size) // 2
    crop = resized[top : top + SPEC.crop_size, left : left + SPEC.crop_size]
    expected = ((crop.astype(np.float32) - 127.0) / 128.0).transpose(2, 0, 1)
    levels = np.abs(out - expected) * 128
    assert levels.max() <= 6 and levels.mean() <= 1, (levels.max(), levels.mean())


def test_a_one_pixel_high_image_of_a_million_pixels_is_cheap() -> None:
    """Enlarging 1 x 1,000,000 whole would take 196 GB; the centre crop alone is 150 KB."""
    rgb = decode_image(solid_png(1_000_000, 1, colour=(10, 20, 30)))
    out = preprocess(rgb, SPEC)
    assert out.shape == SPEC.input_shape
    np.testing.assert_allclose(out[:, 100, 100], (np.array([10, 20, 30]) - 127.0) / 128.0)


def test_a_side_beyond_libpngs_limit_is_refused_with_the_limit() -> None:
    image = png_claiming_size(1, MAX_IMAGE_SIDE + 1)
    with pytest.raises(InvalidImageError, match=f"exceeds the limit of {MAX_IMAGE_SIDE} pixels"):
        probe_image(image, 10**9)


def test_a_multi_picture_jpeg_from_a_phone_decodes_as_its_first_image() -> None:
    mpo = mpo_bytes(png_bytes(64, 48))
    assert b"MPF\x00" in mpo[:200]  # the APP2 MPF segment phones write
    assert probe_image(mpo, 10**6) == ("MPO", 64, 48)
    rgb = decode_image(mpo)
    assert rgb.shape == (48, 64, 3)
    assert abs(int(rgb[10, 10, 0]) - 127) <= 2
    # Cut within its second picture, it still holds the whole first, the one decoded...
    assert decode_image(mpo[: len(mpo) - 100]).shape == (48, 64, 3)
    first_ends = mpo.index(b"\xff\xd9", mpo.index(b"\xff\xda")) + 2  # no 0xFFD9 in the scan
    # ...cut within the first, it is refused (Pillow's MPO reader finds it first).
    with pytest.raises(InvalidImageError, match=r"(?i)truncated"):
        decode_image(mpo[: first_ends - 100])


def test_a_motion_photo_decodes_as_its_jpeg_and_a_cut_jpeg_is_refused() -> None:
    """Phones append the clip of a motion photo to its JPEG; decoders read the JPEG and stop.
    Only the tail used to be searched for the JPEG's end marker, so such photos were refused
    as truncated."""
    photo = jpeg_bytes(320, 240)
    clip = SAMPLE_VIDEO.read_bytes()[:200_000]
    motion_photo = photo + clip
    assert probe_image(motion_photo, 10**6) == ("JPEG", 320, 240)
    assert np.array_equal(decode_image(motion_photo), decode_image(photo))
    for cut in (photo[: len(photo) // 2], photo[:-3]):
        with pytest.raises(InvalidImageError, match="truncated"):
            probe_image(cut + b"\0" * 100, 10**6)  # with or without padding after it
        with pytest.raises(InvalidImageError, match="truncated"):
            probe_image(cut, 10**6)


def test_a_png_with_bytes_after_its_end_decodes_and_a_cut_one_is_refused() -> None:
    """Only its last 72 bytes were searched for IEND: 65 bytes appended, which decoders let
    be, got the PNG refused as truncated."""
    image = png_bytes(32, 32)
    for extra in (b"\0" * 65, b"x" * 5000):
        assert probe_image(image + extra, 10**6) == ("PNG", 32, 32)
        assert np.array_equal(decode_image(image + extra), decode_image(image))
    for cut in (image[:-12], image[:-20]):  # without IEND; within the last data chunk
        with pytest.raises(InvalidImageError, match="truncated"):
            probe_image(cut, 10**6)


def test_a_jpeg_scan_of_stuffed_bytes_alone_is_refused_as_truncated() -> None:
    """A scan made of nothing but 0xFF 0x00 has no end: refused (its walk is the regex
    engine's, where a Python loop over a 16 MiB request took seconds of CPU)."""
    image = jpeg_bytes(64, 48)
    scan = image.index(b"\xff\xda")
    headers = image[: scan + 2 + int.from_bytes(image[scan + 2 : scan + 4], "big")]
    with pytest.raises(InvalidImageError, match="truncated"):
        probe_image(headers + b"\xff\x00" * 100_000 + b"\0" * 100, 10**6)
    ended = headers + b"\xff\x00" * 1000 + b"\xff\xd0" + b"\xff\xd9" + b"\0" * 100
    assert probe_image(ended, 10**6) == ("JPEG", 64, 48)  # restart markers are not its end


def test_a_jpeg_of_more_segments_than_an_encoder_writes_says_so() -> None:
    """Past 10,000 segments before its end the walk stops; such a request was refused as
    "truncated", which sent its sender looking for a cut upload."""
    image = jpeg_bytes(64, 48)
    comments = b"\xff\xfe\x00\x02" * 10_001  # empty COM segments
    crafted = image[:2] + comments + image[2:] + b"\0" * 100  # its EOI out of the tail
    with pytest.raises(InvalidImageError, match=r"more than 10000 (header )?segments"):
        probe_image(crafted, 10**6)
    few = image[:2] + comments[:4000] + image[2:] + b"\0" * 100
    assert probe_image(few, 10**6) == ("JPEG", 64, 48)


@pytest.mark.parametrize("filler", [b"\xff", b"\x00"], ids=["fill-bytes", "stray-bytes"])
def test_a_jpeg_header_padded_with_megabytes_is_refused_before_pillow_walks_them(
    filler: bytes,
) -> None:
    """Pillow reads every image's header and walks fill and stray bytes before a marker one at
    a time in Python: a 16-MiB request of them cost ~7 CPU-s before any check of ours."""
    image = jpeg_bytes(64, 48)
    after_app0 = 4 + int.from_bytes(image[4:6], "big")  # SOI, then APP0's marker and length
    padded = image[:after_app0] + filler * (1 << 20) + image[after_app0:]
    with pytest.raises(InvalidImageError, match="fill or stray bytes between its header"):
        probe_image(padded, 10**6)
    a_few = image[:after_app0] + filler * 64 + image[after_app0:]  # a careless encoder's
    assert probe_image(a_few, 10**6) == ("JPEG", 64, 48)
    assert np.array_equal(decode_image(a_few), decode_image(image))


def test_a_png_chunk_claiming_more_bytes_than_sent_is_refused_before_decoding() -> None:
    bomb = png_with_chunk_claiming(2**31 - 1)
    assert len(bomb) == 45
    with pytest.raises(InvalidImageError, match="claims 2147483647 bytes, past the end"):
        decode_image(bomb)


def test_the_opencv_floor_has_the_rgb_decode_the_service_uses() -> None:
    """Images are decoded straight to RGB (`cv2.IMREAD_COLOR_RGB`, new in OpenCV 4.11), and the
    project's floor stayed at 4.10: with 4.10 kept, the server started and said SERVING (its
    warm-up decodes nothing), then failed every call INTERNAL (found in review, stop 58)."""
    import re
    import tomllib

    import cv2

    from devstack.launcher import REPO_ROOT

    assert hasattr(cv2, "IMREAD_COLOR_RGB")
    assert "IMREAD_COLOR_RGB" in (REPO_ROOT / "services/inference/preprocess.py").read_text()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (floor,) = [d for d in project["dependencies"] if d.startswith("opencv-python-headless>=")]
    found = re.fullmatch(r"opencv-python-headless>=(\d+)\.(\d+).*", floor)
    assert found is not None and tuple(map(int, found.groups())) >= (4, 11), floor
