"""The critical layer range R by a fast path: only what the rule of :func:`critical_layers` reads.

The rule (MEMIT section 3, Appendix A, Fig. 3) needs two curves per fact: the indirect effect of
restoring the LAST SUBJECT TOKEN's hidden state h^l at every layer l, plain and with that token's
later MLP outputs severed. :func:`last_subject_curves` traces exactly these two rows (two calls of
:func:`pmet_lens.analysis.tracing.trace` restricted to one position), instead of the five full
traces of :func:`pmet_lens.analysis.averaged.average_traces` (hidden / MLP / attention windows at
every position from the subject on, and two severed rows). With the same seed, its rows are the
``severed_mean["none"]`` / ``["mlp"]`` rows of one fact in ``average_traces`` exactly.

:func:`scan_layers` averages them over facts the model knows, applies the rule, and measures how
sure the choice is: facts are resampled with replacement (bootstrap) and the rule is applied to
each resample; the share of resamples each candidate run wins is the confidence band on R.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.analysis.averaged import knows_fact
from pmet_lens.analysis.layers import critical_layers
from pmet_lens.analysis.tracing import EmbeddingStats, trace
from pmet_lens.core.models import require_model
from pmet_lens.core.stats import mean_ci95
from pmet_lens.core.tokens import subject_range
from pmet_lens.data import KnownFact

logger = logging.getLogger(__name__)

__all__ = ["LayerScan", "fact_curves", "last_subject_curves", "scan_layers"]


def last_subject_curves(
    model: HookedTransformer,
    prompt: str,
    subject: str,
    *,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    stats: EmbeddingStats | None = None,
) -> tuple[Float[torch.Tensor, " n_layers"], Float[torch.Tensor, " n_layers"]]:
    """Indirect effects (score - corrupted score) of restoring the last subject token's hidden state
    at each layer: plain, and with that token's later MLP outputs severed (MEMIT Fig. 3).

    The answer scored is the model's greedy next token (as in :func:`~pmet_lens.analysis.averaged.average_traces` for known
    facts, whose greedy token is the answer's first token). ``stats``: a cache of the noise scale
    shared by many calls (:class:`~pmet_lens.analysis.tracing.EmbeddingStats`).
    """
    require_model(model, "pmet_lens.analysis.layer_scan.last_subject_curves")
    last = subject_range(model, prompt, subject)[1] - 1
    plain = trace(model, prompt, subject, kind="hidden", samples=samples, noise=noise, seed=seed, positions=[last],
                  stats=stats)
    severed = trace(model, prompt, subject, kind="hidden", samples=samples, noise=noise, seed=seed,
                    sever="mlp", positions=[last], stats=stats)
    return plain.effect[last], severed.effect[last]


def fact_curves(model: HookedTransformer, fact: KnownFact, index: int, *, known_only: bool, samples: int,
                noise: float, seed: int, stats: EmbeddingStats | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One fact's share of :func:`scan_layers`: its :func:`last_subject_curves` (on the CPU) with noise
    seed ``seed + index``, or ``None`` when ``known_only`` and the model does not know it. ``stats``
    caches sigma of W_E across facts."""
    require_model(model, "pmet_lens.analysis.layer_scan.fact_curves")
    if known_only and not knows_fact(model, fact)[0]:
        return None
    p, s = last_subject_curves(model, fact.prompt, fact.subject, samples=samples, noise=noise, seed=seed + index,
                               stats=stats)
    return p.cpu(), s.cpu()


def _facts_curves(model: HookedTransformer, facts: Sequence[KnownFact], first: int,
                  **settings: Any) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """One shard of :func:`scan_layers`: :func:`fact_curves` of consecutive facts from input position ``first``."""
    stats = EmbeddingStats()  # sigma of W_E once per shard
    return [fact_curves(model, f, first + j, stats=stats, **settings) for j, f in enumerate(facts)]


@dataclass(frozen=True)
class LayerScan:
    """Per-fact last-subject-token curves, R by the rule, and its bootstrap band.

    Attributes:
        plain: ``[n_facts, n_layers]`` indirect effect of restoring h^l of the last subject token.
        severed: same with that token's later MLP outputs severed.
        fact_ids: ``known_id`` of the facts used; n_seen: facts examined to find them.
        known_only: whether only facts the model answers right were used.
        size: number of layers in R.
        layers: R (ascending) on all facts; last: L = max(R).
        wins: ``start`` of a run of ``size`` layers -> share of bootstrap resamples it wins.
        n_boot: bootstrap resamples; samples, noise: tracing settings.
    """

    plain: torch.Tensor
    severed: torch.Tensor
    fact_ids: list[int]
    n_seen: int
    known_only: bool
    size: int
    layers: list[int]
    last: int
    wins: dict[int, float] = field(default_factory=dict)
    n_boot: int = 0
    samples: int = 10
    noise: float = 3.0

    @property
    def n_facts(self) -> int:
        """Facts used."""
        return int(self.plain.shape[0])

    @property
    def gap(self) -> torch.Tensor:
        """``[n_layers]`` mean plain - severed effect, the quantity the rule sums over a run."""
        return (self.plain - self.severed).double().mean(0)

    @property
    def confidence(self) -> float:
        """Share of bootstrap resamples in which R itself wins."""
        return self.wins.get(self.layers[0], 0.0)

    def band(self, level: float = 0.95) -> list[list[int]]:
        """The most frequent winning runs whose shares add up to at least ``level`` (most frequent first)."""
        out, total = [], 0.0
        for start, share in sorted(self.wins.items(), key=lambda kv: (-kv[1], kv[0])):
            if total >= level:
                break
            out.append(list(range(start, start + self.size)))
            total += share
        return out

    def curves_frame(self) -> pd.DataFrame:
        """Per layer: mean plain and MLP-severed effects, their gap and 95% half-widths."""
        rows = []
        for layer in range(self.plain.shape[1]):
            p, s = self.plain[:, layer].double(), self.severed[:, layer].double()
            g = p - s
            _, half = mean_ci95(g.tolist())
            rows.append({"layer": layer, "plain": float(p.mean()), "mlp_severed": float(s.mean()),
                         "gap": float(g.mean()), "gap_ci95": half, "in_R": layer in self.layers})
        return pd.DataFrame(rows)

    def wins_frame(self) -> pd.DataFrame:
        """Per candidate run that won at least one resample: its layers and share of wins."""
        rows = [{"start": s, "layers": list(range(s, s + self.size)), "share": share, "is_R": s == self.layers[0]}
                for s, share in sorted(self.wins.items(), key=lambda kv: (-kv[1], kv[0]))]
        return pd.DataFrame(rows, columns=["start", "layers", "share", "is_R"])


def scan_layers(
    model: HookedTransformer,
    facts: Sequence[KnownFact],
    *,
    n_facts: int = 100,
    min_facts: int | None = None,
    known_only: bool = True,
    size: int = 5,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool = True,
    workers: Any = None,
    shard_size: int = 1,
    checkpoint: Any = None,
) -> LayerScan:
    """R over up to ``n_facts`` facts by :func:`last_subject_curves`, with a bootstrap band.

    Facts are examined in order; with ``known_only`` only those the model answers right
    (:func:`pmet_lens.analysis.averaged.knows_fact`) are traced, otherwise every fact, scored on
    the model's own greedy answer. Fact ``i`` (input order) uses noise seed ``seed + i``, as in
    :func:`~pmet_lens.analysis.averaged.average_traces`, so on the same facts both give the same curves.

    Args:
        n_facts: facts to use (stop once this many are found).
        min_facts: fewest usable facts accepted (default ``n_facts``): fewer raise.
        size: number of layers in R (see :func:`critical_layers`).
        n_boot: bootstrap resamples of the facts (seeded with ``seed``); 0 skips the band.
        workers: ``None`` (this process), an int (a local pool of that many workers) or a
            :class:`~pmet_lens.parallel.Workers` pool: facts are traced in shards of ``shard_size``
            (:func:`fact_curves` per fact, as in one process) and used in input order, so R and its band
            equal the single process's; no new shard starts once the finished ones hold ``n_facts``.
        shard_size: facts per shard (on a pool, or with ``checkpoint``).
        checkpoint: a :class:`~pmet_lens.parallel.ShardLog` recording each finished shard, so that a
            killed run resumes with the unfinished ones.

    Raises:
        ValueError: fewer than ``min_facts`` usable facts (the message says how many the model
            knows and how to proceed), or bad settings.
    """
    require_model(model, "pmet_lens.analysis.layer_scan.scan_layers")
    if isinstance(n_facts, bool) or not isinstance(n_facts, int) or n_facts < 1:
        raise ValueError(f"n_facts must be an int >= 1, got {n_facts!r}")
    need = n_facts if min_facts is None else min_facts
    if isinstance(need, bool) or not isinstance(need, int) or not 1 <= need <= n_facts:
        raise ValueError(f"min_facts must be an int in 1..n_facts ({n_facts}), got {min_facts!r}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot must be an int >= 0, got {n_boot!r}")
    if not 1 <= size <= model.cfg.n_layers:
        raise ValueError(f"size must be in 1..{model.cfg.n_layers} (the model's layers), got {size!r}")
    plain: list[torch.Tensor] = []
    severed: list[torch.Tensor] = []
    ids: list[int] = []
    seen = 0
    settings: dict[str, Any] = {"known_only": known_only, "samples": samples, "noise": noise, "seed": seed}
    outcomes: Iterable[tuple[torch.Tensor, torch.Tensor] | None]
    if workers is None and checkpoint is None:
        stats = EmbeddingStats()  # sigma of W_E once for every trace below
        outcomes = (fact_curves(model, fact, i, stats=stats, **settings) for i, fact in enumerate(facts))
    else:
        from pmet_lens.parallel import run_shards, shard_ranges

        def enough(parts: list[list[Any]]) -> bool:
            return sum(o is not None for part in parts for o in part) >= n_facts

        parts = run_shards(model, _facts_curves, [(list(facts[a:b]), a) for a, b in shard_ranges(len(facts), shard_size)],
                           common=settings, workers=workers, checkpoint=checkpoint, until=enough,
                           desc="last-subject traces (shards)", progress=progress)
        outcomes = [o for part in parts for o in part]
    bar = tqdm(total=n_facts, disable=not progress, desc="last-subject traces")
    for fact, outcome in zip(facts, outcomes):
        if len(ids) >= n_facts:
            break
        seen += 1
        if outcome is None:
            continue
        plain.append(outcome[0])
        severed.append(outcome[1])
        ids.append(fact.known_id)
        bar.update(1)
        bar.set_postfix(seen=seen)
    bar.close()
    if len(ids) < need:
        what = "answers right" if known_only else "could trace"
        raise ValueError(
            f"the model {what} only {len(ids)} of the {seen} facts examined; R needs at least {need}. Give more "
            "facts, lower min_facts, or pass known_only=False to trace the model's own answers")
    P, S = torch.stack(plain), torch.stack(severed)  # [n_facts, n_layers] each
    layers, last = critical_layers(P.double().mean(0), S.double().mean(0), size=size)
    wins: dict[int, float] = {}
    if n_boot:
        gen = torch.Generator().manual_seed(int(seed))
        gaps = (P - S).double()  # [n_facts, n_layers]
        n, n_layers = gaps.shape
        draws = torch.randint(0, n, (n_boot, n), generator=gen)  # [n_boot, n_facts]
        means = gaps[draws].mean(1)  # [n_boot, n_layers]
        # run sums of `size` consecutive layers: [n_boot, n_layers - size + 1]
        sums = torch.stack([means[:, s:s + size].sum(1) for s in range(n_layers - size + 1)], dim=1)
        starts = sums.argmax(1)  # first maximum, as the rule
        counts = torch.bincount(starts, minlength=sums.shape[1])
        wins = {int(s): float(c) / n_boot for s, c in enumerate(counts.tolist()) if c}
    logger.info("R = %s over %d facts (%d seen); R wins %.0f%% of %d resamples", layers, len(ids), seen,
                100 * wins.get(layers[0], 0.0), n_boot)
    return LayerScan(plain=P, severed=S, fact_ids=ids, n_seen=seen, known_only=known_only, size=size,
                     layers=layers, last=last, wins=wins, n_boot=n_boot, samples=samples, noise=noise)
