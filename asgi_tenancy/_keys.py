"""Secret keys for HMACs: one rule for every key the library signs with (standard library only).

RLS binding keys, job-snapshot keys and JWT HMAC keys all need at least 32 bytes: a shorter
secret can be brute-forced offline from one signed value.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import IsolationConfigError

MIN_KEY_BYTES = 32


def secret_keys(keys: bytes | str | Iterable[bytes | str], *, what: str) -> list[bytes]:
    """``keys`` as bytes, in order (the first one signs); refuses none and short ones."""
    listed = [keys] if isinstance(keys, bytes | str) else list(keys)
    encoded: list[bytes] = []
    for key in listed:
        raw = key.encode() if isinstance(key, str) else key
        if not isinstance(raw, bytes | bytearray) or len(raw) < MIN_KEY_BYTES:
            raise IsolationConfigError(
                f"each {what} key needs at least {MIN_KEY_BYTES} bytes",
                hint="generate one with secrets.token_bytes(32) and keep it out of the code",
            )
        encoded.append(bytes(raw))
    if not encoded:
        raise IsolationConfigError(f"no {what} key given", hint="pass at least one key")
    return encoded
