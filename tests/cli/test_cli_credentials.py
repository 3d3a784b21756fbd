"""A store URL's credentials (``user:password@``) and query (a signed URL's token) appear in
no message of the ``urza`` commands: each shows the URL with both replaced by ``***``."""

from __future__ import annotations

import pytest

from tests.cli.helpers import assert_one_line_error, publish, run
from tests.urza.helpers import serve_directory

SECRET, TOKEN = "S3CRETPASS", "SIGTOKEN123"
AFFINE = ["--builtin", "affine-shift", "--dim", "2"]


def assert_hidden(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and TOKEN not in text, text


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["urza", "publish", "--store", f"https://al:{SECRET}@127.0.0.1:9/u?sig={TOKEN}"]
            + ["--key", "{keys}", *AFFINE],
            "--store 'https://***@127.0.0.1:9/u?***' is an HTTP store",
        ),
        (
            ["urza", "resign", "--store", f"https://al:{SECRET}@127.0.0.1:9/u?sig={TOKEN}"]
            + ["--key", "{keys}"],
            "--store 'https://***@127.0.0.1:9/u?***' is an HTTP store",
        ),
        (
            ["urza", "publish", "--store", f"memory://al:{SECRET}@bucket/u", "--key", "{keys}"]
            + AFFINE,
            "--store 'memory://***@bucket/u' is a memory:// store",
        ),
        (
            ["urza", "list", "--store", f"file://al:{SECRET}@missing?sig={TOKEN}"],
            "no Urza store at 'file://***@missing?***'",
        ),
    ],
)
def test_a_refused_store_is_named_without_its_credentials(
    argv, fragment, tmp_path, keys, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *[a.format(keys=keys) for a in argv])
    assert_one_line_error(rc, err, fragment)
    assert_hidden(out, err)


def test_publish_list_verify_and_resign_name_the_store_without_its_credentials(
    tmp_path, keys, publishers, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a file:// URL with a user is a relative directory here
    store = f"file://al:{SECRET}@store?sig={TOKEN}"
    shown = "file://***@store?***"
    rc, out, err = run(capsys, "urza", "publish", "--store", store, "--key", str(keys), *AFFINE)
    assert rc == 0 and f") to {shown}\n" in err, err
    assert_hidden(out, err)
    artifact = out.strip()
    for action in ("list", "verify"):
        rc, out, err = run(capsys, "urza", action, "--store", store, "--key", str(keys))
        assert rc == 0 and artifact in out, err
        assert_hidden(out, err)
    rc, out, err = run(capsys, "urza", "resign", "--store", store, "--key", str(keys))
    assert rc == 0 and f"ok     {artifact}" in out, err
    assert_hidden(out, err)

    empty = f"file://al:{SECRET}@empty?sig={TOKEN}"
    (tmp_path / f"al:{SECRET}@empty?sig={TOKEN}").mkdir()
    rc, out, err = run(capsys, "urza", "list", "--store", empty)
    assert rc == 0 and err == "no artifacts in file://***@empty?***\n", err
    rc, out, err = run(capsys, "urza", "verify", "--store", empty, "--key", str(keys))
    assert_one_line_error(rc, err, "no artifacts to verify in file://***@empty?***")
    rc, out, err = run(capsys, "urza", "resign", "--store", empty, "--key", str(keys))
    assert_one_line_error(rc, err, "no artifacts to re-sign in file://***@empty?***")
    assert_hidden(out, err)


def test_an_http_store_is_listed_without_its_credentials(tmp_path, keys, capsys) -> None:
    store = tmp_path / "store"
    artifact = publish(capsys, store, keys, *AFFINE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve_directory(empty) as url:
        secret_url = url.replace("://", f"://al:{SECRET}@") + f"/?sig={TOKEN}"
        rc, out, err = run(capsys, "urza", "list", "--store", secret_url)
    assert rc == 0 and err.startswith("no artifacts in http://***@127.0.0.1:"), err
    assert_hidden(out, err)
    with serve_directory(store) as url:
        secret_url = url.replace("://", f"://al:{SECRET}@")
        rc, out, err = run(capsys, "urza", "verify", "--store", secret_url, "--key", str(keys))
    assert rc == 0 and f"ok     {artifact}" in out, err
    assert_hidden(out, err)


def test_a_store_error_quoting_the_url_is_shown_without_its_credentials(
    tmp_path, keys, capsys, monkeypatch
) -> None:
    """An error the store's own code raises (an fsspec backend's) may quote the URL, or its
    password alone: the one error line shows neither."""
    import kasmina.urza.publish

    store = f"file://al:{SECRET}@store?sig={TOKEN}"

    def failing(*args, **kwargs):
        raise OSError(f"write to {store} refused (password {SECRET})")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kasmina.urza.publish, "publish_payload", failing)
    rc, out, err = run(capsys, "urza", "publish", "--store", store, "--key", str(keys), *AFFINE)
    assert_one_line_error(rc, err, "write to file://***@store?*** refused (password ***)")
    assert_hidden(out, err)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (
            ["urza", "list", "--store", "http://[::1/store"],
            ["store URL 'http://[::1/store' is malformed", "enclose an IPv6 host only"],
        ),
        (
            ["urza", "list", "--store", f"http://al:{SECRET}[@127.0.0.1:9/u?sig={TOKEN}"],
            ["store URL 'http://***@127.0.0.1:9/u?***' is malformed", "(%5B, %5D)"],
        ),
        (
            ["urza", "verify", "--store", f"ftp://al:{SECRET}[@127.0.0.1:9/u", "--key", "{keys}"],
            ["cannot open the store 'ftp://***@127.0.0.1:9/u'"],
        ),
        (
            ["urza", "publish", "--store", f"https://al:{SECRET}[@127.0.0.1:9/u", "--key", "{keys}"]
            + AFFINE,
            ["--store 'https://***@127.0.0.1:9/u' is an HTTP store"],
        ),
        (
            ["urza", "resign", "--store", f"https://al:{SECRET}[@127.0.0.1:9/u", "--key", "{keys}"],
            ["--store 'https://***@127.0.0.1:9/u' is an HTTP store"],
        ),
    ],
)
def test_a_store_url_with_an_unbalanced_bracket_is_one_error_line_without_its_credentials(
    argv, fragments, tmp_path, keys, capsys, monkeypatch
) -> None:
    """An unbalanced '[' in the URL's authority (a typo'd IPv6 host, or a password with one in
    it) makes ``urlsplit`` raise: finding the password to redact must not, or the error line
    became a traceback; and the client names the malformed URL instead of failing its reads."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *[a.format(keys=keys) for a in argv])
    assert_one_line_error(rc, err, *fragments)
    assert_hidden(out, err)
