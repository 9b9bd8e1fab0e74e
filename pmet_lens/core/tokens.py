"""Tokenisation helpers shared by every analysis and editor.

All batches are **right-padded**: with causal attention, a real token never attends to a pad
token that follows it, so every real position computes exactly what it would alone. Position
``lengths[i] - 1`` is the last real token of row ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, cast

import torch
from jaxtyping import Int
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids of several texts.

    Attributes:
        tokens: ``[batch, pos]`` token ids (pad positions hold the pad id).
        lengths: ``[batch]`` number of real tokens per row.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    lengths: Int[torch.Tensor, " batch"]

    @property
    def last(self) -> Int[torch.Tensor, " batch"]:
        """Index of each row's last real token."""
        return self.lengths - 1


def encode(model: HookedTransformer, text: str) -> list[int]:
    """Token ids of ``text`` exactly as ``model.to_tokens`` makes them (BOS per the model's default).

    The ids stay on the host (``move_to_device=False``): reading them back from an accelerator would
    make the host wait for the device once per prompt."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"cannot tokenise an empty prompt (got {text!r})")
    return model.to_tokens(text, truncate=False, move_to_device=False)[0].tolist()


def tokenizer_of(model: HookedTransformer) -> PreTrainedTokenizerBase:
    """``model.tokenizer``, or a ``ValueError`` when the model was loaded without one."""
    if model.tokenizer is None:
        raise ValueError("this operation needs the model's tokenizer (model.tokenizer is None)")
    return model.tokenizer


def decode_text(model: HookedTransformer, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """``model.tokenizer.decode(ids)`` of one sequence (a string)."""
    return cast(str, tokenizer_of(model).decode(list(ids), skip_special_tokens=skip_special_tokens))


def pad_id(model: HookedTransformer) -> int:
    """The pad token id of ``model``'s tokenizer (EOS or 0 when it has none)."""
    tok = tokenizer_of(model)
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad(model: HookedTransformer, sequences: Sequence[Sequence[int]]) -> Batch:
    """Right-pad token id lists into a :class:`Batch` on the model's device."""
    if not sequences:
        raise ValueError("nothing to tokenise: the list of prompts is empty")
    lengths = [len(s) for s in sequences]
    if min(lengths) == 0:
        raise ValueError("cannot run an empty token sequence")
    width = max(lengths)
    out = torch.full((len(sequences), width), pad_id(model), dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    device = model.cfg.device
    return Batch(tokens=out.to(device), lengths=torch.tensor(lengths, device=device))


def tokenize(model: HookedTransformer, texts: Sequence[str]) -> Batch:
    """Tokenise ``texts`` one by one (no cross-text effects) and right-pad them."""
    return pad(model, [encode(model, t) for t in texts])


def target_ids(model: HookedTransformer, target: str) -> list[int]:
    """Token ids of an answer/target continuation, with a leading space as ROME/MEMIT do.

    CounterFact stores objects without the leading space ("English"); the continuation of
    "... is" is " English". A target that already starts with a space is kept as is.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r}")
    text = target if target.startswith(" ") else " " + target
    ids = tokenizer_of(model)(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return list(ids)


def subject_range(model: HookedTransformer, text: str, subject: str) -> tuple[int, int]:
    """Token positions ``[start, end)`` covering the LAST occurrence of ``subject`` in ``text``.

    Positions index ``encode(model, text)`` (so they include a prepended BOS). Uses the
    tokenizer's character offsets, so a subject glued to punctuation is still found; the
    range covers every token that overlaps the subject's characters.

    Raises:
        ValueError: when ``subject`` does not occur in ``text``.
    """
    if not subject or not subject.strip():
        raise ValueError("subject is empty")
    char_start = text.rfind(subject)
    if char_start < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {text!r}")
    char_end = char_start + len(subject)
    enc = tokenizer_of(model)(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    hits = [i for i, (a, b) in enumerate(offsets) if a < char_end and b > char_start]
    if not hits:
        raise ValueError(f"subject {subject!r} covers no token of {text!r}")
    shift = len(encode(model, text)) - len(enc["input_ids"])  # BOS (or other prefix) tokens
    return hits[0] + shift, hits[-1] + 1 + shift


def subject_last_position(model: HookedTransformer, template: str, subject: str, prefix: str = "") -> int:
    """Position of the subject's last token in ``prefix + template.format(subject)``.

    This is the "lookup" position of ROME/MEMIT/PMET (the subject's last token).
    """
    text = prefix + template.format(subject)
    sub_char_end = len(prefix) + template.index("{}") + len(subject)
    enc = tokenizer_of(model)(text, add_special_tokens=False, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < sub_char_end and b > sub_char_end - len(subject)]
    if not hits:
        raise ValueError(f"subject {subject!r} covers no token of {text!r}")
    shift = len(encode(model, text)) - len(enc["input_ids"])
    return hits[-1] + shift
