"""Keep credentials out of everything a run writes: MLflow params, results.json, logs, sweep files.

A location may carry a secret: a password in its user part (``http://user:pw@host``), or a token
in its query (a pre-signed URL's ``X-Amz-Signature=...``, ``?token=...``). What is written keeps
the key and drops the value (``http://user:***@host``, ``?token=***``), so a reader still sees
where a run pointed without being able to use it.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://, then the rest of the location up to whitespace or a quote
_LOCATION = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s'\"<>]*)")
_QUERY = re.compile(r"([?&;#])([^=&;#\s]+)=([^&;#\s]*)")
SECRET_NAME = re.compile(r"sig|signature|token|secret|passw|pass$|pwd|code|credential|auth|key|session|x-amz-", re.I)
_PORT_THEN_PATH = re.compile(r"\d{1,5}(/.*)?")


def _mask_userinfo(rest: str) -> str:
    """The part of a location after ``scheme://`` with the password of its user part masked.

    The user part ends at the last ``@`` of the location, so a password holding ``@``, ``/`` or
    ``#`` (``alice:p@ss@host``) is masked whole. A user part without ``:`` is a token given as the
    user (``https://hf_TOKEN@host``) and is masked whole; one holding a ``/`` but no ``:`` is a
    path with an ``@`` in it (``s3://bucket/a@b``) and is left alone, as is ``host:8080/x@y``.
    """
    at = rest.rfind("@")
    if at <= 0:
        return rest
    user, tail = rest[:at], rest[at:]
    name, colon, password = user.partition(":")
    if colon:
        if _PORT_THEN_PATH.fullmatch(password) and "/" in password:
            return rest
        return f"{name}:{MASK}{tail}"
    if "/" in user:
        return rest
    return f"{MASK}{tail}"


def redact(text: str) -> str:
    """``text`` with URL passwords, tokens given as URL users and secret-looking query values masked."""
    text = _LOCATION.sub(lambda m: m.group(1) + _mask_userinfo(m.group(2)), text)
    return _QUERY.sub(lambda m: f"{m.group(1)}{m.group(2)}={MASK}" if SECRET_NAME.search(m.group(2)) else m.group(0),
                      text)


def redact_tree(value: Any, mask_values_of: tuple[str, ...] = ("worker_env",)) -> Any:
    """A copy of a config-like tree with every string redacted, and every value under a key named in
    ``mask_values_of`` (environment variables handed to workers) replaced by the mask."""
    if isinstance(value, dict):
        return {k: ({name: MASK for name in v} if k in mask_values_of and isinstance(v, dict)
                    else redact_tree(v, mask_values_of)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v, mask_values_of) for v in value)
    return redact(value) if isinstance(value, str) else value


class Sealed:
    """A value handed through a store that shows it (Ray Train keeps a trial's ``train_loop_config`` and
    serves ``str()`` of every value on its dashboard API): the value travels whole (pickled), while
    ``str`` and ``repr`` give only ``shown``, a masked rendering."""

    def __init__(self, value: Any, shown: str):
        self.value, self.shown = value, shown

    def __repr__(self) -> str:
        return self.shown

    __str__ = __repr__


def sealed_env(env: dict[str, str]) -> Sealed:
    """Environment variables for workers: names shown, values masked."""
    return Sealed(dict(env), repr({name: MASK for name in env}))


def sealed_config(cfg: Any) -> Sealed:
    """A run config: shown as its dict with every credential masked."""
    return Sealed(cfg, repr(redact_tree(cfg.to_dict())))
