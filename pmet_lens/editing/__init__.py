"""Model editors on TransformerLens hooks: ``edit(model, facts, method="pmet")``.

Methods (:data:`~pmet_lens.editing.hparams.METHODS`): ``pmet``, ``memit``, ``alphaedit``, ``emmet``
(the target-and-solve pipeline), ``rome`` and ``r-rome`` (the same pieces, one fact after another,
with a rank-one solve), ``ft-w`` and ``ft-l`` (fine-tuning), ``mend`` (a trained editor network on the
fine-tuning gradient, :mod:`.mend`; its training: :mod:`.mend_training`). Each method's hyper-parameter class
names its :class:`~pmet_lens.editing.editor.Editor`, which :func:`edit` and
:class:`~pmet_lens.editing.session.EditSession` call.

The pipeline: validate and tokenise the requests once (:mod:`.validate`, :mod:`.prepared`) with
context prefixes sampled from the model (:mod:`.context`), optimise the targets of all facts in
batches (:mod:`.targets`, PMET eq. 9 / MEMIT eq. 16), then for each critical layer read the keys
(:mod:`.keys`), spread the residual and solve (:mod:`.update`, PMET eqs. 10-11 / MEMIT eqs. 14-15;
:mod:`.solvers`) with covariance statistics from a :class:`CovarianceStore`, writing to the
:class:`~pmet_lens.editing.site.EditSite` of each weight. The result is an :class:`EditResult` value.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.models import require_model
from pmet_lens.editing.context import context_prefixes
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.editor import Editor, EditorState, refuse_workers
from pmet_lens.editing.engine import projected_site_solve
from pmet_lens.editing.hparams import (
    METHODS,
    AlphaEditHyperParams,
    EditHyperParams,
    EMMETHyperParams,
    FTHyperParams,
    FTLHyperParams,
    MEMITHyperParams,
    MENDHyperParams,
    MethodHyperParams,
    PMETHyperParams,
    ROMEHyperParams,
    RROMEHyperParams,
    preset,
)
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.keys import request_keys
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.prepared import PreparedRequests, prepare_requests
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.site import EditSite
from pmet_lens.editing.targets import require_compiler
from pmet_lens.editing.update import Solve
from pmet_lens.editing.validate import EditError, validate_requests
from pmet_lens.parallel import one_pool

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS", "AlphaEditHyperParams", "CovarianceStore", "EMMETHyperParams", "EditError", "EditHyperParams", "EditResult",
    "EditSite", "Editor", "EditorState", "FTHyperParams", "FTLHyperParams", "MEMITHyperParams", "MENDHyperParams", "MethodHyperParams",
    "PMETHyperParams", "PreparedRequests", "ROMEHyperParams", "RROMEHyperParams", "SolveOptions", "context_prefixes", "edit",
    "prepare_requests", "preset", "request_keys",
]


@one_pool
def edit(
    model: HookedTransformer,
    facts: Sequence[Any],
    method: str | None = None,
    hparams: MethodHyperParams | None = None,
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
    """Edit ``facts`` into ``model`` with PMET (default) or another method of
    :data:`~pmet_lens.editing.hparams.METHODS`, through the method's :class:`~pmet_lens.editing.editor.Editor`.

    Args:
        model: any TransformerLens model (sequential or parallel blocks), on any device.
        facts: CounterFact records (dicts with ``requested_rewrite``), :class:`~pmet_lens.data.records.Fact`s
            or dicts with ``subject``, ``prompt`` (with ``{}``) and ``target_new``.
        method: "pmet", "memit", "alphaedit", "emmet", "rome", "r-rome", "ft-w" or "ft-l"; with
            ``hparams`` it must name their method (``hparams.method``); neither given: "pmet". ROME and
            r-ROME edit the facts one after another (each on the model the previous one left);
            the others edit them all at once.
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
        targets: precomputed target vectors (site -> [facts, d_model]; not for ft-w / ft-l), e.g. ``earlier.targets``
            of an edit of the same facts with equal ``hparams.target_settings()`` (the optimisation
            settings: the method whose optimisation runs, which is MEMIT's for AlphaEdit and EMMET,
            layer L, steps, lr, loss weights, prefixes), or row slices of it. The
            targets (PMET eq. 9, MEMIT eq. 16) do not depend on the fields in
            ``hparams.update_only_fields`` (λ, C's corpus settings, the residual spread, which
            weights are updated), so λ sweeps and the spread / W_O ablations can skip the optimisation.
        compile: run the target optimisation's blocks after L through ``torch.compile`` (not for
            ft-w / ft-l; needs a C++
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
    elif not isinstance(hparams, MethodHyperParams):
        raise TypeError(f"hparams must be the hyper-parameters of a method ({', '.join(c.__name__ for c in METHODS.values())}), "
                        f"got {type(hparams).__name__}")
    elif method is not None and method.lower() != hparams.method:
        raise ValueError(f"method={method!r} contradicts hparams={type(hparams).__name__} (method "
                         f"{hparams.method!r}): pass one of them, or hyper-parameters of that method")
    facts = validate_requests(model, facts, hparams)
    editor = hparams.editor()
    if (targets is not None or compile) and not editor.optimises_targets:
        raise ValueError(f"{hparams.method} optimises no target vectors: targets= and compile= do not apply to it")
    if compile:
        require_compiler(model)  # before the covariance and the optimisation, not after them
    model_hash, layer_hashes = weights_hashes(model, hparams.layers)  # one pass over the weights
    if not editor.shards_facts:
        refuse_workers(hparams.method, workers, checkpoint)  # before any work
    state = editor.prepare(model, hparams, cov_store=cov_store, progress=progress, layer_hashes=layer_hashes,
                           workers=workers)
    result = editor.run_batch(model, facts, hparams, state,
                              solve=_nullspace_solve(hparams, state, nullspace_store, solve_options),
                              progress=progress, targets=targets, compile=compile, model_hash=model_hash,
                              solve_options=solve_options, workers=workers, checkpoint=checkpoint)
    if not apply:
        result.restore()
    return result


def _nullspace_solve(hparams: MethodHyperParams, state: EditorState, nullspace_store: Any,
                     options: SolveOptions | None = None) -> Solve | None:
    """With ``nullspace``, AlphaEdit's projected solve (AlphaEdit eq. 12) with P from C of the model as
    it is (no earlier batches); otherwise ``None``, the method's own solve."""
    from pmet_lens.editing.nullspace import NullspaceStore

    if not (isinstance(hparams, EditHyperParams) and hparams.nullspace):
        return None
    ns = nullspace_store if nullspace_store is not None else NullspaceStore()
    projections = {hook: ns.get(state.cov_keys[hook], cov, hparams.nullspace_threshold) for hook, cov in state.covs.items()}
    return partial(projected_site_solve, projections=projections, l2=hparams.l2, options=options)
