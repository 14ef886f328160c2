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
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@?#]*):([^@/\s?#]*)@")
_QUERY = re.compile(r"([?&;])([^=&;#\s]+)=([^&;#\s]*)")
SECRET_NAME = re.compile(r"sig|signature|token|secret|passw|credential|auth|key|session|x-amz-", re.I)


def redact(text: str) -> str:
    """``text`` with URL passwords and secret-looking query values masked."""
    text = _USERINFO.sub(rf"\1:{MASK}@", text)
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
