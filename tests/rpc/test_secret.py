"""load_secret: --secret-file or OBJCACHE_SECRET."""
import logging
import os

import pytest

from objcache.rpc import SecretError, load_secret


def _write(tmp_path, data: bytes, mode=0o600):
    p = tmp_path / "secret"
    p.write_bytes(data)
    os.chmod(p, mode)
    return str(p)


def test_file_wins_over_the_environment(tmp_path, caplog):
    path = _write(tmp_path, b"file-secret-0123456789\n")
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        got = load_secret(path, environ={"OBJCACHE_SECRET": "env-secret"})
    assert got == b"file-secret-0123456789"      # one trailing newline gone
    assert caplog.text == ""


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("OBJCACHE_SECRET", "env-secret-0123456789")
    assert load_secret(None) == b"env-secret-0123456789"
    assert load_secret(environ={"OBJCACHE_SECRET": "x" * 20 + "\r\n"}) == \
        b"x" * 20


def test_only_one_trailing_newline_is_stripped(tmp_path):
    path = _write(tmp_path, b"  spaced secret 0123456789 \n\n")
    assert load_secret(path) == b"  spaced secret 0123456789 \n"


def test_neither_source_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OBJCACHE_SECRET", raising=False)
    with pytest.raises(SecretError, match="--secret-file.*OBJCACHE_SECRET"):
        load_secret(None)


@pytest.mark.parametrize("data", [b"", b"\n", b"\r\n"])
def test_empty_secrets_are_refused(tmp_path, data):
    with pytest.raises(SecretError, match="empty"):
        load_secret(_write(tmp_path, data))
    with pytest.raises(SecretError, match="empty"):
        load_secret(environ={"OBJCACHE_SECRET": data.decode()})


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(SecretError, match="cannot read secret file"):
        load_secret(str(tmp_path / "nope"))
    with pytest.raises(SecretError, match="directory|not a regular file"):
        load_secret(str(tmp_path))
    with pytest.raises(SecretError, match="not a regular file"):
        load_secret("/dev/null")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_world_access_warns_without_the_secret(tmp_path, caplog, mode):
    path = _write(tmp_path, b"perm-secret-0123456789", mode)
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        assert load_secret(path) == b"perm-secret-0123456789"
    assert "chmod 600" in caplog.text and oct(mode)[2:] in caplog.text
    assert "perm-secret" not in caplog.text


def test_short_secret_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="objcache.rpc"):
        assert load_secret(_write(tmp_path, b"q7x9z")) == b"q7x9z"
    assert "only 5 bytes" in caplog.text and "q7x9z" not in caplog.text
