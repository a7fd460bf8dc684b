"""common.urls: what of a URL may be shown in logs, error text and ids."""

from __future__ import annotations

import pytest

from common.urls import shown_url


def test_credentials_and_a_signed_query_are_not_shown() -> None:
    url = (
        "https://AKIA:wJalr%2Fsecret@bucket.s3.amazonaws.com/videos/a.mp4"
        "?X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=0badc0ffee"
    )
    shown = shown_url(url)
    assert shown == "https://bucket.s3.amazonaws.com/videos/a.mp4?…"
    for secret in ("AKIA", "wJalr", "X-Amz-Signature", "0badc0ffee"):
        assert secret not in shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:s3cret@10.0.0.5:554/live", "rtsp://10.0.0.5:554/live"),
        ("http://127.0.0.1:8000/a.mp4#t=10", "http://127.0.0.1:8000/a.mp4?…"),
        ("http://token@[::1/x.mp4?sig=1", "http://[::1/x.mp4?…"),  # no parser accepts it
    ],
)
def test_userinfo_query_and_fragment_go_even_from_odd_urls(url: str, shown: str) -> None:
    assert shown_url(url) == shown


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/videos/a.mp4", "https://h/a@b.mp4", "clip.mp4", "webcam:0"]
)
def test_what_holds_no_secret_is_shown_unchanged(url: str) -> None:
    assert shown_url(url) == url
