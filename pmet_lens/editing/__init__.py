"""PMET and MEMIT editors on TransformerLens hooks: ``edit(model, facts, method="pmet")``.

One pipeline: validate and tokenise the requests once (:mod:`.validate`, :mod:`.prepared`) with
context prefixes sampled from the model (:mod:`.context`), optimise the targets of all facts in
batches (:mod:`.targets`, PMET eq. 9 / MEMIT eq. 16), then for each critical layer read the keys
(:mod:`.keys`), spread the residual and solve the least squares (:mod:`.update`, PMET eqs. 10-11 /
MEMIT eqs. 14-15) with covariance statistics from a :class:`CovarianceStore`, writing to the
:class:`~pmet_lens.editing.site.EditSite` of each weight. The result is an :class:`EditResult` value.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.core.models import require_model
from pmet_lens.editing.context import context_prefixes
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.engine import projected_site_solve, run_batch
from pmet_lens.editing.hparams import (
    METHODS,
    AlphaEditHyperParams,
    EditHyperParams,
    MEMITHyperParams,
    PMETHyperParams,
    preset,
    settings_for,
)
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.keys import request_keys
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.prepared import PreparedRequests, prepare_requests
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.site import TARGET_WEIGHT, EditSite, edit_site
from pmet_lens.editing.targets import require_compiler
from pmet_lens.editing.update import least_squares_solve
from pmet_lens.editing.validate import EditError, validate_requests
from pmet_lens.parallel import one_pool

logger = logging.getLogger(__name__)

__all__ = [
    "AlphaEditHyperParams", "CovarianceStore", "EditError", "EditHyperParams", "EditResult", "EditSite", "MEMITHyperParams",
    "PMETHyperParams", "PreparedRequests", "SolveOptions", "context_prefixes", "edit", "prepare_requests", "preset",
    "request_keys",
]


@one_pool
def edit(
    model: HookedTransformer,
    facts: Sequence[Any],
    method: str | None = None,
    hparams: EditHyperParams | None = None,
    *,
    cov_store: CovarianceStore | None = None,
    nullspace_store: Any = None,
    apply: bool = True,
    progress: bool = True,
    targets: dict[str, torch.Tensor] | None = None,
    compile: bool = False,
    solve_options: SolveOptions | None = None,
    workers: Any = None,
    checkpoint: Any = None,
) -> EditResult:
    """Edit ``facts`` into ``model`` with PMET (default) or MEMIT.

    Args:
        model: any TransformerLens model (sequential or parallel blocks), on any device.
        facts: CounterFact records (dicts with ``requested_rewrite``), :class:`~pmet_lens.data.records.Fact`s
            or dicts with ``subject``, ``prompt`` (with ``{}``) and ``target_new``.
        method: "pmet" or "memit"; with ``hparams`` it must name their method (``hparams.method``);
            neither given: "pmet".
        hparams: hyper-parameters; default :func:`preset` of ``method`` for ``model.cfg.model_name``.
        cov_store: covariance cache (default: a store under ``default_cache_dir()`` on WikiText-2).
        nullspace_store: cache of AlphaEdit's projectors P for ``hparams.nullspace``
            (:class:`~pmet_lens.editing.nullspace.NullspaceStore`; default one under ``default_cache_dir()``).
            With ``nullspace`` (``method="alphaedit"``, or ``PMETHyperParams(nullspace=True)``) the
            update is AlphaEdit's projected solve with no earlier batches (KpKp = 0); for sequential
            batches use :class:`~pmet_lens.editing.session.EditSession`.
        apply: leave the edit written into the weights (otherwise the weights are restored and
            the result can be previewed with :meth:`EditResult.as_hooks` or applied later).
        progress: show progress bars.
        targets: precomputed target vectors (site -> [facts, d_model]), e.g. ``earlier.targets``
            of an edit of the same facts with equal ``hparams.target_settings()`` (the optimisation
            settings: method, layer L, steps, lr, loss weights, prefixes), or row slices of it. The
            targets (PMET eq. 9, MEMIT eq. 16) do not depend on the fields in
            ``hparams.update_only_fields`` (λ, C's corpus settings, the residual spread, which
            weights are updated), so λ sweeps and the spread / W_O ablations can skip the optimisation.
        compile: run the target optimisation's blocks after L through ``torch.compile`` (needs a C++
            compiler on CPU). Compiling is paid once per process and then makes each step cheaper, so
            it pays for mass edits, not for a few facts (``benchmarks/bench_editing.py --compile``
            measures both). Targets equal the eager ones up to float rounding.
        solve_options: how each layer's update is solved (:class:`~pmet_lens.editing.linsolve.SolveOptions`:
            float32 Cholesky with float64 refinement by default; ``float64_device="cpu"`` keeps
            float64 work off a GPU that is slow at it).
        workers: ``None`` (this process), an int (a local pool of that many workers, for this call) or a
            :class:`~pmet_lens.parallel.Workers` pool: the target optimisation runs in shards of facts on
            the workers (each fact's targets do not depend on its shard), and a missing covariance C is
            built there from shards of its corpus; the keys, residuals and the solve stay in this process.
        checkpoint: a :class:`~pmet_lens.parallel.ShardLog` recording each finished shard of the target
            optimisation, so that a killed run resumes with the unfinished ones.

    Returns:
        The :class:`EditResult` (applied if ``apply``).

    Raises:
        pmet_lens.DataError / ValueError / EditError: bad input (checked before any weight
            changes; a ``method`` that contradicts ``hparams`` is a ValueError) or NaN/inf during
            optimisation or solve; in every case the weights are exactly as before the call.
    """
    require_model(model, "pmet_lens.edit")
    if method is not None and (not isinstance(method, str) or method.lower() not in METHODS):
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if hparams is None:
        hparams = preset(str(getattr(model.cfg, "model_name", "")), method or "pmet")
    elif not isinstance(hparams, EditHyperParams):
        raise TypeError(f"hparams must be PMETHyperParams, MEMITHyperParams or AlphaEditHyperParams, got {type(hparams).__name__}")
    elif method is not None and method.lower() != hparams.method:
        raise ValueError(f"method={method!r} contradicts hparams={type(hparams).__name__} (method "
                         f"{hparams.method!r}): pass one of them, or hyper-parameters of that method")
    facts = validate_requests(model, facts, hparams)
    if compile:
        require_compiler(model)  # before the covariance and the optimisation, not after them
    prefixes = context_prefixes(model, hparams)
    settings = settings_for(hparams)
    arch = architecture(model)
    sites = [edit_site(arch, TARGET_WEIGHT[s], l) for l in hparams.layers for s in settings.kept_sites]
    store = cov_store if cov_store is not None else CovarianceStore(progress=progress)
    model_hash, layer_hashes = weights_hashes(model, hparams.layers)  # one pass over the weights
    covs = store.get(model, [site.key_hook for site in sites], hparams.cov_tokens, hparams.cov_dtype,
                     hparams.cov_seq_len, layer_hashes=layer_hashes, workers=workers)
    given = None if targets is None else _check_targets(targets, settings.kept_sites, len(facts), model.cfg.d_model)
    result = run_batch(model, facts, hparams, covs,
                       _solve_for(model, hparams, sites, covs, store, nullspace_store, layer_hashes, solve_options),
                       progress=progress, targets=given, prefixes=prefixes, compile=compile, model_hash=model_hash,
                       workers=workers, checkpoint=checkpoint)
    if not apply:
        result.restore()
    return result


def _check_targets(targets: dict[str, torch.Tensor], sites: Sequence[str], n_facts: int, d_model: int) -> dict[str, torch.Tensor]:
    """Validate precomputed targets: every kept site present, shape [facts, d_model], finite."""
    if not isinstance(targets, dict):
        raise TypeError(f"targets must be a dict site -> tensor (EditResult.targets), got {type(targets).__name__}")
    missing = [s for s in sites if s not in targets]
    if missing:
        raise ValueError(f"targets lack the site(s) {missing} this method updates from (given: {sorted(targets)}); "
                         "reuse targets of an edit with the same method and δ sites")
    for s in sites:
        t = targets[s]
        if tuple(t.shape) != (n_facts, d_model):
            raise ValueError(f"targets[{s!r}] has shape {tuple(t.shape)}, expected ({n_facts}, {d_model}) for {n_facts} fact(s)")
        if not torch.isfinite(t).all():
            raise EditError(f"targets[{s!r}] contains NaN/inf")
    return {s: t.detach() for s, t in targets.items()}


def _solve_for(model: HookedTransformer, hparams: EditHyperParams, sites: Sequence[EditSite],
               covs: dict[str, torch.Tensor], store: CovarianceStore, nullspace_store: Any,
               layer_hashes: dict[int, str], options: SolveOptions | None = None):
    """The per-site solve of ``hparams``: MEMIT's / PMET's least squares with λ, or with
    ``nullspace`` AlphaEdit's projected solve (AlphaEdit eq. 12) with P from C of the model as it is."""
    from pmet_lens.editing.nullspace import NullspaceStore

    if not hparams.nullspace:
        return partial(least_squares_solve, lam=hparams.lam, options=options)
    ns = nullspace_store if nullspace_store is not None else NullspaceStore()
    projections = {}
    for site in sites:
        key = store.cache_key(model, site.key_hook, hparams.cov_tokens, hparams.cov_dtype, hparams.cov_seq_len,
                              layer_hashes=layer_hashes)
        projections[site.key_hook] = ns.get(key, covs[site.key_hook], hparams.nullspace_threshold)
    return partial(projected_site_solve, projections=projections, l2=hparams.l2, options=options)
