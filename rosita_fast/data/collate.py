"""Dynamic padding: each batch is padded to its own longest sequence, not to a fixed length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class DynamicPaddingCollator:
    """Collate items of :class:`~rosita_fast.data.features.EncodedDataset` into model inputs.

    Produces ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them)
    and ``labels`` (when every item is labelled; long for classes, float for regression), all
    right-padded to the longest item of the batch.

    Args:
        pad_token_id: the tokenizer's padding id.
        pad_to_multiple_of: round the padded length up (e.g. 8 for tensor cores); ``None`` = exact.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be a positive integer or None")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(
        cls, tokenizer: Any, pad_to_multiple_of: int | None = None
    ) -> DynamicPaddingCollator:
        """Build a collator using ``tokenizer.pad_token_id``.

        Raises:
            ValueError: the tokenizer has no padding token.
        """
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one before batching")
        return cls(tokenizer.pad_token_id, pad_to_multiple_of)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(item["input_ids"]) for item in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(items)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        with_types = "token_type_ids" in items[0]
        types = torch.zeros((batch, width), dtype=torch.long) if with_types else None
        for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
            input_ids[row, :n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            attention[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.as_tensor(item["token_type_ids"], dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention}
        if types is not None:
            out["token_type_ids"] = types
        labels = [item.get("label") for item in items]
        present = [label is not None for label in labels]
        if all(present):
            is_float = any(isinstance(label, float) for label in labels)
            out["labels"] = torch.tensor(labels, dtype=torch.float32 if is_float else torch.long)
        elif any(present):
            raise ValueError("a batch mixes labelled and unlabelled items")
        return out
