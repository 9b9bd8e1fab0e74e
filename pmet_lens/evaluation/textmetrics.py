"""Text metrics of generated text: n-gram entropy (Fluency / GE) and TF-IDF cosine (Consistency / RS).

* **Fluency** (MEMIT Appendix C eq. 27, ROME ``compute_n_gram_entropy``): for one text,
  ``mean(2/3 · H2, 4/3 · H3)`` with ``Hn = -Σ f log2 f`` over the text's n-gram frequency
  distribution; averaged over texts. ROME tokenises words with NLTK's ``word_tokenize``; NLTK is not
  a dependency here, so :func:`word_tokenize` is a regex that splits words and punctuation the same
  way in ordinary prose (it does not split clitics such as "n't"), so values are close to, not
  bit-equal with, ROME's.
* **Consistency** (ROME/MEMIT "Reference Score"): cosine similarity of the TF-IDF vectors of the
  generated text and a reference text about the new object o*. :class:`Tfidf` reproduces
  scikit-learn's ``TfidfVectorizer`` defaults used by ROME (lower-case, tokens ``\\b\\w\\w+\\b``,
  ``tf · idf``, l2-normalised) and loads ROME's ``idf.npy`` + ``tfidf_vocab.json`` when a user has
  them, or is fitted on a local corpus (the shipped WikiText-2) for the proxy.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["Tfidf", "fluency", "ngram_entropy", "word_tokenize", "wikitext_paragraphs"]

_WORD = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")
_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation marks of ``text`` (a dependency-free stand-in for NLTK's tokenizer)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy`` of one text: ``mean_n(weight_n · H_n)``, H in bits.

    A text with fewer than ``n`` words has an empty n-gram distribution, whose entropy is 0.
    """
    words = word_tokenize(text)
    terms = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum((c / total) * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return float(np.mean(terms))


def fluency(texts: Iterable[str]) -> float:
    """Generation entropy (Fluency) of several texts: the mean of :func:`ngram_entropy`."""
    values = [ngram_entropy(t) for t in texts]
    if not values:
        raise ValueError("fluency needs at least one text")
    return float(np.mean(values))


@dataclass(frozen=True)
class Tfidf:
    """A fitted TF-IDF model with scikit-learn ``TfidfVectorizer`` semantics.

    Attributes:
        vocab: term -> column (only used to look up ``idf``).
        idf: ``[len(vocab)]`` inverse document frequencies.
        oov_idf: idf given to terms outside ``vocab``; ``None`` drops them (what ROME's fixed
            vocabulary does). The WikiText proxy uses the idf of a term seen in no document,
            ``ln((1 + N) / 1) + 1``, so that rare object names still count.
    """

    vocab: Mapping[str, int]
    idf: np.ndarray
    oov_idf: float | None = None

    @classmethod
    def fit(cls, documents: Sequence[str], keep_oov: bool = True) -> "Tfidf":
        """Fit smoothed idf ``ln((1 + N) / (1 + df)) + 1`` (scikit-learn's default) on ``documents``."""
        if not documents:
            raise ValueError("cannot fit TF-IDF on zero documents")
        df: Counter[str] = Counter()
        for doc in documents:
            df.update(set(_TFIDF_TOKEN.findall(doc.lower())))
        vocab = {t: i for i, t in enumerate(sorted(df))}
        n = len(documents)
        idf = np.array([math.log((1 + n) / (1 + df[t])) + 1 for t in vocab], dtype=np.float64)
        return cls(vocab=vocab, idf=idf, oov_idf=math.log(1 + n) + 1 if keep_oov else None)

    @classmethod
    def from_rome(cls, idf_path: str | Path, vocab_path: str | Path) -> "Tfidf":
        """Load ROME's ``idf.npy`` and ``tfidf_vocab.json`` (``counterfact/tfidf/`` of ROME's data)."""
        for p in (idf_path, vocab_path):
            if not Path(p).is_file():
                raise FileNotFoundError(f"TF-IDF file not found: {p}")
        idf = np.load(idf_path)
        vocab = json.loads(Path(vocab_path).read_text())
        if len(vocab) != len(idf):
            raise ValueError(f"idf has {len(idf)} entries but the vocabulary {len(vocab)}")
        return cls(vocab=vocab, idf=np.asarray(idf, dtype=np.float64), oov_idf=None)

    def vector(self, text: str) -> dict[str, float]:
        """Sparse l2-normalised ``tf · idf`` vector of ``text`` (term -> weight)."""
        counts = Counter(_TFIDF_TOKEN.findall(text.lower()))
        vec: dict[str, float] = {}
        for term, c in counts.items():
            col = self.vocab.get(term)
            if col is not None:
                vec[term] = c * float(self.idf[col])
            elif self.oov_idf is not None:
                vec[term] = c * self.oov_idf
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm > 0 else {}

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine similarity of the two texts' TF-IDF vectors (ROME ``tfidf_similarity``); 0 if either is empty."""
        a, b = self.vector(text_a), self.vector(text_b)
        if len(a) > len(b):
            a, b = b, a
        return float(sum(v * b.get(t, 0.0) for t, v in a.items()))


def wikitext_paragraphs(paths: Sequence[str | Path]) -> list[str]:
    """Non-empty, non-heading lines of WikiText raw files (one paragraph each)."""
    out = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("="):
                out.append(line)
    return out
