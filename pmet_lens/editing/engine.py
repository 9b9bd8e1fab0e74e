"""The target-and-solve editor (:data:`LEAST_SQUARES`: PMET, MEMIT, AlphaEdit, EMMET) and the pieces of
the pipeline an :class:`~pmet_lens.editing.session.EditSession` runs per batch, on the shared engine
(:func:`pmet_lens.editing.update.compute_and_apply_updates`): context prefixes, covariances of the
unedited model, one batch's targets and per-layer update with a pluggable solve, and the batch's keys on
the edited model (:func:`pmet_lens.editing.keys.request_keys`).

The update is the method's solve (:func:`method_solve`: MEMIT's / PMET's ``(λC + KᵀK)⁻¹ KᵀR``,
:func:`pmet_lens.editing.update.least_squares_solve`, or EMMET's, :func:`pmet_lens.editing.solvers.emmet_solve`)
unless the caller passes another: AlphaEdit's projected solve (:func:`projected_site_solve`).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Mapping, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.data import Fact
from pmet_lens.editing.context import context_prefixes, template_groups
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.editor import EditorState
from pmet_lens.editing.hparams import EditHyperParams, EMMETHyperParams, MethodHyperParams, settings_for
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.keys import request_keys
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.nullspace import Projection, projected_solve
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.site import TARGET_WEIGHT, EditSite, edit_site
from pmet_lens.editing.solvers import emmet_solve
from pmet_lens.editing.targets import optimise_targets
from pmet_lens.editing.update import Solve, compute_and_apply_updates, least_squares_solve
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["LEAST_SQUARES", "LeastSquaresEditor", "batch_keys", "check_targets", "covariances", "edit_sites",
           "edited_params", "method_solve", "projected_site_solve", "projected_solver", "run_batch"]


def edit_sites(model: HookedTransformer, hparams: EditHyperParams) -> list[EditSite]:
    """The :class:`EditSite` of every weight ``hparams`` edits (layers ascending)."""
    arch = architecture(model)
    settings = settings_for(hparams)
    return [edit_site(arch, TARGET_WEIGHT[s], l) for l in hparams.layers for s in settings.kept_sites]


def covariances(model: HookedTransformer, hparams: EditHyperParams, store: CovarianceStore,
                layer_hashes: dict[int, str] | None = None, *,
                workers: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """C per key hook of the weights ``hparams`` edits, on ``model`` as it is now, and each one's
    cache key (:meth:`CovarianceStore.cache_key`); ``layer_hashes`` and ``workers`` as
    :meth:`CovarianceStore.get`'s."""
    hooks = [site.key_hook for site in edit_sites(model, hparams)]
    if layer_hashes is None or any(l not in layer_hashes for l in hparams.layers):
        _, layer_hashes = weights_hashes(model, hparams.layers)
    covs = store.get(model, hooks, hparams.cov_tokens, hparams.cov_dtype, hparams.cov_seq_len, layer_hashes=layer_hashes,
                     workers=workers)
    keys = {h: store.cache_key(model, h, hparams.cov_tokens, hparams.cov_dtype, hparams.cov_seq_len,
                               layer_hashes=layer_hashes) for h in hooks}
    return covs, keys


def edited_params(model: HookedTransformer, hparams: EditHyperParams) -> dict[str, torch.nn.Parameter]:
    """Parameter name -> parameter of every weight ``hparams`` edits."""
    return {site.param_name: site.param(model) for site in edit_sites(model, hparams)}


def method_solve(hparams: EditHyperParams, options: SolveOptions | None = None) -> Solve:
    """The method's own update rule: EMMET's equality-constrained solve (α = ``lam``, λ_E =
    ``emmet_lambda``) or MEMIT's / PMET's least squares with λ = ``lam`` (solved as ``options`` say,
    :class:`~pmet_lens.editing.linsolve.SolveOptions`)."""
    if isinstance(hparams, EMMETHyperParams):
        return partial(emmet_solve, alpha=hparams.lam, emmet_lambda=hparams.emmet_lambda)
    return partial(least_squares_solve, lam=hparams.lam, options=options)


def check_targets(targets: dict[str, torch.Tensor], sites: Sequence[str], n_facts: int,
                  d_model: int) -> dict[str, torch.Tensor]:
    """Validate precomputed targets: every kept site present, shape [facts, d_model], finite (detached copies)."""
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


def projected_solver(projections: Mapping[str, Projection], l2: float,
                     prev: Mapping[str, torch.Tensor] | None = None, options: SolveOptions | None = None) -> Solve:
    """The engine's :data:`~pmet_lens.editing.update.Solve` for AlphaEdit's update with these P and
    ``prev`` (key hook -> P·KpKp·P)."""
    return partial(projected_site_solve, projections=projections, l2=l2, prev=prev, options=options)


def projected_site_solve(site: EditSite, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, *,
                         projections: Mapping[str, Projection], l2: float,
                         prev: Mapping[str, torch.Tensor] | None = None,
                         options: SolveOptions | None = None) -> torch.Tensor:
    """AlphaEdit's update as the engine's :data:`~pmet_lens.editing.update.Solve`:
    :func:`~pmet_lens.editing.nullspace.projected_solve` with the site's P and ``prev[key hook]`` =
    P·KpKp·P (:func:`~pmet_lens.editing.nullspace.projected_gram` summed over earlier batches; C is
    unused: the projection replaces MEMIT's λC term). P and ``prev`` may stay on the CPU."""
    return projected_solve(keys, resid, projections[site.key_hook].P, l2,
                           projected_gram=None if prev is None else prev.get(site.key_hook), options=options)


def batch_keys(model: HookedTransformer, facts: Sequence[Fact], hparams: EditHyperParams,
               hooks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Keys of ``facts`` at the key hooks ``hooks`` on ``model`` as it is now
    (:func:`~pmet_lens.editing.keys.request_keys`, the keys the update uses), ``[facts, d_k]`` float64."""
    prefixes = hparams.context_prefixes or ()
    requests = prepare_requests(model, facts, prefixes, template_groups(hparams, len(prefixes)))
    sites = [s for s in edit_sites(model, hparams) if s.key_hook in set(hooks)]
    reading = request_keys(model, requests, sites)
    return {site.key_hook: reading.keys[site].double() for site in sites}


def run_batch(model: HookedTransformer, facts: Sequence[Fact], hparams: EditHyperParams,
              covs: dict[str, torch.Tensor], solve: Solve | None, *, progress: bool = False,
              targets: dict[str, torch.Tensor] | None = None, prefixes: tuple[str, ...] | None = None,
              compile: bool = False, model_hash: str | None = None,
              solve_options: SolveOptions | None = None, workers: Any = None, checkpoint: Any = None) -> EditResult:
    """One mass edit of validated ``facts`` into ``model`` (applied): optimise the targets (PMET eq. 9,
    MEMIT eq. 16) unless ``targets`` (site -> [facts, d_model]) are given, then write the per-layer
    update with the given covariances and solve (default the method's, :func:`method_solve`: MEMIT's /
    PMET's least squares with λ, MEMIT eq. 14, PMET eq. 10, or EMMET's). ``prefixes`` default to
    ``hparams.context_prefixes``; ``model_hash`` (of the weights before the edit) is computed when not
    given. ``solve_options`` configure the default solve (:class:`~pmet_lens.editing.linsolve.SolveOptions`).
    ``workers`` (an int or a :class:`~pmet_lens.parallel.Workers` pool) optimises the targets in shards
    of facts on a pool (:func:`~pmet_lens.editing.targets.optimise_targets`); keys, residuals and the
    solve stay here. ``checkpoint`` (a :class:`~pmet_lens.parallel.ShardLog`) keeps the target shards of
    a long run.

    On an exception the weights are written back to their values before the call.
    """
    settings = settings_for(hparams)
    prefixes_ = prefixes if prefixes is not None else (hparams.context_prefixes or ())
    requests = prepare_requests(model, facts, prefixes_, template_groups(hparams, len(prefixes_)))
    if model_hash is None:
        model_hash, _ = weights_hashes(model, [])
    if targets is None:
        optimised = optimise_targets(model, requests, hparams, progress=progress, compile=compile, workers=workers,
                                     checkpoint=checkpoint)
        logger.info("targets: mean steps %.1f, mean P(o*) %.3f", optimised.steps.float().mean(), optimised.prob.mean())
        values = {s: optimised.value(s).detach() for s in settings.delta_sites}
        stats: dict[str, Any] = {"steps": optimised.steps.tolist(), "loss": optimised.loss.tolist(),
                                 "prob": optimised.prob.tolist(), "phi": optimised.phi.tolist()}
    else:
        values, stats = dict(targets), {"targets": "given"}
    originals: dict[str, torch.Tensor] = {}
    written: dict[str, EditSite] = {}

    def keep_original(site: EditSite, delta: torch.Tensor) -> None:
        if site.param_name not in originals:
            originals[site.param_name] = site.param(model).detach().clone()
            written[site.param_name] = site

    try:
        deltas = compute_and_apply_updates(
            model, requests, {s: values[s] for s in settings.kept_sites}, hparams.layers, settings.spread, covs,
            solve=solve if solve is not None else method_solve(hparams, solve_options), on_write=keep_original)
        return EditResult(model=model, method=hparams.method, deltas=deltas, targets=values, facts=list(requests.facts),
                          hparams=hparams.to_dict(), model_hash=model_hash, prefixes=prefixes_, stats=stats,
                          _originals=originals)
    except BaseException:
        with torch.no_grad():
            for name, orig in originals.items():
                written[name].param(model).copy_(orig)
        raise
class LeastSquaresEditor:
    """The :class:`~pmet_lens.editing.editor.Editor` of the target-and-solve methods (PMET, MEMIT,
    AlphaEdit, EMMET): optimise every fact's target at L = max(R) in batches, then one solve per layer
    of R (:func:`~pmet_lens.editing.engine.run_batch`)."""

    optimises_targets = True
    shards_facts = True

    def sites(self, model: HookedTransformer, hparams: MethodHyperParams) -> list[EditSite]:
        return edit_sites(model, _family(hparams))

    def prepare(self, model: HookedTransformer, hparams: MethodHyperParams, *, cov_store: CovarianceStore | None = None,
                progress: bool = False, layer_hashes: dict[int, str] | None = None,
                workers: Any = None) -> EditorState:
        """The context prefixes (sampled once) and C of every key hook of the edited weights."""
        hp = _family(hparams)
        prefixes = context_prefixes(model, hp)
        store = cov_store if cov_store is not None else CovarianceStore(progress=progress)
        covs, keys = covariances(model, hp, store, layer_hashes, workers=workers)
        return EditorState(prefixes=prefixes, covs=covs, cov_keys=keys)

    def run_batch(self, model: HookedTransformer, facts: Sequence[Fact], hparams: MethodHyperParams,
                  state: EditorState, *, solve: Solve | None = None, progress: bool = False,
                  targets: dict[str, torch.Tensor] | None = None, compile: bool = False,
                  model_hash: str | None = None, solve_options: SolveOptions | None = None, workers: Any = None,
                  checkpoint: Any = None) -> EditResult:
        hp = _family(hparams)
        given = None if targets is None else check_targets(targets, settings_for(hp).kept_sites, len(facts),
                                                          model.cfg.d_model)
        return run_batch(model, facts, hp, state.covs, solve, progress=progress, targets=given,
                         prefixes=state.prefixes, compile=compile, model_hash=model_hash, solve_options=solve_options,
                         workers=workers, checkpoint=checkpoint)


def _family(hparams: MethodHyperParams) -> EditHyperParams:
    if not isinstance(hparams, EditHyperParams):
        raise TypeError(f"the target-and-solve editor takes EditHyperParams, got {type(hparams).__name__}")
    return hparams


LEAST_SQUARES = LeastSquaresEditor()
"""The target-and-solve editor (stateless; :meth:`~pmet_lens.editing.hparams.EditHyperParams.editor`)."""
