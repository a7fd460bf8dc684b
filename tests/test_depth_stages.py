"""Each depth-extraction stage on its own: its error handling against real servers, real FFmpeg
and real files."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import email.utils
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import lance
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from yarl import URL

from devstack.video_server import (
    Body,
    Busy,
    Cut,
    Drip,
    Redirect,
    Serve,
    Stall,
    Status,
    VideoServer,
)
from tasks.depth import redirects
from tasks.depth.clip_window import ClipWindow, window_of, with_window
from tasks.depth.depth_loader import load_depth_estimator, shared_estimator
from tasks.depth.depth_maps import FLOAT16_MAX, estimate_depth, estimate_depth_many
from tasks.depth.depth_model import UNTRAINED_CONFIG_KEY, DepthMap, check_depth_model
from tasks.depth.depth_torch import DepthEstimator
from tasks.depth.download import (
    DownloadError,
    backoff_delay_s,
    download,
    download_many,
    is_retryable,
    parse_retry_after,
    sniff_container,
)
from tasks.depth.frame_choice import frame_indices, read_frames
from tasks.depth.redirects import PublicOnlyResolver, RedirectRefused, redirect_refusal
from tasks.depth.settings import DepthSettings, check_frames_spec
from tasks.depth.transcode import ffmpeg_exe, transcode
from tasks.depth.video_record import ARROW_SCHEMA, VideoRecord, records_to_table
from tasks.depth.video_sources import (
    SourceListError,
    read_kinetics_csv,
    read_url_list,
    sanitize_video_id,
)
from tasks.depth.video_table import TableSchemaError, VideoTable, write_rows
from tests.conftest import VIDEOS

CLIP = VIDEOS / "pool_cleaning.mp4"
KINETICS_CSV = VIDEOS.parent / "kinetics" / "kinetics-400_val.csv"
FAST_RETRIES = {"download_retries": 2, "retry_backoff_s": 0.01, "read_timeout_s": 0.5}


def _record(url: str, video_id: str = "clip") -> VideoRecord:
    return VideoRecord(video_id=video_id, source_url=url)


def _leftovers(folder: Path) -> list[str]:
    return (
        sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
        if folder.exists()
        else []
    )


# ---- sources -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("../../etc/passwd", "etc_passwd"),
        ("/absolute/path", "absolute_path"),
        ("a b/c?d=e", "a_b_c_d_e"),
        ("-abc_000012_000022", "-abc_000012_000022"),  # Kinetics ids may start with '-'
        ("..", None),
        ("", None),
    ],
)
def test_video_ids_cannot_escape_the_output_folder(raw: str, expected: str | None) -> None:
    video_id = sanitize_video_id(raw)
    if expected is not None:
        assert video_id == expected
    assert video_id and "/" not in video_id and not video_id.startswith(".")


@given(st.text(max_size=300))
def test_any_text_gives_a_file_name_inside_the_folder(raw: str) -> None:
    root = Path("/srv/out").resolve()
    video_id = sanitize_video_id(raw)
    assert (root / video_id).resolve().parent == root
    assert 0 < len(video_id) <= 120


def test_url_lists_skip_comments_and_repeats_and_keep_ids_unique(tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(
        "# my videos\n\nhttps://a.example/x/clip.mp4\nhttps://a.example/y/clip.mp4\n"
        "https://a.example/x/clip.mp4\nhttps://a.example/v/%2E%2E%2Fescape.mp4?sig=1\n"
    )
    records = read_url_list(listing)
    assert [r.source_url for r in records] == [
        "https://a.example/x/clip.mp4",
        "https://a.example/y/clip.mp4",
        "https://a.example/v/%2E%2E%2Fescape.mp4?sig=1",
    ]
    assert records[0].video_id.startswith("clip_") and records[1].video_id.startswith("clip_")
    assert records[0].video_id != records[1].video_id
    assert records[2].video_id.startswith("escape_")


def test_two_urls_given_one_id_refuse_the_list_and_repeats_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every line is accounted for: a repeated video is dropped and said so; two videos that
    would share a row (ids equal once file-name-safe) are refused, naming both."""
    listing = tmp_path / "ids.csv"
    listing.write_text("url,video_id\nhttps://h/a.mp4,my clip\nhttps://h/b.mp4,my_clip\n")
    with pytest.raises(SourceListError, match=r"'my_clip' \(https://h/a.mp4 and https://h/b.mp4"):
        read_url_list(listing)
    # One file on macOS's and Windows' file systems: each video's files held the other's
    listing.write_text("url,video_id\nhttps://h/a.mp4,Cat01\nhttps://h/b.mp4,cat01\n")
    with pytest.raises(SourceListError, match=r"'cat01' .* differ only in case"):
        read_url_list(listing)
    listing.write_text("url,video_id\nhttps://h/a.mp4,one\nhttps://h/a.mp4,two\nhttps://h/b.mp4,\n")
    with caplog.at_level("WARNING", logger="tasks.depth.video_sources"):
        records = read_url_list(listing)
    assert [(r.source_url, r.video_id[:2]) for r in records] == [
        ("https://h/a.mp4", "on"), ("https://h/b.mp4", "b_"),
    ]  # fmt: skip
    assert "1 lines repeat a video listed before" in caplog.text
    # A Kinetics clip is its id: listed again (here under another split's URL), it is a repeat.
    kinetics = tmp_path / "k.csv"
    row = "abseiling,0wR5jVB-WPk,417,427"
    kinetics.write_text(f"label,youtube_id,time_start,time_end,split\n{row},val\n{row},test\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.depth.video_sources"):
        clips = read_kinetics_csv(kinetics, url_template="https://h/{split}/{youtube_id}.mp4",
                                  split=None)  # fmt: skip
    assert [c.source_url for c in clips] == ["https://h/val/0wR5jVB-WPk.mp4#t=417,427"]
    assert "1 lines repeat" in caplog.text


def test_a_signed_url_keeps_its_id_when_signed_again(tmp_path: Path) -> None:
    """Pre-signed URLs expire: a list signed again must find its earlier rows (it got new ids:
    every video done again, two rows each)."""
    listing = tmp_path / "urls.txt"

    def video_id(url: str) -> str:
        listing.write_text(url + "\n")
        [record] = read_url_list(listing)
        return record.video_id

    s3 = (
        "https://b.s3.amazonaws.com/clips/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Date={}&X-Amz-Signature={}"
    )
    sas = "https://acct.blob.core.windows.net/c/a.mp4?sv=2022-11-02&se={}&sp=r&sig={}"
    cloudfront = "https://d.cloudfront.net/a.mp4?Expires={}&Signature={}&Key-Pair-Id=K1"
    for template in (s3, sas, cloudfront):
        first, again = template.format("20261204", "aaa"), template.format("20261205", "bbb")
        assert video_id(first) == video_id(again), template
    # What names the object stays in the id, a signature's short names too where no
    # signature goes with them (`ss`: a start second), as does the rest of a signed URL.
    assert video_id("https://h/get.mp4?id=1") != video_id("https://h/get.mp4?id=2")
    assert video_id("https://h/clip.mp4?ss=0") != video_id("https://h/clip.mp4?ss=30")
    assert video_id("https://h/a.mp4?expires=1") != video_id("https://h/a.mp4?expires=2")
    assert video_id(sas.format(1, "a") + "&ss=b") == video_id(sas.format(2, "b") + "&ss=f")
    assert video_id(s3.format(1, 2)) != video_id(s3.format(1, 2).replace("a.mp4", "b.mp4"))
    listing.write_text(f"{s3.format(1, 'aaa')}\n{s3.format(2, 'bbb')}\n")
    assert len(read_url_list(listing)) == 1  # the same video, signed twice: one row


def test_a_video_id_depends_on_its_url_alone(tmp_path: Path) -> None:
    """Reordered or extended lists keep every id: a re-run finds its earlier rows."""
    urls = ["https://a.example/x/clip.mp4", "https://b.example/y/clip.mp4"]
    forward, backward, extended = (tmp_path / name for name in ("f.txt", "b.txt", "e.txt"))
    forward.write_text("\n".join(urls))
    backward.write_text("\n".join(reversed(urls)))
    extended.write_text("\n".join(["https://c.example/clip.mp4", *urls]))
    ids = [{r.source_url: r.video_id for r in read_url_list(p)} for p in (forward, backward)]
    assert ids[0] == ids[1] and len(set(ids[0].values())) == 2
    assert {url: ids[0][url] for url in urls}.items() <= {
        r.source_url: r.video_id for r in read_url_list(extended)
    }.items()


def test_a_csv_with_a_url_column_keeps_its_labels(tmp_path: Path) -> None:
    listing = tmp_path / "urls.csv"
    listing.write_text("url,label\nhttps://h/a.mp4,juggling\nhttps://h/b.webm,\n")
    records = read_url_list(listing)
    assert [(r.video_id[:2], r.label) for r in records] == [("a_", "juggling"), ("b_", None)]


def test_a_csv_s_time_columns_ask_for_their_clip(tmp_path: Path) -> None:
    """Found in review, stop 62: `time_start`, `time_end` were dropped, and each row done as
    the whole video under its clip's label. Two clips of one video are two rows."""
    header = "url,label,time_start,time_end\n"
    listing = tmp_path / "clips.csv"
    listing.write_text(header + "https://h/a.mp4,juggling,417,427\n"
                       "https://h/a.mp4,dancing,2.5,12.5\nhttps://h/b.mp4,,,\n")  # fmt: skip
    first, second, whole = read_url_list(listing)
    assert first.source_url == "https://h/a.mp4#t=417,427" and first.label == "juggling"
    assert second.source_url == "https://h/a.mp4#t=2.5,12.5" and second.label == "dancing"
    assert first.video_id != second.video_id
    assert whole.source_url == "https://h/b.mp4"  # no window asked
    for row, why in [('https://h/a.mp4,x,417,', "time_start and time_end go together"),
                     ('https://h/a.mp4,x,427,417', "bad time window"),
                     ('https://h/a.mp4,x,ten,20', "bad time window"),
                     ('"https://h/a.mp4#t=1,2",x,417,427', "a window of its own")]:  # fmt: skip
        listing.write_text(header + row + "\n")
        with pytest.raises(SourceListError, match=why):
            read_url_list(listing)


@pytest.mark.parametrize(
    "text",
    [
        "label, url\njuggling, https://h/a.mp4\n,https://h/b.webm\n",  # spaces after commas
        '"label","URL"\n"juggling","https://h/a.mp4"\n"","https://h/b.webm"\n',  # quoted
        "# made by hand\nlabel,url\njuggling,https://h/a.mp4\n,https://h/b.webm\n",
    ],
    ids=["spaced", "quoted", "comment-first"],
)
def test_a_csv_header_is_found_however_it_is_written(tmp_path: Path, text: str) -> None:
    listing = tmp_path / "urls.csv"
    listing.write_text(text)
    records = read_url_list(listing)
    assert [(r.source_url, r.label) for r in records] == [
        ("https://h/a.mp4", "juggling"),
        ("https://h/b.webm", None),
    ]


def test_a_one_column_csv_and_an_unparseable_url_are_read_as_sources(tmp_path: Path) -> None:
    listing = tmp_path / "urls.csv"
    listing.write_text("url\nhttps://h/a.mp4\nhttp://[::1/x.mp4\n")
    records = read_url_list(listing)
    # The header is not a video; the broken URL is one, which its download fails (below).
    assert [r.source_url for r in records] == ["https://h/a.mp4", "http://[::1/x.mp4"]
    broken = download(records[1], tmp_path, DepthSettings())
    assert broken.failed and "invalid URL" in broken.error, broken.error


@pytest.mark.parametrize(
    ("listed", "says"),
    [
        ("https://h/a.mp4#t=30,10\n", r"#t=30,10: the window's end is not after its start"),
        ("https://h/a.mp4#t=1:75\n", r"#t=1:75 is not a time window"),
        ('url,label\nhttps://h/a.mp4,x\n\n"https://h/b.mp4#t=inf",y\n', r"#t=inf: a window"),
    ],
    ids=["backwards", "unreadable", "csv-inf"],
)
def test_a_listed_window_that_does_not_read_refuses_the_list_naming_its_line(
    tmp_path: Path, listed: str, says: str
) -> None:
    """Found in review, stop 55: a URL whose `#t=` could not be read was done as the whole
    video, under the label of its window."""
    listing = tmp_path / "urls.csv"
    listing.write_text("# windows\n" + listed)
    line = len(listing.read_text().splitlines())  # the last line, blank and comment lines counted
    with pytest.raises(SourceListError, match=rf"urls\.csv:{line}: bad time window: {says}"):
        read_url_list(listing)
    # Windows that read, and fragments that ask for none, are taken as written.
    listing.write_text("https://h/a.mp4#t=0:06:57,0:07:07\nhttps://h/b.mp4#t=0\nhttps://h/c#x\n")
    assert [window_of(r.source_url) for r in read_url_list(listing)] == [
        ClipWindow(417.0, 427.0), None, None,
    ]  # fmt: skip


def test_a_csv_row_with_more_fields_than_its_header_refuses_the_list(tmp_path: Path) -> None:
    """Found in review, stop 55: fields past the header were dropped, and with them the rest
    of a URL with an unquoted comma: `#t=417,427` was read as `#t=417`, from 417 s to the end
    of the video. An empty field past the header (a trailing comma) loses nothing."""
    listing = tmp_path / "urls.csv"
    for text, said in (
        ("url,label\nhttps://h/a.mp4,x\nhttps://h/b.mp4#t=417,427,juggling\n",
         "urls.csv:3: 3 fields, more than the header's 2"),
        ("url\nhttps://h/b.mp4#t=417,427\n", "urls.csv:2: 2 fields, more than the header's 1"),
    ):  # fmt: skip
        listing.write_text(text)
        with pytest.raises(SourceListError, match=re.escape(said)):
            read_url_list(listing)
    listing.write_text('url,label\n"https://h/b.mp4#t=417,427",juggling,\n')
    [record] = read_url_list(listing)
    assert (record.source_url, record.label) == ("https://h/b.mp4#t=417,427", "juggling")
    assert window_of(record.source_url) == ClipWindow(417.0, 427.0)


def test_kinetics_rows_keep_label_id_and_window() -> None:
    template = "https://mirror/{split}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4"
    records = read_kinetics_csv(KINETICS_CSV, url_template=template, split="val", limit=3)
    assert len(records) == 3
    first = records[0]
    assert (first.label, first.youtube_id, first.time_start, first.time_end) == (
        "abseiling", "0wR5jVB-WPk", 417, 427,
    )  # fmt: skip
    assert first.video_id == "0wR5jVB-WPk_000417_000427"
    assert first.source_url == "https://mirror/val/0wR5jVB-WPk_000417_000427.mp4"
    # A split with no row is named, with the splits there are (it was an empty run).
    with pytest.raises(SourceListError, match=r"no row of split 'train' \(found: \['val'\]\)"):
        read_kinetics_csv(KINETICS_CSV, url_template=template, split="train")


def test_kinetics_rows_of_whole_videos_ask_for_their_window(tmp_path: Path) -> None:
    """A template of whole videos (`{youtube_id}.mp4`, as the refusal of a template-less
    Kinetics CSV suggests) gave URLs of the whole video: every frame and depth map was of the
    video, not of the labelled 10-s clip. Its URLs now ask for their window (`#t=`)."""
    (first,) = read_kinetics_csv(KINETICS_CSV, url_template="https://m/{youtube_id}.mp4", limit=1)
    assert first.source_url == "https://m/0wR5jVB-WPk.mp4#t=417,427"
    assert window_of(first.source_url) == ClipWindow(417.0, 427.0)
    assert first.video_id == "0wR5jVB-WPk_000417_000427"  # the clip's id, as before
    # A window running backwards is refused, naming the row (it was taken as it was).
    backwards = tmp_path / "backwards.csv"
    backwards.write_text("label,youtube_id,time_start,time_end,split\nx,abc,20,10,val\n")
    with pytest.raises(SourceListError, match=r"backwards\.csv:2: bad time window: time_end 10"):
        read_kinetics_csv(backwards, url_template="https://m/{youtube_id}.mp4")


@pytest.mark.parametrize(
    ("url", "window"),
    [
        ("http://h/a.mp4#t=417,427", ClipWindow(417.0, 427.0)),
        ("http://h/a.mp4#t=npt:5", ClipWindow(5.0, None)),
        ("http://h/a.mp4#t=,20", ClipWindow(0.0, 20.0)),
        ("http://h/a.mp4#xywh=1,2,3,4&t=1.5,2", ClipWindow(1.5, 2.0)),
        ("http://h/a.mp4#t=npt:0:06:57,0:07:07.5", ClipWindow(417.0, 427.5)),  # clock times
        ("http://h/a.mp4#t=5,3", None),  # backwards
        ("http://h/a.mp4#t=nan,3", None),
        ("http://h/a.mp4#t=0", None),  # the whole video
        ("http://h/a.mp4#section-2", None),
        ("http://h/a.mp4", None),
    ],
)
def test_a_url_s_media_fragment_names_its_window(url: str, window: ClipWindow | None) -> None:
    assert window_of(url) == window
    if window is not None and window.end_s is not None:  # written back as it was read
        assert window_of(with_window(url, window.start_s, window.end_s)) == window


def test_a_window_is_written_in_plain_decimals() -> None:
    """`{:g}` wrote a window at 1,000,000 s as `1e+06`, which FFmpeg's -ss refuses."""
    assert with_window("http://h/a.mp4#old", 1_000_000, 1_000_010.25) == (
        "http://h/a.mp4#t=1000000,1000010.25"
    )


def test_a_kinetics_test_split_without_labels_reads_and_limit_counts_clips(
    tmp_path: Path,
) -> None:
    """Kinetics-600/700 publish their test splits without a label column: refused as "not a
    Kinetics CSV". And `--limit 2` of a list whose first rows repeat gave one clip."""
    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text(
        "youtube_id,time_start,time_end,split\n"
        "abc,1,11,test\nabc,1.0,11,test\ndef,5,15,test\nghi,0,10,test\n"
    )
    records = read_kinetics_csv(
        unlabelled, url_template="https://m/{youtube_id}_{time_start}.mp4", split="test", limit=2
    )
    assert [(r.video_id, r.label) for r in records] == [
        ("abc_000001_000011", None), ("def_000005_000015", None),
    ]  # fmt: skip
    # A bad row past the limit is not read: the first two clips are all that was asked for
    with unlabelled.open("a") as csv_file:
        csv_file.write("jkl,20,10,test\n")
    assert len(read_kinetics_csv(unlabelled, url_template="https://m/{youtube_id}.mp4",
                                 split="test", limit=2)) == 2  # fmt: skip
    with pytest.raises(SourceListError, match=r"uses \{label\}, which .*test.csv:2 has no col"):
        read_kinetics_csv(unlabelled, url_template="https://m/{label}/{youtube_id}.mp4", split=None)


def test_bad_kinetics_input_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(SourceListError, match="unknown fields"):
        read_kinetics_csv(KINETICS_CSV, url_template="https://h/{video}.mp4")
    not_kinetics = tmp_path / "x.csv"
    not_kinetics.write_text("url\nhttps://h/a.mp4\n")
    with pytest.raises(SourceListError, match="missing columns"):
        read_kinetics_csv(not_kinetics, url_template="https://h/{youtube_id}.mp4")
    with pytest.raises(SourceListError, match="cannot read"):
        read_url_list(tmp_path / "missing.txt")
    endless = tmp_path / "inf.csv"
    endless.write_text("label,youtube_id,time_start,time_end,split\nx,abc,inf,10,val\n")
    with pytest.raises(SourceListError, match=r"inf.csv:2: bad time window"):
        read_kinetics_csv(endless, url_template="https://h/{youtube_id}.mp4")
    template = "https://h/{youtube_id}.mp4"
    assert read_kinetics_csv(KINETICS_CSV, url_template=template, limit=0) == []
    # Past the table's int32 (microseconds, a typo): it failed the run after the work, not here.
    for value in ("3000000000", "-5"):
        wide = tmp_path / "wide.csv"
        wide.write_text(f"label,youtube_id,time_start,time_end,split\nx,abc,1,{value},val\n")
        with pytest.raises(
            SourceListError, match=rf"wide.csv:2: bad time window: time_end {value}"
        ):
            read_kinetics_csv(wide, url_template=template)


def test_kinetics_csvs_as_people_write_them_read_or_say_what_is_wrong(tmp_path: Path) -> None:
    """Found in review: a header in other case, no split column with a {split} template, a
    short row, a template with an open brace or a UTF-16 file gave a traceback or a message
    that named neither the file nor the flag."""
    loose = tmp_path / "loose.csv"
    # blank lines first (found in review, stop 62: "not a Kinetics CSV, missing columns")
    loose.write_text("\n \nLabel, YouTube_ID,Time_Start,time_end\nabseiling,0wR5jVB-WPk,417,427\n")
    (record,) = read_kinetics_csv(loose, url_template="https://h/{split}/{youtube_id}.mp4")
    assert record.source_url == "https://h/val/0wR5jVB-WPk.mp4#t=417,427"  # split: as asked
    assert (record.label, record.youtube_id, record.split) == ("abseiling", "0wR5jVB-WPk", "val")
    spaced = tmp_path / "spaced.csv"  # spaces after the commas, as in the header above
    spaced.write_text(
        "label, youtube_id, time_start, time_end, split\nabseiling, 0wR5, 4, 14, val\n"
    )
    (record,) = read_kinetics_csv(spaced, url_template="https://h/{split}/{youtube_id}.mp4")
    assert record.source_url == "https://h/val/0wR5.mp4#t=4,14" and record.youtube_id == "0wR5"
    short = tmp_path / "short.csv"
    short.write_text("label,youtube_id,time_start,time_end,split\nx,abc,1,2,val\ny,def,3\n")
    with pytest.raises(SourceListError, match=r"short.csv:3: fewer columns than the header"):
        read_kinetics_csv(short, url_template="https://h/{youtube_id}.mp4")
    with pytest.raises(SourceListError, match=r"--url-template 'https://h/\{youtube_id.mp4'"):
        read_kinetics_csv(loose, url_template="https://h/{youtube_id.mp4")
    wide = tmp_path / "utf16.txt"
    wide.write_text("https://h/a.mp4\n", encoding="utf-16")
    with pytest.raises(SourceListError, match=r"utf16.txt is not UTF-8 text"):
        read_url_list(wide)
    # A spreadsheet's export (found in review, stop 57): rows of spaces or empty fields refused
    # the list, and a bad row was named by a line counted past the blank lines.
    sheet = tmp_path / "sheet.csv"
    rows = "label,youtube_id,time_start,time_end,split\n\nx,abc,1,2,val\n   \n,,,,\n"
    sheet.write_text(rows)
    (record,) = read_kinetics_csv(sheet, url_template="https://h/{youtube_id}.mp4")
    assert record.youtube_id == "abc"
    sheet.write_text(f"{rows}\ny,def,3\n")
    with pytest.raises(SourceListError, match=r"sheet.csv:7: fewer columns than the header"):
        read_kinetics_csv(sheet, url_template="https://h/{youtube_id}.mp4")
    # A one-column list whose header is not `url`: its header was a video failing every run.
    links = tmp_path / "links.csv"
    links.write_text("video_url\nhttps://h/a.mp4\n")
    assert [r.source_url for r in read_url_list(links)] == ["https://h/a.mp4"]
    other = tmp_path / "other.csv"
    other.write_text("Label,YouTubeID,start,end\n")
    with pytest.raises(SourceListError, match=r"its header: \['Label', 'YouTubeID', 'start'"):
        read_kinetics_csv(other, url_template="https://h/{youtube_id}.mp4")
    # Windows of fractions (found in review, stop 58): 10.9 was cut to 10, -0.5 taken as 0,
    # and two rows a fraction apart made one id, the second dropped as a repeat.
    fractions = tmp_path / "fractions.csv"
    fractions.write_text("label,youtube_id,time_start,time_end\nx,abc,10.0,20\ny,abc,10.9,21\n")
    with pytest.raises(SourceListError, match=r"fractions.csv:3: .*time_start 10.9 is not a wh"):
        read_kinetics_csv(fractions, url_template="https://h/{youtube_id}.mp4")
    fractions.write_text("label,youtube_id,time_start,time_end\nx,abc,10.0,20\n")  # 10.0: 10
    (record,) = read_kinetics_csv(fractions, url_template="https://h/{youtube_id}.mp4")
    assert record.source_url == "https://h/abc.mp4#t=10,20"


def test_url_lists_split_at_semicolons_or_tabs_or_without_a_header_are_read_or_refused(
    tmp_path: Path,
) -> None:
    """A spreadsheet's "CSV" in many locales (`url;label`) or a TSV was read as one URL a line,
    labels and all (its header taken for a stray line), and a list of URLs and labels without a
    header likewise: every video failed at download as a 404 (found in review, stop 58)."""
    for name, sep in (("semicolons.csv", ";"), ("tabs.tsv", "\t")):
        listing = tmp_path / name
        listing.write_text(f"url{sep}label\nhttps://h/a.mp4{sep}dancing\nhttps://h/b.mp4{sep}x\n")
        records = read_url_list(listing)
        assert [(r.source_url, r.label) for r in records] == [
            ("https://h/a.mp4", "dancing"), ("https://h/b.mp4", "x"),
        ]  # fmt: skip
    headerless = tmp_path / "headerless.tsv"
    headerless.write_text("https://h/a.mp4\tdancing\n")
    with pytest.raises(SourceListError, match=r"headerless.tsv:1: .* holds a tab, which no URL"):
        read_url_list(headerless)
    # A space is a path's, as a bucket's console copies it: taken (the download encodes it).
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("https://bucket.example/My Videos/clip 1.mp4\n")
    assert [r.source_url for r in read_url_list(spaced)] == [
        "https://bucket.example/My Videos/clip 1.mp4"
    ]


# ---- download ------------------------------------------------------------------------------


def test_a_download_lands_under_its_id_with_no_temporary_file(tmp_path: Path) -> None:
    with VideoServer({"v.mp4": Serve(CLIP)}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path, DepthSettings())
    assert not record.failed and record.download_attempts == 1
    assert Path(record.raw_path) == tmp_path / "clip.mp4"
    assert Path(record.raw_path).read_bytes() == CLIP.read_bytes()
    assert record.raw_bytes == CLIP.stat().st_size
    assert _leftovers(tmp_path) == []


def test_a_stalled_body_times_out_is_retried_and_leaves_nothing(tmp_path: Path) -> None:
    settings = DepthSettings(**FAST_RETRIES)
    with VideoServer({"v.mp4": Stall(CLIP, stall_s=5)}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path, settings)
        assert server.requests["v.mp4"] == 3
    assert (record.status, record.failed_stage) == ("failed", "download")
    assert "timed out" in record.error and record.download_attempts == 3
    assert list(tmp_path.iterdir()) == []


def test_a_download_waiting_out_a_retry_after_lets_the_others_go_on(tmp_path: Path) -> None:
    """A Retry-After longer than the backoff is waited for (it was cut to the backoff's cap and
    retried into the same 429), and the waiting download lets its slot go: with one slot, the
    next video came only after the wait."""
    settings = DepthSettings(download_concurrency=1, retry_backoff_s=0.1, retry_backoff_max_s=0.2)
    routes = {"busy.mp4": Busy(CLIP, retry_after="2"), "free.mp4": Serve(CLIP)}
    with VideoServer(routes) as server:
        records = [_record(server.url(name), name.split(".")[0]) for name in routes]
        busy, free = download_many(records, tmp_path, settings)
        order = list(server.order)
    assert not busy.failed and busy.download_attempts == 2 and busy.download_s >= 2.0
    assert not free.failed
    assert order == ["busy.mp4", "free.mp4", "busy.mp4"]  # the free one went in the wait


def test_a_retried_download_s_wait_for_a_slot_is_not_taken_from_its_deadline(
    tmp_path: Path,
) -> None:
    """Found in review, stop 62: a download let its slot go for a retry's wait and queued for
    it again behind the shard's downloads not yet started, its deadline running: it failed
    "deadline" for a 503 that a retry would have got past."""
    settings = DepthSettings(download_concurrency=1, download_deadline_s=3.0,
                             retry_backoff_s=0.1, retry_backoff_max_s=0.2)  # fmt: skip
    slow = Drip(CLIP, chunk=64, every_s=2.0, drip_bytes=64)  # 2 s each
    routes = {"busy.mp4": Busy(CLIP, retry_after="0"), "slow1.mp4": slow, "slow2.mp4": slow}
    with VideoServer(routes) as server:
        records = [_record(server.url(name), name.split(".")[0]) for name in routes]
        busy, *slow_ones = download_many(records, tmp_path, settings)
        order = list(server.order)
    assert order == ["busy.mp4", "slow1.mp4", "slow2.mp4", "busy.mp4"]  # ~4 s behind them
    assert not busy.failed and busy.download_attempts == 2, busy.error
    assert not [record for record in slow_ones if record.failed]


def test_a_body_cut_short_by_a_dropped_connection_is_retried(tmp_path: Path) -> None:
    with VideoServer({"v.mp4": Cut(CLIP)}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path, DepthSettings(**FAST_RETRIES))
        assert server.requests["v.mp4"] == 2
    assert not record.failed and record.download_attempts == 2, record.error
    assert Path(record.raw_path).read_bytes() == CLIP.read_bytes()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("behaviour", "max_bytes"),
    [(Serve(CLIP), 10_000), (Stall(CLIP, after_bytes=300_000, stall_s=0), 100_000)],
    ids=["content-length", "streamed"],
)
def test_the_size_cap_stops_a_download_without_retrying(
    tmp_path: Path, behaviour: object, max_bytes: int
) -> None:
    settings = DepthSettings(max_download_bytes=max_bytes, **FAST_RETRIES)
    with VideoServer({"v.mp4": behaviour}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path, settings)
        assert server.requests["v.mp4"] == 1
    assert record.failed and "too big" in record.error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("code", "requests"), [(404, 1), (403, 1), (503, 3), (429, 3), (500, 3)])
def test_only_transient_http_errors_are_retried(tmp_path: Path, code: int, requests: int) -> None:
    settings = DepthSettings(**FAST_RETRIES)
    with VideoServer({"v.mp4": Status(code)}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path, settings)
        assert server.requests["v.mp4"] == requests
    assert record.failed and f"HTTP {code}" in record.error
    assert record.download_attempts == requests
    assert record.download_s is not None and record.download_s > 0  # kept on failed rows


@pytest.mark.parametrize(
    ("authority", "reason"),
    [("127.0.0.1:{port}", "HTTP 404"), ("", "invalid URL")],  # a 404; no host: aiohttp refuses
)
def test_a_failed_download_names_its_url_without_credentials_or_signature(
    tmp_path: Path, authority: str, reason: str
) -> None:
    """The error text goes to logs, artifacts and the table; the record keeps the whole URL (to
    fetch it again), and the table's `source_url` keeps it without the password or signature
    (they were written to every copy of the dataset)."""
    with VideoServer() as server:
        host = authority.format(port=server.port)
        url = f"http://user:pw@{host}/missing.mp4?sig=abc"
        record = download(_record(url), tmp_path, DepthSettings(**FAST_RETRIES))
    assert record.failed and reason in record.error, record.error
    assert f"http://{host}/missing.mp4?…" in record.error, record.error
    assert "pw" not in record.error and "sig=abc" not in record.error, record.error
    assert record.source_url == url
    [stored] = records_to_table([record]).column("source_url").to_pylist()
    assert stored == f"http://{host}/missing.mp4"
    kept = _record("https://u:p@h/get.mp4?id=7&X-Amz-Signature=S&X-Amz-Date=1")
    assert records_to_table([kept]).column("source_url").to_pylist() == ["https://h/get.mp4?id=7"]


@contextlib.contextmanager
def _raw_http_server(answer: bytes) -> Iterator[str]:
    """A loopback server that sends `answer` as it is to every request: bytes that aiohttp's
    own server would never write (a reason phrase that is not UTF-8)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            with client:
                client.recv(65536)
                client.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v.mp4"
    finally:
        done.set()
        server.join()
        listener.close()


def test_a_server_s_text_that_is_not_utf8_reaches_the_row_escaped(tmp_path: Path) -> None:
    """A Latin-1 reason phrase became lone surrogates in the error, which Arrow refused: the
    shard's write failed, and every video of the shard was stored as `store crashed`."""
    answer = b"HTTP/1.1 404 N\xe3o encontrado\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    with _raw_http_server(answer) as url:
        record = download(_record(url), tmp_path, DepthSettings(**FAST_RETRIES))
    assert record.failed and "HTTP 404 N\\udce3o encontrado" in record.error, record.error
    [stored] = records_to_table([record]).column("error").to_pylist()
    assert stored == record.error
    table = VideoTable(tmp_path / "out")
    table.upsert([record])
    rows = lance.dataset(table.lance_path).to_table(columns=["error"]).to_pylist()
    assert rows == [{"error": record.error}]


def test_a_video_whose_first_bytes_come_a_few_at_a_time_is_recognised(tmp_path: Path) -> None:
    """A slow link or a proxy: the container check waits for enough bytes to decide."""
    with VideoServer({"v.mp4": Drip(CLIP, chunk=3, every_s=0.05, drip_bytes=30)}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path, DepthSettings())
    assert not record.failed, record.error
    assert Path(record.raw_path).read_bytes() == CLIP.read_bytes()
    capture = cv2.VideoCapture(record.raw_path)
    assert capture.read()[0]  # the file is a video that decodes
    capture.release()
    assert _leftovers(tmp_path) == []


def test_a_short_body_that_is_not_a_video_is_still_refused(tmp_path: Path) -> None:
    # The first 4 bytes of an MP4 and then the end: too short to be a video.
    with VideoServer({"v.mp4": Body(CLIP.read_bytes()[:4], "video/mp4")}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path, DepthSettings())
    assert record.failed and "not a video container" in record.error
    assert list(tmp_path.iterdir()) == []


def test_a_refused_connection_is_retried_then_reported(tmp_path: Path) -> None:
    with VideoServer() as server:
        dead_url = server.url("v.mp4")
    record = download(_record(dead_url), tmp_path, DepthSettings(**FAST_RETRIES))
    assert record.failed and record.download_attempts == 3
    assert "Connect" in record.error and dead_url in record.error


def test_a_redirect_loop_is_reported_without_the_url_s_secrets(tmp_path: Path) -> None:
    """aiohttp's error says the whole URL: a pre-signed query went to the table, the artifacts
    and the logs."""
    signed = "loop.mp4?X-Amz-Signature=SIGSECRET"
    with VideoServer({"loop.mp4": Redirect(f"/{signed}")}) as server:
        url = server.url(signed).replace("http://", "http://alice:PW@")
        record = download(_record(url), tmp_path, DepthSettings(**FAST_RETRIES))
    assert record.failed and "too many redirects" in record.error, record.error
    assert "SIGSECRET" not in record.error and "PW" not in record.error
    assert "/loop.mp4?…" in record.error


def test_redirects_to_another_host_are_followed_only_to_public_addresses(tmp_path: Path) -> None:
    """aiohttp followed any redirect: a server in the list could send a worker to the cloud's
    metadata address or into the private network. The listed host's own redirects still work;
    a name is refused by its addresses, found as it is connected to."""
    routes = {
        "moved.mp4": Redirect("/v.mp4"),
        "relative.mp4": Redirect("v.mp4"),
        "metadata.mp4": Redirect("http://169.254.169.254/latest/meta-data/"),
        "private.mp4": Redirect("http://10.1.2.3/v.mp4"),
        "mapped.mp4": Redirect("http://[::ffff:169.254.169.254]/"),
        "ftp.mp4": Redirect("ftp://127.0.0.1/v.mp4"),
    }
    settings = DepthSettings(**FAST_RETRIES)
    with VideoServer({**routes, "v.mp4": Serve(CLIP)}) as server:
        by_name = server.url("v.mp4").replace("//127.0.0.1:", "//localhost:")
        server.routes["byname.mp4"] = Redirect(by_name)  # localhost: loopback, found by DNS
        names = [*routes, "byname.mp4"]
        records = [
            download(_record(server.url(name), name.split(".")[0]), tmp_path, settings)
            for name in names
        ]
        requests = [server.requests[name] for name in names]
    followed, relative, *refused = records
    for record in (followed, relative):
        assert not record.failed, record.error
        assert Path(record.raw_path).read_bytes() == CLIP.read_bytes()
    kinds = ["link-local", "private", "link-local", "ftp", "localhost is a loopback"]
    for record, kind in zip(refused, kinds, strict=True):
        assert record.failed and "redirect" in record.error and kind in record.error, record.error
        assert record.download_attempts == 1  # refused, never retried
    assert requests == [1, 1, 1, 1, 1, 1, 1]
    assert server.requests["v.mp4"] == 2  # only the listed host's own redirects reached it


def test_a_redirect_to_another_listed_private_host_is_refused_over_a_kept_connection(
    tmp_path: Path,
) -> None:
    """Found in review (stop 57): a shard's session keeps its connection to a listed private
    mirror alive, and a hop to that host from another server went over it with no lookup, so
    the resolver never checked it: an arbitrary path of the private host fetched."""
    settings = DepthSettings(**FAST_RETRIES, download_concurrency=1)  # one after the other
    with VideoServer({"v.mp4": Serve(CLIP), "secret.mp4": Serve(CLIP)}) as server:
        private = server.url("v.mp4").replace("//127.0.0.1:", "//localhost:")  # listed: allowed
        server.routes["hostile.mp4"] = Redirect(private.replace("v.mp4", "secret.mp4"))
        records = [_record(private, "mirror"), _record(server.url("hostile.mp4"), "hostile")]
        mirror, hostile = download_many(records, tmp_path, settings)
        secret_asked = server.requests["secret.mp4"]
    assert not mirror.failed, mirror.error
    assert hostile.failed and "localhost is a loopback" in hostile.error, hostile.error
    assert secret_asked == 0


@pytest.mark.parametrize(
    ("origin", "target", "refused"),
    [
        ("http://93.184.216.34/a.mp4", "http://127.0.0.1/b.mp4", "loopback"),
        ("http://93.184.216.34/a.mp4", "http://[::1]:8080/b.mp4", "loopback"),
        ("http://93.184.216.34/a.mp4", "http://192.168.1.5/b.mp4", "private"),
        ("http://93.184.216.34/a.mp4", "http://0.0.0.0:9000/b.mp4", "unspecified"),
        ("http://10.0.0.1/a.mp4", "http://10.9.9.9/b.mp4", "private"),
        ("https://127.0.0.1/a.mp4", "http://127.0.0.1/b.mp4", "https to http"),
        ("http://93.184.216.34/a.mp4", "file:///etc/passwd", "http/https only"),
        ("http://93.184.216.34/a.mp4", "https://8.8.8.8/b.mp4", None),
        ("http://localhost:1/a.mp4", "http://localhost:2/b.mp4", None),  # the listed host
        ("http://127.0.0.1:1/a.mp4", "http://localhost:2/b.mp4", None),  # a name: connected to
    ],
)
def test_a_redirect_to_another_host_must_name_a_public_address(
    origin: str, target: str, refused: str | None
) -> None:
    """Literal addresses, checked before any request (a public origin cannot be served from
    this sandbox); names are checked by the resolver, below and in the test above."""
    refusal = redirect_refusal(URL(origin), URL(origin), URL(target))
    assert (refusal is None) if refused is None else (refused in (refusal or "")), refusal


def test_the_resolver_refuses_a_name_with_a_non_public_address_on_a_redirect_only() -> None:
    async def resolve(public_only: bool) -> list[str]:
        token = redirects._PUBLIC_ONLY.set(public_only)
        resolver = PublicOnlyResolver()
        try:
            return [result["host"] for result in await resolver.resolve("localhost", 80)]
        finally:
            redirects._PUBLIC_ONLY.reset(token)
            await resolver.close()

    assert "127.0.0.1" in asyncio.run(resolve(public_only=False))  # a listed host: anywhere
    with pytest.raises(RedirectRefused, match="localhost is a loopback address"):
        asyncio.run(resolve(public_only=True))


def test_only_http_and_https_are_fetched(tmp_path: Path) -> None:
    for url in ("file:///etc/passwd", "ftp://host/a.mp4"):
        record = download(_record(url), tmp_path, DepthSettings())
        assert record.failed and "unsupported URL scheme" in record.error
        assert record.download_attempts == 0
    local = download(_record(str(CLIP)), tmp_path, DepthSettings())  # a path, not a URL
    assert local.failed and local.error.startswith("not a URL: give http(s) URLs")


def test_a_url_whose_host_cannot_be_encoded_fails_alone(tmp_path: Path) -> None:
    bad_hosts = ("http://a..b/x.mp4", f"http://{'b' * 70}.com/x.mp4")  # empty, too-long label
    with VideoServer({"v.mp4": Serve(CLIP)}) as server:
        urls = (*bad_hosts, server.url("v.mp4"))
        records = [_record(url, f"v{index}") for index, url in enumerate(urls)]
        *bad, good = download_many(records, tmp_path, DepthSettings(**FAST_RETRIES))
    assert good.status != "failed" and good.raw_path is not None
    for record, url in zip(bad, bad_hosts, strict=True):
        assert record.failed and record.failed_stage == "download"
        assert "invalid URL" in record.error and url in record.error, record.error
        assert record.download_attempts == 1  # no retry can fix it


def test_retry_classification_and_backoff() -> None:
    import aiohttp

    assert is_retryable(TimeoutError())
    assert is_retryable(aiohttp.ServerDisconnectedError())
    assert is_retryable(DownloadError("HTTP 502", retryable=True))
    assert not is_retryable(DownloadError("HTTP 404", retryable=False))
    assert not is_retryable(ValueError("bug"))
    assert is_retryable(aiohttp.ClientPayloadError("Response payload is not completed"))
    refused = aiohttp.ClientConnectorCertificateError(None, ssl.SSLCertVerificationError("bad"))
    assert not is_retryable(refused)  # a certificate stays wrong however often it is asked
    cut = aiohttp.ClientConnectorSSLError(None, ssl.SSLEOFError("EOF in violation of protocol"))
    assert is_retryable(cut)  # a handshake an overloaded server cut short
    plain = aiohttp.ClientConnectorSSLError(None, ssl.SSLError(1, "WRONG_VERSION_NUMBER"))
    assert not is_retryable(plain)  # plain HTTP on an https port: the same every time
    settings = DepthSettings(retry_backoff_s=1.0, retry_backoff_max_s=5.0)
    for retry, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (2.5, 5), (2.5, 5)]):
        assert low <= backoff_delay_s(retry, settings) <= high
    assert backoff_delay_s(0, settings, retry_after_s=3.0) == 3.0
    # Asked for longer than the backoff's cap: waited for (the deadline bounds it), not cut to
    # 5 s and retried into the same 429 until the attempts ran out.
    assert backoff_delay_s(0, settings, retry_after_s=600.0) == 600.0
    assert parse_retry_after("120") == 120.0 and parse_retry_after("soon") is None
    in_a_minute = email.utils.format_datetime(
        datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60), usegmt=True
    )
    assert 55 <= parse_retry_after(in_a_minute) <= 60
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: at once


def test_containers_are_recognised_by_their_first_bytes(tmp_path: Path) -> None:
    assert sniff_container(CLIP.read_bytes()[:256]) == "mp4"
    # AVCHD's .mts and a bare MPEG-2 stream, as FFmpeg writes them, were "not a video".
    for name, muxing, expected in [
        ("camera.mts", ["-f", "mpegts", "-mpegts_m2ts_mode", "1"], "m2ts"),
        ("bare.m2v", ["-f", "mpeg2video"], "mpg"),
    ]:
        made = tmp_path / name
        command = [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=d=1:s=64x64",
                   "-c:v", "mpeg2video", *muxing, str(made)]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        assert sniff_container(made.read_bytes()[:256]) == expected, name
    assert sniff_container(b"\x1a\x45\xdf\xa3" + bytes(60)) == "mkv"
    assert sniff_container(b"<!DOCTYPE html><html>") is None
    assert sniff_container(b"") is None


def test_a_webm_is_stored_as_webm_and_found_again_and_matroska_as_mkv(tmp_path: Path) -> None:
    """Found in review, stop 55: WebM, Matroska by another DocType, was stored as `.mkv`, where
    the README says `.webm`. Told apart by the DocType of their EBML header, as FFmpeg writes
    them (VP8 in WebM, MPEG-4 part 2 in Matroska)."""
    made = {}
    for name, codec in (("v.webm", "libvpx"), ("v.mkv", "mpeg4")):
        made[name] = tmp_path / "made" / name
        made[name].parent.mkdir(exist_ok=True)
        command = [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "testsrc=d=1:s=64x48:r=30",
                   "-c:v", codec, str(made[name])]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
    with VideoServer({name: Serve(path) for name, path in made.items()}) as server:
        raw = tmp_path / "raw"
        webm = download(_record(server.url("v.webm"), "a"), raw, DepthSettings())
        mkv = download(_record(server.url("v.mkv"), "b"), raw, DepthSettings())
        again = download(_record(server.url("v.webm"), "a"), raw, DepthSettings())
        asked = dict(server.requests)
    assert (webm.raw_path, mkv.raw_path) == (str(raw / "a.webm"), str(raw / "b.mkv"))
    assert again.raw_path == webm.raw_path and asked["v.webm"] == 1  # the whole one kept
    assert sorted(p.name for p in raw.iterdir()) == ["a.url", "a.webm", "b.mkv", "b.url"]
    done = transcode(webm, tmp_path / "out", DepthSettings())
    assert not done.failed and done.frame_count == 30, done.error
    # Too few bytes to reach the DocType: still Matroska's family, named as before.
    assert sniff_container(made["v.webm"].read_bytes()[:12]) == "mkv"


# ---- transcode -----------------------------------------------------------------------------


def test_transcode_gives_360p_h264_with_an_even_width(tmp_path: Path) -> None:
    record = _record("http://h/v.mp4").update(raw_path=str(CLIP))
    result = transcode(record, tmp_path, DepthSettings())
    assert not result.failed, result.error
    capture = cv2.VideoCapture(result.transcoded_path)
    codec = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
    ok, frame = capture.read()
    capture.release()
    assert ok and frame.shape[:2] == (360, 478) and codec in ("avc1", "h264")
    assert (result.source_width, result.source_height, result.source_fps) == (340, 256, 30.0)
    assert result.frame_count == 300 and result.duration_s == pytest.approx(10.0)
    assert _leftovers(tmp_path) == []


def test_a_url_s_window_is_cut_from_its_video(tmp_path: Path) -> None:
    """A Kinetics row of a whole video (or a URL list's `#t=`): the transcode is the window
    alone, fetched from the URL without its fragment."""
    with VideoServer({"v.mp4": Serve(CLIP)}) as server:
        record = download(_record(server.url("v.mp4") + "#t=2,5"), tmp_path, DepthSettings())
    assert not record.failed, record.error
    result = transcode(record, tmp_path / "out", DepthSettings())
    assert not result.failed, result.error
    assert result.frame_count == 90 and result.duration_s == pytest.approx(3.0)  # 30 fps
    capture = cv2.VideoCapture(result.transcoded_path)
    first = capture.read()[1]
    capture.release()
    source = cv2.VideoCapture(str(CLIP))
    source.set(cv2.CAP_PROP_POS_FRAMES, 60)  # 2 s in
    expected = cv2.resize(source.read()[1], (first.shape[1], first.shape[0]))
    source.release()
    assert np.mean(np.abs(first.astype(float) - expected.astype(float))) < 12
    # A mirror that names its clips by video id alone serves the clip itself: it cannot hold
    # the window and is no longer than it, and is taken whole (cut again, little was left).
    for window in ("#t=417,427", "#t=5,15"):  # past its end; or the clip's length, from 5 s
        clip_itself = record.update(source_url=record.source_url.replace("#t=2,5", window))
        whole = transcode(clip_itself, tmp_path / "whole" / window[3:], DepthSettings())
        assert not whole.failed and whole.frame_count == 300, (window, whole.error)


def _testsrc_video(path: Path, seconds: int) -> Path:
    """A real H.264 MP4 of `seconds` at 30 fps (64x48), made by FFmpeg."""
    source = f"testsrc=d={seconds}:s=64x48:r=30"
    command = [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", source, "-c:v", "libx264",
               "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return path


@pytest.mark.parametrize(
    ("seconds", "window", "frames"),
    [
        (7, "#t=5,15", 210),  # the clip itself, a little short: whole (it was cut to its last 2 s)
        (30, "#t=25,35", 150),  # a video that ends inside its window: what it has of it
        (30, "#t=25", 150),  # an open window: from its start to the video's end
    ],
)
def test_a_file_is_the_clip_itself_only_when_it_is_no_longer_than_its_window(
    tmp_path: Path, seconds: int, window: str, frames: int
) -> None:
    """Found in review, stop 55: a file that could not hold its window was cut to what it
    had of it even when it was about the clip's length (a 7-s clip asked for 5-15 s gave its
    last 2 s), though the README takes such a file as the clip itself."""
    video = _testsrc_video(tmp_path / "video.mp4", seconds)
    record = _record(f"http://h/v.mp4{window}").update(raw_path=str(video))
    done = transcode(record, tmp_path / "out", DepthSettings())
    assert not done.failed, done.error
    assert done.frame_count == frames and done.duration_s == pytest.approx(frames / 30)


@pytest.mark.parametrize("window", ["#t=417,427", "#t=40"])
def test_a_video_that_ends_before_its_window_starts_fails_unless_it_is_the_clip(
    tmp_path: Path, window: str
) -> None:
    """Found in review, stop 55: any file that ended before its window's start was taken
    whole as "the clip itself": a 30-s video asked for 417-427 s became an ok row of 30 s of
    other footage under the clip's label. Only a file no longer than the window is the clip."""
    video = _testsrc_video(tmp_path / "video.mp4", 30)
    record = _record(f"http://h/v.mp4{window}").update(raw_path=str(video))
    done = transcode(record, tmp_path / "out", DepthSettings())
    assert (done.status, done.failed_stage) == ("failed", "transcode"), done
    start = window[3:].split(",")[0]
    assert done.error == f"the video is 30 s; its window starts at {start} s (the URL's #t=)"
    assert not (tmp_path / "out" / "clip.mp4").exists()


# `ffmpeg -encoders` of a build without libx264 (Fedora's ffmpeg-free, conda-forge's LGPL
# build), and its answer to a transcode that asks for it.
FFMPEG_WITHOUT_X264 = """#!/bin/sh
case "$*" in
    *-encoders*)
        echo "Encoders:"
        echo " V..... = Video"
        echo " ------"
        echo " V....D libopenh264          OpenH264 H.264 / AVC / MPEG-4 AVC (codec h264)"
        echo " V....D libvpx-vp9           libvpx VP9 (codec vp9)"
        echo " A....D aac                  AAC (Advanced Audio Coding)"
        exit 0 ;;
esac
echo "Unknown encoder 'libx264'" >&2
exit 8
"""


@pytest.fixture
def ffmpeg_found_again() -> Iterator[None]:
    """`ffmpeg_exe` looks again in this test, and again after it (its answer is cached)."""
    ffmpeg_exe.cache_clear()
    yield
    ffmpeg_exe.cache_clear()


def test_an_ffmpeg_on_path_without_libx264_is_passed_by_for_the_wheel_s(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    ffmpeg_found_again: None,
) -> None:
    """Found in review, stop 55: an ffmpeg on PATH was used without asking whether it encodes
    H.264; with Fedora's ffmpeg-free every transcode failed with "Unknown encoder", though
    the imageio-ffmpeg wheel's ffmpeg was there. One that has libx264 is still preferred."""
    import imageio_ffmpeg

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "ffmpeg"
    fake.write_text(FFMPEG_WITHOUT_X264)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    with caplog.at_level("WARNING", logger="tasks.depth.transcode"):
        record = transcode(_record("http://h/v.mp4").update(raw_path=str(CLIP)), tmp_path / "out",
                           DepthSettings())  # fmt: skip
    assert not record.failed and record.frame_count == 300, record.error
    assert ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
    assert f"{fake} has no libx264 encoder" in caplog.text
    # An ffmpeg on PATH that has it (here the wheel's, under the name `ffmpeg`) is taken.
    fake.unlink()
    fake.symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    ffmpeg_exe.cache_clear()
    assert ffmpeg_exe() == str(fake)


def _ffmpeg_children_niceness() -> list[int]:
    """The niceness of this process's ffmpeg children running now."""
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):  # ended meanwhile
            if child.name().startswith("ffmpeg"):
                found.append(child.nice())
    return found


@pytest.mark.parametrize("lower_by", [10, 0])
def test_ffmpeg_runs_below_the_pipelines_cpu_priority(tmp_path: Path, lower_by: int) -> None:
    """Transcodes are batch work: ffmpeg runs `transcode_nice` steps below its worker, so the
    Prefect UI, downloads and the depth model get a busy machine's CPU first."""
    settings = DepthSettings(transcode_nice=lower_by)
    record = _record("http://h/v.mp4").update(raw_path=str(CLIP))
    ffmpeg_exe()  # found first: imageio-ffmpeg checks its binary by running it, at our priority
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = pool.submit(transcode, record, tmp_path, settings)
        seen: set[int] = set()
        while not done.done():
            seen.update(_ffmpeg_children_niceness())
            time.sleep(0.005)
    assert not done.result().failed
    assert seen == {os.nice(0) + lower_by}


def test_ffmpeg_errors_end_up_in_the_record(tmp_path: Path) -> None:
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(CLIP.read_bytes()[:4096])
    record = transcode(
        _record("http://h/v.mp4").update(raw_path=str(broken)), tmp_path / "out", DepthSettings()
    )
    assert (record.status, record.failed_stage) == ("failed", "transcode")
    assert "ffmpeg exit" in record.error and "moov atom not found" in record.error
    assert _leftovers(tmp_path / "out") == []


def test_a_source_cut_short_fails_its_transcode_and_is_not_kept(tmp_path: Path) -> None:
    """FFmpeg transcodes what there is of a file cut short (a download from a server that
    sent no length, a mirror's broken copy) and exits 0: the clip became an ok row of 6 s of
    its 10, kept for good (ok rows are never fetched again)."""
    whole = tmp_path / "whole.mp4"  # index first, as a streamed file is: the rest is readable
    command = [ffmpeg_exe(), "-v", "error", "-i", str(CLIP), "-c", "copy",
               "-movflags", "+faststart", str(whole)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    record = transcode(
        _record("http://h/v.mp4").update(raw_path=str(cut)), tmp_path / "out", DepthSettings()
    )
    assert (record.status, record.failed_stage) == ("failed", "transcode"), record
    assert "frames its header gives (cut short, or damaged)" in record.error, record.error
    assert "of the 300 frames" in record.error, record.error
    assert _leftovers(tmp_path / "out") == [] and not (tmp_path / "out" / "clip.mp4").exists()


# An m4a's cover picture is a video stream to `-map 0:v:0`: it became a one-frame "video"
# row with a depth map of the album art.
COVER_ART = [
    "-f", "lavfi", "-i", "color=c=red:s=64x64:d=1", "-map", "0:a", "-map", "1:v", "-frames:v", "1",
    "-c:v", "mjpeg", "-disposition:v:0", "attached_pic", "-c:a", "aac",
]  # fmt: skip


@pytest.mark.parametrize("extra", [[], COVER_ART], ids=["audio-only", "cover-art"])
def test_a_file_without_a_video_stream_says_so(tmp_path: Path, extra: list[str]) -> None:
    audio = tmp_path / "song.m4a"
    command = [ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=d=1", *extra, str(audio)]
    made = subprocess.run(command, capture_output=True, check=False)
    assert made.returncode == 0, made.stderr
    record = transcode(
        _record("http://h/song.m4a").update(raw_path=str(audio)), tmp_path / "out", DepthSettings()
    )
    assert record.failed and record.error.startswith("no video stream in the file"), record.error


def test_an_error_no_check_foresaw_fails_its_video_not_the_shard(tmp_path: Path) -> None:
    """An ffmpeg that cannot start (here: not executable; for real, fork out of memory) raised
    out of the shard's transcodes, and every video of the shard was failed with its error."""
    from tasks.depth.transcode import transcode_many

    broken = tmp_path / "broken"
    broken.write_bytes(CLIP.read_bytes()[:4096])
    records = [
        VideoRecord(video_id=name, source_url=f"http://h/{name}.mp4", raw_path=str(path))
        for name, path in (("a", CLIP), ("b", broken))
    ]
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the output folder should be")
    for workers in (1, 2):
        done = transcode_many(records, blocked / "out", DepthSettings(), workers)
        assert [r.failed_stage for r in done] == ["transcode", "transcode"]
        assert "transcode crashed: NotADirectoryError" in done[0].error
    done = transcode_many(records, tmp_path / "out", DepthSettings(), 2)
    assert not done[0].failed and done[1].failed and "ffmpeg exit" in done[1].error


def test_a_transcode_past_its_timeout_is_stopped(tmp_path: Path) -> None:
    """Failed, its partial file gone, and its ffmpeg stopped: the partial file is unlinked even
    while an ffmpeg left running writes on (found in review, stop 57: nothing checked it)."""
    record = _record("http://h/v.mp4").update(raw_path=str(CLIP))
    ffmpeg_exe()  # found first: imageio-ffmpeg checks its binary by running it
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = pool.submit(transcode, record, tmp_path, DepthSettings(transcode_timeout_s=0.2))
        running = False
        while not done.done():
            running = running or bool(_ffmpeg_children_niceness())
            time.sleep(0.005)
    record = done.result()
    assert record.failed and "timed out after 0.2 s" in record.error
    assert running and _ffmpeg_children_niceness() == []  # it ran, and was stopped
    assert list(tmp_path.iterdir()) == []


def test_a_missing_download_fails_the_transcode(tmp_path: Path) -> None:
    record = transcode(
        _record("http://h/v.mp4").update(raw_path=str(tmp_path / "gone.mp4")),
        tmp_path,
        DepthSettings(),
    )
    assert record.failed and "missing" in record.error


# ---- depth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("first", 300, [0]),
        ("middle", 300, [150]),
        ("uniform:1", 300, [150]),
        ("uniform:3", 300, [50, 150, 250]),
        ("uniform:10", 4, [0, 1, 2, 3]),
        ("first", 0, []),
        ("all", 4, [0, 1, 2, 3]),
    ],
)
def test_frame_selection(spec: str, count: int, expected: list[int]) -> None:
    assert frame_indices(spec, count) == expected


@pytest.mark.parametrize("spec", ["last", "uniform:0", "uniform:x", "uniform", "uniform:-1"])
def test_bad_frame_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="must be first, middle, uniform:N or all with N >= 1"):
        check_frames_spec(spec)
    with pytest.raises(ValidationError, match="must be first, middle"):
        DepthSettings(frames=spec)
    # The flow's parameter schema says so too: Prefect refuses such a run when it is created.
    schema = DepthSettings.model_json_schema()["properties"]["frames"]
    assert re.fullmatch(schema["pattern"], spec) is None
    valid = ("first", "middle", "all", "uniform:12")
    assert all(re.fullmatch(schema["pattern"], ok) for ok in valid)


def test_a_video_whose_maps_cannot_be_written_fails_alone_and_leaves_no_file(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    """A write that fails (a full disk, here a folder where the file goes) raised out of the
    depth call: every video of the call failed, and the others' partial files were left."""
    settings = DepthSettings(depth_model=str(tiny_depth_model), frames="uniform:2", device="cpu")
    transcoded = transcode(
        _record("http://h/v.mp4").update(raw_path=str(CLIP)), tmp_path / "videos", settings
    )
    maps_dir = tmp_path / "depth"
    (maps_dir / "blocked.npy").mkdir(parents=True)  # where its file goes: renamed onto, refused
    blocked, fine = (transcoded.update(video_id=name) for name in ("blocked", "fine"))
    first, second = estimate_depth_many([blocked, fine], maps_dir, settings)
    assert first.failed and first.failed_stage == "depth", first
    assert "IsADirectoryError" in first.error, first.error
    assert second.status == "ok" and np.load(second.depth_path).shape == (2, 360, 478)
    assert sorted(p.name for p in maps_dir.iterdir()) == ["blocked.npy", "fine.npy", "fine.png"]


def test_a_video_a_stage_fails_under_another_stage_s_name_is_said_in_its_log() -> None:
    """The depth step fails a transcode that has no readable frame as failed at transcode: it
    was said in no task's log, only in the table (found in review, stop 59)."""
    from tasks.depth.shard_tasks import Shard, _run_stage

    going, gone = _record("http://h/a.mp4", "a"), _record("http://h/b.mp4", "b")
    shard = Shard(0, 1, (going, gone.fail("download", "HTTP 404")))

    def depth_step(records: list[VideoRecord]) -> list[VideoRecord]:
        return [record.fail("transcode", "no frame could be read") for record in records]

    said: list[str] = []
    heard = logging.Handler(logging.WARNING)  # not caplog: Prefect's import resets the root's
    heard.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("tasks.depth.shard_tasks")
    logger.addHandler(heard)

    def crashes(records: list[VideoRecord]) -> list[VideoRecord]:
        raise RuntimeError("feed.add failed")

    try:
        _run_stage("depth", shard, depth_step)
        _run_stage("transcode", shard, crashes)  # its last try (outside Prefect: the only one)
    finally:
        logger.removeHandler(heard)
    assert said == [
        "a failed at transcode: no frame could be read",  # b: said by its own stage
        "a failed at transcode: transcode crashed: RuntimeError: feed.add failed",
    ]


def test_a_video_whose_maps_find_the_disk_full_fails_alone_and_leaves_no_file(
    tmp_path: Path, tiny_depth_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk full as a video's map file takes its blocks (found in review, stop 59: only a
    failed rename was tested, not this, the path a full disk takes). A full disk cannot be had
    on demand here: the system call says so for that one file."""
    real_allocate = os.posix_fallocate

    def full_for_one(fd: int, offset: int, length: int) -> None:
        if ".full.npy." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_allocate(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", full_for_one)
    settings = DepthSettings(depth_model=str(tiny_depth_model), frames="uniform:2", device="cpu")
    transcoded = transcode(
        _record("http://h/v.mp4").update(raw_path=str(CLIP)), tmp_path / "videos", settings
    )
    maps_dir = tmp_path / "depth"
    full, fine = (transcoded.update(video_id=name) for name in ("full", "fine"))
    first, second = estimate_depth_many([full, fine], maps_dir, settings)
    assert first.failed and first.failed_stage == "depth", first
    assert "No space left on device" in first.error, first.error
    assert second.status == "ok" and np.load(second.depth_path).shape == (2, 360, 478)
    assert sorted(p.name for p in maps_dir.iterdir()) == ["fine.npy", "fine.png"]  # no partial


def test_depth_maps_are_written_at_the_frame_size(tmp_path: Path, tiny_depth_model: Path) -> None:
    settings = DepthSettings(depth_model=str(tiny_depth_model), frames="uniform:3", device="cpu")
    transcoded = transcode(
        _record("http://h/v.mp4").update(raw_path=str(CLIP)), tmp_path / "videos", settings
    )
    record = estimate_depth(transcoded, tmp_path / "depth", settings)
    assert record.status == "ok" and record.depth_frame_indices == [50, 150, 250]
    depth = np.load(record.depth_path)
    assert depth.dtype == np.float16 and depth.shape == (3, 360, 478)
    assert np.isfinite(depth).all() and (depth > 0).all()
    assert cv2.imread(record.depth_preview_path).shape == (360, 478, 3)
    assert record.depth_min_m <= record.depth_mean_m <= record.depth_max_m
    assert abs(record.depth_mean_m - float(depth.astype(np.float64).mean())) < 0.01 * abs(
        record.depth_mean_m
    )
    assert record.depth_model == str(tiny_depth_model) and record.depth_s > 0
    assert record.depth_untrained is True
    # One model per process: a reused worker does not load the weights again.
    assert shared_estimator(settings) is shared_estimator(settings.model_copy())


class _ConstantDepth:
    """A stand-in model whose every depth value is `value`: a model's NaN or overflow cannot be
    had from the test's small model on demand."""

    model_name, device, untrained = "constant", "cpu", True

    def __init__(self, value: float) -> None:
        self.value = value

    def estimate(self, frames_rgb: list[np.ndarray]) -> list[DepthMap]:
        return [DepthMap(np.full(f.shape[:2], self.value, np.float32), None) for f in frames_rgb]


def test_a_model_s_nan_fails_its_video_and_depth_past_float16_is_clipped(tmp_path: Path) -> None:
    """A NaN was stored and the row said "ok" with min inf, max -inf and a mean of NaN; a value
    past float16's range was stored as inf while the row gave its float32 maximum."""
    settings = DepthSettings(frames="uniform:2", device="cpu")
    transcoded = transcode(
        _record("http://h/v.mp4").update(raw_path=str(CLIP)), tmp_path / "videos", settings
    )
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("-inf", -float("inf"))):
        bad = estimate_depth(transcoded, tmp_path / name, settings, _ConstantDepth(value))
        assert bad.failed and bad.failed_stage == "depth" and "NaN or inf" in bad.error, name
        assert not list((tmp_path / name).glob("*.npy"))  # no map that looks made
    far = estimate_depth(transcoded, tmp_path / "far", settings, _ConstantDepth(1e6))
    assert far.status == "ok" and far.depth_max_m == far.depth_min_m == FLOAT16_MAX
    assert np.isfinite(np.load(far.depth_path)).all()


def _count_calls(estimator: Any) -> list[int]:
    """The frames of each of `estimator`'s model calls from now on (it still makes them)."""
    calls: list[int] = []
    real_estimate = estimator.estimate

    def counting(frames: list[np.ndarray]) -> list:
        calls.append(len(frames))
        return real_estimate(frames)

    estimator.estimate = counting
    return calls


def _wide_and_square(tmp_path: Path, settings: DepthSettings) -> list[VideoRecord]:
    """The sample clip (4:3) and a square crop of it, transcoded: two shapes of frame."""
    square = tmp_path / "square.mp4"
    crop = [ffmpeg_exe(), "-v", "error", "-i", str(CLIP), "-vf", "crop=256:256", "-t", "2"]
    subprocess.run([*crop, str(square)], check=True)
    return [
        transcode(_record(f"http://h/{name}.mp4", name).update(raw_path=str(raw)),
                  tmp_path / "videos", settings)
        for name, raw in (("wide", CLIP), ("square", square))
    ]  # fmt: skip


def test_videos_of_two_shapes_share_a_batch_of_a_model_that_keeps_their_aspect(
    tmp_path: Path, tiny_depth_anything: Path
) -> None:
    """Depth Anything's processor cannot stack frames of two shapes: every batch that mixed a
    16:9 and a 4:3 video failed all of its videos."""
    settings = DepthSettings(
        depth_model=str(tiny_depth_anything), depth_backend="torch", device="cpu",
        frames="uniform:2", depth_batch_size=8, height=64,
    )  # fmt: skip
    estimator = DepthEstimator(str(tiny_depth_anything), "cpu")
    calls = _count_calls(estimator)
    videos = _wide_and_square(tmp_path, settings)
    done = estimate_depth_many(videos, tmp_path / "depth", settings, estimator)
    assert [r.status for r in done] == ["ok", "ok"], [r.error for r in done]
    assert calls == [4]  # one batch of both videos' frames (not retried video by video)
    assert np.load(done[0].depth_path).shape == (2, 64, 86)  # each at its frames' size
    assert np.load(done[1].depth_path).shape == (2, 64, 64)


class _FailsOnShape(_ConstantDepth):
    """A stand-in model that fails on any call holding a frame of `shape` (a model's failure on
    one video's frames cannot be had from the test's small model on demand)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__(1.0)
        self.shape = shape

    def estimate(self, frames_rgb: list[np.ndarray]) -> list[DepthMap]:
        if any(frame.shape == self.shape for frame in frames_rgb):
            raise RuntimeError("cannot take this one")
        return super().estimate(frames_rgb)


def test_a_model_failure_on_one_video_of_a_batch_fails_that_video_alone(tmp_path: Path) -> None:
    """The whole batch, up to 8 videos, failed with it."""
    settings = DepthSettings(frames="uniform:2", depth_batch_size=8, height=64, device="cpu")
    videos = _wide_and_square(tmp_path, settings)
    wide, square = estimate_depth_many(
        videos, tmp_path / "depth", settings, _FailsOnShape((64, 64, 3))
    )
    assert wide.status == "ok", wide.error
    assert square.failed and square.failed_stage == "depth"
    assert square.error == "RuntimeError: cannot take this one"


def test_all_frames_stream_through_batches_into_one_array_per_video(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    """`--frames all`: every frame of each video, in model calls of at most the batch size that
    span videos, with maps equal to those of one-frame calls."""
    settings = DepthSettings(
        depth_model=str(tiny_depth_model), frames="all", device="cpu", depth_batch_size=7
    )
    videos = [
        transcode(_record(f"http://h/{name}.mp4", name).update(raw_path=str(CLIP)),
                  tmp_path / "videos", settings.model_copy(update={"height": 64}))
        for name in ("a", "b")
    ]  # fmt: skip
    estimator = load_depth_estimator(settings, "cpu")  # ONNX Runtime, as a CPU actor runs it
    real_estimate = estimator.estimate
    calls = _count_calls(estimator)
    done = estimate_depth_many(videos, tmp_path / "depth", settings, estimator)
    frames = videos[0].frame_count
    assert all(record.status == "ok" for record in done), [r.error for r in done]
    # Batches of 7 across both videos (each video alone would end in a short batch of its own).
    full, rest = divmod(2 * frames, 7)
    assert calls == [7] * full + [rest] * bool(rest), calls
    for record in done:
        depth = np.load(record.depth_path, mmap_mode="r")
        assert depth.dtype == np.float16 and depth.shape[0] == frames == len(
            record.depth_frame_indices
        )
    middle = read_frames(Path(done[1].transcoded_path), [frames // 2])[frames // 2]
    alone = real_estimate([middle])[0].depth_m.astype(np.float16)
    np.testing.assert_allclose(
        np.load(done[1].depth_path)[frames // 2], alone, rtol=1e-2, atol=1e-3
    )


def test_a_model_that_cannot_load_fails_the_video_not_the_run(tmp_path: Path) -> None:
    settings = DepthSettings(depth_model=str(tmp_path / "no-model"), device="cpu")
    transcoded = transcode(
        _record("http://h/v.mp4").update(raw_path=str(CLIP)), tmp_path / "videos", settings
    )
    record = estimate_depth(transcoded, tmp_path / "depth", settings)
    assert (record.status, record.failed_stage) == ("failed", "depth")
    assert "no-model" in record.error


def test_depth_estimator_matches_a_direct_forward(tiny_depth_model: Path) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    frame = read_frames(CLIP, [10])[10]
    ours = DepthEstimator(str(tiny_depth_model), "cpu").estimate([frame])[0]
    processor = AutoImageProcessor.from_pretrained(tiny_depth_model)
    model = AutoModelForDepthEstimation.from_pretrained(tiny_depth_model).eval()
    with torch.inference_mode():
        outputs = model(**processor(images=[frame], return_tensors="pt"))
    direct = processor.post_process_depth_estimation(outputs, target_sizes=[frame.shape[:2]])[0]
    np.testing.assert_allclose(ours.depth_m, direct["predicted_depth"].numpy(), rtol=1e-5)


def test_only_a_model_marked_untrained_is_labelled_untrained(
    tmp_path: Path, tiny_depth_model: Path
) -> None:
    """The marker in config.json decides: the same weights without it count as trained."""
    trained = tmp_path / "trained"
    shutil.copytree(tiny_depth_model, trained)
    config = json.loads((trained / "config.json").read_text())
    assert config.pop(UNTRAINED_CONFIG_KEY) is True
    (trained / "config.json").write_text(json.dumps(config))
    assert DepthEstimator(str(tiny_depth_model), "cpu").untrained is True
    assert DepthEstimator(str(trained), "cpu").untrained is False
    on_onnx = DepthSettings(depth_model=str(trained), cache_dir=tmp_path / "cache")
    assert load_depth_estimator(on_onnx, "cpu").untrained is False
    assert check_depth_model(str(tiny_depth_model)) is True
    assert check_depth_model(str(trained)) is False


def test_a_home_folder_is_expanded_in_output_cache_and_model(
    tmp_path: Path, tiny_depth_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~/x`, from the environment or a quoted flag, is the home folder's x (it made a folder
    named `~` in the working directory, and a model there was "not found")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_depth_model, tmp_path / "models" / "tiny")
    monkeypatch.setenv("VIDFLOW_DEPTH_OUTPUT", "~/out")
    settings = DepthSettings(depth_model="~/models/tiny", cache_dir="~/cache")
    assert settings.output == tmp_path / "out"
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.depth_model == str(tmp_path / "models" / "tiny")
    assert check_depth_model(settings.depth_model) is True


TIMEOUTS = [
    "connect_timeout_s",
    "read_timeout_s",
    "download_deadline_s",
    "download_rate_window_s",
    "transcode_timeout_s",
    # found in review, stop 62: these alone took any number (a keep-alive of 1e12 s)
    "depth_keep_alive_s",
    "lost_node_wait_s",
    "retry_backoff_s",
    "retry_backoff_max_s",
]


@pytest.mark.parametrize("name", TIMEOUTS)
def test_a_timeout_python_cannot_wait_for_is_refused(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review, stop 55: `--transcode-timeout-s inf` made every transcode crash with
    OverflowError in subprocess's wait (so did 1e7 s), `--connect-timeout-s inf` every download
    in aiohttp. Timeouts are finite and at most a day; no setting takes inf or nan."""
    for value in (math.inf, math.nan, 86_401.0, 1e9):
        with pytest.raises(ValidationError, match=name):
            DepthSettings(**{name: value})
    monkeypatch.setenv(f"VIDFLOW_DEPTH_{name.upper()}", "inf")
    with pytest.raises(ValidationError, match="finite number"):
        DepthSettings()
    monkeypatch.delenv(f"VIDFLOW_DEPTH_{name.upper()}")
    assert getattr(DepthSettings(**{name: 86_400.0}), name) == 86_400.0
    with pytest.raises(ValidationError, match="finite number"):
        DepthSettings(depth_keep_alive_s=math.inf)


def test_the_longest_timeouts_are_waits_python_makes(tmp_path: Path) -> None:
    """A day, the most a timeout takes, is a wait subprocess and aiohttp make: a download and
    a transcode with every timeout at it run as any other (guard)."""
    waits = [name for name in TIMEOUTS if "backoff" not in name]  # a retry would wait a day
    longest = DepthSettings(**dict.fromkeys(waits, 86_400.0))
    with VideoServer({"v.mp4": Serve(CLIP)}) as server:
        record = download(_record(server.url("v.mp4")), tmp_path / "raw", longest)
    done = transcode(record, tmp_path / "out", longest)
    assert not done.failed and done.frame_count == 300, done.error


# ---- storage -------------------------------------------------------------------------------


def test_the_arrow_schema_lists_every_record_field_in_order() -> None:
    assert ARROW_SCHEMA.names == [field.name for field in dataclasses.fields(VideoRecord)]


def test_upserts_replace_rows_and_plans_skip_done_videos(tmp_path: Path) -> None:
    table = VideoTable(tmp_path)
    done = _record("http://h/a.mp4", "a").finish(status="ok", depth_frame_indices=[0])
    broken = _record("http://h/b.mp4", "b").fail("download", "HTTP 404")
    table.upsert([done, broken])
    plan = table.plan([_record("http://h/a.mp4", "a"), _record("http://h/b.mp4", "b"),
                       _record("http://h/c.mp4", "c")])  # fmt: skip
    assert plan.already_ok == 1
    assert [(r.video_id, r.attempts) for r in plan.todo] == [("b", 2), ("c", 1)]
    table.upsert([plan.todo[0].finish(status="ok"), plan.todo[1].fail("transcode", "bad")])
    rows = {row["video_id"]: row for row in lance.dataset(table.lance_path).to_table().to_pylist()}
    assert sorted(rows) == ["a", "b", "c"]
    assert (rows["b"]["status"], rows["b"]["attempts"], rows["b"]["error"]) == ("ok", 2, None)
    assert rows["a"]["depth_frame_indices"] == [0]
    exported = pq.read_table(table.export_parquet())  # written batch by batch, all of it
    assert sorted(exported.to_pylist(), key=lambda row: row["video_id"]) == [
        rows[video_id] for video_id in sorted(rows)
    ]
    empty = VideoTable(tmp_path / "empty")
    empty.create()
    assert pq.read_table(empty.export_parquet()).num_rows == 0


def test_a_rerun_fetches_again_only_videos_that_failed_before_their_transcode_was_taken(
    tmp_path: Path,
) -> None:
    """A video that failed at depth or store has a transcode ffmpeg and the probe took: after a
    model fault, a rerun fetched and transcoded every clip of the list again."""
    table = VideoTable(tmp_path)
    failed = {"d": "depth", "s": "store", "t": "transcode", "w": "download"}
    table.upsert([_record(f"http://h/{v}.mp4", v).fail(stage, "x") for v, stage in failed.items()])
    # A shard whose worker died at depth fails only the videos its transcode got through
    # (`_Chain.crashed_rows`): theirs is kept too (found in review, stop 57: fetched again).
    crashed = {"c": "depth", "u": "transcode"}
    table.upsert([_record(f"http://h/{v}.mp4", v).fail(stage, f"{stage} crashed: worker died")
                  for v, stage in crashed.items()])  # fmt: skip
    plan = table.plan([_record(f"http://h/{v}.mp4", v) for v in [*failed, *crashed]])
    assert [record.video_id for record in plan.todo] == ["d", "s", "t", "w", "c", "u"]
    assert plan.rerun_ids == {"t", "w", "u"}  # only these from the start


def test_worker_fragments_appear_only_when_the_driver_commits_them(tmp_path: Path) -> None:
    """Lance's distributed write: a shard's rows are invisible until committed, and a shard
    that re-did a video replaces its row in the same single commit."""
    from flows.depth_extraction import commit_shard
    from tasks.depth.shard_tasks import Shard, WrittenShard, write_task

    table = VideoTable(tmp_path)
    table.create()
    table.upsert([_record("http://h/a.mp4", "a").fail("download", "HTTP 503")])
    plan = table.plan([_record("http://h/a.mp4", "a"), _record("http://h/b.mp4", "b")])
    assert plan.rerun_ids == {"a"}
    fresh = (_record("http://h/e.mp4", "e").finish(status="ok"),)  # no row yet: fragments
    written = write_task.fn(Shard(0, 2, fresh), table.lance_path)
    assert written.fragments and lance.dataset(table.lance_path).count_rows() == 1  # not yet
    orphans = write_rows([_record("http://h/c.mp4", "c").finish(status="ok")], table.lance_path)
    assert orphans  # a killed driver never commits these: they never become rows
    assert commit_shard(table, written) == fresh
    # A shard that re-did `a` writes no fragments: one upsert replaces its row.
    done = tuple(r.finish(status="ok") for r in plan.todo)
    redone = write_task.fn(Shard(1, 2, done), table.lance_path)
    assert redone.fragments == []
    version = lance.dataset(table.lance_path).version
    assert commit_shard(table, redone) == done
    dataset = lance.dataset(table.lance_path)
    rows = {r["video_id"]: r for r in dataset.to_table().to_pylist()}
    assert sorted(rows) == ["a", "b", "e"] and dataset.version == version + 1  # one commit
    assert (rows["a"]["status"], rows["a"]["attempts"]) == ("ok", 2)

    # A commit that fails (here: the table gone from under the run) fails the shard's videos
    # at `store`, and the run goes on to its other shards and its artifacts.
    new = (_record("http://h/d.mp4", "d").finish(status="ok"),)
    written = WrittenShard(Shard(1, 2, new), write_rows(new, table.lance_path))
    shutil.rmtree(table.lance_path)
    (lost,) = commit_shard(table, written)
    assert lost.failed_stage == "store" and "commit failed" in lost.error, lost.error


def test_rows_a_worker_cannot_write_are_written_by_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a write task that raised past its retries read as a crash of its
    worker ("store crashed"), and every rerun fetched and transcoded the whole shard again.
    It now hands the rows to the driver, whose commit writes them. (A write that fails on a
    worker and not on the driver cannot be had on demand: the worker's write is made to fail.)"""
    from flows.depth_extraction import commit_shard
    from tasks.depth import shard_tasks
    from tasks.depth.shard_tasks import Shard, write_task

    def no_room(*_args: object) -> list:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shard_tasks, "write_rows", no_room)
    table = VideoTable(tmp_path)
    table.create()
    rows = (_record("http://h/f.mp4", "f").finish(status="ok"),)
    with monkeypatch.context() as retrying:  # a retry left: raised, for Prefect to retry
        retrying.setattr(shard_tasks, "_last_attempt", lambda: False)
        with pytest.raises(OSError, match="No space left"):
            write_task.fn(Shard(0, 1, rows), table.lance_path)
    written = write_task.fn(Shard(0, 1, rows), table.lance_path)  # no retry left
    assert written.fragments == []
    assert commit_shard(table, written) == rows
    [stored] = lance.dataset(table.lance_path).to_table().to_pylist()
    assert (stored["video_id"], stored["status"]) == ("f", "ok")


def test_a_table_of_another_layout_is_refused_with_the_way_out(tmp_path: Path) -> None:
    import pyarrow as pa

    lance.write_dataset(pa.table({"video_id": ["a"]}), tmp_path / "videos.lance")
    with pytest.raises(TableSchemaError, match="another output folder"):
        VideoTable(tmp_path).create()
    # The same columns, one of another type (rewritten through pandas: ints with NULLs as
    # floats): every shard's write failed at store after all its work (found in review, stop 60)
    from tasks.depth.video_table import ARROW_SCHEMA

    retyped = pa.schema(
        [pa.field(f.name, pa.float64()) if f.name == "attempts" else f for f in ARROW_SCHEMA]
    )
    other = tmp_path / "other"
    lance.write_dataset(retyped.empty_table(), other / "videos.lance")
    with pytest.raises(TableSchemaError, match=r"other types .*: attempts \(double, not int"):
        VideoTable(other).create()
    VideoTable(tmp_path / "fresh").create()  # this version's own table passes
    VideoTable(tmp_path / "fresh").create()


def test_stages_keep_the_complete_outputs_of_an_earlier_attempt(tmp_path: Path) -> None:
    """A retried shard or a resumed run does not fetch or encode a video again."""
    settings = DepthSettings()
    with VideoServer({"v.mp4": Serve(CLIP)}) as server:
        record = _record(server.url("v.mp4"), "v")
        first = download(record, tmp_path / "raw", settings)
        again = download(record, tmp_path / "raw", settings)
        assert server.requests["v.mp4"] == 1 and again.raw_path == first.raw_path
    encoded = transcode(first, tmp_path / "videos", settings)
    stamp = Path(encoded.transcoded_path).stat().st_mtime_ns
    reused = transcode(first, tmp_path / "videos", settings)
    assert Path(reused.transcoded_path).stat().st_mtime_ns == stamp
    assert (reused.frame_count, reused.height) == (encoded.frame_count, 360)


def test_a_video_fetched_before_from_another_url_is_fetched_again(tmp_path: Path) -> None:
    """An id need not change with its URL (a Kinetics row's id under another --url-template, a
    corrected URL in a CSV with video ids): the earlier download and transcode were reused by
    id, and the new row described one clip and held the frames of another video (found in
    review, stop 58)."""
    from tasks.depth.output_layout import OutputLayout

    settings, layout = DepthSettings(), OutputLayout(tmp_path)
    with VideoServer({"whole.mp4": Serve(CLIP), "clip.mp4": Serve(CLIP)}) as server:
        whole = server.url("whole.mp4")
        transcode(download(_record(whole, "v"), layout.raw, settings), layout.videos, settings)
        assert layout.drop_other_sources({"v": whole}) == 0  # its own URL: kept
        signed_again = f"{whole}?X-Amz-Signature=0f0f&X-Amz-Expires=60"  # the same video
        assert layout.drop_other_sources({"v": signed_again}) == 0
        assert layout.drop_other_sources({"other": server.url("clip.mp4")}) == 0  # no files
        clip = server.url("clip.mp4")
        assert layout.drop_other_sources({"v": clip}) == 3  # the download, its note, the mp4
        assert not list(layout.videos.iterdir())
        fetched = download(_record(clip, "v"), layout.raw, settings)
        assert server.requests["clip.mp4"] == 1 and Path(fetched.raw_path).is_file()
        assert layout.drop_other_sources({"v": clip}) == 0
    # Files an older vidflow kept (no note of their source) are taken for the URL asked now,
    # and noted so: a first run after an upgrade fetched and encoded all of them again.
    (layout.raw / "v.url").unlink()
    assert layout.drop_other_sources({"v": clip}) == 0
    assert (layout.raw / "v.url").read_text() == f"{clip}\n"


def test_a_shard_whose_worker_was_killed_is_failed_at_the_stage_that_never_completed() -> None:
    """A Ray worker killed outright leaves its task run Running and the later stages Pending:
    its videos were failed as "store crashed" and counted as through every stage. The worker's
    death is not made here; the task runs' states are Prefect's own."""
    from prefect.states import Completed, Pending, Running

    from tasks.depth.shard_tasks import Shard, _Chain

    @dataclasses.dataclass
    class Ran:  # what the chain reads of a task run's future
        state: object
        made: Shard | None = None

        def result(self) -> Shard:
            if self.made is None:
                raise RuntimeError("its result went with its node")
            return self.made

    planned = (_record("http://h/a.mp4", "a"), _record("http://h/b.mp4", "b"))
    shard = Shard(0, 1, planned)
    # What the download left: `a` fetched, `b` a 404 (found in review: the rows were built
    # from the planned shard, and `b` read "transcode crashed" with its own reason lost).
    downloaded = shard.with_records(
        [planned[0].update(raw_path="/raw/a.mp4", download_s=1.5),
         planned[1].fail("download", "HTTP 404")]
    )  # fmt: skip
    futures = [("download", Ran(Completed(), downloaded)), ("transcode", Ran(Running())),
               ("depth", Ran(Pending())), ("store", Ran(Pending()))]  # fmt: skip
    a, b = _Chain(shard, futures).crashed_rows(RuntimeError("worker died")).records
    assert a.failed_stage == "transcode" and a.error.startswith("transcode crashed")
    assert a.download_s == 1.5  # its download's time kept
    assert (b.failed_stage, b.error) == ("download", "HTTP 404")
    # A result that cannot be had (its node lost): that stage's outcome is not known.
    futures[0] = ("download", Ran(Completed()))
    a, b = _Chain(shard, futures).crashed_rows(RuntimeError("worker died")).records
    assert a.failed_stage == b.failed_stage == "download"
    assert a.error.startswith("download crashed")
    # Its depth task's worker killed: only the videos its transcode got through fail there
    # (a rerun keeps their transcodes); its write task's worker killed (found in review, stop
    # 57: "store crashed", finished videos counted failed and fetched again): the depth task's
    # rows as they are, for the driver to write.
    transcoded = downloaded.with_records([downloaded.records[0].update(transcode_s=2.0),
                                          downloaded.records[1]])  # fmt: skip
    mapped = transcoded.with_records([transcoded.records[0].finish(status="ok"),
                                      transcoded.records[1]])  # fmt: skip
    futures = [("download", Ran(Completed(), downloaded)),
               ("transcode", Ran(Completed(), transcoded)), ("depth", Ran(Running())),
               ("store", Ran(Pending()))]  # fmt: skip
    a, b = _Chain(shard, futures).crashed_rows(RuntimeError("worker died")).records
    assert (a.failed_stage, a.transcode_s) == ("depth", 2.0) and a.error.startswith("depth crash")
    assert (b.failed_stage, b.error) == ("download", "HTTP 404")
    futures[2:] = [("depth", Ran(Completed(), mapped)), ("store", Ran(Running()))]
    assert _Chain(shard, futures).crashed_rows(RuntimeError("worker died")) == mapped
    assert _Chain(shard, futures).rows_after(RuntimeError("worker died")) == mapped

    # The Prefect API down as well, so no stage's state can be read (found in review, stop
    # 61: the error left the run, its other shards uncommitted, no artifacts): the planned
    # shard's videos (what the driver holds) all fail from their download, done again whole.
    class Unreadable:
        @property
        def state(self) -> object:
            raise ConnectionError("All connection attempts failed")

    futures = [(stage, Unreadable()) for stage in ("download", "transcode", "depth", "store")]
    a, b = _Chain(shard, futures).rows_after(RuntimeError("worker died")).records
    assert (a.failed_stage, b.failed_stage) == ("download", "download")
    assert a.error.startswith("download crashed") and "worker died" in a.error
    assert b.error == a.error


def test_the_onnx_backend_refuses_a_model_that_is_not_depth_pro_before_any_work(
    tiny_depth_anything: Path, tiny_depth_model: Path, tmp_path: Path
) -> None:
    """Found in review: `--depth-backend onnx` with another model was taken; every video was
    downloaded and transcoded, then each failed at depth ("not a Depth Pro model")."""
    from tasks.depth.preflight import check_run_settings

    other = DepthSettings(depth_model=str(tiny_depth_anything), depth_backend="onnx",
                          device="cpu", output=tmp_path / "out")  # fmt: skip
    with pytest.raises(ValueError, match=r"runs Depth Pro models only;.*'depth_anything'"):
        check_run_settings(other)
    assert not (tmp_path / "out").exists()  # refused before the output was made
    # Depth Pro on it, and the other model on the other backends, are taken.
    check_run_settings(other.model_copy(update={"depth_model": str(tiny_depth_model)}))
    check_run_settings(other.model_copy(update={"depth_backend": "auto"}))


def test_a_run_gives_up_on_what_its_cluster_lacks_only_while_a_stage_still_needs_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lost-node wait (found in reviews of stop 59's own change: it failed shards whose
    transcodes were all done, the lost node needed by nothing left, and shards whose depth still
    ran; and its warning came again after every shard). The states are Prefect's own; the
    cluster's lack is said by hand."""
    import queue

    from prefect.states import Completed, Pending, Running

    from tasks.depth import shard_tasks
    from tasks.depth.shard_tasks import Shard, _all_lost, _Chain, _LackWatch, _next_finished

    clock = [1000.0]  # the watch's clock, moved by hand: no sleep a loaded machine stretches

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

    monkeypatch.setattr(shard_tasks, "time", Clock)
    monkeypatch.setattr(shard_tasks, "LOST_CHECK_S", 0.0)
    a, b, c = (_record(f"http://h/{name}.mp4", name) for name in "abc")
    shard_a = Shard(0, 3, (a,))

    @dataclasses.dataclass
    class Ran:  # what the watch reads of a task run's future
        state: object
        made: Shard = shard_a

        def result(self) -> Shard:
            return self.made

    states = {"download": Ran(Completed()), "transcode": Ran(Completed()),
              "depth": Ran(Running()), "store": Ran(Pending())}  # fmt: skip
    in_flight = {"written-a": _Chain(shard_a, list(states.items()))}
    lacking = {"transcode": "--transcode-cpus 2: no node has that many CPUs"}
    waiting: list[Shard] = []
    watch = _LackWatch(lambda: lacking, 300.0, in_flight, waiting)
    said: list[str] = []
    heard = logging.Handler(logging.WARNING)
    heard.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("tasks.depth.shard_tasks").addHandler(heard)
    try:
        for _ in range(3):  # no transcode left to run: the lack is nobody's
            watch()
            clock[0] += 400
        waiting.append(Shard(2, 3, (c,)))  # a shard still to start: its transcode needs it
        for _ in range(3):  # but a's depth still runs, needing nothing lacking: it may end
            watch()
            clock[0] += 400
        states["depth"].state = states["store"].state = Completed()  # a is done, and taken
        del in_flight["written-a"]
        shard_b = Shard(1, 3, (b,))
        b_states = [("download", Ran(Completed(), shard_b)), ("transcode", Ran(Pending())),
                    ("depth", Ran(Pending())), ("store", Ran(Pending()))]  # fmt: skip
        in_flight["written-b"] = _Chain(shard_b, b_states)  # held up at its transcode
        watch()
        clock[0] += 200
        watch()  # 200 s with every shard in flight held up: not yet
        clock[0] += 100
        assert _next_finished(queue.Queue(), watch) is None  # 300 s
    finally:
        logging.getLogger("tasks.depth.shard_tasks").removeHandler(heard)
    assert len(said) == 1 and said[0].startswith("--transcode-cpus 2"), said  # said once
    assert watch.lost is not None and watch.lost.stage == "transcode"
    lost = list(_all_lost(in_flight, waiting, watch.lost))
    rows = [record for written in lost for record in written.shard.records]
    # b waited on its transcode; c was never fetched
    assert [(r.video_id, r.failed_stage) for r in rows] == [("b", "transcode"), ("c", "download")]
    assert "ClusterLostError: --transcode-cpus 2" in rows[0].error
    assert rows[1].error.startswith("not started: --transcode-cpus 2: no node has that many CPUs")
