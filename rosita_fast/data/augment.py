"""TinyBERT-style data augmentation (method 5.3) for the distillation stages.

For every text field, each content word (alphabetic, not a stop word) gets up to ``top_k``
replacement candidates:

* a word that the tokenizer keeps as one WordPiece: mask it and ask a masked LM, fed
  ``[CLS] masked sentence [SEP] original sentence [SEP]`` (segments 0/1), for its ``top_k``
  predictions at the mask, dropping ``##`` continuation pieces (and special / ``[unused]`` tokens);
* a word split into several pieces: the method takes the 15 nearest GloVe words. **Substitution:**
  GloVe is not available offline, so by default the whole word is replaced by a single ``[MASK]``
  and the same masked LM proposes whole-word candidates. Passing ``word_vectors`` (a
  :class:`~rosita_fast.data.word_vectors.WordVectors`, e.g. from ``glove.42B.300d``) restores the
  method's behaviour.

:class:`VectorSubstitutes` needs no masked LM: every candidate word, single piece or not, gets its
``top_k`` nearest neighbours in a :class:`~rosita_fast.data.word_vectors.WordVectors`, e.g. the
whole-word rows of the model's own input embedding (the offline stand-in for GloVe that makes
augmentation possible for models without an MLM head, such as all-MiniLM-L6-v2). Words without
a vector are kept.

No candidates means the word itself. Then ``n`` attempts each copy the words, replace every
candidate position with probability ``p`` by a uniformly drawn candidate, join with spaces, and
keep the sentence if it is new. The original example always comes first; labels are copied.

Pair tasks are augmented one field at a time. The method's code pairs field-B variants with the
*last* field-A variant (an in-place mutation side effect); here they are paired with the original
field A unless ``carry_last_a_variant=True``.

The randomness of each example depends only on ``seed`` and its position in the input, so the
output does not depend on batching.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .examples import Example
from .stopwords import STOP_WORDS
from .tasks import GlueTask, get_task
from .text import basic_tokenize
from .word_vectors import WordVectors

DEFAULT_REPLACE_PROB = 0.4
DEFAULT_TOP_K = 15


def candidate_positions(words: Sequence[str], stop_words: frozenset[str] = STOP_WORDS) -> list[int]:
    """Indices of the words augmentation may replace: purely alphabetic and not stop words."""
    return [i for i, w in enumerate(words) if w.isalpha() and w not in stop_words]


class Substitutes(Protocol):
    """A source of replacement candidates (:class:`MlmSubstitutes`, :class:`VectorSubstitutes`)."""

    def candidates(
        self, sentences: Sequence[tuple[list[str], list[int]]]
    ) -> list[dict[int, list[str]]]: ...


class VectorSubstitutes:
    """Replacement candidates from static word vectors alone: the ``top_k`` nearest neighbours
    of each word (cached per word), none for a word without a vector.

    Args:
        word_vectors: the neighbour index, e.g. :meth:`WordVectors.from_embedding`.
        top_k: neighbours per word (method: 15).
    """

    def __init__(self, word_vectors: WordVectors, *, top_k: int = DEFAULT_TOP_K) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {top_k}")
        self.word_vectors = word_vectors
        self.top_k = top_k
        self._cache: dict[str, list[str]] = {}

    def candidates(
        self, sentences: Sequence[tuple[list[str], list[int]]]
    ) -> list[dict[int, list[str]]]:
        """Per sentence, ``{position: neighbours}`` (see :meth:`MlmSubstitutes.candidates`)."""
        new = sorted({words[pos] for words, positions in sentences for pos in positions}
                     - self._cache.keys())
        self._cache.update(zip(new, self.word_vectors.nearest_many(new, self.top_k),
                               strict=True))
        return [{pos: list(self._cache[words[pos]]) for pos in positions}
                for words, positions in sentences]


@dataclass
class _Request:
    words: list[str]
    position: int


class MlmSubstitutes:
    """Proposes replacement words with a masked LM (and optionally static word vectors).

    Args:
        model: any Hugging Face masked-LM (``...ForMaskedLM``) sharing ``tokenizer``'s vocabulary.
        tokenizer: its tokenizer; must define ``mask_token``, ``cls_token``, ``sep_token``.
        top_k: predictions taken at the mask (before dropping ``##`` and special tokens).
        word_vectors: if given, multi-piece words use their nearest neighbours (the method's
            GloVe step) instead of the masked LM.
        batch_size: masked sequences per forward pass (memory grows with batch x length x vocab).
        max_length: longest sequence fed to the model (BERT: 512).
        device: where to run the model; defaults to the model's device.
        head_at_mask_only: for models with a separate encoder and LM head (BERT's ``bert`` +
            ``cls``), apply the head only at the mask position (same result, about half the
            compute); otherwise the full model runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        top_k: int = DEFAULT_TOP_K,
        word_vectors: WordVectors | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        device: torch.device | str | None = None,
        head_at_mask_only: bool = True,
    ) -> None:
        for attr in ("mask_token_id", "cls_token_id", "sep_token_id", "pad_token_id"):
            if getattr(tokenizer, attr, None) is None:
                raise ValueError(f"the tokenizer has no {attr[:-3]}; a BERT-style MLM tokenizer "
                                 "is required for augmentation")
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab_size is not None and len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the MLM only "
                             f"{vocab_size}; they do not belong together")
        self.model = model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.word_vectors = word_vectors
        self.batch_size = batch_size
        self.max_length = max_length
        self.head_at_mask_only = head_at_mask_only
        if device is None:
            device = next(model.parameters()).device
        self.device = torch.device(device)
        self._pieces: dict[str, list[int]] = {}
        specials = set(tokenizer.all_special_tokens)
        vocab = tokenizer.get_vocab()
        # Continuation pieces cannot stand alone as words; special and reserved slots
        # ("[unused7]") are not words at all.
        self._banned = torch.zeros(max(vocab_size or 0, len(tokenizer)), dtype=torch.bool)
        for token, idx in vocab.items():
            if token.startswith("##") or token in specials or (
                    token.startswith("[") and token.endswith("]")):
                self._banned[idx] = True

    def pieces(self, word: str) -> list[int]:
        """WordPiece ids of ``word`` (cached)."""
        ids = self._pieces.get(word)
        if ids is None:
            ids = self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(word))
            ids = ids or [self.tokenizer.unk_token_id]
            self._pieces[word] = ids
        return ids

    def is_single_piece(self, word: str) -> bool:
        """True when the tokenizer keeps ``word`` as one known WordPiece."""
        ids = self.pieces(word)
        return len(ids) == 1 and ids[0] != self.tokenizer.unk_token_id

    def masked_input(self, words: Sequence[str], position: int) -> tuple[list[int], list[int], int]:
        """Ids, segment ids and mask index of ``[CLS] masked [SEP] original [SEP]``.

        The word at ``position`` becomes one ``[MASK]`` (whatever its number of pieces). The
        original sentence is truncated first when the pair exceeds ``max_length``; the mask
        index is -1 if even the masked sentence is too long to reach it.
        """
        tok = self.tokenizer
        masked = [tok.cls_token_id]
        mask_index = -1
        for i, word in enumerate(words):
            if i == position:
                mask_index = len(masked)
                masked.append(tok.mask_token_id)
            else:
                masked.extend(self.pieces(word))
        masked.append(tok.sep_token_id)
        original = [piece for word in words for piece in self.pieces(word)] + [tok.sep_token_id]
        room = self.max_length - len(masked)
        if room < 1:
            masked = masked[: self.max_length - 1] + [tok.sep_token_id]
            original = []
            if mask_index >= len(masked) - 1:
                mask_index = -1
        elif len(original) > room:
            original = original[: room - 1] + [tok.sep_token_id]
        ids = masked + original
        return ids, [0] * len(masked) + [1] * len(original), mask_index

    @torch.inference_mode()
    def _mlm_candidates(self, requests: Sequence[_Request]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in requests]
        self.model.eval()
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            built = [self.masked_input(r.words, r.position) for r in chunk]
            width = max(len(ids) for ids, _, _ in built)
            ids = torch.full((len(built), width), self.tokenizer.pad_token_id, dtype=torch.long)
            types = torch.zeros_like(ids)
            attention = torch.zeros_like(ids)
            for row, (seq, seg, _) in enumerate(built):
                ids[row, : len(seq)] = torch.tensor(seq)
                types[row, : len(seg)] = torch.tensor(seg)
                attention[row, : len(seq)] = 1
            masks = [m for _, _, m in built]
            logits = self._mask_logits(ids, types, attention, masks)
            for row, mask_index in enumerate(masks):
                if mask_index < 0:
                    continue
                top = logits[row].float().topk(self.top_k).indices.cpu()
                keep = top[~self._banned[top]]
                out[start + row] = self.tokenizer.convert_ids_to_tokens(keep.tolist())
        return out

    def _mask_logits(self, ids: torch.Tensor, types: torch.Tensor, attention: torch.Tensor,
                     masks: list[int]) -> torch.Tensor:
        inputs = {"input_ids": ids.to(self.device), "token_type_ids": types.to(self.device),
                  "attention_mask": attention.to(self.device)}
        rows = torch.arange(len(masks))
        cols = torch.tensor([max(m, 0) for m in masks])
        encoder = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
        head = getattr(self.model, "cls", None) or getattr(self.model, "lm_head", None)
        if self.head_at_mask_only and encoder is not None and head is not None:
            # The vocabulary projection costs about as much as the encoder; run it only where
            # the mask is instead of at every position.
            hidden = encoder(**inputs).last_hidden_state
            return head(hidden[rows, cols])
        return self.model(**inputs).logits[rows, cols]

    def candidates(
        self, sentences: Sequence[tuple[list[str], list[int]]]
    ) -> list[dict[int, list[str]]]:
        """Replacement candidates for many sentences at once.

        Args:
            sentences: ``(words, positions)`` pairs; ``positions`` are the words to replace.

        Returns:
            per sentence, ``{position: candidates}``; the list may be empty (then the caller
            keeps the word).
        """
        results: list[dict[int, list[str]]] = [{} for _ in sentences]
        mlm_requests: list[_Request] = []
        owners: list[tuple[int, int]] = []
        for s, (words, positions) in enumerate(sentences):
            for pos in positions:
                word = words[pos]
                if self.word_vectors is not None and not self.is_single_piece(word):
                    results[s][pos] = self.word_vectors.nearest(word, self.top_k)
                else:
                    mlm_requests.append(_Request(list(words), pos))
                    owners.append((s, pos))
        for (s, pos), cands in zip(owners, self._mlm_candidates(mlm_requests), strict=True):
            results[s][pos] = cands
        return results


def sample_variants(
    words: Sequence[str],
    candidates: Mapping[int, Sequence[str]],
    n: int,
    p: float,
    rng: random.Random,
    *,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Make up to ``n`` new sentences by random replacement (method 5.3, step 3).

    Each of ``n`` attempts replaces every position of ``candidates`` with probability ``p`` by a
    uniformly chosen candidate (an empty candidate list means the word itself). Sentences equal to
    an earlier one, to ``" ".join(words)`` or to anything in ``exclude`` are dropped.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"replacement probability must be in [0, 1]; got {p}")
    seen = {" ".join(words), *exclude}
    positions = sorted(candidates)
    variants: list[str] = []
    for _ in range(n):
        new = list(words)
        for pos in positions:
            if rng.random() < p:
                options = candidates[pos] or [words[pos]]
                new[pos] = rng.choice(options)
        sentence = " ".join(new)
        if sentence not in seen:
            seen.add(sentence)
            variants.append(sentence)
    return variants


def augment_examples(
    examples: Sequence[Example],
    task: str | GlueTask,
    substitutes: Substitutes,
    *,
    n: int | None = None,
    p: float = DEFAULT_REPLACE_PROB,
    seed: int = 42,
    carry_last_a_variant: bool = False,
    chunk_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[Example]:
    """Augment a training set; each original example is followed by its variants.

    Args:
        substitutes: the candidate generator (:class:`MlmSubstitutes` or
            :class:`VectorSubstitutes`).
        n: attempts per text field; defaults to the method's per-task value
            (CoLA 30, SST-2 20, QNLI 20, QQP 10, MNLI 10, others 20).
        p: replacement probability per candidate position (method: 0.4).
        seed: makes the output reproducible.
        carry_last_a_variant: reproduce the method's pairing quirk for pair tasks (field-B
            variants carry the last field-A variant, and the original B is repeated).
        chunk_size: examples whose candidates are computed together.
        progress: called with the number of examples finished after every chunk.
    """
    task = get_task(task)
    n = task.augment_n if n is None else n
    out: list[Example] = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start:start + chunk_size]
        fields: list[tuple[list[str], list[int]]] = []
        for ex in chunk:
            texts = [ex.text_a, ex.text_b] if task.is_pair else [ex.text_a]
            for text in texts:
                words = basic_tokenize(text or "")
                fields.append((words, candidate_positions(words)))
        cands = substitutes.candidates(fields)
        per_example = 2 if task.is_pair else 1
        for k, ex in enumerate(chunk):
            rng = random.Random(f"{seed}/{start + k}")
            base = k * per_example
            out.extend(_augment_one(ex, task, fields[base:base + per_example],
                                    cands[base:base + per_example], n, p, rng,
                                    carry_last_a_variant))
        if progress is not None:
            progress(len(chunk))
    return out


def _augment_one(
    ex: Example,
    task: GlueTask,
    fields: list[tuple[list[str], list[int]]],
    cands: list[dict[int, list[str]]],
    n: int,
    p: float,
    rng: random.Random,
    carry_last_a_variant: bool,
) -> list[Example]:
    words_a, _ = fields[0]
    variants_a = sample_variants(words_a, cands[0], n, p, rng, exclude=[ex.text_a])
    rows = [ex] + [Example(f"{ex.guid}-aug{i + 1}", text, ex.text_b, ex.label)
                   for i, text in enumerate(variants_a)]
    if not task.is_pair:
        return rows
    words_b, _ = fields[1]
    variants_b = sample_variants(words_b, cands[1], n, p, rng, exclude=[ex.text_b or ""])
    if carry_last_a_variant:
        partner = variants_a[-1] if variants_a else ex.text_a
        variants_b = [ex.text_b or ""] + variants_b
    else:
        partner = ex.text_a
    offset = len(rows)
    rows += [Example(f"{ex.guid}-aug{offset + i}", partner, text, ex.label)
             for i, text in enumerate(variants_b)]
    return rows
