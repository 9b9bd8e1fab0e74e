"""The fixed tuning / reporting split of the shipped CounterFact subset.

Hyper-parameters (the SmolLM2 presets) are chosen on the ``tune`` cases only; results are
reported on the ``report`` cases only. The split is written once to
``pmet_lens/data/files/counterfact_split.json`` (seed 0: ``random.Random(0).shuffle`` of the
sorted case ids, the first 100 are ``tune``) and never regenerated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pmet_lens.data import Fact, data_path, load_counterfact

__all__ = ["CounterfactSplit", "load_split", "split_facts"]


@dataclass(frozen=True)
class CounterfactSplit:
    """Case ids of the two disjoint parts of the shipped CounterFact subset.

    Attributes:
        seed: the seed the split was drawn with.
        tune: case ids used to choose hyper-parameters.
        report: case ids used to report results (never for tuning).
    """

    seed: int
    tune: tuple[int, ...]
    report: tuple[int, ...]


def load_split() -> CounterfactSplit:
    """Read the shipped split file."""
    raw = json.loads(data_path("counterfact_split.json").read_text())
    split = CounterfactSplit(seed=int(raw["seed"]), tune=tuple(raw["tune"]), report=tuple(raw["report"]))
    if set(split.tune) & set(split.report):
        raise ValueError("counterfact_split.json is corrupt: tune and report overlap")
    return split


def split_facts(part: str, limit: int | None = None) -> list[Fact]:
    """The shipped CounterFact facts of one part ("tune" or "report"), in case-id order."""
    if part not in ("tune", "report"):
        raise ValueError(f"part must be 'tune' or 'report', got {part!r}")
    wanted = set(getattr(load_split(), part))
    facts = [f for f in load_counterfact() if f.case_id in wanted]
    return facts if limit is None else facts[:limit]
