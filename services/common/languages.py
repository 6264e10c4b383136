"""Language tags as clients send them, and the language Whisper decodes.

One rule for every endpoint: a BCP-47-like tag (`en`, `de`, `en-US`, `zh-Hant-TW`),
whose primary subtag, lower-cased, is the ISO 639-1/3 code Whisper knows.
"""

from __future__ import annotations

import re

_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def is_language_tag(text: str) -> bool:
    return _TAG.fullmatch(text) is not None


def primary_language(tag: str) -> str:
    """`en-US` -> `en`: the language Whisper decodes."""
    return tag.split("-", 1)[0].lower()
