"""BERT-style basic tokenisation: lower-case, strip accents, split on whitespace and punctuation.

Augmentation works on these words (method 5.3, step 1), and its output sentences are these words
joined by single spaces, exactly as in the method.
"""

from __future__ import annotations

import unicodedata


def _is_punctuation(ch: str) -> bool:
    code = ord(ch)
    # BERT treats every non-alphanumeric printable ASCII character as punctuation ("$", "^", "`").
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    code = ord(ch)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def strip_accents(text: str) -> str:
    """Remove combining marks after canonical decomposition (``café`` -> ``cafe``)."""
    return "".join(ch for ch in unicodedata.normalize("NFD", text)
                   if unicodedata.category(ch) != "Mn")


def basic_tokenize(text: str, *, lowercase: bool = True) -> list[str]:
    """Split ``text`` into words and single punctuation / CJK characters.

    With ``lowercase`` (the uncased-BERT setting) the text is lower-cased and accents are removed.
    Control characters are dropped.
    """
    if lowercase:
        text = strip_accents(text.lower())
    words: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            words.append("".join(current))
            current.clear()

    for ch in text:
        if ch.isspace():
            flush()
        elif _is_punctuation(ch) or _is_cjk(ch):
            flush()
            words.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf") or ch == "\ufffd":
            continue
        else:
            current.append(ch)
    flush()
    return words
