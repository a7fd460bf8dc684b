"""A local stand-in for a Kinetics mirror: the real sample clips under the real Kinetics names.

The Kinetics list points at YouTube, which offline machines cannot reach. This serves every row
of the real Kinetics-400 validation CSV at the usual mirror path
`/{split}/{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`, each name answered with one of the
real sample clips (chosen by a hash of the name, so a name always gets the same clip). The demo
and the local deployments point `depth-extraction` at it; with a real mirror only the URL
template changes.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from common.settings import KINETICS_VAL_CSV, SAMPLE_VIDEOS_DIR
from devstack.http_thread import serve_in_thread
from tasks.depth.video_sources import KINETICS_ID_FORMAT, read_kinetics_csv

MIRROR_PATH_TEMPLATE = "{split}/" + KINETICS_ID_FORMAT + ".mp4"


def mirror_url_template(host: str, port: int) -> str:
    """The `--url-template` that points a Kinetics CSV at a mirror on host:port; for a mirror
    bound to every interface, at this machine's loopback address of that family
    (`http://0.0.0.0:...` is no address a client can use; asyncio binds `::` to IPv6 only)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address, as a URL writes it
    return f"http://{shown}:{port}/" + MIRROR_PATH_TEMPLATE


def _mirror_names(kinetics_csv: Path) -> set[str]:
    """Every mirror path of the CSV, e.g. `val/abc123_000010_000020.mp4`."""
    rows = read_kinetics_csv(kinetics_csv, url_template=MIRROR_PATH_TEMPLATE, split=None)
    return {row.source_url for row in rows}


def build_app(
    kinetics_csv: Path = KINETICS_VAL_CSV, clips_dir: Path = SAMPLE_VIDEOS_DIR
) -> web.Application:
    """An aiohttp app answering each Kinetics name with a real sample clip, anything else 404."""
    clips = sorted(clips_dir.glob("*.mp4"))
    if not clips:
        raise FileNotFoundError(
            f"no .mp4 sample clips in {clips_dir} (in the compose stack: the folder "
            "VIDFLOW_SHARED_DATA names on the host, ../shared/data by default, mounted there; "
            "the worker waits for this mirror)"
        )
    names = _mirror_names(kinetics_csv)

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in names:
            raise web.HTTPNotFound(text=f"{name} is not a row of {kinetics_csv.name}\n")
        clip = clips[zlib.crc32(name.encode()) % len(clips)]
        return web.FileResponse(clip, headers={"Content-Type": "video/mp4"})

    app = web.Application()
    app.router.add_get("/{name:.+}", serve)
    return app


@contextmanager
def running_mirror(host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the mirror in a background thread; yields its URL template."""
    with serve_in_thread(build_app(), host, port) as bound_port:
        yield mirror_url_template(host, bound_port)
