"""storage/credentials.py: credentials never travel as text: URIs that carry them are refused, and
names shown to a user are redacted."""

from __future__ import annotations

import pytest

from ilias_ray.errors import UserError
from ilias_ray.storage.credentials import check_credentials_free, is_uri, redact


def test_redact_removes_userinfo_and_secret_query_values():
    assert redact("s3://key:secret@bucket/a/b.tar") == "s3://bucket/a/b.tar"
    assert (
        redact("gs://b/x?access_token=abc&endpoint_override=h:1") == "gs://b/x?access_token=***&endpoint_override=h:1"
    )
    assert redact("/local/path?not=a-uri") == "/local/path?not=a-uri"


@pytest.mark.parametrize("where", ["s3://k:s@b/x", "s3://b/x?secret_key=s", "gs://b/x?Signature=y"])
def test_a_uri_with_credentials_is_refused_in_one_line(where):
    with pytest.raises(UserError, match=r"^--dataset_dir .*: credentials in a URI are not accepted") as e:
        check_credentials_free("--dataset_dir", where)
    assert "s@" not in str(e.value) and "=s" not in str(e.value).replace("=***", "")


def test_plain_uris_and_paths_pass():
    for where in ("s3://b/x?endpoint_override=127.0.0.1:9000&scheme=http", "/data/x", None):
        check_credentials_free("--dataset_dir", where)
    assert is_uri("s3://b") and not is_uri("/x")
