"""Edit requests tokenised once: every stage of an edit reads this value.

For fact i and context template j (``context_templates(prefixes)``: j = 0 the bare prompt "{}",
then "pref_j. {}"), the prompt pref_j ⊕ p(s_i) (PMET eq. 9, MEMIT eq. 16) is tokenised once, with
the lookup position (the subject's last token), the target ids o*_i and the KL prompt
"{s_i} is a". The target optimisation, the keys of the weight update and their covariance-side
consumers build their token rows from it with :meth:`PreparedRequests.rows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.tokens import encode, pad, subject_last_position, target_ids
from pmet_lens.data import DataError, Fact
from pmet_lens.editing.context import context_templates

__all__ = ["KL_TEMPLATE", "PreparedRequests", "PromptRows", "prepare_requests"]

KL_TEMPLATE = "{} is a"
"""The prompt of the KL term (PMET eq. 9, MEMIT eq. 16: the subject's essence, "{s} is a")."""


@dataclass(frozen=True)
class PromptRows:
    """Right-padded token rows of prepared requests, fact-major (each fact's templates in order,
    then its KL prompt when asked for).

    Attributes:
        tokens: ``[rows, pos]`` token ids.
        lengths: ``[rows]`` real tokens per row.
        fact: ``[rows]`` fact index of each row.
        template: ``[rows]`` context template index j of each row (-1 for a KL prompt).
        lookup: ``[rows]`` lookup position (the subject's last token) of each row.
        bare: ``[facts]`` row of each fact's bare prompt (j = 0).
        kl: ``[facts]`` row of each fact's KL prompt (empty without KL rows).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    fact: torch.Tensor
    template: torch.Tensor
    lookup: torch.Tensor
    bare: torch.Tensor
    kl: torch.Tensor


@dataclass(frozen=True)
class PreparedRequests:
    """Validated facts with their token ids (row i = fact i).

    Attributes:
        facts: the facts, in order.
        prefixes: the context prefixes pref_j (without the trailing ". ").
        templates: ``context_templates(prefixes)``: ``"{}"`` first, then ``"pref_j. {}"``.
        prompt_ids: ``[fact][template]`` token ids of ``template.format(prompt).format(subject)``
            (with the model's BOS).
        lookup: ``[fact][template]`` position of the subject's last token in those ids.
        target_ids: ``[fact]`` token ids of o* (with the leading space, :func:`~pmet_lens.core.tokens.target_ids`).
        kl_ids: ``[fact]`` token ids of the KL prompt ``"{s} is a"``.
        kl_lookup: ``[fact]`` position of the subject's last token in the KL prompt.
        groups: template indices per group a key is averaged over
            (:func:`~pmet_lens.editing.context.template_groups`); empty: the bare prompt, then every
            prefixed template (:attr:`template_groups`).
    """

    facts: tuple[Fact, ...]
    prefixes: tuple[str, ...]
    templates: tuple[str, ...]
    prompt_ids: tuple[tuple[tuple[int, ...], ...], ...]
    lookup: tuple[tuple[int, ...], ...]
    target_ids: tuple[tuple[int, ...], ...]
    kl_ids: tuple[tuple[int, ...], ...]
    kl_lookup: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.facts)

    def subset(self, indices: Sequence[int]) -> "PreparedRequests":
        """The requests ``indices`` (in that order), without tokenising again."""
        pick = lambda values: tuple(values[i] for i in indices)  # noqa: E731
        return PreparedRequests(facts=pick(self.facts), prefixes=self.prefixes, templates=self.templates,
                                prompt_ids=pick(self.prompt_ids), lookup=pick(self.lookup),
                                target_ids=pick(self.target_ids), kl_ids=pick(self.kl_ids),
                                kl_lookup=pick(self.kl_lookup), groups=self.groups)

    @property
    def template_groups(self) -> tuple[tuple[int, ...], ...]:
        """Indices of the context templates per group: ``groups`` if given, else the bare prompt
        alone, then every prefixed template (the official ``[["{}"], [prefixed ...]]``); only the first
        without prefixes."""
        if self.groups:
            return self.groups
        rest = tuple(range(1, len(self.templates)))
        return ((0,), rest) if rest else ((0,),)

    def suffix_length(self, i: int) -> int:
        """Positions from the lookup on of fact ``i``'s bare prompt ⊕ o*[:-1]: what a step of the target
        optimisation recomputes for that row."""
        return len(self.prompt_ids[i][0]) - self.lookup[i][0] + len(self.target_ids[i]) - 1

    def rows(self, model: HookedTransformer, *, append_target: bool = False, kl: bool = False) -> PromptRows:
        """The rows pref_j ⊕ p(s_i) of every fact i and template j (⊕ o*_i[:-1] with ``append_target``,
        the teacher-forced rows of the NLL term), followed per fact by its KL prompt with ``kl``."""
        seqs: list[list[int]] = []
        fact_of, template_of, lookups, bare, kl_rows = [], [], [], [], []
        for i in range(len(self)):
            tail = list(self.target_ids[i][:-1]) if append_target else []
            for j, ids in enumerate(self.prompt_ids[i]):
                if j == 0:
                    bare.append(len(seqs))
                seqs.append(list(ids) + tail)
                fact_of.append(i)
                template_of.append(j)
                lookups.append(self.lookup[i][j])
            if kl:
                kl_rows.append(len(seqs))
                seqs.append(list(self.kl_ids[i]))
                fact_of.append(i)
                template_of.append(-1)
                lookups.append(self.kl_lookup[i])
        batch = pad(model, seqs)
        dev = batch.tokens.device
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=dev)  # noqa: E731
        return PromptRows(tokens=batch.tokens, lengths=batch.lengths, fact=as_long(fact_of),
                          template=as_long(template_of), lookup=as_long(lookups), bare=as_long(bare),
                          kl=as_long(kl_rows))


def prepare_requests(model: HookedTransformer, facts: Sequence[Fact], prefixes: tuple[str, ...],
                     groups: tuple[tuple[int, ...], ...] = ()) -> PreparedRequests:
    """Tokenise validated ``facts`` (:func:`~pmet_lens.editing.validate.validate_requests`) once, for
    every context template of ``prefixes``; ``groups``: the key-averaging groups of the templates
    (:func:`~pmet_lens.editing.context.template_groups`; default the bare prompt, then every prefix).

    Raises:
        DataError: a prompt or target cannot be tokenised (the subject covers no token, the target
            tokenises to nothing), naming the record.
    """
    templates = tuple(context_templates(tuple(prefixes)))
    if groups and sorted(i for g in groups for i in g) != list(range(len(templates))):
        raise ValueError(f"groups {groups!r} must split the template indices 0..{len(templates) - 1} exactly once")
    prompt_ids, lookup, targets, kl_ids, kl_lookup = [], [], [], [], []
    for fact in facts:
        try:
            if fact.target_new is None:  # an edit request needs its new object
                raise ValueError("target must be a non-empty string, got None")
            targets.append(tuple(target_ids(model, fact.target_new)))
            ids, looks = [], []
            for tmpl in templates:
                text_tmpl = tmpl.replace("{}", fact.prompt)
                looks.append(subject_last_position(model, text_tmpl, fact.subject))
                ids.append(tuple(encode(model, text_tmpl.format(fact.subject))))
            kl_lookup.append(subject_last_position(model, KL_TEMPLATE, fact.subject))
            kl_ids.append(tuple(encode(model, KL_TEMPLATE.format(fact.subject))))
        except ValueError as exc:
            raise DataError(f"{fact.where}: {exc}") from None
        prompt_ids.append(tuple(ids))
        lookup.append(tuple(looks))
    return PreparedRequests(facts=tuple(facts), prefixes=tuple(prefixes), templates=templates,
                            prompt_ids=tuple(prompt_ids), lookup=tuple(lookup), target_ids=tuple(targets),
                            kl_ids=tuple(kl_ids), kl_lookup=tuple(kl_lookup), groups=tuple(map(tuple, groups)))
