"""The sample mirror (`vidflow sample-mirror`): the URL template it gives a user works as given."""

from __future__ import annotations

import urllib.request

import pytest

from common.settings import KINETICS_VAL_CSV
from devstack.sample_mirror import running_mirror
from tasks.depth.video_sources import read_kinetics_csv


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "::1"])
def test_the_url_template_reaches_the_mirror_whatever_it_is_bound_to(host: str) -> None:
    """Bound to every interface, the template said `http://0.0.0.0:PORT/...`, which no client
    can use; an IPv6 address needs its brackets in a URL."""
    with running_mirror(host, 0) as template:
        assert "0.0.0.0" not in template and "[::]" not in template
        [row] = read_kinetics_csv(KINETICS_VAL_CSV, url_template=template, split="val")[:1]
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy
        with direct.open(row.source_url, timeout=10) as answer:
            assert answer.status == 200 and answer.headers["Content-Type"] == "video/mp4"
            assert len(answer.read()) > 10_000
