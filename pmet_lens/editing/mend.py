"""MEND (Mitchell et al. 2022, arXiv 2110.11309): a learned editor that turns the fine-tuning gradient
of the last MLP layers into an edit.

The gradient decomposition (MEND §3.1). For the FFN output weight of block ℓ in TransformerLens
orientation, m = u W_out + b (``W_out`` [d_mlp, d_model], u the FFN key at ``mlp.hook_post``, m the
FFN output at ``hook_mlp_out``), the fine-tuning gradient of a loss L is a sum of rank-one terms over
the token rows t of the edit input:

    ∇_{W_out} L = Σ_t u_tᵀ δ_t,    δ_t = ∂L/∂m_t.

The editor network (MEND §3.2). Per edited layer ℓ a map g_ℓ: (u_t, δ_t) -> (ũ_t, δ̃_t): both factors
are normalised to zero mean and unit variance per dimension (statistics of the training edits), then
their concatenation z goes through a residual MLP of low-rank layers
``h = z + σ(s_ℓ ⊙ (U V z + b) + o_ℓ)`` (σ a ReLU on the hidden layers and the identity on the last),
whose U, V, b are shared by the edited layers and whose scale s_ℓ and shift o_ℓ are the layer's own
(MEND's ``shared`` and ``combine`` variant). U starts at zero, so an untrained g is the normalisation
alone. The edit of layer ℓ is

    ΔW_ℓ = −α_ℓ Σ_t ũ_tᵀ δ̃_t        (MEND Alg. 2)

with a learned step α_ℓ. Several facts in one edit sum their updates (MEND's batched edits): the loss
is the sum over facts of each fact's mean NLL of its new object, so each fact's rows carry its own
gradient and ΔW is the sum of the facts' single updates.

Training g and α (MEND Alg. 1) is :mod:`pmet_lens.editing.mend_training`; a trained network is a
safetensors file (:func:`save_network`), looked up by name for a model first in the user's cache and
then among the networks shipped with the package (:func:`find_network`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import FFN_OUT_WEIGHT, architecture, block_index
from pmet_lens.core.paths import atomic_path
from pmet_lens.core.readout import final_logits
from pmet_lens.core.tokens import pad
from pmet_lens.data import Fact
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.editor import EditorState, WrittenWeights, refuse_workers
from pmet_lens.editing.hparams import MENDHyperParams, MethodHyperParams
from pmet_lens.editing.identity import weights_hashes
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.result import EditResult
from pmet_lens.editing.site import EditSite, edit_site
from pmet_lens.editing.update import Solve
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = [
    "MEND",
    "MENDEditor",
    "MENDHyperParams",
    "MENDNetwork",
    "NETWORK_FORMAT",
    "TeacherForcedRows",
    "default_edit_layers",
    "find_network",
    "gradient_factors",
    "load_network",
    "mend_deltas",
    "model_dims",
    "network_for",
    "network_for_name",
    "save_network",
    "shipped_network_dir",
    "training_command",
    "user_network_dir",
]

NETWORK_FORMAT = "pmet-lens-mend/1"
"""The ``format`` entry in the metadata of a trained network file."""

_STD_EPS = 1e-7
"""Added to the standard deviations of the normalisation (MEND's value)."""


def model_dims(model: HookedTransformer) -> tuple[int, int]:
    """``(d_mlp, d_model)`` of ``model``: the widths of the FFN key u and of the output gradient δ."""
    architecture(model)  # rejects attention-only models
    return int(model.cfg.d_mlp or 0), int(model.cfg.d_model)


def default_edit_layers(n_layers: int, count: int = 3) -> tuple[int, ...]:
    """The last ``count`` blocks, whose FFN output weights MEND edits (MEND §5: the last 3 MLP layers)."""
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= n_layers:
        raise ValueError(f"the number of edited layers must be an int in [1, {n_layers}], got {count!r}")
    return tuple(range(n_layers - count, n_layers))


# ----------------------------------------------------------------------------- the network
class _LowRankResidual(nn.Module):
    """One layer of g: ``z + σ(s_ℓ ⊙ (U V z + b) + o_ℓ)`` with U [dim, r] (zero at start, so the layer is
    the identity), V [r, dim], b [dim] shared by the edited layers, and per-layer scale s_ℓ and shift o_ℓ."""

    def __init__(self, dim: int, rank: int, n_modes: int, hidden: bool, generator: torch.Generator | None) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim, generator=generator))
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.hidden = hidden

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.V.T) @ self.U.T + self.b  # [rows, dim] -> [rows, r] -> [rows, dim]
        pre = pre * self.scale[mode] + self.shift[mode]
        return z + (pre.clamp(min=0) if self.hidden else pre)


class MENDNetwork(nn.Module):
    """MEND's editor for the FFN output weights of ``layers`` (MEND §3.2): the normalisation statistics,
    the low-rank residual MLP g and the per-layer steps α_ℓ.

    Args:
        d_key: width of the FFN key u (``d_mlp``).
        d_model: width of the FFN output gradient δ.
        layers: the edited blocks ℓ, ascending; layer ``layers[i]`` is g's mode ``i``.
        rank: r, the rank of U V in each layer of g.
        n_hidden: hidden layers of g (each with a ReLU); g has ``n_hidden + 1`` layers.
        alpha_init: the initial α_ℓ (MEND's ``edit_lr``).
        seed: seed of V's random start.
    """

    key_mean: torch.Tensor
    key_std: torch.Tensor
    grad_mean: torch.Tensor
    grad_std: torch.Tensor

    def __init__(self, d_key: int, d_model: int, layers: Sequence[int], rank: int = 64, n_hidden: int = 1,
                 alpha_init: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        layers = tuple(int(l) for l in layers)
        if not layers or list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be ascending without repeats (at least one), got {layers!r}")
        for name, value in (("d_key", d_key), ("d_model", d_model), ("rank", rank)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(n_hidden, int) or n_hidden < 0:
            raise ValueError(f"n_hidden must be an int >= 0, got {n_hidden!r}")
        if not (isinstance(alpha_init, (int, float)) and math.isfinite(alpha_init)):
            raise ValueError(f"alpha_init must be a finite number, got {alpha_init!r}")
        self.d_key, self.d_model, self.layers = d_key, d_model, layers
        self.rank, self.n_hidden = rank, n_hidden
        generator = torch.Generator().manual_seed(seed)
        dim = d_key + d_model
        self.blocks = nn.ModuleList(
            [_LowRankResidual(dim, rank, len(layers), i < n_hidden, generator) for i in range(n_hidden + 1)])
        self.alpha = nn.Parameter(torch.full((len(layers),), float(alpha_init)))
        self.register_buffer("key_mean", torch.zeros(len(layers), d_key))
        self.register_buffer("key_std", torch.ones(len(layers), d_key))
        self.register_buffer("grad_mean", torch.zeros(len(layers), d_model))
        self.register_buffer("grad_std", torch.ones(len(layers), d_model))

    def config(self) -> dict[str, Any]:
        """The constructor's shape arguments (``alpha_init`` and ``seed`` aside), JSON-ready."""
        return {"d_key": self.d_key, "d_model": self.d_model, "layers": list(self.layers), "rank": self.rank,
                "n_hidden": self.n_hidden}

    def mode(self, layer: int) -> int:
        """g's mode index of block ``layer``."""
        if layer not in self.layers:
            raise ValueError(f"this MEND network edits layers {list(self.layers)}, not {layer}")
        return self.layers.index(layer)

    def set_normalisation(self, layer: int, key_mean: torch.Tensor, key_std: torch.Tensor, grad_mean: torch.Tensor,
                          grad_std: torch.Tensor) -> None:
        """Store the per-dimension mean and standard deviation of u and δ at ``layer`` (MEND §3.2)."""
        i = self.mode(layer)
        with torch.no_grad():
            self.key_mean[i] = key_mean
            self.key_std[i] = key_std
            self.grad_mean[i] = grad_mean
            self.grad_std[i] = grad_std

    def transform(self, layer: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ũ, δ̃) = g_ℓ(u, δ) for token rows ``u`` [rows, d_key] and ``delta`` [rows, d_model] (float32)."""
        i = self.mode(layer)
        u = (u.float() - self.key_mean[i]) / (self.key_std[i] + _STD_EPS)
        delta = (delta.float() - self.grad_mean[i]) / (self.grad_std[i] + _STD_EPS)
        z = torch.cat([u, delta], dim=-1)  # [rows, d_key] ⊕ [rows, d_model] -> [rows, d_key + d_model]
        for block in self.blocks:
            z = block(z, i)
        return z[:, : self.d_key], z[:, self.d_key:]

    def update(self, layer: int, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """ΔW_ℓ = −α_ℓ Σ_t ũ_tᵀ δ̃_t, ``[d_key, d_model]`` (W_out's TransformerLens orientation)."""
        u_t, d_t = self.transform(layer, u, delta)
        return -self.alpha[self.mode(layer)] * (u_t.T @ d_t)


# ----------------------------------------------------------------------------- files
def _model_dir_name(model_name: str) -> str:
    name = str(model_name).strip().replace("\\", "/").rstrip("/").split("/")[-1]
    if not name or name in (".", ".."):
        raise ValueError(f"cannot name a network folder after the model name {model_name!r}")
    return name


def user_network_dir(model_name: str) -> Path:
    """Where trained networks of ``model_name`` go: ``default_cache_dir()/mend/<model>``."""
    from pmet_lens.core.models import default_cache_dir

    return default_cache_dir() / "mend" / _model_dir_name(model_name)


def shipped_network_dir(model_name: str) -> Path:
    """The package's read-only networks of ``model_name``: ``pmet_lens/presets/mend/<model>``."""
    return Path(str(resources.files("pmet_lens") / "presets" / "mend")) / _model_dir_name(model_name)


def training_command(model_name: str, network: str) -> str:
    """The command that trains network ``network`` (a name; for a path, a CounterFact network) for
    ``model_name`` into the user's cache."""
    if _is_path(network):
        network = "counterfact"
    dataset = network if network in ("zsre", "counterfact") else "counterfact"
    extra = "" if network == dataset else f" --name {network}"
    return f"python analyses/train_mend.py --model {model_name} --dataset {dataset}{extra}"


def _is_path(network: str) -> bool:
    return network.endswith(".safetensors") or "/" in network or "\\" in network


def find_network(model_name: str, network: str) -> Path | None:
    """The file of network ``network`` for ``model_name``: a path as given, else the user's copy
    (:func:`user_network_dir`) before the shipped one (:func:`shipped_network_dir`); ``None`` if none exists."""
    if _is_path(network):
        path = Path(network).expanduser()
        return path if path.is_file() else None
    for folder in (user_network_dir(model_name), shipped_network_dir(model_name)):
        path = folder / f"{network}.safetensors"
        if path.is_file():
            return path
    return None


def save_network(network: MENDNetwork, path: str | Path, *, model_name: str, model_hash: str,
                 info: Mapping[str, Any] | None = None) -> Path:
    """Write ``network`` (parameters and normalisation statistics) to a safetensors file, atomically, with
    its shape, the model it was trained for and ``info`` (training settings and figures) as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    meta = {"format": NETWORK_FORMAT, "model_name": str(model_name), "model_hash": model_hash,
            "config": json.dumps(network.config()), "info": json.dumps(dict(info or {}))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_network(path: str | Path) -> tuple[MENDNetwork, dict[str, Any]]:
    """Read a network written by :func:`save_network`; returns it (in eval mode) and its metadata
    (``model_name``, ``model_hash``, ``config``, ``info``).

    Raises:
        FileNotFoundError: no file at ``path``.
        EditError: the file is corrupt or not a MEND network file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MEND network file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != NETWORK_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {NETWORK_FORMAT!r}")
        config = json.loads(meta["config"])
        network = MENDNetwork(config["d_key"], config["d_model"], config["layers"], rank=config["rank"],
                              n_hidden=config["n_hidden"])
        network.load_state_dict(tensors)
    except Exception as exc:  # safetensors / json / state-dict errors on a damaged or foreign file
        raise EditError(f"cannot read the MEND network file {path}: it is corrupt or not a MEND network file ({exc}); "
                        "train it again with analyses/train_mend.py or use an intact copy") from None
    network.eval()
    return network, {"model_name": meta.get("model_name", ""), "model_hash": meta.get("model_hash", ""),
                     "config": config, "info": json.loads(meta.get("info", "{}"))}


def network_for_name(model_name: str, network: str) -> tuple[Path, dict[str, Any]]:
    """The file of network ``network`` for ``model_name`` (:func:`find_network`) and its metadata
    (as :func:`load_network` returns it), without loading the network.

    Raises:
        FileNotFoundError: no such network for this model (the message gives the training command).
        EditError: the file is unreadable or made for another model.
    """
    from safetensors import safe_open

    path = find_network(model_name, network)
    if path is None:
        where = (f"the file {network}" if _is_path(network) else
                 f"{user_network_dir(model_name)} or the package's {shipped_network_dir(model_name)}")
        raise FileNotFoundError(
            f"no trained MEND network {network!r} for model {model_name!r} (looked in {where}). MEND needs "
            f"an editor network trained for each model; train one with:\n    {training_command(model_name, network)}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = dict(fh.metadata() or {})
        if raw.get("format") != NETWORK_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}, expected {NETWORK_FORMAT!r}")
        meta = {"model_name": raw.get("model_name", ""), "model_hash": raw.get("model_hash", ""),
                "config": json.loads(raw["config"]), "info": json.loads(raw.get("info", "{}"))}
    except Exception as exc:  # safetensors / json errors on a damaged or foreign file
        raise EditError(f"cannot read the MEND network file {path}: it is corrupt or not a MEND network file ({exc}); "
                        "train it again with analyses/train_mend.py or use an intact copy") from None
    if meta["model_name"] and _model_dir_name(meta["model_name"]).lower() != _model_dir_name(model_name).lower():
        raise EditError(f"MEND network {path} was trained for {meta['model_name']!r}, not {model_name!r}; train one "
                        f"for this model with: {training_command(model_name, network)}")
    return path, meta


def network_for(model: HookedTransformer, hparams: MENDHyperParams) -> tuple[MENDNetwork, Path, dict[str, Any]]:
    """The trained network ``hparams.network`` for ``model`` (:func:`network_for_name`), loaded and checked
    against the model's widths and ``hparams.layers``.

    Raises:
        FileNotFoundError: no such network for this model (the message gives the training command).
        EditError: the file is unreadable, or made for another model or other layers.
    """
    model_name = str(getattr(model.cfg, "model_name", "") or "model")
    path, _ = network_for_name(model_name, hparams.network)
    network, meta = load_network(path)
    if (network.d_key, network.d_model) != model_dims(model):
        raise EditError(f"MEND network {path} is for d_mlp={network.d_key}, d_model={network.d_model}; this model has "
                        f"d_mlp={model.cfg.d_mlp}, d_model={model.cfg.d_model}")
    if tuple(hparams.layers) != network.layers:
        raise EditError(f"MEND network {path} was trained to edit layers {list(network.layers)}, not "
                        f"{list(hparams.layers)}; pass layers={network.layers} (preset(model_name, 'mend') reads "
                        "them from the file) or train a network for those layers")
    arch = architecture(model)
    for layer in network.layers:
        arch.check_layer(layer)
    return network, path, meta


# ----------------------------------------------------------------------------- gradient factors
@dataclass(frozen=True)
class TeacherForcedRows:
    """Right-padded rows prompt ⊕ target[:-1]; position ``loss_pos[j]`` of row ``loss_row[j]`` predicts
    token ``loss_token[j]`` (every target token of every row).

    Attributes:
        tokens: ``[rows, pos]`` token ids.
        lengths: ``[rows]`` real tokens per row.
        loss_row, loss_pos, loss_token: ``[n]`` row, position and target token of each predicted token.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    loss_row: torch.Tensor
    loss_pos: torch.Tensor
    loss_token: torch.Tensor

    @classmethod
    def build(cls, model: HookedTransformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> "TeacherForcedRows":
        """Rows of (prompt ids, target ids) pairs (non-empty both)."""
        seqs, rows, pos, toks = [], [], [], []
        for r, (prompt, target) in enumerate(pairs):
            prompt, target = list(prompt), list(target)
            if not prompt or not target:
                raise ValueError("a teacher-forced row needs a non-empty prompt and target")
            seqs.append(prompt + target[:-1])
            for j, tok in enumerate(target):
                rows.append(r)
                pos.append(len(prompt) - 1 + j)
                toks.append(tok)
        batch = pad(model, seqs)
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=batch.tokens.device)  # noqa: E731
        return cls(tokens=batch.tokens, lengths=batch.lengths, loss_row=as_long(rows), loss_pos=as_long(pos),
                   loss_token=as_long(toks))

    def real(self) -> torch.Tensor:
        """``[rows, pos]`` mask of the real (unpadded) positions."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None, :] < self.lengths[:, None]

    def row_nll(self, model: HookedTransformer, final: torch.Tensor) -> torch.Tensor:
        """Each row's mean NLL of its target tokens, ``[rows]``, from the residual stream after the last
        block ``final`` ``[rows, pos, d_model]``."""
        logprobs = torch.log_softmax(final_logits(model, final[self.loss_row, self.loss_pos]).float(), dim=-1)
        nll = -logprobs.gather(-1, self.loss_token[:, None])[:, 0]  # [n]
        n_rows = self.tokens.shape[0]
        total = torch.zeros(n_rows, device=nll.device).index_add(0, self.loss_row, nll)
        count = torch.zeros(n_rows, device=nll.device).index_add(0, self.loss_row, torch.ones_like(nll))
        return total / count


def gradient_factors(model: HookedTransformer, rows: TeacherForcedRows,
                     layers: Sequence[int]) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The rank-one factors of the fine-tuning gradient of W_out at each of ``layers`` (MEND §3.1).

    The loss is the sum over rows of each row's mean NLL of its target tokens (one row per fact, so
    facts do not dilute one another). Returns ``{layer: (u, δ)}`` with u ``[tokens, d_mlp]`` the FFN keys
    at ``mlp.hook_post`` and δ ``[tokens, d_model]`` = ∂L/∂m at ``hook_mlp_out`` of every real token
    (pads are left out; their δ is zero), so that ∇_{W_out} L = uᵀ δ, and the rows' NLLs ``[rows]``.
    The weights are not changed and no gradient is accumulated in them.
    """
    arch = architecture(model)
    layers = [arch.check_layer(l) for l in layers]
    start, n_layers = min(layers), model.cfg.n_layers
    keys: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def keep_key(act: torch.Tensor, hook: Any) -> None:
        keys[block_index(hook.name)] = act.detach()

    def keep_out(act: torch.Tensor, hook: Any) -> None:
        outs[block_index(hook.name)] = act

    hooks: list[tuple[str | Callable, Callable]] = [(arch.mlp_key_hook(l), keep_key) for l in layers]
    hooks += [(arch.mlp_out_hook(l), keep_out) for l in layers]
    with torch.no_grad():
        resid = model(rows.tokens, stop_at_layer=start)  # [rows, pos, d_model] entering the first edited block
    resid = resid.detach().requires_grad_(True)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        final = model(resid, start_at_layer=start, stop_at_layer=n_layers)  # [rows, pos, d_model]
        nll = rows.row_nll(model, final)
        grads = torch.autograd.grad(nll.sum(), [outs[l] for l in layers])
    real = rows.real()
    factors = {l: (keys[l][real].float(), g[real].float())  # [rows, pos, d] -> [tokens, d]
               for l, g in zip(layers, grads)}
    return factors, nll.detach()


def mend_deltas(model: HookedTransformer, facts: Sequence[Fact], network: MENDNetwork,
                batch_size: int = 32) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """MEND's ΔW of every edited W_out for ``facts`` on ``model`` as it is now (MEND Alg. 2), in the
    parameters' dtype, and per-fact figures (``nll``: the NLL of o* before the edit). Facts are processed
    ``batch_size`` at a time and their updates summed. Nothing is written.

    Raises:
        EditError: a non-finite gradient or update.
    """
    arch = architecture(model)
    requests = prepare_requests(model, facts, ())
    sums: dict[int, torch.Tensor] = {}
    nll: list[float] = []
    network = network.to(model.cfg.device)
    for start in range(0, len(requests), batch_size):
        part = requests.subset(range(start, min(start + batch_size, len(requests))))
        rows = TeacherForcedRows.build(model, [(p[0], t) for p, t in zip(part.prompt_ids, part.target_ids)])
        factors, part_nll = gradient_factors(model, rows, network.layers)
        nll += part_nll.tolist()
        with torch.no_grad():
            for layer, (u, delta) in factors.items():
                update = network.update(layer, u, delta)  # [d_mlp, d_model]
                sums[layer] = update if layer not in sums else sums[layer] + update
    deltas: dict[str, torch.Tensor] = {}
    for layer, update in sums.items():
        if not torch.isfinite(update).all():
            raise EditError(f"MEND's update of layer {layer} is not finite (NaN/inf in the gradient or the network)")
        site = edit_site(arch, FFN_OUT_WEIGHT, layer)
        param = site.param(model)
        deltas[site.param_name] = update.to(param.device, param.dtype)
    return deltas, {"nll": nll}


def _mend(hparams: MethodHyperParams) -> MENDHyperParams:
    if not isinstance(hparams, MENDHyperParams):
        raise TypeError(f"MEND's editor takes MENDHyperParams, got {type(hparams).__name__}")
    return hparams


class MENDEditor:
    """The :class:`~pmet_lens.editing.editor.Editor` of MEND (MEND Alg. 2): :meth:`prepare` loads the
    trained network once, :meth:`run_batch` makes one forward and backward pass of the edit prompts
    p(s) ⊕ o*, runs the network on the gradient factors and writes ΔW_ℓ = −α_ℓ Σ ũᵀδ̃ into W_out of
    each edited layer."""

    optimises_targets = False
    shards_facts = False

    def sites(self, model: HookedTransformer, hparams: MethodHyperParams) -> list[EditSite]:
        arch = architecture(model)
        return [edit_site(arch, FFN_OUT_WEIGHT, l) for l in _mend(hparams).layers]

    def prepare(self, model: HookedTransformer, hparams: MethodHyperParams, *, cov_store: CovarianceStore | None = None,
                progress: bool = False, layer_hashes: dict[int, str] | None = None,
                workers: Any = None) -> EditorState:
        """Load and check the trained network (no prefixes, no covariance).

        Raises:
            FileNotFoundError: no trained network for this model (the message gives the training command).
            EditError: a network made for another model or other layers.
        """
        network, path, _ = network_for(model, _mend(hparams))
        return EditorState(extra={"network": network.to(model.cfg.device), "network_file": str(path)})

    def run_batch(self, model: HookedTransformer, facts: Sequence[Fact], hparams: MethodHyperParams,
                  state: EditorState, *, solve: Solve | None = None, progress: bool = False,
                  targets: dict[str, torch.Tensor] | None = None, compile: bool = False,
                  model_hash: str | None = None, solve_options: SolveOptions | None = None, workers: Any = None,
                  checkpoint: Any = None) -> EditResult:
        """Edit validated ``facts`` with the prepared network; ``stats["nll"]`` is each fact's NLL of o*
        before the edit, ``targets`` of the result is empty (MEND has none)."""
        refuse_workers(hparams.method, workers, checkpoint)
        hp = _mend(hparams)
        if solve is not None or targets is not None or compile:
            raise ValueError("mend applies a trained network to the gradient: it takes no solve, targets or compile")
        if model_hash is None:
            model_hash, _ = weights_hashes(model, [])
        deltas, stats = mend_deltas(model, facts, state.extra["network"], hp.batch_size)
        written = WrittenWeights(model)
        try:
            with torch.no_grad():
                for site in self.sites(model, hp):
                    written.keep(site)
                    site.param(model).add_(deltas[site.param_name])
        except BaseException:
            written.rollback()
            raise
        return EditResult(model=model, method=hp.method, deltas=deltas, targets={}, facts=list(facts),
                          hparams={**hp.to_dict(), "network_file": state.extra["network_file"]}, model_hash=model_hash,
                          stats=stats, _originals=dict(written.originals))


MEND = MENDEditor()
"""MEND's editor (stateless; :meth:`~pmet_lens.editing.hparams.MENDHyperParams.editor`)."""
