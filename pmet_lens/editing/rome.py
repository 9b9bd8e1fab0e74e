"""ROME and r-ROME (:class:`~pmet_lens.editing.hparams.ROMEHyperParams`,
:class:`~pmet_lens.editing.hparams.RROMEHyperParams`) on the shared pipeline, one fact after another.

For each fact in turn, on the model the previous facts left (MEMIT's "sequential ROME"):

1. its target v* = m_init + δ at ``hook_mlp_out`` of the one layer
   (:func:`~pmet_lens.editing.targets.optimise_targets` with ROME's settings: PMET's ``mlp_out`` site
   without δ_a, the NLL averaged over the 21 templates, KL on "{s} is a", no KL stop);
2. its keys on the current model (:func:`~pmet_lens.editing.keys.request_keys`, averaged uniformly
   over the templates: k̄) and the bare prompt's key k_s and output;
3. the rank-one update (:func:`~pmet_lens.editing.solvers.rank_one_solve`) through the engine
   (:func:`~pmet_lens.editing.update.compute_and_apply_updates` with one layer, so the spread is 1).

The context prefixes and C are taken once, on the model before the first fact (the official code
caches both). The weight after fact i is written as W_0 + ΔW_{≤i}, with ΔW_{≤i} the float64 sum of
the facts' updates so far cast once to the weight's dtype: the result's delta is then exactly what
the edit wrote (``EditResult.apply`` of it on the unedited model, and a session's replay, give the
same bits), and ``restore()`` writes W_0 back.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import FFN_OUT_WEIGHT, architecture
from pmet_lens.data import Fact
from pmet_lens.editing.context import context_prefixes, template_groups
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.delta import add_delta, delta_dtype
from pmet_lens.editing.editor import EditorState, WrittenWeights, refuse_workers
from pmet_lens.editing.engine import check_targets, covariances
from pmet_lens.editing.hparams import MethodHyperParams, ROMEHyperParams
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.site import EditSite, edit_site
from pmet_lens.editing.solvers import rank_one_solve
from pmet_lens.editing.targets import optimise_targets
from pmet_lens.editing.update import Solve, compute_and_apply_updates

logger = logging.getLogger(__name__)

__all__ = ["ROME", "ROMEEditor"]

_SITE = "mlp_out"
"""ROME's δ site and target: the FFN output m of the edited layer (``hook_mlp_out``)."""


def _rome(hparams: MethodHyperParams) -> ROMEHyperParams:
    if not isinstance(hparams, ROMEHyperParams):
        raise TypeError(f"the ROME editor takes ROMEHyperParams, got {type(hparams).__name__}")
    return hparams


class ROMEEditor:
    """The :class:`~pmet_lens.editing.editor.Editor` of ROME and r-ROME (see the module docstring)."""

    optimises_targets = True
    shards_facts = False

    def sites(self, model: HookedTransformer, hparams: MethodHyperParams) -> list[EditSite]:
        return [edit_site(architecture(model), FFN_OUT_WEIGHT, _rome(hparams).layers[0])]

    def prepare(self, model: HookedTransformer, hparams: MethodHyperParams, *, cov_store: CovarianceStore | None = None,
                progress: bool = False, layer_hashes: dict[int, str] | None = None,
                workers: Any = None) -> EditorState:
        """ROME's context prefixes (sampled once) and C of the edited layer's keys."""
        hp = _rome(hparams)
        store = cov_store if cov_store is not None else CovarianceStore(progress=progress)
        covs, keys = covariances(model, hp, store, layer_hashes, workers=workers)
        return EditorState(prefixes=context_prefixes(model, hp), covs=covs, cov_keys=keys)

    def run_batch(self, model: HookedTransformer, facts: Sequence[Fact], hparams: MethodHyperParams,
                  state: EditorState, *, solve: Solve | None = None, progress: bool = False,
                  targets: dict[str, torch.Tensor] | None = None, compile: bool = False,
                  model_hash: str | None = None, solve_options: SolveOptions | None = None, workers: Any = None,
                  checkpoint: Any = None) -> EditResult:
        """Edit ``facts`` one after another. ``targets`` (``{"mlp_out": [facts, d_model]}``) replace the
        optimisation of each fact's v*; they were optimised on some model state, so for more than one
        fact they are an approximation of sequential ROME (whose targets depend on the earlier edits)."""
        refuse_workers(hparams.method, workers, checkpoint)
        hp = _rome(hparams)
        if solve is not None:
            raise ValueError(f"{hp.method}'s update is its rank-one solve; it takes no other solve")
        given = None if targets is None else check_targets(targets, (_SITE,), len(facts), model.cfg.d_model)
        if model_hash is None:
            model_hash, _ = weights_hashes(model, [])
        site = self.sites(model, hp)[0]
        param = site.param(model)
        requests = prepare_requests(model, facts, state.prefixes, template_groups(hp, len(state.prefixes)))
        written = WrittenWeights(model)
        written.keep(site)
        total = torch.zeros(param.shape, dtype=torch.float64, device=param.device)
        values: list[torch.Tensor] = []
        stats: dict[str, list[float]] = {"steps": [], "loss": [], "prob": [], "update_norm": []}
        bare = hp.residual_key == "bare"
        try:
            for i in tqdm(range(len(facts)), desc=hp.method, disable=not progress or len(facts) < 2):
                one = requests.subset([i])
                if given is None:
                    found = optimise_targets(model, one, hp, compile=compile)
                    value = found.value(_SITE).detach()
                    stats["steps"].append(float(found.steps[0]))
                    stats["loss"].append(float(found.loss[0]))
                    stats["prob"].append(float(found.prob[0]))
                else:
                    value = given[_SITE][i:i + 1]
                delta = compute_and_apply_updates(model, one, {_SITE: value}, hp.layers, "even", state.covs,
                                                  solve=rank_one_solve, residual_from="bare" if bare else "mean",
                                                  pass_bare_keys=bare)[site.param_name]
                total += delta.double()
                with torch.no_grad():  # W = W_0 + (ΔW_1 + ... + ΔW_i), one rounding (module docstring)
                    param.copy_(written.originals[site.param_name])
                    add_delta(param, total.to(delta_dtype(param.dtype)))
                values.append(value)
                stats["update_norm"].append(float(delta.double().norm()))
        except BaseException:
            written.rollback()
            raise
        if given is not None:
            stats = {"targets": "given", "update_norm": stats["update_norm"]}  # type: ignore[dict-item]
        return EditResult(model=model, method=hp.method, deltas={site.param_name: total.to(delta_dtype(param.dtype))},
                          targets={_SITE: torch.cat(values)}, facts=list(requests.facts), hparams=hp.to_dict(),
                          model_hash=model_hash, prefixes=state.prefixes, stats=stats,
                          _originals=dict(written.originals))


ROME = ROMEEditor()
"""The ROME / r-ROME editor (stateless; :meth:`~pmet_lens.editing.hparams.ROMEHyperParams.editor`)."""
