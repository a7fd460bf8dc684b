"""The depth run's summary table counts each stage's videos by how they ended, not by timings."""

from __future__ import annotations

from flows.depth_report import FAILURES_SHOWN, VIDEO_ROWS_SHOWN, RunReport
from tasks.depth.video_record import VideoRecord


def _video(video_id: str, **fields: object) -> VideoRecord:
    return VideoRecord(video_id=video_id, source_url=f"http://h/{video_id}.mp4").update(**fields)


def test_each_stage_counts_the_videos_that_got_through_it() -> None:
    report = RunReport(total=6, skipped=0)
    timed = {"download_s": 1.0, "transcode_s": 2.0, "depth_s": 0.5}
    report.add(_video("ok", status="ok", **timed))
    # A 404 spent time downloading; a resumed video kept its earlier download, so has no time.
    report.add(_video("gone", download_s=0.2).fail("download", "HTTP 404"))
    for resumed in ("resumed", "resumed-too"):
        report.add(_video(resumed, status="ok", transcode_s=2.0, depth_s=0.5))
    report.add(_video("dark", download_s=1.0, transcode_s=2.0).fail("depth", "crashed"))
    # Its commit failed (found in review, stop 57: failed in the run's row, in no stage's).
    report.add(_video("lost", status="ok", **timed).fail("store", "commit failed"))

    stages = ("download", "transcode", "depth", "store")
    rows = {row["stage"]: row for row in report.table()}
    assert [(rows[s]["done"], rows[s]["failed"]) for s in stages] == [
        (5, 1),
        (5, 0),
        (4, 1),
        (3, 1),
    ]
    assert (rows["run"]["done"], rows["run"]["failed"]) == (3, 3)
    assert rows["download"]["total_s"] == 3.2  # the time spent, the failed attempt's included


def test_a_server_s_words_in_an_error_show_as_text_in_the_failures_artifact() -> None:
    """A reason phrase is the remote server's to choose: it must not become a link, an image
    or HTML in the UI, nor break the table."""
    report = RunReport(total=1, skipped=0)
    reason = "HTTP 403 ![x](http://evil.example/b.png) <img src=x onerror=alert(1)> a|b `c`"
    report.add(_video("v", download_s=0.1).fail("download", reason))
    row = report.failures_markdown().splitlines()[-1]
    assert row.startswith("| v | ") and row.count(" | ") == 3, row
    cell = row.rsplit(" | ", 1)[1].removesuffix(" |")
    shown = "HTTP 403 ![x](http://evil.example/b.png) <img src=x onerror=alert(1)> a\\|b 'c'"
    assert cell == f"`{shown}`"  # one code span: its text shown as it is
    # A lone carriage return ends a line in markdown: it split the row in two
    broken = RunReport(total=1, skipped=0)
    broken.add(_video("w", download_s=0.1).fail("download", "HTTP 502 bad\rgateway\r\nnow"))
    last = broken.failures_markdown().splitlines()[-1]
    assert last.startswith("| w | ") and last.endswith("`HTTP 502 bad gateway now` |"), last


def test_the_log_names_the_first_failures_one_line_each_and_counts_the_rest() -> None:
    """A command line run's artifacts end with its temporary server: its console must say
    which videos failed and why."""
    report = RunReport(total=12, skipped=0)
    report.add(_video("cut", transcode_s=0.1).fail("transcode", "ffmpeg exit 1:\nmoov atom\nend"))
    for index in range(11):
        report.add(_video(f"gone{index}").fail("download", "HTTP 404 Not Found"))
    lines = report.failure_lines(limit=10)
    assert lines[0] == "cut: transcode failed: ffmpeg exit 1: moov atom end"
    assert lines[1:10] == [f"gone{i}: download failed: HTTP 404 Not Found" for i in range(9)]
    assert lines[10].startswith("2 more failed") and len(lines) == 11
    assert "no row" not in lines[10]
    assert RunReport(total=0, skipped=0).failure_lines() == []
    # A shard whose commit failed left no row for any of its videos: "the table's rows say
    # why" sent the user to rows that are not there (found in review, stop 60)
    report.add(_video("lost").fail("store", "commit failed: OSError: No space left on device"))
    assert report.failure_lines(limit=10)[10].endswith("the next run does them again")
    # a shard that redid videos an earlier run failed keeps their earlier rows (stop 62)
    assert "that run's row and error, not this one's" in report.failure_lines(limit=10)[10]
    assert "left no row for any of its videos" in report.failures_markdown(limit=10)


def test_a_commit_that_failed_after_the_failures_shown_is_still_said_to_leave_no_row() -> None:
    """The note looked only at the failures kept to show (the first 100): 150 404s, then a
    shard whose commit failed, and the log sent the user to rows that are not there (found in
    review, stop 61)."""
    from flows.depth_report import FAILURES_SHOWN

    report = RunReport(total=FAILURES_SHOWN + 51, skipped=0)
    for index in range(FAILURES_SHOWN + 50):
        report.add(_video(f"gone{index}").fail("download", "HTTP 404 Not Found"))
    report.add(_video("lost").fail("store", "commit failed: OSError: No space left on device"))
    assert "lost" not in {record.video_id for record in report.failures}  # past the cap
    assert report.failure_lines(limit=10)[-1].endswith("the next run does them again")
    assert "left no row for any of its videos" in report.failures_markdown()


def test_a_long_run_keeps_only_what_its_artifacts_show() -> None:
    """Every record of a run stayed in the driver until it ended (with `--frames all`, a list
    of frame indices each): ~1 GB for 100,000 videos. Rows of the lowest shards are kept, as
    shards end in any order; failures up to what the artifact shows, all of them counted."""
    report = RunReport(total=25_000, skipped=0)
    for shard in reversed(range(250)):  # the last shards end first
        for index in range(100):
            video = _video(f"s{shard}-{index}", shard=shard, depth_frame_indices=list(range(300)))
            report.add(video.fail("depth", "crashed") if index == 0 else video)
            assert len(report._rows) < 2 * VIDEO_ROWS_SHOWN
    rows = report.video_rows()
    assert len(rows) == VIDEO_ROWS_SHOWN and {row["shard"] for row in rows} == set(range(1, 101))
    # and says so: under "every video of this run", 10,000 rows of 25,000 read as videos lost
    cut = f"The first {VIDEO_ROWS_SHOWN} videos, by shard, of the 25000 this run processed"
    assert report.video_rows_description().startswith(cut)
    small = RunReport(total=5, skipped=3)
    small.add(_video("a", shard=0))
    assert small.video_rows_description().startswith("Every video this run processed")
    assert small.video_rows_description().endswith("the 3 done in earlier runs are not listed")
    assert (report.ok, report.failed, len(report.failures)) == (24_750, 250, FAILURES_SHOWN)
    markdown = report.failures_markdown()
    assert markdown.count("| depth |") == FAILURES_SHOWN and "150 more in the table" in markdown
