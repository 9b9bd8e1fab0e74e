"""The pieces of the editing pipeline an :class:`~pmet_lens.editing.session.EditSession` runs per
batch: context prefixes, covariances of the unedited model, one batch's targets and per-layer
update with a pluggable solve, and the batch's keys on the edited model.

``solve(hook, keys, resid, cov) -> Δ (float64, [d_k, d_out])`` replaces MEMIT's / PMET's
``(λC + KᵀK)⁻¹ KᵀR`` (:func:`pmet_lens.editing.update.solve_update`) when given; the session passes
AlphaEdit's projected solve (:func:`pmet_lens.editing.nullspace.projected_solve`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, pad, subject_last_position
from pmet_lens.data import Fact
from pmet_lens.editing.context import context_prefixes, context_templates
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.hparams import EditHyperParams
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.nullspace import Projection, projected_solve
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.targets import optimise_targets, settings_for, site_hook
from pmet_lens.editing.update import get_param, key_hook, param_name, solve_update, spread
from pmet_lens.editing.validate import validate_requests

__all__ = ["Solve", "batch_keys", "covariances", "edited_params", "prefixes", "projected_solver", "run_batch", "validate"]

Solve = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def projected_solver(projections: Mapping[str, Projection], l2: float,
                     prev: Mapping[str, torch.Tensor] | None = None) -> Solve:
    """AlphaEdit's update as a per-layer solve: :func:`~pmet_lens.editing.nullspace.projected_solve`
    with the key hook's P and ``prev[hook]`` = P·KpKp (C is unused: the projection replaces MEMIT's λC term)."""

    def solve(hook: str, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        return projected_solve(keys, resid, projections[hook].P, l2,
                               projected_prev=None if prev is None else prev.get(hook))

    return solve


def prefixes(model: HookedTransformer, hparams: EditHyperParams) -> tuple[str, ...]:
    """The context prefixes of ``hparams`` on ``model`` (sampled unless given)."""
    return context_prefixes(model, hparams)


def validate(model: HookedTransformer, facts: Sequence[Any], hparams: EditHyperParams) -> list[Fact]:
    """The requests normalised and checked (:func:`~pmet_lens.editing.validate.validate_requests`)."""
    return validate_requests(model, facts, hparams)


def _key_hooks(model: HookedTransformer, hparams: EditHyperParams) -> list[str]:
    settings = settings_for(hparams)
    return [key_hook(model, site, l) for l in hparams.layers for site in settings.kept_sites]


def covariances(model: HookedTransformer, hparams: EditHyperParams,
                store: CovarianceStore) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """C per key hook of the weights ``hparams`` edits, on ``model`` as it is now, and each one's
    cache key (:meth:`CovarianceStore.cache_key`)."""
    hooks = _key_hooks(model, hparams)
    _, layer_hashes = weights_hashes(model, hparams.layers)
    covs = store.get(model, hooks, hparams.cov_tokens, hparams.cov_dtype, hparams.cov_seq_len, layer_hashes=layer_hashes)
    keys = {h: store.cache_key(model, h, hparams.cov_tokens, hparams.cov_dtype, hparams.cov_seq_len,
                               layer_hashes=layer_hashes) for h in hooks}
    return covs, keys


def edited_params(model: HookedTransformer, hparams: EditHyperParams) -> dict[str, torch.nn.Parameter]:
    """Parameter name -> parameter of every weight ``hparams`` edits."""
    settings = settings_for(hparams)
    names = [param_name(site, l) for l in hparams.layers for site in settings.kept_sites]
    return {n: get_param(model, n) for n in names}


def _rows(model: HookedTransformer, facts: Sequence[Fact], prefixes: tuple[str, ...]):
    templates = context_templates(prefixes)
    seqs, lookups = [], []
    for fact in facts:
        for tmpl in templates:
            text_tmpl = tmpl.replace("{}", fact.prompt)
            seqs.append(encode(model, text_tmpl.format(fact.subject)))
            lookups.append(subject_last_position(model, text_tmpl, fact.subject))
    batch = pad(model, seqs)
    look = torch.tensor(lookups, device=batch.tokens.device)
    return batch, look, len(templates)


def batch_keys(model: HookedTransformer, facts: Sequence[Fact], hparams: EditHyperParams,
               hooks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Keys of ``facts`` at ``hooks`` on ``model`` as it is now: each fact's key at its subject's
    last token averaged over the context prefixes (MEMIT ``compute_ks``), ``[facts, d_k]`` float64."""
    prefixes_ = hparams.context_prefixes or ()
    batch, look, P = _rows(model, facts, prefixes_)
    rows = torch.arange(batch.tokens.shape[0], device=look.device)
    got: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        got[hook.name] = act[rows, look].reshape(len(rows), -1).double()  # [rows, d_k]

    from pmet_lens.core.arch import block_index

    with torch.no_grad(), model.hooks(fwd_hooks=[(h, grab) for h in hooks]):
        model(batch.tokens, stop_at_layer=max(block_index(h) for h in hooks) + 1)
    return {h: got[h].reshape(len(facts), P, -1).mean(1) for h in hooks}  # [facts, prefixes, d_k] -> [facts, d_k]


def run_batch(model: HookedTransformer, facts: Sequence[Fact], hparams: EditHyperParams,
              covs: dict[str, torch.Tensor], solve: Solve | None, *, progress: bool = False,
              targets: dict[str, torch.Tensor] | None = None) -> EditResult:
    """One mass edit of ``facts`` into ``model`` (applied) with the given covariances and solve;
    ``targets`` (site -> [facts, d_model]) skips the target optimisation.

    On an exception the weights are written back to their values before the call.
    """
    settings = settings_for(hparams)
    prefixes_ = hparams.context_prefixes or ()
    model_hash, _ = weights_hashes(model, [])
    if targets is None:
        optimised = optimise_targets(model, facts, hparams, prefixes_, progress=progress)
        values = {s: optimised.value(s).detach() for s in settings.delta_sites}
        stats: dict[str, Any] = {"steps": optimised.steps.tolist(), "loss": optimised.loss.tolist(),
                                 "prob": optimised.prob.tolist()}
    else:
        values, stats = dict(targets), {"targets": "given"}
    arch = architecture(model)
    layers = hparams.layers
    L = max(layers)
    batch, look, P = _rows(model, facts, prefixes_)
    rows = torch.arange(batch.tokens.shape[0], device=look.device)
    bare = rows[::P]
    originals: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            first = min(layers)
            resid_first = model(batch.tokens, stop_at_layer=first)
            for layer in layers:
                got: dict[str, torch.Tensor] = {}

                def grab(act, hook):
                    got[hook.name] = act[rows, look].reshape(len(rows), -1).clone()  # [rows, d]

                names = {site: key_hook(model, site, layer) for site in settings.kept_sites}
                outs = {site: site_hook(arch, site, L) for site in settings.kept_sites}
                with model.hooks(fwd_hooks=[(h, grab) for h in {*names.values(), *outs.values()}]):
                    model(resid_first, start_at_layer=first, stop_at_layer=L + 1)
                for site in settings.kept_sites:
                    keys = got[names[site]].reshape(len(facts), P, -1).mean(1)  # [facts, d_k]
                    current = got[outs[site]][bare]
                    resid = (values[site].to(current.dtype) - current) * spread(L, layer, settings.spread)
                    cov = covs[names[site]]
                    delta64 = solve(names[site], keys, resid, cov) if solve is not None else \
                        solve_update(keys, resid, cov, hparams.lam)
                    name = param_name(site, layer)
                    param = get_param(model, name)
                    delta = delta64.to(param.dtype).reshape(param.shape)  # [d_k, d_out] -> param's shape
                    originals.setdefault(name, param.detach().clone())
                    param += delta
                    deltas[name] = delta
    except BaseException:
        with torch.no_grad():
            for name, orig in originals.items():
                get_param(model, name).copy_(orig)
        raise
    return EditResult(model=model, method=hparams.method, deltas=deltas, targets=values, facts=list(facts),
                      hparams=hparams.to_dict(), model_hash=model_hash, prefixes=prefixes_, stats=stats,
                      _originals=originals)
