"""Nearest-neighbour word lookup in a static embedding, for augmentation candidates.

The method (5.3) proposes replacements for words that WordPiece splits into several pieces from
the 15 nearest GloVe words. GloVe cannot be downloaded offline. Two sources are offered:

* :meth:`WordVectors.from_glove_text` reads the GloVe text file, for users who have it;
* :meth:`WordVectors.from_embedding` takes the rows of a model's own input embedding that are
  whole words (single WordPiece tokens), which needs nothing beyond the model being compressed.
  The nearest neighbours there are close to GloVe's (``good``: excellent, bad, great, better;
  ``movie``: movies, film, films, cinema in all-MiniLM-L6-v2). Antonyms are near too, as in
  GloVe. Prediction KD scores each variant with the teacher, so a flipped sentiment gets the
  teacher's label, not the copied gold one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

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
    def from_embedding(
        cls, weight: torch.Tensor, tokenizer: Any, words: Iterable[str] | None = None
    ) -> WordVectors:
        """The whole-word rows of a model's input embedding.

        Args:
            weight: the word-embedding matrix, one row per token id (``[vocab, dim]``).
            tokenizer: the model's tokenizer (its ``get_vocab`` maps tokens to rows).
            words: if given, only these words get rows (e.g. the training set's words, so that
                variants never bring a token the training corpus lacks).

        Rows are tokens of at least two alphabetic characters: not ``##`` continuation pieces,
        not special or reserved (``[unused7]``) tokens, not single letters.

        Raises:
            ValueError: ``weight`` is not a matrix, has fewer rows than the tokenizer has ids, or
                no token qualifies.
        """
        if weight.ndim != 2:
            raise ValueError("the embedding must be a [vocab, dim] matrix; got "
                             f"{tuple(weight.shape)}")
        vocab = tokenizer.get_vocab()
        if vocab and max(vocab.values()) >= weight.shape[0]:
            raise ValueError(f"the tokenizer has ids up to {max(vocab.values())} but the "
                             f"embedding only {weight.shape[0]} rows")
        allowed = None if words is None else set(words)
        specials = set(getattr(tokenizer, "all_special_tokens", []))
        chosen = sorted((idx, token) for token, idx in vocab.items()
                        if len(token) > 1 and token.isalpha() and token not in specials
                        and (allowed is None or token in allowed))
        if not chosen:
            raise ValueError("no whole-word token of the tokenizer qualifies for word vectors")
        rows = torch.tensor([idx for idx, _ in chosen], dtype=torch.long)
        matrix = weight.detach().float().cpu().index_select(0, rows).numpy()
        return cls([token for _, token in chosen], matrix)

    def nearest_many(self, words: Sequence[str], k: int, chunk: int = 1024) -> list[list[str]]:
        """:meth:`nearest` for many words, ``chunk`` of them per matrix product (the same
        neighbours up to float rounding among near-ties)."""
        out: list[list[str]] = [[] for _ in words]
        k = min(k, len(self.words) - 1)
        pending = [(i, self.index[w]) for i, w in enumerate(words) if w in self.index]
        if k <= 0:
            return out
        for start in range(0, len(pending), chunk):
            part = pending[start:start + chunk]
            rows = np.array([r for _, r in part])
            sims = self.matrix[rows] @ self.matrix.T
            sims[np.arange(len(rows)), rows] = -np.inf
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for j, (i, _) in enumerate(part):
                order = top[j][np.argsort(-sims[j, top[j]], kind="stable")]
                out[i] = [self.words[t] for t in order]
        return out

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
