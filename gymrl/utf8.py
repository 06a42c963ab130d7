"""Text that is valid UTF-8, whatever the model (or an endpoint) produced.

A Python ``str`` can hold lone surrogates (``"\\udcff"``): an OpenAI-compatible endpoint's JSON may carry
them as ``\\udcff`` escapes, and ``surrogateescape`` decoding makes them from stray bytes. Such a string
cannot be encoded as UTF-8, so an HTTP body (httpx), a SQLite TEXT value or a JSON reply that holds one
fails to encode. :func:`clean` replaces each surrogate with U+FFFD, the replacement character a
decoder writes for a bad byte (``bytes.decode(errors="replace")``), in strings nested in dicts and lists.
Valid text is returned as it is (the check is one encode attempt; for a nested value, one JSON encoding in C
before any walk, since the walk cost a sixth of a server's ``/verify_batch`` time). Pure Python: both venvs
import it.
"""

import json
import re
from typing import Any

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def clean(value: Any) -> Any:
    """``value`` with :func:`clean_text` applied to every string in it (dict keys too); other values as they are.
    A value with no lone surrogate (nearly all) is returned as it is."""
    if isinstance(value, str):
        return clean_text(value)
    try:
        json.dumps(value, ensure_ascii=False, default=repr).encode("utf-8")
        return value
    except (TypeError, ValueError):  # a lone surrogate (UnicodeEncodeError), or keys JSON cannot hold
        return _walk(value)


def _walk(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {_walk(k): _walk(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_walk(v) for v in value)
    return value
