"""Fuzzing the image path (probe, decode, preprocess) and one round through the real server.

Property: any bytes give either a model input of the right shape or InvalidImageError, never
another exception, and never more memory than the stated bound.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.launcher import ServerProcess
from protos import inference_pb2, inference_pb2_grpc
from services.inference.client import channel_options
from services.inference.models import MODELS
from services.inference.preprocess import InvalidImageError, load_and_preprocess
from tests.images import jpeg_bytes, png_bytes, png_claiming_size, solid_png

pytestmark = pytest.mark.faults

SPEC = MODELS["efficientnet_lite0"].preprocess
MAX_PIXELS = 4_000_000
# Decoding an accepted image holds its RGB array (3 bytes a pixel) plus the codec's working
# memory (up to 6 bytes a pixel for a progressive JPEG); preprocessing adds under 1 MB. The
# allowance covers allocator slack and Hypothesis itself.
MEMORY_BOUND_BYTES = 9 * MAX_PIXELS + 48 * 2**20

REAL_JPEG = jpeg_bytes(64, 48)
REAL_PNG = png_bytes(64, 48)
SIDES = st.one_of(
    st.sampled_from([0, 1, 2, 255, 256, 6_000, 65_535, 1_000_000, 1_000_001, 2**31 - 1]),
    st.integers(0, 2**32 - 1),
)

JPEG_SIDES = st.integers(0, 65_535)  # SOF fields are 16-bit


def _jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its SOF0 frame header claiming width x height (16-bit fields)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


def _png_with_ihdr(width: int, height: int, real_rows: bool) -> bytes:
    """A PNG whose IHDR says width x height, with pixel data for it when that is cheap."""
    if real_rows and 0 < width * height <= 2_000_000 and max(width, height) <= 1_000_000:
        return solid_png(width, height)
    return png_claiming_size(width, height)


def _corrupt(data: bytes, positions: list[int], values: list[int]) -> bytes:
    corrupted = bytearray(data)
    for position, value in zip(positions, values, strict=False):
        corrupted[position % len(corrupted)] = value
    return bytes(corrupted)


def _recrc_png(data: bytes) -> bytes:
    """Fix every chunk's CRC, so a corruption reaches the decoder instead of the CRC check."""
    out, offset = bytearray(data[:8]), 8
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        end = offset + 8 + length
        if end + 4 > len(data):
            break
        body = data[offset + 4 : end]
        out += data[offset:end] + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        offset = end + 4
    return bytes(out + data[offset:])


IMAGE_BYTES = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda n: REAL_JPEG[:n], st.integers(0, len(REAL_JPEG))),
    st.builds(lambda n: REAL_PNG[:n], st.integers(0, len(REAL_PNG))),
    st.builds(
        _corrupt,
        st.sampled_from([REAL_JPEG, REAL_PNG]),
        st.lists(st.integers(0, 10**6), min_size=1, max_size=8),
        st.lists(st.integers(0, 255), min_size=1, max_size=8),
    ),
    st.builds(
        lambda data: _recrc_png(data),
        st.builds(
            _corrupt,
            st.just(REAL_PNG),
            st.lists(st.integers(33, 10**6), min_size=1, max_size=4),
            st.lists(st.integers(0, 255), min_size=1, max_size=4),
        ),
    ),
    st.builds(_png_with_ihdr, SIDES, SIDES, st.booleans()),
    st.builds(lambda w, h: _jpeg_with_size(REAL_JPEG, w, h), JPEG_SIDES, JPEG_SIDES),
    st.builds(
        lambda w, h: _jpeg_with_size(REAL_JPEG, w, h),
        st.sampled_from([0, 1, 2, 6_000, 65_535]),
        st.sampled_from([0, 1, 2, 6_000, 65_535]),
    ),
)


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmHWM")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=IMAGE_BYTES)
def test_any_bytes_give_a_model_input_or_invalid_image_within_the_memory_bound(
    data: bytes,
) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now
    baseline = _rss_bytes()
    try:
        tensor = load_and_preprocess(data, SPEC, MAX_PIXELS)
    except InvalidImageError as exc:
        assert str(exc)  # a reason for the caller
    else:
        assert tensor.shape == SPEC.input_shape and tensor.dtype == np.float32
        assert np.isfinite(tensor).all()
    grown = _peak_rss_bytes() - baseline
    assert grown < MEMORY_BOUND_BYTES, f"{grown / 2**20:.0f} MiB for {len(data)} bytes"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=IMAGE_BYTES)
def test_the_server_answers_fuzzed_images_with_a_label_or_invalid_argument(
    onnx_server: ServerProcess, data: bytes
) -> None:
    with grpc.insecure_channel(onnx_server.target, options=channel_options()) as channel:
        stub = inference_pb2_grpc.ClassifierStub(channel)
        try:
            reply = stub.Classify(inference_pb2.ClassifyRequest(image=data), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        else:
            assert reply.predictions
