"""Nearest-neighbour word lookup in a static embedding (GloVe), for multi-piece words.

The method (5.3) proposes replacements for words that WordPiece splits into several pieces from
the 15 nearest GloVe words. GloVe cannot be downloaded offline, so augmentation uses the masked LM
for those words unless a :class:`WordVectors` is supplied; this class makes the faithful variant
available to users who have the GloVe text file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import DataError


class WordVectors:
    """Unit-normalised word vectors with cosine nearest-neighbour search.

    Args:
        words: vocabulary, one entry per row of ``vectors``.
        vectors: ``(len(words), dim)`` array.
    """

    def __init__(self, words: Sequence[str], vectors: np.ndarray) -> None:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[0] != len(words):
            raise ValueError(f"need one vector per word; got {len(words)} words, {matrix.shape}")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self.matrix = matrix / np.maximum(norms, 1e-12)
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def nearest(self, word: str, k: int) -> list[str]:
        """The ``k`` words with the highest cosine similarity to ``word``, excluding itself.

        Returns an empty list for a word without a vector.
        """
        row = self.index.get(word)
        if row is None:
            return []
        sims = self.matrix @ self.matrix[row]
        sims[row] = -np.inf
        k = min(k, len(self.words) - 1)
        top = np.argpartition(-sims, k - 1)[:k] if k > 0 else np.zeros(0, dtype=int)
        top = top[np.argsort(-sims[top], kind="stable")]
        return [self.words[i] for i in top]

    @classmethod
    def from_glove_text(
        cls, path: str | os.PathLike[str], max_words: int = 100_000
    ) -> WordVectors:
        """Read the first ``max_words`` lines of a GloVe text file (``word v1 v2 ...``).

        Raises:
            DataError: the file is missing or a line does not have the same dimension as the first.
        """
        words: list[str] = []
        rows: list[np.ndarray] = []
        try:
            handle = open(path, encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{path}: cannot read word vectors ({exc})") from exc
        with handle:
            for lineno, line in enumerate(handle, start=1):
                if len(words) >= max_words:
                    break
                parts = line.rstrip().split(" ")
                try:
                    values = np.asarray(parts[1:], dtype=np.float32)
                except ValueError:
                    raise DataError(f"{path}:{lineno}: not a 'word v1 v2 ...' line") from None
                if values.size == 0 or (rows and values.size != rows[0].size):
                    expected = rows[0].size if rows else "at least 1"
                    raise DataError(f"{path}:{lineno}: {values.size} values, expected {expected}")
                words.append(parts[0])
                rows.append(values)
        if not rows:
            raise DataError(f"{path}: no word vectors")
        return cls(words, np.stack(rows))
