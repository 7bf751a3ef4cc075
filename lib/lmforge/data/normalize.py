"""Text normalisation applied to every document before filtering and dedup.

Conservative on purpose: code keeps its indentation, prose its paragraphs. Unicode NFC,
newlines unified (CR, CRLF, NEL, U+2028/9), control characters (C0 and C1, other than tab and
newline) and zero-width/BOM marks removed, trailing spaces
stripped per line, runs of 3+ blank lines collapsed to one blank line, outer whitespace trimmed.
"""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\ufeff]")
_NEWLINES = re.compile(r"\r\n|[\r\x85\u2028\u2029]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANKS.sub("\n\n", text)
    return text.strip()
