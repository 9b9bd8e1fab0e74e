"""Averaged causal traces by ROME token class, severed-path curves (MEMIT Fig. 3) and the rule
that turns them into the critical layer range R.

ROME (Meng et al. 2022, Fig. 2 / `read_knowledge`) averages the indirect effect of each restored
state over facts the model knows, grouping prompt positions into six classes; MEMIT section 3 and
Appendix A pick R where restoring the last subject token's hidden state loses most of its effect
once that token's later MLPs are severed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, cast

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.analysis.tracing import EmbeddingStats, Kind, trace
from pmet_lens.core.models import require_model
from pmet_lens.core.readout import final_logits
from pmet_lens.core.stats import mean_ci95
from pmet_lens.core.tokens import encode, subject_range, target_ids
from pmet_lens.data import KnownFact

logger = logging.getLogger(__name__)

__all__ = ["TOKEN_CLASSES", "AverageTrace", "average_traces", "fact_traces", "token_class_rows", "knows_fact"]

TOKEN_CLASSES: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
"""ROME's token classes, in plotting order."""

SEVERED: tuple[str, ...] = ("none", "mlp", "attn")


def token_class_rows(subject: tuple[int, int], n_tokens: int) -> dict[str, list[int]]:
    """Prompt positions of each ROME token class (a class may be empty and is then skipped).

    first/last subject token: ``start`` / ``end - 1``; middle: strictly between them; first
    subsequent token: ``end`` (if the prompt continues); further tokens: ``end + 1 .. n - 2``;
    last token: ``n - 1`` (it can coincide with another class, as in ROME).
    """
    start, end = subject
    last = n_tokens - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end <= last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


@dataclass(frozen=True)
class AverageTrace:
    """Causal traces averaged over facts the model knows.

    Attributes:
        kinds: trace kinds computed ("hidden", "mlp", "attn").
        mean: kind -> ``[6, n_layers]`` mean indirect effect (score - low score) per token class.
        ci: kind -> ``[6, n_layers]`` half-width of the 95% confidence interval
            (:func:`pmet_lens.core.stats.mean_ci95`; NaN for a class with fewer than two facts).
        count: kind -> ``[6]`` number of facts contributing to each class.
        severed_mean: "none" / "mlp" / "attn" -> ``[n_layers]`` mean indirect effect of restoring
            the hidden state of the last subject token at each layer, plain or with that token's
            later MLP / attention outputs severed (MEMIT Fig. 3).
        severed_ci: same keys, 95% half-widths.
        n_facts: facts used (known by the model); n_seen: facts examined.
        fact_ids: ``known_id`` of the facts used.
        low_score, high_score: mean corrupted / clean probability of the facts used.
        samples, noise, window: tracing settings.
    """

    kinds: tuple[str, ...]
    mean: dict[str, torch.Tensor]
    ci: dict[str, torch.Tensor]
    count: dict[str, torch.Tensor]
    severed_mean: dict[str, torch.Tensor]
    severed_ci: dict[str, torch.Tensor]
    n_facts: int
    n_seen: int
    fact_ids: list[int] = field(default_factory=list)
    low_score: float = float("nan")
    high_score: float = float("nan")
    samples: int = 10
    noise: float = 3.0
    window: int = 10

    @property
    def n_layers(self) -> int:
        """Number of layers."""
        return int(next(iter(self.severed_mean.values())).shape[0])

    def class_frame(self) -> pd.DataFrame:
        """Long table: kind, token_class, layer, mean, ci, count."""
        rows = []
        for kind in self.kinds:
            for c, name in enumerate(TOKEN_CLASSES):
                for layer in range(self.mean[kind].shape[1]):
                    rows.append({"kind": kind, "token_class": name, "layer": layer,
                                 "mean": float(self.mean[kind][c, layer]), "ci": float(self.ci[kind][c, layer]),
                                 "count": int(self.count[kind][c])})
        return pd.DataFrame(rows)

    def severed_frame(self) -> pd.DataFrame:
        """Long table: severed ("none"/"mlp"/"attn"), layer, mean, ci."""
        return pd.DataFrame([
            {"severed": k, "layer": l, "mean": float(v[l]), "ci": float(self.severed_ci[k][l])}
            for k, v in self.severed_mean.items() for l in range(v.shape[0])
        ])


def knows_fact(model: HookedTransformer, fact: KnownFact) -> tuple[bool, int]:
    """Whether the model gets ``fact`` right, and its greedy next token.

    Rule: the model's greedy next token after ``fact.prompt`` equals the first token of
    ``" " + fact.attribute`` (ROME's known facts are those whose prediction starts the attribute;
    with a different tokenizer we compare token ids, so " Paris" for "Paris" counts).
    """
    require_model(model, "pmet_lens.analysis.averaged.knows_fact")
    tokens = torch.tensor([encode(model, fact.prompt)], device=model.cfg.device)
    with torch.inference_mode():  # read out the last position only (float32 for a half-precision model)
        greedy = int(final_logits(model, model(tokens, stop_at_layer=model.cfg.n_layers)[0, -1]).argmax())
    return greedy == target_ids(model, fact.attribute)[0], greedy


def _mean_ci(stack: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 95% half-width (:func:`pmet_lens.core.stats.mean_ci95`) over the facts, float32."""
    mean, half = mean_ci95(torch.stack(stack))
    return torch.from_numpy(mean).float(), torch.from_numpy(half).float()


def fact_traces(
    model: HookedTransformer,
    fact: KnownFact,
    index: int,
    *,
    need: Sequence[str],
    severed: bool,
    samples: int,
    noise: float,
    window: int,
    seed: int,
    stats: EmbeddingStats | None = None,
) -> dict[str, Any] | None:
    """One fact's share of :func:`average_traces`: ``None`` when the model does not know it, else its
    per-token-class effects of each kind in ``need`` (``"classes"``), the last subject token's plain and
    severed rows (``"severed"``), its corrupted / clean scores and its ``known_id``. The fact at input
    position ``index`` uses noise seed ``seed + index``; ``stats`` caches sigma of W_E across facts
    (:class:`~pmet_lens.analysis.tracing.EmbeddingStats`)."""
    require_model(model, "pmet_lens.analysis.averaged.fact_traces")
    ok, _ = knows_fact(model, fact)
    if not ok:
        return None
    subj = subject_range(model, fact.prompt, fact.subject)
    n_tok = len(encode(model, fact.prompt))
    rows_of = token_class_rows(subj, n_tok)
    positions = list(range(subj[0], n_tok))
    out: dict[str, Any] = {"classes": {}, "severed": {}, "low": float("nan"), "high": float("nan"), "id": fact.known_id}
    for kind in need:
        r = trace(model, fact.prompt, fact.subject, kind=cast(Kind, kind), window=window, samples=samples,
                  noise=noise, seed=seed + index, positions=positions, stats=stats)
        effect = r.effect
        out["low"], out["high"] = r.low_score, r.high_score
        out["classes"][kind] = {c: effect[rows].mean(0) for c, rows in rows_of.items() if rows}
        if kind == "hidden":
            out["severed"]["none"] = effect[subj[1] - 1]
    if severed:
        for what in ("mlp", "attn"):
            r = trace(model, fact.prompt, fact.subject, kind="hidden", samples=samples, noise=noise,
                      seed=seed + index, sever=what, positions=[subj[1] - 1], stats=stats)
            out["severed"][what] = r.effect[subj[1] - 1]
    return out


def _facts_traces(model: HookedTransformer, facts: Sequence[KnownFact], first: int,
                  **settings: Any) -> list[dict[str, Any] | None]:
    """One shard of :func:`average_traces`: :func:`fact_traces` of consecutive facts from input position ``first``."""
    stats = EmbeddingStats()  # sigma of W_E once per shard
    return [fact_traces(model, f, first + j, stats=stats, **settings) for j, f in enumerate(facts)]


def average_traces(
    model: HookedTransformer,
    facts: Sequence[KnownFact],
    *,
    kinds: Sequence[str] = ("hidden", "mlp", "attn"),
    severed: bool = True,
    samples: int = 10,
    noise: float = 3.0,
    window: int = 10,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    workers: Any = None,
    shard_size: int = 1,
    checkpoint: Any = None,
) -> AverageTrace:
    """Average causal traces over the facts the model knows (ROME Fig. 2; MEMIT Fig. 3 and 8).

    Facts the model gets wrong (see :func:`knows_fact`) are skipped. For each kept fact, traces
    of every ``kind`` are computed at the positions from the first subject token on (positions
    before the subject belong to no class), the indirect effect (score - low score) is grouped by
    :data:`TOKEN_CLASSES` (mean over the positions of a class), and with ``severed`` the last
    subject token is traced again with its later MLP / attention outputs severed. Fact ``i``
    (in input order) uses noise seed ``seed + i``.

    Args:
        model: the hooked model.
        facts: ROME known facts.
        kinds: trace kinds for the token-class heat maps ("hidden" is always traced when
            ``severed`` is set, since the plain curve is its last-subject-token row).
        severed: also compute the MEMIT Fig. 3 curves.
        samples: see :func:`pmet_lens.analysis.tracing.trace`.
        noise: see :func:`pmet_lens.analysis.tracing.trace`.
        window: see :func:`pmet_lens.analysis.tracing.trace`.
        limit: stop after this many known facts.
        progress: show a tqdm progress bar.
        workers: ``None`` (this process), an int (a local pool of that many workers) or a
            :class:`~pmet_lens.parallel.Workers` pool: facts are traced in shards of ``shard_size``
            (:func:`fact_traces` per fact, the same function as in one process) and averaged in input
            order, so the result equals the single process's; with ``limit``, no new shard starts once
            the finished ones hold ``limit`` known facts.
        shard_size: facts per shard (on a pool, or with ``checkpoint``).
        checkpoint: a :class:`~pmet_lens.parallel.ShardLog` recording each finished shard, so that a
            killed run resumes with the unfinished ones (``ShardLog(dir, resume=True)``).
    """
    require_model(model, "pmet_lens.average_traces")

    need = list(dict.fromkeys(list(kinds) + (["hidden"] if severed else [])))
    settings: dict[str, Any] = {"need": need, "severed": severed, "samples": samples, "noise": noise, "window": window,
                                "seed": seed}
    per_kind: dict[str, dict[str, list[torch.Tensor]]] = {k: {c: [] for c in TOKEN_CLASSES} for k in need}
    sev: dict[str, list[torch.Tensor]] = {k: [] for k in SEVERED}
    used: list[int] = []
    lows, highs = [], []
    seen = 0
    bar = tqdm(total=limit if limit is not None else len(facts), disable=not progress, desc="causal traces")
    outcomes: Iterable[dict[str, Any] | None]
    if workers is None and checkpoint is None:
        stats = EmbeddingStats()  # sigma of W_E once for every trace below
        outcomes = (fact_traces(model, fact, i, stats=stats, **settings) for i, fact in enumerate(facts))
    else:
        from pmet_lens.parallel import run_shards, shard_ranges

        def enough(parts: list[list[dict[str, Any] | None]]) -> bool:
            return limit is not None and sum(o is not None for part in parts for o in part) >= limit

        parts = run_shards(model, _facts_traces, [(list(facts[a:b]), a) for a, b in shard_ranges(len(facts), shard_size)],
                           common=settings, workers=workers, checkpoint=checkpoint, until=enough,
                           desc="causal traces (shards)", progress=progress)
        outcomes = [o for part in parts for o in part]
    for outcome in outcomes:
        if limit is not None and len(used) >= limit:
            break
        seen += 1
        if outcome is None:
            if limit is None:
                bar.update(1)
            continue
        for kind in need:
            for c, value in outcome["classes"][kind].items():
                per_kind[kind][c].append(value)
        for what, row in outcome["severed"].items():
            sev[what].append(row)
        used.append(outcome["id"])
        lows.append(outcome["low"])
        highs.append(outcome["high"])
        bar.update(1)
        bar.set_postfix(known=len(used), seen=seen)
    bar.close()
    if not used:
        raise ValueError(f"the model knows none of the {seen} facts examined: nothing to average")
    n_layers = model.cfg.n_layers
    nan = torch.full((n_layers,), float("nan"))
    mean, ci, count = {}, {}, {}
    for kind in kinds:
        ms, cs = [], []
        for c in TOKEN_CLASSES:
            m, h = _mean_ci(per_kind[kind][c]) if per_kind[kind][c] else (nan, nan)
            ms.append(m)
            cs.append(h)
        mean[kind], ci[kind] = torch.stack(ms), torch.stack(cs)
        count[kind] = torch.tensor([len(per_kind[kind][c]) for c in TOKEN_CLASSES])
    sev_mean, sev_ci = {}, {}
    for k in (SEVERED if severed else ()):
        sev_mean[k], sev_ci[k] = _mean_ci(sev[k])
    logger.info("averaged traces over %d known facts (of %d seen)", len(used), seen)
    return AverageTrace(
        kinds=tuple(kinds), mean=mean, ci=ci, count=count, severed_mean=sev_mean, severed_ci=sev_ci,
        n_facts=len(used), n_seen=seen, fact_ids=used, low_score=sum(lows) / len(lows),
        high_score=sum(highs) / len(highs), samples=samples, noise=noise, window=window,
    )
