"""PMET and MEMIT editors on TransformerLens hooks: ``edit(model, facts, method="pmet")``.

One pipeline (DESIGN.md section 3): sample context prefixes (:mod:`.context`), optimise the
targets of all facts in batches (:mod:`.targets`), then for each critical layer compute keys,
spread the residual and solve the least squares (:mod:`.update`) with covariance statistics
from a :class:`CovarianceStore`. The result is an :class:`EditResult` value.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.editing.context import context_prefixes
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.hparams import EditHyperParams, MEMITHyperParams, PMETHyperParams, preset
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.targets import optimise_targets, require_compiler, settings_for
from pmet_lens.editing.update import compute_and_apply_updates, get_param, key_hook
from pmet_lens.editing.validate import EditError, validate_requests

logger = logging.getLogger(__name__)

__all__ = [
    "CovarianceStore", "EditError", "EditHyperParams", "EditResult", "MEMITHyperParams",
    "PMETHyperParams", "context_prefixes", "edit", "preset",
]


def edit(
    model: HookedTransformer,
    facts: Sequence[Any],
    method: str = "pmet",
    hparams: EditHyperParams | None = None,
    *,
    cov_store: CovarianceStore | None = None,
    apply: bool = True,
    progress: bool = True,
    targets: dict[str, torch.Tensor] | None = None,
    compile: bool = False,
) -> EditResult:
    """Edit ``facts`` into ``model`` with PMET (default) or MEMIT.

    Args:
        model: any TransformerLens model (sequential or parallel blocks), on any device.
        facts: CounterFact records (dicts with ``requested_rewrite``), :class:`pmet_lens.Fact`s
            or dicts with ``subject``, ``prompt`` (with ``{}``) and ``target_new``.
        method: "pmet" or "memit" (ignored when ``hparams`` is given; its class decides).
        hparams: hyper-parameters; default :func:`preset` for ``model.cfg.model_name``.
        cov_store: covariance cache (default: a store under ``default_cache_dir()`` on WikiText-2).
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
            compiler on CPU). Compiling costs about a minute per process on 2 CPU cores and then
            saves about a quarter of each step, so it pays for mass edits, not for a few facts
            (``benchmarks/bench_editing.py --compile``). Targets equal the eager ones up to float
            rounding.

    Returns:
        The :class:`EditResult` (applied if ``apply``).

    Raises:
        pmet_lens.DataError / ValueError / EditError: bad input (checked before any weight
            changes) or NaN/inf during optimisation or solve; in every case the weights are
            exactly as before the call.
    """
    if hparams is None:
        hparams = preset(str(getattr(model.cfg, "model_name", "")), method)
    elif not isinstance(hparams, EditHyperParams):
        raise TypeError(f"hparams must be PMETHyperParams or MEMITHyperParams, got {type(hparams).__name__}")
    elif method.lower() != hparams.method and method != "pmet":
        raise ValueError(f"method={method!r} but hparams are {type(hparams).__name__}")
    facts = validate_requests(model, facts, hparams)
    if compile:
        require_compiler(model)  # before the covariance and the optimisation, not after them
    settings = settings_for(hparams)
    store = cov_store if cov_store is not None else CovarianceStore(progress=progress)
    model_hash, layer_hashes = weights_hashes(model, hparams.layers)  # one pass over the weights
    key_hooks = [key_hook(model, site, l) for l in hparams.layers for site in settings.kept_sites]
    covs = store.get(model, key_hooks, hparams.cov_tokens, hparams.cov_dtype, hparams.cov_seq_len,
                     layer_hashes=layer_hashes)
    prefixes = context_prefixes(model, hparams)
    if targets is None:
        optimised = optimise_targets(model, facts, hparams, prefixes, progress=progress, compile=compile)
        logger.info("targets: mean steps %.1f, mean P(o*) %.3f", optimised.steps.float().mean(), optimised.prob.mean())
        values = {s: optimised.value(s).detach() for s in settings.delta_sites}
        stats = {"steps": optimised.steps.tolist(), "loss": optimised.loss.tolist(), "prob": optimised.prob.tolist()}
    else:
        values = _check_targets(targets, settings.kept_sites, len(facts), model.cfg.d_model)
        stats = {"targets": "given"}

    originals: dict[str, torch.Tensor] = {}

    def keep_original(name: str, delta: torch.Tensor) -> None:
        if name not in originals:
            originals[name] = get_param(model, name).detach().clone()

    try:
        deltas = compute_and_apply_updates(
            model, facts, {s: values[s] for s in settings.kept_sites}, hparams.layers, hparams.lam,
            settings, prefixes, covs, keep_original)
    except BaseException:
        with torch.no_grad():
            for name, orig in originals.items():
                get_param(model, name).copy_(orig)
        raise
    result = EditResult(
        model=model, method=hparams.method, deltas=deltas,
        targets=values, facts=list(facts), hparams=hparams.to_dict(), model_hash=model_hash, prefixes=prefixes,
        stats=stats, _originals=originals,
    )
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
