"""Reference texts about the new object o* for the Consistency / Reference-Score metric.

ROME/MEMIT's Consistency (RS) compares the text an edited model generates about the subject with
**Wikipedia snippets about other subjects that have o* as the object of the same relation**
(``attribute_snippets.json[relation_id][target_new.id]``), in the TF-IDF space of ROME's
``idf.npy`` / ``tfidf_vocab.json``. Those files (926 MB, 11 MB, 32 MB) are not available offline.

* :class:`RomeReference` uses them when a user has them: the paper's metric, reported as
  ``consistency``.
* :class:`ProxyReference` is this package's documented **proxy**, always reported as
  ``consistency_proxy`` (never under the paper's name):

  - reference text for a record = its CounterFact ``attribute_prompts`` (prompts about *other*
    subjects whose true object for the same relation is o*, the closest offline analogue of ROME's
    snippets) each completed with " o*", followed by up to ``max_paragraphs`` (10) paragraphs of the
    shipped WikiText-2 (validation + test) that contain o* as a whole word, in file order;
  - TF-IDF fitted on those WikiText-2 paragraphs (scikit-learn default smoothing); words outside
    that vocabulary keep the idf of an unseen term, so rare object names still count;
  - value = cosine of the TF-IDF vectors of the record's generated texts (joined, as ROME joins
    them) and that reference text.

  Numbers are therefore not comparable with the papers' Consistency column (GPT-J ~29-41): the
  corpus, the IDF table and the reference texts all differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from pmet_lens.data import Fact, data_path, wikitext_path
from pmet_lens.evaluation.textmetrics import Tfidf, wikitext_paragraphs

__all__ = ["ConsistencyReference", "ProxyReference", "RomeReference"]


class ConsistencyReference(Protocol):
    """What evaluation needs to score consistency: the output name, a TF-IDF model and references."""

    name: str
    tfidf: Tfidf

    def reference_text(self, fact: Fact) -> str:
        """The reference text about ``fact.target_new``."""
        ...


@dataclass
class ProxyReference:
    """The offline proxy (see the module docstring); reported as ``consistency_proxy``."""

    tfidf: Tfidf
    paragraphs: Sequence[str]
    max_paragraphs: int = 10
    name: str = "consistency_proxy"
    _cache: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_wikitext(cls, paths: Sequence[str | Path] | None = None, max_paragraphs: int = 10) -> "ProxyReference":
        """Build the proxy on WikiText raw files (default: the two shipped WikiText-2 splits)."""
        paragraphs = wikitext_paragraphs(list(paths) if paths is not None else wikitext_path())
        return cls(tfidf=Tfidf.fit(paragraphs), paragraphs=paragraphs, max_paragraphs=max_paragraphs)

    def paragraphs_about(self, obj: str) -> list[str]:
        """Up to ``max_paragraphs`` corpus paragraphs containing ``obj`` as a whole word."""
        if obj not in self._cache:
            pattern = re.compile(r"(?<!\w)" + re.escape(obj) + r"(?!\w)")
            hits = []
            for para in self.paragraphs:
                if obj in para and pattern.search(para):
                    hits.append(para)
                    if len(hits) >= self.max_paragraphs:
                        break
            self._cache[obj] = hits
        return self._cache[obj]

    def reference_text(self, fact: Fact) -> str:
        """``attribute_prompt + " " + o*`` for each attribute prompt, then paragraphs about o*."""
        if fact.target_new is None:
            raise ValueError(f"{fact.where}: consistency needs target_new")
        obj = fact.target_new.strip()
        parts = [f"{p} {obj}" for p in fact.attribute_prompts] or [obj]
        return " ".join(parts + self.paragraphs_about(obj))


@dataclass
class RomeReference:
    """ROME's attribute snippets and TF-IDF tables: the papers' Consistency, reported as ``consistency``.

    ``attribute_snippets.json`` is keyed by relation id and the new object's Wikidata id, which
    :class:`pmet_lens.data.Fact` does not keep; they are read by ``case_id`` from the CounterFact file
    (default: the shipped subset).
    """

    tfidf: Tfidf
    snippets: Mapping[str, Mapping[str, Any]]
    target_ids: Mapping[Any, tuple[str, str]]
    name: str = "consistency"

    @classmethod
    def from_paths(
        cls,
        snippets_path: str | Path,
        idf_path: str | Path,
        vocab_path: str | Path,
        counterfact_path: str | Path | None = None,
    ) -> "RomeReference":
        """Load ROME's ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json``."""
        if not Path(snippets_path).is_file():
            raise FileNotFoundError(f"attribute snippets file not found: {snippets_path}")
        snippets = json.loads(Path(snippets_path).read_text())
        if isinstance(snippets, list):  # ROME's raw format: list of {relation_id, target_id, samples}
            table: dict[str, dict[str, Any]] = {}
            for item in snippets:
                table.setdefault(item["relation_id"], {})[item["target_id"]] = item["samples"]
            snippets = table
        records = json.loads(Path(counterfact_path or data_path("counterfact_subset.json")).read_text())
        ids = {
            r["case_id"]: (r["requested_rewrite"]["relation_id"], r["requested_rewrite"]["target_new"]["id"])
            for r in records
        }
        return cls(tfidf=Tfidf.from_rome(idf_path, vocab_path), snippets=snippets, target_ids=ids)

    def reference_text(self, fact: Fact) -> str:
        """The joined snippet texts for (relation, o*), as ROME's ``consistency_texts``."""
        if fact.case_id not in self.target_ids:
            raise KeyError(f"{fact.where}: case_id not in the CounterFact file, cannot find o*'s Wikidata id")
        rel, target = self.target_ids[fact.case_id]
        samples = self.snippets.get(rel, {}).get(target, [])
        return " ".join(s["text"] if isinstance(s, Mapping) else str(s) for s in samples)
