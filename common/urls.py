"""URLs as they may be shown: in logs, error text, artifacts, Kafka keys."""

from __future__ import annotations

import re

# The userinfo of an authority: `//user:password@` (RFC 3986 3.2.1), after an optional scheme.
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^/?#]*@")


def shown_url(url: str) -> str:
    """`url` without what tends to be secret: the userinfo (`user:password@`) goes, and a query
    or fragment becomes `?…` (pre-signed URLs carry their signature there, RTSP cameras their
    tokens). Plain string work, so a URL no parser accepts is still cleaned, never raised on."""
    without_user = _USERINFO.sub(r"\1", url, count=1)
    cut = min((i for i in (without_user.find("?"), without_user.find("#")) if i >= 0), default=-1)
    return without_user if cut < 0 else f"{without_user[:cut]}?…"
