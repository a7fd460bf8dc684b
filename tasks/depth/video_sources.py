"""The flow's input: video URLs from a plain list, a CSV with a `url` column or a Kinetics CSV.

Every source gets a `video_id` that is safe as a file name: output files are named after it, so
nothing a URL or a CSV says can write outside the output folder. An id depends on its source
alone (the URL, or the Kinetics row), never on the list around it: reordering or extending a
list keeps every id, so a re-run finds the rows of earlier runs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import re
import string
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from common.urls import shown_url, unsigned_url
from tasks.depth.clip_window import asked_window, window_of, with_window
from tasks.depth.video_record import VideoRecord

log = logging.getLogger(__name__)

MAX_VIDEO_ID_CHARS = 120
URL_HASH_CHARS = 10
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# The usual file naming of Kinetics mirrors (and of the ActivityNet downloader).
KINETICS_ID_FORMAT = "{youtube_id}_{time_start:06d}_{time_end:06d}"


class SourceListError(ValueError):
    """The input list cannot be read (missing column, bad template, unreadable file)."""


def sanitize_video_id(raw: str) -> str:
    """A file-name-safe id: letters, digits, `._-` only, no leading dot, bounded length.

    Anything else becomes `_`, so `../../etc/passwd` becomes `etc_passwd` and cannot escape
    the folder it is joined to. An id with nothing usable left becomes a hash of the input.
    """
    cleaned = _UNSAFE_CHARS.sub("_", raw).strip("._")
    if not cleaned:
        return "video_" + hashlib.sha1(raw.encode()).hexdigest()[:12]
    if len(cleaned) > MAX_VIDEO_ID_CHARS:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        cleaned = f"{cleaned[: MAX_VIDEO_ID_CHARS - 9]}_{digest}"
    return cleaned


def _id_from_url(url: str) -> str:
    """The file's name and a short hash of the URL: readable, and unique per URL (two
    mirrors' `clip.mp4` are two videos) without looking at any other line of the list. The
    hash leaves out a signed URL's signature (`unsigned_url`): re-signed, it is the same video."""
    try:
        path = urlsplit(url).path
    except ValueError:  # e.g. "http://[::1/x": its download fails it with the reason
        path = ""
    name = unquote(path.rstrip("/").rsplit("/", 1)[-1])
    stem = name.rsplit(".", 1)[0] if "." in name else name
    digest = hashlib.sha1(unsigned_url(url).encode()).hexdigest()[:URL_HASH_CHARS]
    return sanitize_video_id(f"{stem[: MAX_VIDEO_ID_CHARS - URL_HASH_CHARS - 1]}_{digest}")


def _unique_ids(
    records: Iterable[VideoRecord], path: Path, *, same_id_same_video: bool = False
) -> list[VideoRecord]:
    """One row per video: a URL listed again (or, with `same_id_same_video`, a video listed
    again under another URL: a Kinetics clip, a URL signed again) is dropped, and how many
    were is logged. Otherwise two different URLs that get one id (a CSV's `video_id` column,
    the same once made file-name-safe, e.g. `my clip` and `my_clip`, or the same but for case,
    `Cat01` and `cat01`: one file on macOS's and Windows' file systems) refuse the list: either
    one's row, or its files, would silently take the other's place."""
    by_url: dict[str, VideoRecord] = {}
    by_id: dict[str, VideoRecord] = {}
    repeats = 0
    for record in records:
        if record.source_url in by_url:
            repeats += 1
            continue
        # Given ids are told apart regardless of case; ids made from URLs carry a hash, and
        # Kinetics' YouTube ids differ by case alone.
        key = record.video_id if same_id_same_video else record.video_id.casefold()
        if (first := by_id.get(key)) is not None:
            if not same_id_same_video:
                raise SourceListError(
                    f"{path}: two URLs get the video id {record.video_id!r} "
                    f"({shown_url(first.source_url)} and {shown_url(record.source_url)}); "
                    "give each video an id of its own (ids that differ only in case name one "
                    "file on some file systems)"
                )
            repeats += 1
            continue
        by_url[record.source_url] = by_id[key] = record
    if repeats:
        log.warning("%s: %d lines repeat a video listed before: one row each", path, repeats)
    return list(by_id.values())


def read_url_list(path: Path) -> list[VideoRecord]:
    """One URL per line, or a CSV whose header names a `url` column; blank lines and `#`
    comments are skipped in both.

    A CSV may also carry `video_id`, `label` and `split` columns; they are kept; and
    `time_start`, `time_end` (seconds), the clip of the video its row asks for. Column names
    are matched without case or surrounding spaces, in quotes or not, and a header of `url`
    alone is a header too. A line or row the list cannot mean as written (a `#t=` window that
    does not read, more fields than the header) refuses it, naming its line.
    """
    lines = [
        (number, line)
        for number, line in enumerate(_read_text(path).splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        return []
    delimiter = _delimiter(lines[0][1])
    header = [name.strip().lower() for name in _csv_fields(lines[0][1], delimiter)]
    if "url" not in header and len(header) > 1 and not any("://" in name for name in header):
        raise SourceListError(
            f"{path}: a CSV needs a url column (its header names {header}); or give one URL "
            "per line"
        )
    if "url" not in header:
        if len(lines) > 1 and "://" not in lines[0][1] and "://" in lines[1][1]:
            # A header of another name (`video_url`, `link`) was a video that failed every run.
            number, line = lines.pop(0)
            log.warning("%s:%d: %r is no URL: taken as a header", path, number, line.strip()[:200])
        urls = [_checked_url(line.strip(), f"{path}:{number}") for number, line in lines]
        records = (VideoRecord(video_id=_id_from_url(url), source_url=url) for url in urls)
        return _unique_ids(records, path, same_id_same_video=True)
    records = [
        record
        for number, line in lines[1:]
        if (record := _csv_record(header, _csv_fields(line, delimiter), f"{path}:{number}"))
        is not None
    ]
    # Ids made from URLs are equal for the same video (re-signed); given ones must differ.
    return _unique_ids(records, path, same_id_same_video="video_id" not in header)


def _csv_fields(line: str, delimiter: str = ",") -> list[str]:
    """One CSV line's fields, read alone: a quote left open ends with its line, where a reader
    of the whole list went on into the lines after it."""
    return next(csv.reader([line], delimiter=delimiter), [])


def _delimiter(header_line: str) -> str:
    """The list's field separator: a comma, or where its header names a url column only when
    split at them, semicolons (a spreadsheet's "CSV" in many locales) or tabs (a TSV). Read at
    commas, such a header named no url column: every line was taken whole as a URL, labels
    and all, and every video failed at download."""
    for delimiter in (",", ";", "\t"):
        if "url" in (name.strip().lower() for name in _csv_fields(header_line, delimiter)):
            return delimiter
    return ","


def _csv_record(header: list[str], row: list[str], where: str) -> VideoRecord | None:
    """A URL list's CSV row as a source, None for a row without a URL (skipped, logged);
    `where` (file:line) names it in errors. Fields past the header refuse the list: they were
    dropped, and with them the rest of a URL with an unquoted comma (`#t=417,427` read as
    `#t=417`, a window to the video's end); empty ones (a trailing comma) lose nothing."""
    if any(extra.strip() for extra in row[len(header) :]):
        raise SourceListError(
            f"{where}: {len(row)} fields, more than the header's {len(header)} (quote a URL "
            'with a comma in it: "https://host/v.mp4#t=417,427")'
        )
    fields = {name: value.strip() for name, value in zip(header, row, strict=False)}
    if not (url := fields.get("url")):
        log.warning("%s: a row without a URL is skipped: %s", where, ",".join(row)[:200])
        return None
    given_id = fields.get("video_id")
    url = _windowed(url, fields, where)
    return VideoRecord(
        video_id=sanitize_video_id(given_id) if given_id else _id_from_url(url),
        source_url=_checked_url(url, where),
        label=fields.get("label") or None,
        split=fields.get("split") or None,
    )


def _windowed(url: str, fields: dict[str, str], where: str) -> str:
    """`url` asking for its row's `time_start`,`time_end` window (`#t=`), where the row gives
    one. The columns were dropped, and each row done as the whole video under its clip's label
    (found in review, stop 62)."""
    start, end = fields.get("time_start", ""), fields.get("time_end", "")
    if not (start or end):
        return url
    if not (start and end):
        raise SourceListError(f"{where}: time_start and time_end go together: give both")
    if window_of(url) is not None:
        raise SourceListError(
            f"{where}: the URL asks for a window of its own (#t=) and the row for another "
            "(time_start, time_end): give one"
        )
    try:
        return with_window(url, float(start), float(end))
    except ValueError as exc:
        raise SourceListError(f"{where}: bad time window: {exc}") from None


def _checked_url(url: str, where: str) -> str:
    """`url`, unless the window its `#t=` asks for does not read (`#t=30,10`, `#t=1:75`):
    then SourceListError naming its line (it was done as the whole video, under its label);
    or unless it holds a tab, which no URL does (a TSV row of a list whose header was
    missing: `https://h/a.mp4<TAB>dance` failed at download as a 404). A space is taken: a
    path copied from a bucket's console has them, and the download encodes them."""
    if "\t" in url:
        raise SourceListError(
            f"{where}: {url[:200]!r} holds a tab, which no URL does: a list of more than URLs "
            "needs a header naming its url column"
        )
    try:
        asked_window(url)
    except ValueError as exc:
        raise SourceListError(f"{where}: bad time window: {exc}") from None
    return url


def read_kinetics_csv(
    path: Path, *, url_template: str, split: str | None = "val", limit: int | None = None
) -> list[VideoRecord]:
    """Rows of a Kinetics CSV (`label,youtube_id,time_start,time_end,split[,is_cc]`) as sources.

    `url_template` is formatted with the row's fields, for example
    `https://HOST/val/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4` (a mirror of the clips).
    A template without the time fields names whole videos (`https://HOST/{youtube_id}.mp4`):
    each URL then asks for its row's window (`#t=start,end`, clip_window), which the transcode
    cuts from the video.
    """
    whole_videos = not {"time_start", "time_end"} & _check_template(url_template)
    lines = _read_text(path).splitlines()
    # Blank lines before the header (found in review, stop 62: "not a Kinetics CSV ... []")
    blank_first = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    reader = csv.DictReader(lines[blank_first:])
    found = reader.fieldnames or []
    # Headers as people write them ("YouTube_ID", " label") read as Kinetics' own.
    reader.fieldnames = [name.strip().lower() for name in found]
    # No label column: a test split (Kinetics-600 and -700 publish theirs without labels).
    missing = {"youtube_id", "time_start", "time_end"} - set(reader.fieldnames)
    if missing:
        raise SourceListError(
            f"{path}: not a Kinetics CSV, missing columns {sorted(missing)} (its header: {found})"
        )
    records: list[VideoRecord] = []
    clips: set[tuple[str, ...]] = set()  # --limit counts clips: a repeated row is no new one
    splits_skipped: dict[str, int] = {}
    for row in reader:
        line_number = blank_first + reader.line_num  # the row's own line, blank ones counted
        if not any(value.strip() for value in row.values() if isinstance(value, str)):
            continue  # a blank row, or one of empty fields (`,,,,` from a spreadsheet)
        row_split = (row.get("split") or "").strip() or split
        if split is not None and row_split != split:
            splits_skipped[row_split] = splits_skipped.get(row_split, 0) + 1
            continue
        # --limit counts clips, and rows past it are not read (nor refused)
        clip = _clip_key(row)
        if limit is not None and clip not in clips and len(clips) >= limit:
            break
        if None in row.values():  # a short row: csv fills the missing columns with None
            raise SourceListError(f"{path}:{line_number}: fewer columns than the header")
        record = _kinetics_record(row, row_split, url_template, f"{path}:{line_number}")
        if whole_videos:
            record = record.update(
                source_url=with_window(record.source_url, record.time_start, record.time_end)
            )
        clips.add(clip)
        records.append(record)
    if not records and splits_skipped:
        raise SourceListError(
            f"{path}: no row of split {split!r} (found: {sorted(splits_skipped)}); choose one "
            "with --split, or --split all for every row"
        )
    return _unique_ids(records, path, same_id_same_video=True)


def _clip_key(row: dict[str, str]) -> tuple[str, ...]:
    """A row's clip as --limit counts it, before the row is read: its video and window, the
    times as whole seconds where they are numbers (`10` and `10.0` are one clip)."""
    times = []
    for column in ("time_start", "time_end"):
        text = (row.get(column) or "").strip()
        with contextlib.suppress(ValueError, OverflowError):  # read as `_seconds` reads it
            text = str(int(float(text)))
        times.append(text)
    return ((row.get("youtube_id") or "").strip(), *times)


def _kinetics_record(
    row: dict[str, str], row_split: str | None, url_template: str, where: str
) -> VideoRecord:
    """One Kinetics row as a source; `where` (file:line) names it in errors."""
    # Values as people write them (", val"): the spaces went into the split and the URL.
    row = {name: value.strip() for name, value in row.items() if isinstance(value, str)}
    fields = {
        **row,
        "split": row_split or "",
        "time_start": _seconds(row, "time_start", where),
        "time_end": _seconds(row, "time_end", where),
    }
    if fields["time_end"] <= fields["time_start"]:
        raise SourceListError(
            f"{where}: bad time window: time_end {row['time_end']} is not after time_start "
            f"{row['time_start']}"
        )
    try:
        url = url_template.format(**fields)
    except (ValueError, TypeError) as exc:  # a format spec that does not fit the field
        raise SourceListError(f"--url-template on {where}: {exc}") from exc
    except KeyError as exc:  # {label} or {is_cc} of a CSV without that column
        raise SourceListError(
            f"--url-template uses {{{exc.args[0]}}}, which {where} has no column for"
        ) from exc
    return VideoRecord(
        video_id=sanitize_video_id(KINETICS_ID_FORMAT.format(**fields)),
        source_url=url,
        label=row.get("label") or None,
        split=row.get("split") or row_split,
        youtube_id=row["youtube_id"],
        time_start=fields["time_start"],
        time_end=fields["time_end"],
    )


# The table's time columns are int32 (Kinetics' windows are seconds into the video): a larger
# value failed the shard's write and then the whole run, and every run of that list again.
MAX_TIME_S = 2**31 - 1


def _seconds(row: dict[str, str], column: str, where: str) -> int:
    """A time-window column as whole seconds, or SourceListError naming the row."""
    try:
        value = float(row[column])
        seconds = int(value)
    except (ValueError, OverflowError) as exc:  # not a number, or inf
        raise SourceListError(f"{where}: bad time window: {exc}") from exc
    if seconds != value:  # 10.9 was cut to 10, and windows a fraction apart made one id
        raise SourceListError(
            f"{where}: bad time window: {column} {row[column]} is not a whole number of "
            "seconds (Kinetics' windows are)"
        )
    if not 0 <= seconds <= MAX_TIME_S:
        raise SourceListError(
            f"{where}: bad time window: {column} {row[column]} is not a number of seconds "
            f"from 0 to {MAX_TIME_S}"
        )
    return seconds


def _check_template(url_template: str) -> set[str]:
    """The fields `url_template` uses, or SourceListError naming what is wrong with it."""
    allowed = {"label", "youtube_id", "time_start", "time_end", "split", "is_cc"}
    try:
        parsed = list(string.Formatter().parse(url_template))
    except ValueError as exc:  # an unclosed brace
        raise SourceListError(f"--url-template {url_template!r}: {exc}") from exc
    names = {name for _, name, _, _ in parsed if name is not None}
    if unnamed := sorted(name for name in names if not name or name.isdigit()):
        raise SourceListError(
            f"--url-template fields need names, e.g. {{youtube_id}} (got {unnamed})"
        )
    if unknown := names - allowed:
        raise SourceListError(
            f"--url-template uses unknown fields {sorted(unknown)}; known: {sorted(allowed)}"
        )
    return names


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SourceListError(f"cannot read the input list {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceListError(f"{path} is not UTF-8 text (save it as UTF-8): {exc}") from exc


def unfetchable(url: str) -> str | None:
    """Why `url` is not fetched at all, or None: only http(s) URLs are. Raises ValueError for
    a URL that does not parse ("http://[::1/x")."""
    scheme = urlsplit(url).scheme.lower()
    if not scheme:  # a local path: a worker on another node could not read it anyway
        return "not a URL: give http(s) URLs (serve local files over HTTP)"
    if scheme not in ("http", "https"):
        return f"unsupported URL scheme {scheme!r} (http/https only)"
    return None


def _none_fetchable(sources: list[VideoRecord], where: str) -> SourceListError | None:
    """The error for an input of which no video can be fetched (YouTube ids and no template, a
    list of local paths): every row would fail at download, after a Prefect server and Ray had
    started. An input with some fetchable videos goes on; the others get error rows."""
    first_reason = None
    for record in sources:
        try:
            reason = unfetchable(record.source_url)
        except ValueError:
            return None  # said per video, in its error row
        if reason is None:
            return None
        first_reason = first_reason or reason
    first = sources[0].source_url
    return SourceListError(
        f"{where}: no video of it can be fetched, e.g. {shown_url(first)!r}: {first_reason}"
    )


def load_sources(
    urls: str | None,
    kinetics_csv: str | None,
    url_template: str | None,
    split: str | None,
    limit: int | None,
) -> list[VideoRecord]:
    """The input videos, from exactly one of `urls` and `kinetics_csv`; an input with none is
    refused (a deployment run of an empty list ended Completed, "all 0 videos done")."""
    if (urls is None) == (kinetics_csv is None):
        raise ValueError(
            "give exactly one input: --urls (a URL list) or --kinetics-csv (flow parameters "
            "urls, kinetics_csv; a deployment's run on a list of your own: "
            '{"urls": "LIST", "kinetics_csv": null, "url_template": null, "limit": null})'
        )
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 or more (got {limit})")
    if kinetics_csv is not None:
        if not url_template:
            raise ValueError(
                "--kinetics-csv needs --url-template (flow parameters kinetics_csv, "
                "url_template), e.g. https://HOST/{youtube_id}.mp4"
            )
        every_split = split is None or split == "all"
        sources = read_kinetics_csv(
            Path(kinetics_csv),
            url_template=url_template,
            split=None if every_split else split,
            limit=limit,
        )
    else:
        sources = read_url_list(Path(urls or ""))[:limit]  # a slice to None: all of it
    limited = f" (--limit {limit})" if limit is not None else ""
    if not sources:
        raise SourceListError(f"no videos to process in {urls or kinetics_csv}{limited}")
    if (error := _none_fetchable(sources, f"{urls or kinetics_csv}{limited}")) is not None:
        raise error
    return sources
