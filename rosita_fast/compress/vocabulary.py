"""Vocabulary pruning: keep only the tokens a corpus uses, with a tokenizer that matches.

Beyond the ROSITA paper (TextPruner has it). For a small encoder the word embedding dominates the
parameter count (all-MiniLM-L6-v2: 11.7M of 22.7M), so dropping the tokens a task never produces
is the largest single saving. Kept tokens keep their relative order; every special and added token
and every id up to the padding id stay (RoBERTa and MPNet derive position ids from the padding
id, so it must not move).

The new tokenizer is the old one with a smaller WordPiece vocabulary. WordPiece matches the
longest vocabulary prefix greedily, and every token the corpus produced is still present, so each
corpus text tokenizes to the same pieces, now with the new ids. Text outside the corpus may map
more pieces to the unknown token; ``spell_ascii`` keeps every printable ASCII character as a word
start and as a ``##`` continuation (about 50 tokens beyond a typical English corpus's), so an
ASCII word the corpus never used is spelled in known pieces instead of becoming ``[UNK]``
(WordPiece maps a word to ``[UNK]`` as soon as one stretch of it matches no piece).

BPE tokenizers (RoBERTa) are refused: their merges pass through intermediate tokens that a
kept-token vocabulary would lack, so the same guarantee cannot hold.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.adapter import adapter_for
from ..models.factorized_embedding import FactorizedEmbedding
from .surgery import replace_parameter_

__all__ = ["corpus_token_ids", "prune_vocabulary_"]


def corpus_token_ids(tokenizer: Any, texts: Iterable[str | tuple[str, str]]) -> set[int]:
    """Ids the tokenizer produces for ``texts`` (strings or sentence pairs), specials excluded."""
    used: set[int] = set()
    chunk: list[str] = []

    def flush() -> None:
        if chunk:
            for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                used.update(ids)
            chunk.clear()

    for text in texts:
        chunk.extend([text] if isinstance(text, str) else list(text))
        if len(chunk) >= 1024:
            flush()
    flush()
    return used


def _ascii_piece_ids(tokenizer: Any) -> set[int]:
    """Ids of the printable ASCII characters as word starts and as ``##`` continuations (the
    vocabulary's continuing-subword prefix is ``##`` for every supported tokenizer)."""
    vocab = tokenizer.get_vocab()
    chars = [chr(c) for c in range(33, 127)]
    return {vocab[t] for c in chars for t in (c, "##" + c) if t in vocab}


def _remap_post_processor(proc: dict | None, new_id: dict[int, int]) -> None:
    if proc is None:
        return
    kind = proc.get("type")
    if kind == "TemplateProcessing":
        for spec in proc["special_tokens"].values():
            spec["ids"] = [new_id[i] for i in spec["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            proc[key][1] = new_id[proc[key][1]]
    elif kind == "Sequence":
        for inner in proc["processors"]:
            _remap_post_processor(inner, new_id)
    elif kind != "ByteLevel":
        raise ValueError(f"cannot remap special-token ids of a {kind} post-processor")


def _pruned_tokenizer_json(spec: dict, keep: list[int]) -> dict:
    new_id = {old: new for new, old in enumerate(keep)}
    spec = json.loads(json.dumps(spec))  # deep copy
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {
        tok: new_id[i] for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in new_id
    }
    for added in spec.get("added_tokens") or []:
        added["id"] = new_id[added["id"]]
    _remap_post_processor(spec.get("post_processor"), new_id)
    if spec.get("padding") and spec["padding"].get("pad_id") is not None:
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    return spec


def _build_tokenizer(tokenizer: Any, keep: list[int], output_dir: str | Path | None) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        spec = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(_pruned_tokenizer_json(spec, keep)), encoding="utf-8")
        new = type(tokenizer).from_pretrained(tmp)
    if len(new) != len(keep):
        raise RuntimeError(f"pruned tokenizer has {len(new)} tokens, expected {len(keep)}")
    if output_dir is not None:
        new.save_pretrained(str(output_dir))
    return new


def _slice_rows(param: nn.Parameter, keep: torch.Tensor) -> nn.Parameter:
    rows = param.data.index_select(0, keep.to(param.device)).clone()
    return nn.Parameter(rows, requires_grad=param.requires_grad)


@torch.no_grad()
def _shrink_model_(model: nn.Module, keep: list[int]) -> None:
    adapter = adapter_for(model)
    index = torch.tensor(keep, dtype=torch.long)
    new_id = {old: new for new, old in enumerate(keep)}
    parent, name = adapter.word_embedding_owner(model)
    emb = getattr(parent, name)
    table = emb.lookup if isinstance(emb, FactorizedEmbedding) else emb
    old_weight = table.weight
    new_weight = _slice_rows(old_weight, index)
    # Tied output heads share the table's Parameter object and are updated by the same swap.
    replace_parameter_(model, old_weight, new_weight)
    table.num_embeddings = len(keep)
    if table.padding_idx is not None:
        table.padding_idx = new_id[table.padding_idx]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        if head.weight is not new_weight:
            replace_parameter_(model, head.weight, _slice_rows(head.weight, index))
        if head.bias is not None:
            replace_parameter_(model, head.bias, _slice_rows(head.bias, index))
        head.out_features = len(keep)
    config = model.config
    config.vocab_size = len(keep)
    for key in list(config.to_dict()):
        value = getattr(config, key, None)
        if key.endswith("_token_id") and isinstance(value, int) and value in new_id:
            setattr(config, key, new_id[value])


def prune_vocabulary_(
    model: nn.Module,
    tokenizer: Any,
    texts: Iterable[str | tuple[str, str]],
    *,
    output_dir: str | Path | None = None,
    keep_tokens: Iterable[str] = (),
    spell_ascii: bool = False,
) -> Any:
    """Shrink ``model``'s vocabulary to the tokens ``texts`` use; return the matching tokenizer.

    Args:
        model: a supported model (dense or student; the embedding may be factorized). Its word
            embedding rows, and a masked-LM head's rows and bias (tied or not), are cut to the
            kept tokens; ``config.vocab_size`` and special-token ids follow.
        tokenizer: the model's fast WordPiece tokenizer (BERT, MiniLM, MPNet).
        texts: the corpus (strings, or pairs of strings).
        output_dir: where to write the new tokenizer (``save_pretrained``), e.g. the directory
            the model is saved to, so that ``AutoTokenizer.from_pretrained`` finds both.
        keep_tokens: extra tokens to keep although the corpus does not use them.
        spell_ascii: also keep each printable ASCII character and its ``##`` continuation
            where the vocabulary has them, so no ASCII word maps to the unknown token.

    Returns:
        The new tokenizer: for every corpus text, its ids are the old ids renumbered.

    Raises:
        ValueError: the tokenizer is not a fast WordPiece tokenizer, is larger than the
            model's vocabulary, or a ``keep_tokens`` entry is unknown. Checked before the model
            is modified.
    """
    adapter = adapter_for(model)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("vocabulary pruning needs a fast (tokenizers-backed) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "WordPiece":
        raise ValueError(
            f"vocabulary pruning supports WordPiece tokenizers, got {spec['model'].get('type')}"
        )
    parent, name = adapter.word_embedding_owner(model)
    rows = getattr(parent, name).num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model only {rows} rows")
    extra = []
    for token in keep_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise ValueError(f"keep_tokens: {token!r} is not in the vocabulary")
        extra.append(token_id)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else -1
    keep = set(corpus_token_ids(tokenizer, texts))
    if spell_ascii:
        keep |= _ascii_piece_ids(tokenizer)
    keep |= set(tokenizer.all_special_ids) | set(extra) | set(range(pad + 1))
    keep |= {a["id"] for a in spec.get("added_tokens") or []}
    ordered = sorted(keep)
    new_tokenizer = _build_tokenizer(tokenizer, ordered, output_dir)
    _shrink_model_(model, ordered)
    return new_tokenizer
