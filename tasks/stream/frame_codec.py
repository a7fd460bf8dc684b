"""The one frame codec: how a video frame and its result travel through Kafka.

A frame message is JPEG bytes with the frame's identity and clocks in headers, keyed by stream
id (so one stream stays ordered within its partition). A result message is JSON keyed by
`stream_id@session:frame_index`, so a consumer of results can drop the duplicates that
at-least-once delivery allows. The session is drawn once per producer start: a camera's stream id
is its stable name, and a producer started again numbers its frames from 0 again, so without the
session its new frames would share keys with the last run's and be dropped as duplicates.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protos.inference_pb2 import ClassifyResponse

HEADER_STREAM_ID = "vidflow-stream-id"
HEADER_FRAME_INDEX = "vidflow-frame-index"
HEADER_CAPTURE_TS_NS = "vidflow-capture-ts-ns"
HEADER_PRODUCE_TS_NS = "vidflow-produce-ts-ns"
HEADER_SESSION = "vidflow-producer-session"  # optional: frames from other producers lack it
# A dead-lettered message carries its reason and source topic, and when the service failed on
# it, the status and the attempts made.
HEADER_DLQ_REASON = "vidflow-dlq-reason"
HEADER_DLQ_SOURCE = "vidflow-dlq-source"
HEADER_DLQ_STATUS = "vidflow-dlq-status"
HEADER_DLQ_ATTEMPTS = "vidflow-dlq-attempts"
# The size of a frame left out of its dead-letter copy (too large with the reason headers).
HEADER_DLQ_VALUE_DROPPED = "vidflow-dlq-value-dropped"

Headers = list[tuple[str, bytes]]


class FrameFormatError(ValueError):
    """A message on the frames topic lacks what a frame message must carry."""


@dataclass(frozen=True)
class Frame:
    stream_id: str
    frame_index: int
    capture_ts_ns: int
    produce_ts_ns: int
    jpeg: bytes
    session: str = ""  # the producer start that numbered it; "" from a producer without one

    @property
    def key(self) -> str:
        return frame_key(self.stream_id, self.frame_index, self.session)


def frame_key(stream_id: str, frame_index: int, session: str = "") -> str:
    """The identity of a frame, and the key of its result message: `stream@session:index`,
    or `stream:index` for a frame whose producer sent no session."""
    return f"{stream_id}@{session}:{frame_index}" if session else f"{stream_id}:{frame_index}"


def new_session() -> str:
    """A producer start's session: 8 random hex digits, unique enough among the starts of
    one camera (a clock could repeat across machines; a collision needs the same stream id)."""
    return secrets.token_hex(4)


def encode_frame_headers(frame: Frame) -> Headers:
    headers = [
        (HEADER_STREAM_ID, frame.stream_id.encode()),
        (HEADER_FRAME_INDEX, str(frame.frame_index).encode()),
        (HEADER_CAPTURE_TS_NS, str(frame.capture_ts_ns).encode()),
        (HEADER_PRODUCE_TS_NS, str(frame.produce_ts_ns).encode()),
    ]
    if frame.session:
        headers.append((HEADER_SESSION, frame.session.encode()))
    return headers


# Headers come from whoever can produce to the topic. A stream id is a key of results and of
# per-stream figures; the numbers are nanoseconds since the epoch and counts, which int64 holds
# (a 400-digit capture time overflowed float conversion and ended the consumer on every start).
MAX_STREAM_ID_CHARS = 256
MAX_SESSION_CHARS = 64
# A result key reads back one way only: `@` parts the stream from the session, whose characters
# hold no `:` (what parts it from the index).
KEY_SEPARATOR = "@"
SESSION_PATTERN = re.compile(r"[0-9A-Za-z_-]*")
MAX_HEADER_INT = 2**63 - 1


def decode_frame(value: bytes | None, headers: Headers | None) -> Frame:
    """Rebuild a Frame from a message's value and headers, or raise FrameFormatError."""
    try:
        return _decode_frame(value, headers)
    except FrameFormatError:
        raise
    except Exception as exc:  # a shape no check foresaw must not end the consumer either
        raise FrameFormatError(f"frame message could not be read: {exc!r}") from exc


def _decode_frame(value: bytes | None, headers: Headers | None) -> Frame:
    found = {name: raw for name, raw in (headers or [])}
    try:
        stream_id = _header_text(HEADER_STREAM_ID, found[HEADER_STREAM_ID])
        session = (found.get(HEADER_SESSION) or b"").decode()
        numbers = [
            _header_int(name, found[name])
            for name in (HEADER_FRAME_INDEX, HEADER_CAPTURE_TS_NS, HEADER_PRODUCE_TS_NS)
        ]
    except FrameFormatError:
        raise
    except KeyError as exc:
        raise FrameFormatError(f"frame message lacks header {exc.args[0]}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameFormatError(f"frame message has a malformed header: {exc}") from None
    if len(stream_id) > MAX_STREAM_ID_CHARS:
        raise FrameFormatError(
            f"frame message header {HEADER_STREAM_ID} is too long ({len(stream_id)} characters, "
            f"at most {MAX_STREAM_ID_CHARS})"
        )
    if KEY_SEPARATOR in stream_id:
        raise FrameFormatError(
            f"frame message header {HEADER_STREAM_ID} holds {KEY_SEPARATOR!r}, which parts the "
            "stream from the producer's session in result keys"
        )
    if len(session) > MAX_SESSION_CHARS:
        raise FrameFormatError(
            f"frame message header {HEADER_SESSION} is too long ({len(session)} characters, "
            f"at most {MAX_SESSION_CHARS})"
        )
    if not SESSION_PATTERN.fullmatch(session):
        raise FrameFormatError(
            f"frame message header {HEADER_SESSION} may hold letters, digits, '-' and '_' only"
        )
    frame_index, capture_ts_ns, produce_ts_ns = numbers
    return Frame(stream_id, frame_index, capture_ts_ns, produce_ts_ns, value or b"", session)


def _header_text(name: str, raw: bytes | None) -> str:
    if raw is None:  # Kafka headers may carry no value at all
        raise FrameFormatError(f"frame message header {name} has no value")
    return raw.decode()


def _header_int(name: str, raw: bytes | None) -> int:
    if raw is None or len(raw) > 20:  # int64 has 19 digits: longer text is not parsed at all
        raise FrameFormatError(f"frame message header {name} is out of range")
    number = int(raw)
    if not 0 <= number <= MAX_HEADER_INT:
        raise FrameFormatError(f"frame message header {name} is out of range ({number})")
    return number


@dataclass(frozen=True)
class FrameResult:
    """What the consumer publishes for one frame.

    A frame skipped under the latency budget gets a record too, so none is silently lost:
    `skipped="stale"`, its age (capture to the moment its call was due) in `age_ms` and in
    `e2e_ms`, an empty label, class_index -1 and zero score and timings."""

    stream_id: str
    frame_index: int
    label: str
    class_index: int
    score: float
    model_name: str
    capture_ts_ns: int
    result_ts_ns: int
    inference_ms: float
    rpc_ms: float
    e2e_ms: float
    partition: int
    offset: int
    skipped: str | None = None  # "stale": not classified, older than --max-frame-age-ms
    age_ms: float | None = None  # a skipped frame's age when it was skipped
    session: str = ""  # the frame's producer session (Frame.session)

    @property
    def key(self) -> str:
        return frame_key(self.stream_id, self.frame_index, self.session)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> FrameResult:
        """A result record; fields a later version added are left out, so a reader can be
        upgraded after the consumers that write the records (as `session` was added)."""
        data: dict[str, Any] = json.loads(payload)
        known = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in data.items() if name in known})


def classified_result(
    frame: Frame, response: ClassifyResponse, rpc_s: float, partition: int, offset: int
) -> FrameResult:
    """The result record of a frame the service classified: its best prediction and clocks."""
    best = response.predictions[0]
    result_ts_ns = time.time_ns()
    return FrameResult(
        stream_id=frame.stream_id,
        frame_index=frame.frame_index,
        label=best.label,
        class_index=best.class_index,
        score=round(best.score, 6),
        model_name=response.model_name,
        capture_ts_ns=frame.capture_ts_ns,
        result_ts_ns=result_ts_ns,
        inference_ms=round(response.timings.inference_ms, 3),
        rpc_ms=round(rpc_s * 1e3, 3),
        e2e_ms=round((result_ts_ns - frame.capture_ts_ns) / 1e6, 3),
        partition=partition,
        offset=offset,
        session=frame.session,
    )


SKIPPED_STALE = "stale"


def stale_result(frame: Frame, partition: int, offset: int, age_ms: float) -> FrameResult:
    """The record of a frame not classified because it was older than the latency budget."""
    age = round(age_ms, 3)
    return FrameResult(
        stream_id=frame.stream_id,
        frame_index=frame.frame_index,
        label="",
        class_index=-1,
        score=0.0,
        model_name="",
        capture_ts_ns=frame.capture_ts_ns,
        result_ts_ns=time.time_ns(),
        inference_ms=0.0,
        rpc_ms=0.0,
        e2e_ms=age,
        partition=partition,
        offset=offset,
        skipped=SKIPPED_STALE,
        age_ms=age,
        session=frame.session,
    )
