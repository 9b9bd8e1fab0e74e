"""Training MEND's editor network (MEND Alg. 1), offline, with the base model frozen.

Each step draws ``batch_size`` training edits (x_e, y_e), applies them as one batched MEND edit
(:mod:`pmet_lens.editing.mend`: ΔW_ℓ = −α_ℓ Σ_t ũ_tᵀ δ̃_t summed over the batch's facts), and trains
g and α on

    L = c_e · L_e + c_loc · L_loc        (MEND §3.3, Alg. 1)

with L_e the NLL of the new object y_e after the edit on the equivalence prompts x_e' (the edit prompt
and its paraphrases; averaged per edit) and L_loc = KL(p_θ(·|x_loc) ‖ p_θ̃(·|x_loc)) on unrelated
inputs x_loc, averaged over their token positions. What the frozen model computes never changes, so
it is computed once per training edit before the first step (:func:`prepare_edits`): the gradient
factors (u_t, δ_t) of each edit and the residual stream entering the first edited block for its x_e'
and x_loc rows. A step then runs only the edited blocks and the read-out, with the edit added as
forward hooks (k ΔW = −α (k ũᵀ) δ̃ at each edited FFN output), and back-propagates into g and α.

The normalisation statistics of g (MEND §3.2) are the per-dimension mean and standard deviation of u
and δ over every token row of the training edits, fixed before the first step. Validation runs every
``val_every`` steps on held-out edits (batched like training); the network kept is the one with the
lowest validation loss (MEND's early-stopping rule; the untrained network, validated at step 0, is
one of the candidates). A checkpoint (network, both Adam states, the
curve, the best network) is written atomically every ``checkpoint_every`` steps; a resumed run equals
an uninterrupted one bit for bit (the batches and locality prompts of a step depend only on the seed
and the step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.core.paths import atomic_path
from pmet_lens.core.readout import final_logits
from pmet_lens.core.tokens import encode, pad
from pmet_lens.data import DataError, Fact, ZsreRecord
from pmet_lens.editing.identity import weights_hash
from pmet_lens.editing.mend import MENDNetwork, TeacherForcedRows, default_edit_layers, gradient_factors, model_dims
from pmet_lens.editing.prepared import prepare_requests

logger = logging.getLogger(__name__)

__all__ = [
    "MENDExample",
    "MENDTrainingParams",
    "PreparedEdits",
    "TrainedMEND",
    "counterfact_examples",
    "evaluate_network",
    "prepare_edits",
    "train_mend",
    "zsre_examples",
]

_CHECKPOINT_FORMAT = "pmet-lens-mend-checkpoint/1"


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class MENDExample:
    """One training edit.

    Attributes:
        fact: the edit (x_e = ``fact.text``, y_e = ``fact.target_new``).
        equivalent: x_e', full prompts whose continuation must become y_e after the edit (the edit
            prompt first, then its paraphrases).
        locality: x_loc, full texts whose next-token distributions must not change.
    """

    fact: Fact
    equivalent: tuple[str, ...]
    locality: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.fact.target_new is None:
            raise DataError(f"{self.fact.where}: a MEND training edit needs a target_new")
        if not self.equivalent or not self.locality:
            raise DataError(f"{self.fact.where}: a MEND training edit needs at least one equivalence prompt and "
                            "one locality text")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the data fingerprint of a training run)."""
        return {"fact": self.fact.to_counterfact(), "equivalent": list(self.equivalent), "locality": list(self.locality)}


def zsre_examples(records: Sequence[ZsreRecord]) -> list[MENDExample]:
    """zsRE training edits as MEND trains on them: x_e = the question ``src``, y_e = the record's new
    answer; x_e' = ``src`` and its ``rephrase``; x_loc = the record's Natural Questions prompt ``loc``
    followed by its answer ``loc_ans``."""
    out = []
    for r in records:
        fact = r.to_fact()
        out.append(MENDExample(fact=fact, equivalent=(fact.text, r.rephrase), locality=(f"{r.loc} {r.loc_ans}",)))
    return out


def counterfact_examples(facts: Sequence[Fact]) -> list[MENDExample]:
    """CounterFact training edits: x_e = p(s), y_e = o*; x_e' = p(s) and its paraphrase prompts; x_loc =
    its neighbourhood prompts (other subjects with the same relation and true object, which must keep it)."""
    out = []
    for f in facts:
        if not f.neighborhood_prompts:
            raise DataError(f"{f.where}: a CounterFact training edit needs neighborhood_prompts (its x_loc)")
        out.append(MENDExample(fact=f, equivalent=(f.text, *f.paraphrase_prompts), locality=tuple(f.neighborhood_prompts)))
    return out


# ----------------------------------------------------------------------------- hyper-parameters
@dataclass(frozen=True)
class MENDTrainingParams:
    """How MEND's network is built and trained (MEND Alg. 1, Appendix C; MEND's defaults in brackets).

    Attributes:
        layers: the edited blocks ℓ (their W_out); ``None``: the last 3 [the last 3 MLP layers].
        rank: r, the rank of U V in each layer of g [1920; lower here so that a network is a few MB].
        n_hidden: hidden layers of g [1].
        alpha_init: the initial step α_ℓ [``edit_lr`` 1e-4].
        lr: Adam learning rate of g's parameters [1e-6].
        lr_alpha: Adam learning rate of the steps α_ℓ [``lr_lr`` 1e-4].
        c_edit: c_e, the weight of the edit loss L_e [0.1].
        c_loc: the weight of the locality loss L_loc [1].
        batch_size: edits per step, applied together as one batched edit [10].
        steps: training steps.
        grad_clip: the largest gradient norm of g and α per step [100].
        loc_per_edit: at most this many of an edit's locality texts per step (drawn per step).
        val_every: steps between validations (and at the last step).
        checkpoint_every: steps between checkpoints (and at the last step).
        seed: seeds V's start, the order of the edits and the locality draws.
    """

    layers: tuple[int, ...] | None = None
    rank: int = 64
    n_hidden: int = 1
    alpha_init: float = 3e-4
    lr: float = 1e-5
    lr_alpha: float = 1e-4
    c_edit: float = 0.1
    c_loc: float = 1.0
    batch_size: int = 8
    steps: int = 1200
    grad_clip: float = 100.0
    loc_per_edit: int = 2
    val_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(not isinstance(l, int) or isinstance(l, bool) or l < 0 for l in layers) \
                    or list(layers) != sorted(set(layers)):
                raise ValueError(f"layers must be ascending non-negative ints without repeats, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)
        for name in ("rank", "batch_size", "steps", "loc_per_edit", "val_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("n_hidden", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("lr", "lr_alpha", "grad_clip", "alpha_init"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("c_edit", "c_loc"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.c_edit == 0 and self.c_loc == 0:
            raise ValueError("c_edit and c_loc are both 0: the training loss would be 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        if out["layers"] is not None:
            out["layers"] = list(out["layers"])
        return out

    def with_(self, **changes: Any) -> "MENDTrainingParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def resolved_layers(self, model: HookedTransformer) -> tuple[int, ...]:
        """The edited layers for ``model`` (``layers`` or its last 3 blocks), checked against it."""
        arch = architecture(model)
        layers = self.layers if self.layers is not None else default_edit_layers(model.cfg.n_layers)
        return tuple(arch.check_layer(l) for l in layers)


# ----------------------------------------------------------------------------- what the frozen model computes
@dataclass(frozen=True)
class _Row:
    """One x_e' or x_loc row: the residual stream entering the first edited block ``[len, d_model]`` and,
    for x_e' rows, the positions and tokens of y_e (empty for x_loc rows)."""

    resid: torch.Tensor
    pos: torch.Tensor
    token: torch.Tensor


@dataclass(frozen=True)
class PreparedEdits:
    """The frozen model's quantities for a list of training edits (:func:`prepare_edits`).

    Attributes:
        layers: the edited blocks; ``start`` = ``layers[0]``.
        u, delta: layer -> per edit ``[tokens, d_mlp]`` keys and ``[tokens, d_model]`` output gradients of
            its edit prompt x_e ⊕ y_e (the factors of ∇_{W_out} of its NLL).
        equivalent: per edit, its x_e' rows (the edit prompt first).
        locality: per edit, its x_loc rows.
        fingerprint: a hash of the model's weights, the layers and the edits.
    """

    layers: tuple[int, ...]
    u: dict[int, list[torch.Tensor]]
    delta: dict[int, list[torch.Tensor]]
    equivalent: list[list[_Row]]
    locality: list[list[_Row]]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.equivalent)

    @property
    def start(self) -> int:
        return self.layers[0]


def _fingerprint(model_hash: str, layers: Sequence[int], examples: Sequence[MENDExample]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"model": model_hash, "layers": list(layers),
                         "examples": [e.to_dict() for e in examples]}, sort_keys=True).encode())
    return h.hexdigest()


def prepare_edits(model: HookedTransformer, examples: Sequence[MENDExample], layers: Sequence[int], *,
                  chunk: int = 8, progress: bool = False, model_hash: str | None = None) -> PreparedEdits:
    """Compute, ``chunk`` edits at a time (always the same chunks, so a rerun gives the same values),
    every edit's gradient factors (:func:`~pmet_lens.editing.mend.gradient_factors`) and the residual
    stream entering ``layers[0]`` of its x_e' and x_loc rows.

    Raises:
        pmet_lens.DataError: an edit that cannot be tokenised (naming it).
    """
    layers = tuple(layers)
    start = layers[0]
    u: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    delta: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    equivalent: list[list[_Row]] = []
    locality: list[list[_Row]] = []
    bar = tqdm(range(0, len(examples), chunk), desc="MEND: frozen model's factors", disable=not progress)
    for c in bar:
        part = list(examples[c:c + chunk])
        requests = prepare_requests(model, [e.fact for e in part], ())
        rows = TeacherForcedRows.build(model, [(p[0], t) for p, t in zip(requests.prompt_ids, requests.target_ids)])
        factors, _ = gradient_factors(model, rows, layers)
        counts = rows.lengths.tolist()
        for l in layers:
            u[l] += [t.clone() for t in factors[l][0].split(counts)]  # [tokens, d] -> per edit [len, d]
            delta[l] += [t.clone() for t in factors[l][1].split(counts)]
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, e in enumerate(part):
            target = requests.target_ids[i]
            for text in e.equivalent:
                try:
                    pairs.append((encode(model, text), list(target)))
                except ValueError as exc:
                    raise DataError(f"{e.fact.where}: equivalence prompt {text!r}: {exc}") from None
                owner.append(i)
        eq_rows = TeacherForcedRows.build(model, pairs)
        loc_ids = [[encode(model, text) for text in e.locality] for e in part]
        loc_batch = pad(model, [ids for group in loc_ids for ids in group])
        with torch.no_grad():
            eq_resid = model(eq_rows.tokens, stop_at_layer=start)  # [rows, pos, d_model]
            loc_resid = model(loc_batch.tokens, stop_at_layer=start)
        per_edit: list[list[_Row]] = [[] for _ in part]
        for r in range(len(pairs)):
            sel = eq_rows.loss_row == r
            n = int(eq_rows.lengths[r])
            per_edit[owner[r]].append(_Row(eq_resid[r, :n].clone(), eq_rows.loss_pos[sel].clone(),
                                           eq_rows.loss_token[sel].clone()))
        equivalent += per_edit
        r = 0
        for group in loc_ids:
            mine = []
            for ids in group:
                mine.append(_Row(loc_resid[r, :len(ids)].clone(), torch.empty(0, dtype=torch.long),
                                 torch.empty(0, dtype=torch.long)))
                r += 1
            locality.append(mine)
    if model_hash is None:
        model_hash = weights_hash(model)
    return PreparedEdits(layers=layers, u=u, delta=delta, equivalent=equivalent, locality=locality,
                         fingerprint=_fingerprint(model_hash, layers, examples))


def _normalisation(network: MENDNetwork, prepared: PreparedEdits) -> None:
    """Set g's normalisation to the per-dimension mean and (unbiased) standard deviation of u and δ over
    every token row of the prepared edits (MEND §3.2)."""
    for l in prepared.layers:
        u = torch.cat(prepared.u[l]).double()  # per edit [len, d] -> [tokens, d]
        d = torch.cat(prepared.delta[l]).double()
        if u.shape[0] < 2:
            raise ValueError("MEND's normalisation needs at least 2 token rows of training edits")
        network.set_normalisation(l, u.mean(0).float(), u.std(0).float(), d.mean(0).float(), d.std(0).float())


# ----------------------------------------------------------------------------- one batched edit
def _pad_rows(rows: Sequence[_Row], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad row residuals with zeros: ``[rows, pos, d_model]`` and lengths ``[rows]`` (a zero pad
    vector is harmless: blocks are causal and the norms map 0 to 0)."""
    width = max(r.resid.shape[0] for r in rows)
    out = torch.zeros(len(rows), width, rows[0].resid.shape[1], dtype=rows[0].resid.dtype, device=device)
    for i, r in enumerate(rows):
        out[i, : r.resid.shape[0]] = r.resid
    return out, torch.tensor([r.resid.shape[0] for r in rows], device=device)


def _edit_hooks(model: HookedTransformer, network: MENDNetwork, prepared: PreparedEdits,
                edits: Sequence[int]) -> list[tuple[str | Callable, Callable]]:
    """The batched MEND edit of ``edits`` as forward hooks: at each edited block, k ΔW = −α (k ũᵀ) δ̃ added
    to the FFN output, with k the FFN key of the same (edited) forward pass."""
    arch = architecture(model)
    hooks: list[tuple[str | Callable, Callable]] = []
    for l in prepared.layers:
        u = torch.cat([prepared.u[l][i] for i in edits])  # [tokens, d_mlp]
        d = torch.cat([prepared.delta[l][i] for i in edits])  # [tokens, d_model]
        u_t, d_t = network.transform(l, u, d)
        alpha = network.alpha[network.mode(l)]
        store: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, hook: Any, _store: dict[str, torch.Tensor] = store) -> None:
            _store["k"] = act

        def add(act: torch.Tensor, hook: Any, _store: dict[str, torch.Tensor] = store, _u: torch.Tensor = u_t,
                _d: torch.Tensor = d_t, _a: torch.Tensor = alpha) -> torch.Tensor:
            k = _store.pop("k").float()  # [batch, pos, d_mlp]
            return act + (-_a * ((k @ _u.T) @ _d)).to(act.dtype)  # [b, pos, tokens] @ [tokens, d_model]

        hooks += [(arch.mlp_key_hook(l), keep), (arch.mlp_out_hook(l), add)]
    return hooks


def _batch_losses(model: HookedTransformer, network: MENDNetwork | None, prepared: PreparedEdits,
                  edits: Sequence[int], loc_choice: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Apply the batched edit of ``edits`` (none with ``network=None``) and return L_e, L_loc (tensors in
    the graph) and the figures: per x_e' token top-1 accuracy of the edit prompt and of the paraphrases,
    and the share of x_loc positions whose top-1 token is unchanged."""
    device = torch.device(str(model.cfg.device))
    eq_rows = [row for i in edits for row in prepared.equivalent[i]]
    eq_owner = torch.tensor([k for k, i in enumerate(edits) for _ in prepared.equivalent[i]], device=device)
    eq_first = torch.tensor([j == 0 for i in edits for j in range(len(prepared.equivalent[i]))], device=device)
    loc_rows = [prepared.locality[i][j] for i, choice in zip(edits, loc_choice) for j in choice]
    resid, lengths = _pad_rows(eq_rows + loc_rows, device)
    n_eq = len(eq_rows)
    n_layers = model.cfg.n_layers
    hooks = _edit_hooks(model, network, prepared, edits) if network is not None else []
    with model.hooks(fwd_hooks=hooks):
        final = model(resid, start_at_layer=prepared.start, stop_at_layer=n_layers)  # [rows, pos, d_model]
    # x_e' rows: NLL of y_e per token -> per row mean -> per edit mean -> batch mean
    row_ix = torch.cat([torch.full((len(r.pos),), k, dtype=torch.long) for k, r in enumerate(eq_rows)]).to(device)
    pos = torch.cat([r.pos for r in eq_rows]).to(device)
    tok = torch.cat([r.token for r in eq_rows]).to(device)
    logprobs = torch.log_softmax(final_logits(model, final[row_ix, pos]).float(), dim=-1)  # [targets, vocab]
    nll = -logprobs.gather(-1, tok[:, None])[:, 0]
    correct = (logprobs.argmax(-1) == tok).float()
    ones = torch.ones_like(nll)
    row_nll = torch.zeros(n_eq, device=device).index_add(0, row_ix, nll) / \
        torch.zeros(n_eq, device=device).index_add(0, row_ix, ones)
    row_acc = torch.zeros(n_eq, device=device).index_add(0, row_ix, correct) / \
        torch.zeros(n_eq, device=device).index_add(0, row_ix, ones)
    n_edits = len(edits)
    per_edit = torch.zeros(n_edits, device=device).index_add(0, eq_owner, row_nll) / \
        torch.zeros(n_edits, device=device).index_add(0, eq_owner, torch.ones_like(row_nll))
    out: dict[str, torch.Tensor] = {"edit_loss": per_edit.mean(),
                                    "efficacy": row_acc[eq_first].mean().detach()}
    para = ~eq_first
    out["paraphrase"] = row_acc[para].mean().detach() if bool(para.any()) else torch.tensor(float("nan"))
    # x_loc rows: KL(p_base || p_edited) at every real position
    loc_lengths = lengths[n_eq:]
    real = torch.arange(final.shape[1], device=device)[None, :] < loc_lengths[:, None]  # [loc rows, pos]
    edited = torch.log_softmax(final_logits(model, final[n_eq:][real]).float(), dim=-1)  # [positions, vocab]
    if network is None:
        base = edited.detach()
    else:
        with torch.no_grad():
            base_final = model(resid[n_eq:], start_at_layer=prepared.start, stop_at_layer=n_layers)
            base = torch.log_softmax(final_logits(model, base_final[real]).float(), dim=-1)
    kl = (base.exp() * (base - edited)).sum(-1)  # [positions]
    out["loc_loss"] = kl.mean()
    out["loc_agree"] = (base.argmax(-1) == edited.argmax(-1)).float().mean().detach()
    return out


# ----------------------------------------------------------------------------- schedule
def _batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The edits of step ``step``: epoch e = step // (n // batch_size) is a seeded permutation of the
    edits cut into whole batches (the last partial batch of an epoch is skipped), so a step's batch
    depends only on the seed and the step."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def _loc_choice(prepared: PreparedEdits, edits: Sequence[int], per_edit: int, seed: int, step: int) -> list[list[int]]:
    """Which x_loc texts of each edit step ``step`` uses: all of them when there are at most ``per_edit``,
    else a draw seeded by the seed and the step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * step + 1)
    out = []
    for i in edits:
        n = len(prepared.locality[i])
        out.append(list(range(n)) if n <= per_edit else sorted(torch.randperm(n, generator=g)[:per_edit].tolist()))
    return out


def evaluate_network(model: HookedTransformer, network: MENDNetwork | None, prepared: PreparedEdits,
                     edits_per_batch: int, loc_per_edit: int = 2) -> dict[str, float]:
    """Mean L_e, L_loc and figures over every prepared edit, applied ``edits_per_batch`` at a time in
    order (each batch one batched edit; ``network=None``: the unedited model). The first
    ``loc_per_edit`` x_loc texts of each edit are used."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for s in range(0, len(prepared), edits_per_batch):
            edits = list(range(s, min(s + edits_per_batch, len(prepared))))
            choice = [list(range(min(loc_per_edit, len(prepared.locality[i])))) for i in edits]
            out = _batch_losses(model, network, prepared, edits, choice)
            for k, v in out.items():
                value = float(v)
                if math.isfinite(value):
                    sums[k] = sums.get(k, 0.0) + value * len(edits)
                    counts[k] = counts.get(k, 0) + len(edits)
    return {k: sums[k] / counts[k] for k in sums}


# ----------------------------------------------------------------------------- training
@dataclass
class TrainedMEND:
    """The result of :func:`train_mend`.

    Attributes:
        network: the network with the lowest validation loss (MEND's early stopping; the untrained
            network of step 0 included), in eval mode.
        curve: one row per logged step: step, training losses (mean over the steps since the last row),
            validation figures at validation steps (step 0: the untrained network), α_ℓ, seconds of
            training so far.
        summary: the best step, its validation figures, the unedited model's, the settings, the time.
        last: the network's state after the last step (whatever its validation loss).
    """

    network: MENDNetwork
    curve: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    last: dict[str, torch.Tensor] = field(default_factory=dict)


def _training_params(network: MENDNetwork) -> list[torch.nn.Parameter]:
    return [p for n, p in network.named_parameters() if n != "alpha"]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_mend(model: HookedTransformer, train: Sequence[MENDExample], val: Sequence[MENDExample],
               params: MENDTrainingParams | None = None, *, checkpoint: str | Path | None = None, resume: bool = False,
               progress: bool = True, prepared: tuple[PreparedEdits, PreparedEdits] | None = None) -> TrainedMEND:
    """Train MEND's network for ``model`` on ``train`` edits, validating on ``val`` edits (MEND Alg. 1).

    Args:
        model: the model to edit; it is not changed (its parameters get no gradient).
        train: training edits (at least ``params.batch_size``).
        val: held-out edits for the validation curve and the choice of the network kept.
        params: settings (default :class:`MENDTrainingParams`).
        checkpoint: file for the resumable checkpoint (written every ``checkpoint_every`` steps).
        resume: continue from ``checkpoint`` (it must exist and match the settings and the data; ``steps``
            may be larger than the checkpoint's run).
        progress: tqdm bars.
        prepared: :func:`prepare_edits` of ``train`` and ``val`` when already computed.

    Raises:
        ValueError: too few training edits, a checkpoint that does not match, or ``resume`` without one.
        FloatingPointError: a non-finite loss or gradient.
    """
    params = params if params is not None else MENDTrainingParams()
    if len(train) < params.batch_size:
        raise ValueError(f"{len(train)} training edits are fewer than batch_size {params.batch_size}")
    if not val:
        raise ValueError("no validation edits: pass some held-out edits as val")
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume and (ckpt_path is None or not ckpt_path.is_file()):
        raise ValueError(f"resume=True but there is no checkpoint at {ckpt_path}")
    layers = params.resolved_layers(model)
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_state:
        p.requires_grad_(False)
    try:
        model_hash = weights_hash(model)
        if prepared is None:
            prep_train = prepare_edits(model, train, layers, progress=progress, model_hash=model_hash)
            prep_val = prepare_edits(model, val, layers, progress=progress, model_hash=model_hash)
        else:
            prep_train, prep_val = prepared
            if prep_train.fingerprint != _fingerprint(model_hash, layers, train) or \
                    prep_val.fingerprint != _fingerprint(model_hash, layers, val):
                raise ValueError("the prepared edits were computed for another model, other layers or other edits")
        return _train(model, prep_train, prep_val, params, layers, model_hash, ckpt_path, resume, progress)
    finally:
        for p, flag in grad_state:
            p.requires_grad_(flag)


def _train(model: HookedTransformer, prep_train: PreparedEdits, prep_val: PreparedEdits, params: MENDTrainingParams,
           layers: tuple[int, ...], model_hash: str, ckpt_path: Path | None, resume: bool, progress: bool) -> TrainedMEND:
    device = model.cfg.device
    network = MENDNetwork(*model_dims(model), layers, rank=params.rank, n_hidden=params.n_hidden,
                          alpha_init=params.alpha_init, seed=params.seed)
    _normalisation(network, prep_train)
    network.to(device)
    opt = torch.optim.Adam(_training_params(network), lr=params.lr)
    opt_alpha = torch.optim.Adam([network.alpha], lr=params.lr_alpha)
    data_key = {"train": prep_train.fingerprint, "val": prep_val.fingerprint}
    fixed = {k: v for k, v in params.to_dict().items() if k != "steps"}
    curve: list[dict[str, Any]] = []
    step, seconds = 0, 0.0
    baseline = evaluate_network(model, None, prep_val, params.batch_size, params.loc_per_edit)
    best: dict[str, Any] = {}
    if resume:
        assert ckpt_path is not None
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not a MEND training checkpoint")
        if state["data"] != data_key or state["params"] != fixed:
            raise ValueError(f"the checkpoint {ckpt_path} was made with other settings or other data "
                             f"(settings {state['params']}, now {fixed}); start afresh without resume")
        network.load_state_dict(state["network"])
        opt.load_state_dict(state["opt"])
        opt_alpha.load_state_dict(state["opt_alpha"])
        step, seconds, curve, best = int(state["step"]), float(state["seconds"]), list(state["curve"]), dict(state["best"])
        logger.info("resumed MEND training at step %d from %s", step, ckpt_path)

    def checkpoint_now() -> None:
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {"format": _CHECKPOINT_FORMAT, "params": fixed, "data": data_key,
                                         "network": network.state_dict(), "opt": opt.state_dict(),
                                         "opt_alpha": opt_alpha.state_dict(), "step": step, "seconds": seconds,
                                         "curve": curve, "best": best})

    def validate() -> dict[str, float]:
        network.eval()
        val = evaluate_network(model, network, prep_val, params.batch_size, params.loc_per_edit)
        network.train()
        val["loss"] = params.c_edit * val["edit_loss"] + params.c_loc * val["loc_loss"]
        return val

    if step == 0:  # the untrained network (g = the normalisation, α at its start): the curve's first row
        val0 = validate()
        curve.append({"step": 0, "seconds": 0.0, **{f"alpha_{l}": float(a) for l, a in zip(layers, network.alpha.detach())},
                      **{f"val_{k}": v for k, v in val0.items()}})
        best = {"step": 0, "val": val0, "network": {k: v.detach().clone() for k, v in network.state_dict().items()}}
    running: dict[str, float] = {}
    n_running = 0
    bar = tqdm(total=params.steps, initial=step, desc="MEND training", disable=not progress)
    network.train()
    while step < params.steps:
        t0 = time.perf_counter()
        edits = _batch(len(prep_train), params.batch_size, step, params.seed)
        choice = _loc_choice(prep_train, edits, params.loc_per_edit, params.seed, step)
        out = _batch_losses(model, network, prep_train, edits, choice)
        loss = params.c_edit * out["edit_loss"] + params.c_loc * out["loc_loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"MEND training loss is not finite at step {step}")
        opt.zero_grad(set_to_none=True)
        opt_alpha.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(network.parameters()), params.grad_clip)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"MEND training gradient is not finite at step {step}")
        opt.step()
        opt_alpha.step()
        step += 1
        seconds += time.perf_counter() - t0
        figures = {"loss": float(loss.detach()), "edit_loss": float(out["edit_loss"].detach()),
                   "loc_loss": float(out["loc_loss"].detach()),
                   "efficacy": float(out["efficacy"]), "paraphrase": float(out["paraphrase"]),
                   "loc_agree": float(out["loc_agree"]), "grad_norm": float(grad_norm)}
        for k, v in figures.items():
            running[k] = running.get(k, 0.0) + v
        n_running += 1
        bar.update(1)
        bar.set_postfix(loss=f"{figures['loss']:.3f}", edit=f"{figures['edit_loss']:.2f}", loc=f"{figures['loc_loss']:.4f}")
        validating = step % params.val_every == 0 or step == params.steps
        if validating or step % params.checkpoint_every == 0:
            row: dict[str, Any] = {"step": step, "seconds": seconds}
            row.update({f"train_{k}": v / n_running for k, v in running.items()})
            row.update({f"alpha_{l}": float(a) for l, a in zip(layers, network.alpha.detach())})
            running, n_running = {}, 0
            if validating:
                val = validate()
                row.update({f"val_{k}": v for k, v in val.items()})
                if not best or val["loss"] < best["val"]["loss"]:
                    best = {"step": step, "val": val,
                            "network": {k: v.detach().clone() for k, v in network.state_dict().items()}}
                logger.info("MEND step %d: val loss %.4f (edit %.3f, loc %.5f), efficacy %.3f", step, val["loss"],
                            val["edit_loss"], val["loc_loss"], val.get("efficacy", float("nan")))
            curve.append(row)
            checkpoint_now()
    bar.close()
    last = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.load_state_dict(best["network"])
    network.eval()
    summary = {"best_step": best["step"], "val_best": best["val"], "val_unedited": baseline,
               "steps": step, "train_seconds": seconds, "params": params.to_dict(), "layers": list(layers),
               "n_train": len(prep_train), "n_val": len(prep_val), "model_hash": model_hash}
    return TrainedMEND(network=network, curve=curve, summary=summary, last=last)

