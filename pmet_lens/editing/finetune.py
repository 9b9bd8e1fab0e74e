"""FT-W and FT-L (:class:`~pmet_lens.editing.hparams.FTHyperParams`, :class:`~pmet_lens.editing.hparams.FTLHyperParams`):
fine-tune the FFN output weight W_out of the given layers on the facts' target NLL (MEMIT Appendix
B.1; ROME's constrained fine-tuning), all facts together (a mass edit).

The change ΔW (float32, zero-initialised) is the only trained tensor; while training it acts as a
hook, k ΔW added at the weight's output with k read at its input in the same block (as
:meth:`EditResult.as_hooks`), so the model's weights are untouched until ΔW is written once at the
end (W += ΔW, the result's delta). The blocks below the lowest edited layer do not depend on ΔW: the
residual stream entering it is computed once. The loss per chunk of facts is the mean over its facts
of the mean token NLL of o* after the bare prompt p(s) (teacher-forced, read only at o*'s
positions); Adam's L2 weight decay acts on ΔW (the gradient gets wd·ΔW); FT-L clamps ΔW to [−ε, ε]
after each step. One step is an epoch over the facts in chunks of ``batch_size`` (an Adam step per
chunk whose loss is ≥ ``loss_stop``), and training stops once an epoch's mean loss is below
``loss_stop`` (the official ``baselines/ft`` loop).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import FFN_OUT_WEIGHT, architecture
from pmet_lens.core.readout import final_logits
from pmet_lens.data import Fact
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.editor import EditorState, WrittenWeights, refuse_workers
from pmet_lens.editing.hparams import FTHyperParams, MethodHyperParams
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.prepared import PreparedRequests, prepare_requests
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.site import EditSite, edit_site
from pmet_lens.editing.update import Solve
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["FINETUNE", "FineTuneEditor", "FineTuneRun", "fine_tune"]


def _ft(hparams: MethodHyperParams) -> FTHyperParams:
    if not isinstance(hparams, FTHyperParams):
        raise TypeError(f"the fine-tuning editor takes FTHyperParams, got {type(hparams).__name__}")
    return hparams


class FineTuneRun:
    """The teacher-forced rows of prepared requests (bare prompt ⊕ o*[:-1]) with the residual stream
    entering block ``start`` computed once, and where each target token's log-probability is read.

    Attributes:
        tokens: ``[facts, pos]`` token rows (right-padded; row i = fact i).
        resid: ``[facts, pos, d_model]`` residual stream entering block ``start``.
        row, pos, tok: ``[n_targets]`` row, predicting position and id of every target token.
        weight: ``[n_targets]`` 1/|o*_i| of its fact (the per-fact mean over tokens).
    """

    def __init__(self, model: HookedTransformer, requests: PreparedRequests, start: int) -> None:
        rows = requests.rows(model, append_target=True)
        self.start = start
        self.tokens = rows.tokens
        with torch.no_grad():
            self.resid = model(rows.tokens, stop_at_layer=start)  # [facts, pos, d_model]
        spots = [(i, len(requests.prompt_ids[i][0]) - 1 + k, t, 1.0 / len(requests.target_ids[i]))
                 for i in range(len(requests)) for k, t in enumerate(requests.target_ids[i])]
        dev = rows.tokens.device
        cols = list(zip(*spots))
        self.row = torch.tensor(cols[0], device=dev)
        self.pos = torch.tensor(cols[1], device=dev)
        self.tok = torch.tensor(cols[2], device=dev)
        self.weight = torch.tensor(cols[3], device=dev, dtype=torch.float32)

    def loss(self, model: HookedTransformer, facts: torch.Tensor, hooks: list) -> torch.Tensor:
        """Mean over ``facts`` (indices) of each fact's mean token NLL of o*, with ``hooks`` active."""
        n_layers = model.cfg.n_layers
        pick = torch.isin(self.row, facts)
        local = torch.full((self.tokens.shape[0],), -1, dtype=torch.long, device=facts.device)
        local[facts] = torch.arange(len(facts), device=facts.device)
        with model.hooks(fwd_hooks=hooks):
            out = model(self.resid[facts], start_at_layer=self.start, stop_at_layer=n_layers)  # [chunk, pos, d_model]
        at = out[local[self.row[pick]], self.pos[pick]]                                      # [n_targets, d_model]
        lp = torch.log_softmax(final_logits(model, at).float(), dim=-1)
        tok_lp = lp.gather(1, self.tok[pick][:, None])[:, 0]  # [n_targets, vocab] -> [n_targets]
        per_fact = torch.zeros(len(facts), device=lp.device).index_add(0, local[self.row[pick]],
                                                                      -tok_lp * self.weight[pick])
        return per_fact.mean()


def _delta_hooks(sites: Sequence[EditSite], deltas: dict[str, torch.Tensor]) -> list:
    """Hooks adding k ΔW at each site's output, with k read at its input in the same block."""
    hooks: list = []
    for site in sites:
        store: dict[str, torch.Tensor] = {}

        def keep(act, hook, _store=store):
            _store["k"] = act

        def add(act, hook, _store=store, _d=deltas[site.param_name]):
            k = _store.pop("k")
            return act + (k @ _d.to(k.dtype)).to(act.dtype)  # [batch, pos, d_mlp] @ [d_mlp, d_model]

        hooks += [(site.key_hook, keep), (site.out_hook, add)]
    return hooks


def fine_tune(model: HookedTransformer, requests: PreparedRequests, hparams: FTHyperParams,
              progress: bool = False) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train ΔW of every edited weight on the requests (see the module docstring); the weights are
    not changed.

    Returns:
        ``({param name: ΔW float32}, [mean loss of each epoch])``.

    Raises:
        EditError: a loss becomes NaN/inf.
    """
    arch = architecture(model)
    sites = [edit_site(arch, FFN_OUT_WEIGHT, l) for l in hparams.layers]
    run = FineTuneRun(model, requests, min(hparams.layers))
    deltas = {s.param_name: torch.zeros(s.param(model).shape, dtype=torch.float32, device=run.resid.device,
                                        requires_grad=True) for s in sites}
    opt = torch.optim.Adam(list(deltas.values()), lr=hparams.lr, weight_decay=hparams.weight_decay)
    hooks = _delta_hooks(sites, deltas)
    n = len(requests)
    chunks = [torch.arange(s, min(s + hparams.batch_size, n), device=run.resid.device)
              for s in range(0, n, hparams.batch_size)]
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    curve: list[float] = []
    try:
        for p, _ in grad_state:
            p.requires_grad_(False)
        for step in tqdm(range(hparams.steps), desc=hparams.method, disable=not progress):
            total = 0.0
            for idx in chunks:
                opt.zero_grad()
                with torch.enable_grad():
                    loss = run.loss(model, idx, hooks)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise EditError(f"{hparams.method}: the loss became NaN/inf at step {step}")
                total += value * len(idx)
                if value >= hparams.loss_stop:
                    with torch.enable_grad():
                        loss.backward()
                    opt.step()
                if hparams.norm_constraint is not None:
                    eps = hparams.norm_constraint
                    with torch.no_grad():
                        for d in deltas.values():
                            d.clamp_(-eps, eps)
            curve.append(total / n)
            if curve[-1] < hparams.loss_stop:
                break
    finally:
        for p, state in grad_state:
            p.requires_grad_(state)
    return {k: d.detach() for k, d in deltas.items()}, curve


class FineTuneEditor:
    """The :class:`~pmet_lens.editing.editor.Editor` of FT-W and FT-L (see the module docstring)."""

    optimises_targets = False
    shards_facts = False

    def sites(self, model: HookedTransformer, hparams: MethodHyperParams) -> list[EditSite]:
        arch = architecture(model)
        return [edit_site(arch, FFN_OUT_WEIGHT, l) for l in _ft(hparams).layers]

    def prepare(self, model: HookedTransformer, hparams: MethodHyperParams, *, cov_store: CovarianceStore | None = None,
                progress: bool = False, layer_hashes: dict[int, str] | None = None,
                workers: Any = None) -> EditorState:
        """Nothing: fine-tuning needs no prefixes and no covariance."""
        _ft(hparams)
        return EditorState()

    def run_batch(self, model: HookedTransformer, facts: Sequence[Fact], hparams: MethodHyperParams,
                  state: EditorState, *, solve: Solve | None = None, progress: bool = False,
                  targets: dict[str, torch.Tensor] | None = None, compile: bool = False,
                  model_hash: str | None = None, solve_options: SolveOptions | None = None, workers: Any = None,
                  checkpoint: Any = None) -> EditResult:
        refuse_workers(hparams.method, workers, checkpoint)
        hp = _ft(hparams)
        if solve is not None or targets is not None or compile:
            raise ValueError(f"{hp.method} fine-tunes the weight directly: it takes no solve, targets or compile")
        if model_hash is None:
            model_hash, _ = weights_hashes(model, [])
        requests = prepare_requests(model, facts, ())
        trained, curve = fine_tune(model, requests, hp, progress=progress)
        written = WrittenWeights(model)
        deltas: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for site in self.sites(model, hp):
                    written.keep(site)
                    param = site.param(model)
                    deltas[site.param_name] = trained[site.param_name].to(param.dtype)
                    param.add_(deltas[site.param_name])
        except BaseException:
            written.rollback()
            raise
        logger.info("%s: %d facts, %d epochs, final loss %.4f", hp.method, len(facts), len(curve), curve[-1])
        return EditResult(model=model, method=hp.method, deltas=deltas, targets={}, facts=list(requests.facts),
                          hparams=hp.to_dict(), model_hash=model_hash, stats={"loss": curve},
                          _originals=dict(written.originals))


FINETUNE = FineTuneEditor()
"""The FT-W / FT-L editor (stateless; :meth:`~pmet_lens.editing.hparams.FTHyperParams.editor`)."""
