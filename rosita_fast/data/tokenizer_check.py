"""Checks that tokenizers which must agree really do (before any training starts).

Distillation compares teacher and student outputs position by position, so both must turn a text
into the same ids: same vocabulary, same special tokens, same normalisation (lower-casing, accent
stripping). A mismatch would silently train the student against garbage.
"""

from __future__ import annotations

from typing import Any

from .errors import TokenizerMismatchError

# Exercises case folding, accents, punctuation, digits, CJK splitting and sub-word splitting.
_PROBES = (
    "Hello WORLD, it's a Naïve café — 3.14 dollars!",
    "unflinchingly über-résumé Straße 東京 tokyo",
    ("A premise sentence.", "a HYPOTHESIS sentence?"),
)
_SPECIALS = ("pad_token", "cls_token", "sep_token", "unk_token", "mask_token")


def check_same_tokenizer(
    student: Any, teacher: Any, *, names: tuple[str, str] = ("student", "teacher")
) -> None:
    """Raise unless ``student`` and ``teacher`` tokenise text identically.

    Compares vocabularies, special tokens and the ids produced for probe texts.

    Raises:
        TokenizerMismatchError: naming the first difference found.
    """
    a_name, b_name = names
    vocab_a, vocab_b = student.get_vocab(), teacher.get_vocab()
    if vocab_a != vocab_b:
        only_a = sorted(set(vocab_a) - set(vocab_b))[:5]
        only_b = sorted(set(vocab_b) - set(vocab_a))[:5]
        moved = sorted(t for t in set(vocab_a) & set(vocab_b) if vocab_a[t] != vocab_b[t])[:5]
        raise TokenizerMismatchError(
            f"the {a_name} and {b_name} tokenizers have different vocabularies "
            f"({len(vocab_a)} vs {len(vocab_b)} tokens; only in {a_name}: {only_a}; "
            f"only in {b_name}: {only_b}; different ids: {moved}); distillation needs the same "
            "tokenizer for both models"
        )
    for attr in _SPECIALS:
        tok_a, tok_b = getattr(student, attr, None), getattr(teacher, attr, None)
        if str(tok_a) != str(tok_b):
            raise TokenizerMismatchError(
                f"the {a_name} and {b_name} tokenizers use different {attr}: {tok_a!r} vs {tok_b!r}"
            )
    for probe in _PROBES:
        args = probe if isinstance(probe, tuple) else (probe,)
        ids_a, ids_b = student(*args)["input_ids"], teacher(*args)["input_ids"]
        if list(ids_a) != list(ids_b):
            raise TokenizerMismatchError(
                f"the {a_name} and {b_name} tokenizers encode {probe!r} differently "
                f"({student.convert_ids_to_tokens(ids_a)} vs "
                f"{teacher.convert_ids_to_tokens(ids_b)}); check lower-casing/accent settings"
            )


def check_tokenizer_fits_model(tokenizer: Any, config: Any, *, model_name: str = "model") -> None:
    """Raise if the tokenizer can emit ids the model's embedding table does not have.

    Raises:
        TokenizerMismatchError: ``len(tokenizer) > config.vocab_size``.
    """
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise TokenizerMismatchError(
            f"the tokenizer has {len(tokenizer)} tokens but the {model_name} embeds only "
            f"{vocab_size}; it was trained with a different tokenizer"
        )
