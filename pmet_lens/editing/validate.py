"""Checks run on every edit request before any weight changes (the tokenisation checks follow in
:func:`pmet_lens.editing.prepared.prepare_requests`)."""

from __future__ import annotations

from typing import Any, Sequence

from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.data import DataError, Fact, as_facts
from pmet_lens.editing.hparams import MethodHyperParams

__all__ = ["EditError", "validate_requests"]


class EditError(ValueError):
    """An edit could not be made (bad request, NaN/inf during optimisation or solve)."""


def validate_requests(model: HookedTransformer, facts: Sequence[Any], hparams: MethodHyperParams) -> list[Fact]:
    """Normalise ``facts`` and reject bad input with a clear message (without tokenising: what only
    the tokenizer can reject is checked by :func:`~pmet_lens.editing.prepared.prepare_requests`).

    Raises:
        DataError: a record is malformed, its subject is not in its prompt, its target is empty
            or whitespace or equals its true target, or two requests conflict (same subject and
            prompt, different targets).
        ValueError: a layer of ``hparams.layers`` is out of range.
    """
    if isinstance(facts, (str, bytes)) or not hasattr(facts, "__iter__"):
        raise TypeError("facts must be a list of CounterFact records or Fact objects")
    facts = as_facts(list(facts) if not isinstance(facts, dict) else facts)
    if not facts:
        raise DataError("no facts to edit: the list is empty")
    arch = architecture(model)
    for layer in hparams.layers:
        arch.check_layer(layer)
    seen: dict[tuple[str, str], str] = {}
    for fact in facts:
        where = fact.where
        if fact.target_new is None or not fact.target_new.strip():
            raise DataError(f"{where}: target_new is missing, empty or whitespace")
        if fact.target_true is not None and fact.target_new.strip() == fact.target_true.strip():
            raise DataError(f"{where}: target_new {fact.target_new!r} equals the true target; nothing to edit")
        if fact.subject not in fact.text:
            raise DataError(f"{where}: subject {fact.subject!r} does not occur in the prompt {fact.text!r}")
        key = (fact.subject, fact.prompt)
        previous = seen.get(key)
        if previous is not None and previous.strip() != fact.target_new.strip():
            raise DataError(
                f"{where}: conflicting edits in one call: {fact.text!r} -> {previous!r} and -> {fact.target_new!r}")
        seen[key] = fact.target_new
    return facts
