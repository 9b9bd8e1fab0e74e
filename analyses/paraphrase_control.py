"""Does a paraphrase express the subject's fact at all? A control on the unedited model.

An edit can only be expected to carry o* to a paraphrase if the model, on that paraphrase, answers
from what it knows about the subject. This script tests that for one CounterFact case (default:
case 0, Danielle Darrieux's mother tongue, o^c French -> o* English) without editing anything.

Every prompt of the case (the edit prompt and each paraphrase) becomes a template by putting ``{}``
where the case's subject is. Into each template go *other* subjects whose true object for the same
relation is known from the shipped data:

* the subjects of every CounterFact record of that relation (true object: the record's o^c), of its
  neighbourhood prompts (same object as the record's subject) and of its attribute prompts (object:
  the record's o*), the latter two parsed with the relation's templates that the records use;
* ROME's known facts of that relation (object: the known attribute).

For the group whose true object is the case's o* and the group whose true object is its o^c, the
unedited margin log P(o*) - log P(o^c) (mean token log-probabilities, as the CounterFact metrics)
is printed per template: how often o* is ahead, the mean margin, and the gap between the groups'
means (how much the template's answer depends on who the subject is). A template on which even
subjects whose true object is o* do not get o* ahead is one where the model does not state this
fact, for anybody; an edit that makes the case's subject like them would not flip it either.

    python analyses/paraphrase_control.py > figures/paraphrase_control.txt

Nothing here edits the model or feeds a preset; it reads prompts of both splits.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from statistics import mean
from typing import Iterable, Sequence

from pmet_lens import load_model
from pmet_lens.data import Fact, KnownFact, load_counterfact, load_known_facts
from pmet_lens.evaluation.scoring import score_continuations


def parse_subject(prompt: str, templates: Iterable[str]) -> str | None:
    """The subject of ``prompt`` if it is one of ``templates`` (each with one ``{}``) filled in."""
    for template in templates:
        head, tail = template.split("{}")
        match = re.fullmatch(re.escape(head) + r"(.+?)" + re.escape(tail), prompt)
        if match:
            return match.group(1)
    return None


def subjects_by_object(relation: str, records: Sequence[Fact], known: Sequence[KnownFact] = ()) -> dict[str, set[str]]:
    """True object -> subjects, for one relation, from CounterFact records and known facts.

    A record contributes its subject and its neighbourhood prompts' subjects (object: its o^c) and its
    attribute prompts' subjects (object: its o*); prompts that match none of the relation's
    templates (those of the relation's records) are skipped. A subject listed under two objects is
    dropped from both.
    """
    same = [r for r in records if r.relation_id == relation]
    templates = sorted({r.prompt for r in same}, key=len, reverse=True)
    found: dict[str, set[str]] = defaultdict(set)
    for record in same:
        if record.target_true:
            found[record.target_true].add(record.subject)
            found[record.target_true].update(s for p in record.neighborhood_prompts if (s := parse_subject(p, templates)))
        if record.target_new:
            found[record.target_new].update(s for p in record.attribute_prompts if (s := parse_subject(p, templates)))
    for fact in known:
        if fact.relation_id == relation:
            found[fact.attribute].add(fact.subject)
    seen = Counter(s for subjects in found.values() for s in subjects)
    return {obj: {s for s in subjects if seen[s] == 1} for obj, subjects in found.items()}


def case_templates(fact: Fact) -> list[tuple[str, str]]:
    """(kind, template) for the case's edit prompt and each paraphrase that names its subject once."""
    out = [("edit", fact.prompt)]
    for p in fact.paraphrase_prompts:
        if p.count(fact.subject) == 1:
            out.append(("paraphrase", p.replace(fact.subject, "{}")))
    return out


def margins(model, template: str, subjects: Sequence[str], new: str, true: str) -> list[float]:
    """log P(new) - log P(true) after ``template`` filled with each subject (unedited model)."""
    prompts = [template.format(s) for s in subjects for _ in (0, 1)]
    lp = score_continuations(model, prompts, [new, true] * len(subjects)).mean_logprob.view(-1, 2)
    return (lp[:, 0] - lp[:, 1]).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=int, default=0, help="CounterFact case_id")
    args = parser.parse_args()
    records = load_counterfact()
    by_id = {r.case_id: r for r in records}
    if args.case not in by_id:
        raise SystemExit(f"no CounterFact case {args.case} in the shipped data (case ids {min(by_id)}-{max(by_id)})")
    fact = by_id[args.case]
    groups = subjects_by_object(fact.relation_id, records, load_known_facts())
    new_group = sorted(groups.get(fact.target_new, set()) - {fact.subject})
    true_group = sorted(groups.get(fact.target_true, set()) - {fact.subject})
    if not new_group or not true_group:
        raise SystemExit(f"case {args.case}: the shipped data name no other subjects whose {fact.relation_id} is "
                         f"{fact.target_new!r} ({len(new_group)}) or {fact.target_true!r} ({len(true_group)})")
    model = load_model()
    print(f"{model.cfg.model_name}, unedited; CounterFact case {fact.case_id} ({fact.relation_id}): "
          f"{fact.subject!r}, o^c {fact.target_true!r} -> o* {fact.target_new!r}")
    print(f"control subjects from the shipped data: {len(new_group)} whose true object is {fact.target_new!r}, "
          f"{len(true_group)} whose true object is {fact.target_true!r}")
    print(f"  {fact.target_new}: {', '.join(new_group)}")
    print(f"  {fact.target_true}: {', '.join(true_group)}")
    print(f"\nmargin = log P({fact.target_new}) - log P({fact.target_true}); 'ahead' = share of subjects with margin > 0")
    edit_right: list[bool] = []
    for kind, template in case_templates(fact):
        own, *m_all = margins(model, template, [fact.subject, *new_group, *true_group], fact.target_new, fact.target_true)
        m_new, m_true = m_all[:len(new_group)], m_all[len(new_group):]
        if kind == "edit":
            edit_right = [m > 0 for m in m_new]
        print(f"\n[{kind}] {template!r}")
        print(f"  {fact.subject}: margin {own:6.2f}")
        print(f"  true {fact.target_new:>8} (n = {len(m_new):2d}): {fact.target_new} ahead {mean(m > 0 for m in m_new):6.1%}, "
              f"mean margin {mean(m_new):6.2f}")
        print(f"  true {fact.target_true:>8} (n = {len(m_true):2d}): {fact.target_new} ahead {mean(m > 0 for m in m_true):6.1%}, "
              f"mean margin {mean(m_true):6.2f}")
        print(f"  gap between the groups' mean margins: {mean(m_new) - mean(m_true):5.2f}")
        if kind != "edit" and any(edit_right):
            kept = [m > 0 for m, right in zip(m_new, edit_right) if right]
            print(f"  of the {len(kept)} true-{fact.target_new} subjects with {fact.target_new} ahead on the edit prompt, "
                  f"{sum(kept)} keep it ahead here")


if __name__ == "__main__":
    main()
