"""Loading the cluster secret (``--secret-file`` or ``OBJCACHE_SECRET``).

The secret is the HMAC key of the RPC handshake (objcache/rpc/auth.py). It
is never logged; error messages name the file or variable, not the value.
"""
from __future__ import annotations

import logging
import os
import stat

ENV_VAR = "OBJCACHE_SECRET"
MIN_RECOMMENDED_LEN = 16

log = logging.getLogger("objcache.rpc")


class SecretError(ValueError):
    """The cluster secret is missing, unreadable or empty."""


def load_secret(secret_file: str | None = None, *,
                environ: "os._Environ | dict | None" = None) -> bytes:
    """The cluster secret as bytes.

    ``secret_file`` (the ``--secret-file`` flag) wins; otherwise the
    ``OBJCACHE_SECRET`` environment variable (``environ``, for tests,
    defaults to ``os.environb``/``os.environ``). One trailing newline
    (``\\n`` or ``\\r\\n``) is stripped, as ``echo`` and editors add one;
    anything else is part of the secret. Raises SecretError when neither
    source is given, the file cannot be read, or the secret is empty. Logs
    a warning when the file is readable or writable by group or others, and
    when the secret is shorter than 16 bytes.
    """
    if secret_file is not None:
        try:
            with open(secret_file, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if not stat.S_ISREG(mode):
                    raise SecretError(f"secret file {secret_file!r} is not a "
                                      f"regular file")
                data = f.read()
        except OSError as exc:
            raise SecretError(f"cannot read secret file {secret_file!r}: "
                              f"{exc.strerror or exc}") from exc
        if mode & 0o077:
            log.warning("secret file %s is accessible by group/others (mode "
                        "%04o); restrict it with: chmod 600 %s", secret_file,
                        stat.S_IMODE(mode), secret_file)
        source = f"secret file {secret_file!r}"
    else:
        if environ is not None:
            value = environ.get(ENV_VAR)
        else:
            value = os.environb.get(ENV_VAR.encode())
        if value is None:
            raise SecretError(f"no cluster secret: pass --secret-file PATH or "
                              f"set {ENV_VAR}")
        data = value.encode() if isinstance(value, str) else bytes(value)
        source = f"${ENV_VAR}"
    data = _strip_newline(data)
    if not data:
        raise SecretError(f"the cluster secret from {source} is empty")
    if len(data) < MIN_RECOMMENDED_LEN:
        log.warning("the cluster secret from %s is only %d bytes; use at "
                    "least %d random bytes", source, len(data),
                    MIN_RECOMMENDED_LEN)
    return data


def _strip_newline(data: bytes) -> bytes:
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data
