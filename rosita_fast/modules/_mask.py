"""Key padding masks from the attention masks Hugging Face models hand to their layers.

HF builds a 4-D mask per forward (``create_bidirectional_mask``): ``None`` when nothing is padded,
a bool ``[B, 1, Lq, Lk]`` (True = attend) for SDPA, or an additive float ``[B, 1, Lq, Lk]`` (0 or
the dtype's minimum) for eager attention. The fused attention op takes the ``[B, Lk]`` key padding
mask those encode. Every layer of one forward receives the same mask object, so the conversion
(and its check that the mask really is a padding mask) runs once per forward.
"""

from __future__ import annotations

import torch

__all__ = ["forget_masks", "key_padding_mask"]

# (mask object, its version, converted mask). Holding the object keeps its id from being reused.
_last: tuple[torch.Tensor, int, torch.Tensor | None] | None = None


def _convert(mask: torch.Tensor, check: bool = True) -> torch.Tensor | None:
    # check=False (under torch.compile): no data-dependent branches, so no graph breaks; the mask
    # is then trusted to be a padding mask and an all-True mask is passed on as is.
    if mask.dim() == 2:
        keep = mask if mask.dtype == torch.bool else mask != 0
        return keep if not check or not bool(keep.all()) else None
    if mask.dim() != 4:
        raise ValueError(
            f"fast attention: expected a [B, Lk] padding mask or HF's [B, 1, Lq, Lk] mask, got "
            f"shape {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        keep4 = mask
    else:
        # Additive float mask: 0 where attended, a very large negative number where masked.
        keep4 = mask > torch.finfo(mask.dtype).min / 2
        if check and not bool(((mask == 0) | ~keep4).all()):
            raise ValueError(
                "fast attention supports padding masks only; this additive mask has values other "
                "than 0 and the dtype's minimum"
            )
    keep = keep4[:, 0, 0, :]
    if not check:
        return keep
    # A padding mask is the same for every head and query row; anything else (a causal or
    # per-query mask) is not what the fused op computes, so refuse it rather than be wrong.
    if not bool((keep4 == keep[:, None, None, :]).all()):
        raise ValueError(
            "fast attention supports key padding masks only (the same keys masked for every query "
            "row); this mask differs between rows"
        )
    return None if bool(keep.all()) else keep


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The bool ``[B, Lk]`` key padding mask (True = attend) encoded by ``mask``, or ``None``.

    Accepts a ``[B, Lk]`` mask (nonzero = attend) or HF's 4-D bool/additive masks. Raises
    ``ValueError`` for masks that are not padding masks (causal, per-query). ``None`` is returned
    when no key is masked (the op then skips masking).
    """
    global _last
    if mask is None:
        return None
    if torch.compiler.is_compiling():
        return _convert(mask, check=False)
    # Inference tensors keep no version counter: those are matched by identity alone, and the
    # cache is also dropped at the start of every forward of a model whose embeddings are fused
    # (forget_masks), so a mask object reused across calls is always converted afresh.
    version = None if mask.is_inference() else mask._version
    last = _last
    if last is not None and last[0] is mask and last[1] == version:
        return last[2]
    converted = _convert(mask)
    _last = (mask, version, converted)
    return converted


def forget_masks() -> None:
    """Drop the cached conversion (called at the start of a model's forward)."""
    global _last
    _last = None
