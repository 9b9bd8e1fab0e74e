"""The state of an edit as a value: per-layer weight deltas and the targets.

Writing it into the weights (:meth:`EditResult.apply`), undoing it bit-for-bit
(:meth:`EditResult.restore`), previewing it as forward hooks (:meth:`EditResult.as_hooks`) and
saving / loading it (safetensors, deltas only, model identity checked) are operations on it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.core.models import require_model
from pmet_lens.core.paths import atomic_path
from pmet_lens.data import Fact, as_facts
from pmet_lens.editing.delta import add_delta
from pmet_lens.editing.identity import HASH_SCHEME, legacy_weights_hash, sample_indices, weights_hash
from pmet_lens.editing.site import EditSite, site_of_param
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["EditResult"]


def _fingerprint(param: torch.Tensor, n: int = 4096) -> torch.Tensor:
    """A fixed, evenly spaced sample of ``n`` entries of ``param`` (a copy): any later edit of a
    weight (a dense ΔW) changes it. Indices in integer arithmetic (:func:`sample_indices`), exact
    for any number of entries."""
    idx = sample_indices(param.numel(), n, param.device)  # row-major flat positions
    return param.detach()[torch.unravel_index(idx, param.shape)]  # gathered (a copy), no copy of the weight


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the form edit and session files record)."""
    return str(dtype).removeprefix("torch.")


def check_dtype(path: str | Path, recorded: str | None, params: Mapping[str, torch.Tensor], fix: str) -> None:
    """Raise ``ValueError`` when a file's recorded weights dtype is not the dtype of the model's
    ``params`` it edits (files that record none are not checked); ``fix`` ends the message."""
    if recorded is None:
        return
    for name, p in params.items():
        if dtype_name(p.dtype) != recorded:
            raise ValueError(f"{path} was made on a model in {recorded}, but this model's {name} is "
                             f"{dtype_name(p.dtype)}: {fix} (e.g. load_model(..., dtype=torch.{recorded}))")


def file_weights_hash(meta: dict[str, str], model: HookedTransformer) -> str:
    """The model's weights hash in the scheme an edit or session file records (``meta``)."""
    if meta.get("hash_scheme") == HASH_SCHEME:
        return weights_hash(model)
    return legacy_weights_hash(model)  # written before files recorded their hash scheme


def check_identity(path: str | Path, meta: dict[str, str], model: HookedTransformer, hint: str,
                   mismatch: str = "was made for a different model") -> str:
    """The model's weights hash (in the scheme the file records) if it equals the file's
    ``model_hash``; else ``ValueError`` saying ``{path} {mismatch}``, then ``hint`` (what to
    load instead)."""
    current = file_weights_hash(meta, model)
    if current != meta.get("model_hash"):
        raise ValueError(f"{path} {mismatch} (weights hash {meta.get('model_hash')} of "
                         f"{meta.get('model_name')!r}; this model's is {current}). {hint}")
    return current


@dataclass(eq=False)
class EditResult:
    """An edit: ``deltas`` maps the parameter name of each edited weight (``EditSite.param_name``:
    the FFN's W_out of every layer in R and, for the W_O ablation, the MHSA's W_O) to the change
    applied, W_new − W_old, in the parameter's shape and in float32 (float64 for float64 weights;
    :mod:`pmet_lens.editing.delta`): adding it with :func:`~pmet_lens.editing.delta.add_delta`
    gives the edited weights exactly, in any dtype.

    Attributes:
        model: the model the edit belongs to.
        method: "pmet" or "memit".
        deltas: parameter name -> ΔW (the change applied).
        targets: δ site ("mlp_out" and "attn_out" for PMET, "resid_post" for MEMIT) -> [facts, d_model]
            target vectors v = initial output + δ at L (reusable with ``edit(..., targets=...)``).
        facts: the edited facts, in order.
        hparams: the hyper-parameters as a dict (``EditHyperParams.to_dict``).
        model_hash: weights hash of the unedited model (checked by :meth:`load`).
        prefixes: the context prefixes used (pass them again to skip re-sampling).
        stats: per-fact optimisation figures (steps, final loss, target probability, the NLL weight φ of that loss).
    """

    model: HookedTransformer
    method: str
    deltas: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    facts: list[Fact]
    hparams: dict[str, Any]
    model_hash: str
    prefixes: tuple[str, ...] = ()
    stats: dict[str, list[float]] = field(default_factory=dict)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _written: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self._originals and not self._written:  # applied by edit(): remember what it wrote
            self._written = {name: _fingerprint(self._param(name)) for name in self._originals}

    # ------------------------------------------------------------- weights
    @property
    def applied(self) -> bool:
        """Whether the deltas are currently written into the model's weights (by this object)."""
        return bool(self._originals)

    def site(self, name: str) -> EditSite:
        """The :class:`EditSite` of a key of ``deltas``."""
        return site_of_param(architecture(self.model), name)

    def _param(self, name: str) -> torch.nn.Parameter:
        return self.site(name).param(self.model)

    def apply(self) -> "EditResult":
        """Write the deltas into the weights (W += ΔW), keeping the originals for :meth:`restore`."""
        if self.applied:
            raise RuntimeError("this edit is already applied")
        params = {name: self._param(name) for name in self.deltas}
        for name, delta in self.deltas.items():
            if params[name].shape != delta.shape:
                raise ValueError(f"delta {name} has shape {tuple(delta.shape)}, the model's is {tuple(params[name].shape)}")
        originals = {name: p.detach().clone() for name, p in params.items()}
        try:
            for name, delta in self.deltas.items():
                add_delta(params[name], delta)
        except BaseException:
            with torch.no_grad():
                for name, orig in originals.items():
                    params[name].copy_(orig)
            raise
        self._originals = originals
        self._written = {name: _fingerprint(p) for name, p in params.items()}
        return self

    def restore(self, force: bool = False) -> None:
        """Put the original weights back, bit for bit (no-op when not applied).

        Edits applied one after another must be restored in the opposite order: restoring an
        earlier one first would write back weights that predate the later edits, silently
        leaving a mixture. So this raises when the edited weights are no longer what this edit
        wrote (checked on a fixed sample of their entries), unless ``force``.
        """
        if not force:
            changed = [name for name, fp in self._written.items() if not torch.equal(_fingerprint(self._param(name)), fp)]
            if changed:
                raise RuntimeError(f"{changed} changed after this edit was applied (another edit applied on top of it?); "
                                   "restore edits in the opposite order to their application, or pass force=True to "
                                   "write this edit's originals back anyway")
        with torch.no_grad():
            for name, orig in self._originals.items():
                self._param(name).copy_(orig)
        self._originals = {}
        self._written = {}

    def __enter__(self) -> "EditResult":
        if not self.applied:
            self.apply()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def delta_norms(self) -> list[dict[str, Any]]:
        """Per edited weight: its block ``layer``, ``weight`` ("W_out" / "W_O"), the Frobenius norm
        ``delta_norm`` = ‖ΔW‖ (PMET Appendix A, Fig. 4) and ``relative`` = ‖ΔW‖ / ‖W‖ of the unedited
        weight."""
        rows = []
        for name, delta in self.deltas.items():
            weight = self._originals[name] if name in self._originals else self._param(name).detach()
            d = float(delta.float().norm())
            site = self.site(name)
            rows.append({"layer": site.layer, "weight": site.weight, "delta_norm": d,
                         "relative": d / max(float(weight.float().norm()), 1e-12)})
        return rows

    # --------------------------------------------------------------- hooks
    def as_hooks(self) -> list[tuple[str, Callable]]:
        """The edit as forward hooks, weights untouched: ΔW·k added at each site's output hook, with k
        captured at its key hook in the same block (:class:`EditSite`).

        Use with ``model.hooks(fwd_hooks=result.as_hooks())``. Raises if the edit is applied
        (it would be counted twice).
        """
        if self.applied:
            raise RuntimeError("the edit is applied to the weights; restore() it before previewing it as hooks")
        hooks: list[tuple[str, Callable]] = []
        for name, delta in self.deltas.items():
            site = self.site(name)
            flat = delta.reshape(-1, delta.shape[-1])  # [d_k, d_model] (W_O: [heads, d_head, d_model] -> [heads·d_head, d_model])
            store: dict[str, torch.Tensor] = {}

            def keep(act, hook, _store=store):
                _store["k"] = act

            def add(act, hook, _store=store, _d=flat):
                k = _store.pop("k")
                k = k.reshape(*k.shape[:2], -1)  # [batch, pos, ...] -> [batch, pos, d_k]
                return act + (k.to(_d.dtype) @ _d.to(k.device)).to(act.dtype)  # the product in the delta's float dtype

            hooks += [(site.key_hook, keep), (site.out_hook, add)]
        return hooks

    # ----------------------------------------------------------- save/load
    def save(self, path: str | Path) -> Path:
        """Save deltas, targets and metadata to a safetensors file (atomic write)."""
        from safetensors.torch import save_file

        path = Path(path)
        dtypes = {dtype_name(self._param(name).dtype) for name in self.deltas}
        if len(dtypes) > 1:
            raise ValueError(f"the edited weights have several dtypes ({sorted(dtypes)}); an edit file records one")
        tensors = {f"delta/{k}": v.detach().cpu().contiguous() for k, v in self.deltas.items()}
        tensors.update({f"target/{k}": v.detach().cpu().contiguous() for k, v in self.targets.items()})
        meta = {
            "format": "pmet-lens-edit/1",
            "method": self.method,
            "model_hash": self.model_hash,
            "hash_scheme": HASH_SCHEME,
            "dtype": dtypes.pop() if dtypes else dtype_name(self.model.cfg.dtype),
            "model_name": str(getattr(self.model.cfg, "model_name", "")),
            "hparams": json.dumps(self.hparams),
            "facts": json.dumps([f.to_counterfact() for f in self.facts]),
            "prefixes": json.dumps(list(self.prefixes)),
            "stats": json.dumps(self.stats),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, model: HookedTransformer, apply: bool = False) -> "EditResult":
        """Load a saved edit for ``model`` (unedited), checking it is the model it was made for: the
        dtype of the weights the file records, then the weights hash.

        Raises:
            TypeError: ``model`` is not a loaded model.
            FileNotFoundError: there is no file at ``path``.
            EditError: the file is truncated or corrupt (not readable as safetensors).
            ValueError: the file is not an edit file, the model's weights are in another dtype than
                the file's (the message names both), or the model's weights hash differs.
        """
        from safetensors import safe_open

        require_model(model, "EditResult.load")
        if not Path(path).is_file():
            raise FileNotFoundError(f"edit file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()} if meta.get("format") == "pmet-lens-edit/1" else {}
        except Exception as exc:  # safetensors raises its own error types on a damaged file
            raise EditError(f"cannot read the edit file {path}: it is truncated or corrupt ({exc}); "
                            "save the edit again (EditResult.save) or use an intact copy") from None
        if meta.get("format") != "pmet-lens-edit/1":
            raise ValueError(f"{path} is not a pmet-lens edit file")
        arch = architecture(model)
        names = [k[6:] for k in tensors if k.startswith("delta/")]
        try:
            params = {name: site_of_param(arch, name).param(model) for name in names}
        except ValueError as exc:
            raise ValueError(f"{path} edits a weight this model does not have ({exc})") from None
        check_dtype(path, meta.get("dtype"), params, "load the model in the dtype the edit was made in")
        check_identity(path, meta, model, "Load the model it was made for, with no edit applied")
        last = max(names, key=lambda name: site_of_param(arch, name).layer, default=None)
        target_device = params[last].device if last is not None else torch.device("cpu")
        result = cls(
            model=model, method=meta["method"],
            deltas={k[6:]: v.to(params[k[6:]].device) for k, v in tensors.items() if k.startswith("delta/")},
            targets={k[7:]: v.to(target_device) for k, v in tensors.items() if k.startswith("target/")},
            facts=as_facts(json.loads(meta["facts"])), hparams=json.loads(meta["hparams"]),
            model_hash=meta["model_hash"], prefixes=tuple(json.loads(meta.get("prefixes", "[]"))),
            stats=json.loads(meta.get("stats", "{}")),
        )
        return result.apply() if apply else result
