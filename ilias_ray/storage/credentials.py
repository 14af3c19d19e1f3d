"""Credentials never travel as text: URIs that carry them are refused, and every name shown to
a user goes through `redact`."""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import parse_qsl, urlsplit

from ilias_ray.errors import UserError

SECRET_PARAMS = re.compile(r"(key|secret|token|password|passwd|credential|signature)", re.I)


def is_uri(where: str) -> bool:
    return "://" in where


def redact(text: str) -> str:
    """`text` with the `user:password@` part and secret-looking query values of URIs removed."""
    text = re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@", r"\1", text)
    return re.sub(
        r"([?&][^=&\s]*(?:key|secret|token|password|passwd|credential|signature)[^=&\s]*=)[^&\s]*",
        r"\1***",
        text,
        flags=re.I,
    )


def check_credentials_free(flag: str, where: Optional[str]) -> None:
    """Refuse a URI that carries credentials: they belong in the environment, never in flags."""
    if not where or not is_uri(where):
        return
    url = urlsplit(where)
    secret_query = [k for k, _ in parse_qsl(url.query) if SECRET_PARAMS.search(k)]
    if "@" in url.netloc or secret_query:
        raise UserError(
            f"{flag} {redact(where)}: credentials in a URI are not accepted; use the standard "
            "AWS/GCP environment, config files or instance roles"
        )
