"""The editor protocol: what :func:`~pmet_lens.editing.edit` and
:class:`~pmet_lens.editing.session.EditSession` call, whatever the method.

A method is a hyper-parameter class in :data:`~pmet_lens.editing.hparams.METHODS` whose
:meth:`~pmet_lens.editing.hparams.MethodHyperParams.editor` returns an :class:`Editor`. The editor says
which weights the method writes (:meth:`Editor.sites`), prepares what it needs once per model
(:meth:`Editor.prepare`: context prefixes, covariance statistics, a hypernetwork, ...) and edits one
batch of validated facts into the model (:meth:`Editor.run_batch`), returning an
:class:`~pmet_lens.editing.result.EditResult` that holds the originals of every weight it wrote, so
that ``restore()`` is bit-exact. The editors:

* :data:`pmet_lens.editing.engine.LEAST_SQUARES`: targets, keys and one solve per layer (PMET, MEMIT,
  AlphaEdit, EMMET);
* :data:`pmet_lens.editing.rome.ROME`: ROME and r-ROME, the same pieces one fact after another;
* :data:`pmet_lens.editing.finetune.FINETUNE`: FT-W and FT-L.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.data import Fact
from pmet_lens.editing.site import EditSite

if TYPE_CHECKING:
    from pmet_lens.editing.covariance import CovarianceStore
    from pmet_lens.editing.hparams import MethodHyperParams
    from pmet_lens.editing.linsolve import SolveOptions
    from pmet_lens.editing.result import EditResult
    from pmet_lens.editing.update import Solve

__all__ = ["Editor", "EditorState", "WrittenWeights", "edited_params", "refuse_workers"]


@dataclass
class EditorState:
    """What an editor prepared once for a model: for one :func:`~pmet_lens.editing.edit` call, or for
    a whole session on the unedited model.

    Attributes:
        prefixes: the context prefixes (empty for methods without).
        covs: key hook -> C = E[kᵀk] of the unedited model (empty for methods without).
        cov_keys: key hook -> the covariance's cache key (:meth:`CovarianceStore.cache_key`).
        extra: method-specific objects (e.g. a trained hypernetwork).
    """

    prefixes: tuple[str, ...] = ()
    covs: dict[str, torch.Tensor] = field(default_factory=dict)
    cov_keys: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Editor(Protocol):
    """How one family of methods edits (see the module docstring).

    Attributes:
        optimises_targets: whether :meth:`run_batch` optimises target vectors, so that it takes
            precomputed ``targets`` and ``compile=True``.
        shards_facts: whether :meth:`run_batch` can run its per-fact work in shards on a pool of
            workers (``workers=``); the methods that edit facts one after another, or in one
            gradient step over all of them, cannot.
    """

    optimises_targets: bool
    shards_facts: bool

    def sites(self, model: HookedTransformer, hparams: "MethodHyperParams") -> list[EditSite]:
        """Every weight an edit with ``hparams`` may write (layers ascending)."""
        ...

    def prepare(self, model: HookedTransformer, hparams: "MethodHyperParams", *,
                cov_store: "CovarianceStore | None" = None, progress: bool = False,
                layer_hashes: dict[int, str] | None = None, workers: Any = None) -> EditorState:
        """What the method needs from the model as it is now, computed once (``layer_hashes``:
        :func:`~pmet_lens.editing.identity.weights_hashes` of the current weights, to save a pass;
        ``workers``: a pool that builds a missing covariance from shards of its corpus)."""
        ...

    def run_batch(self, model: HookedTransformer, facts: Sequence[Fact], hparams: "MethodHyperParams",
                  state: EditorState, *, solve: "Solve | None" = None, progress: bool = False,
                  targets: dict[str, torch.Tensor] | None = None, compile: bool = False,
                  model_hash: str | None = None, solve_options: "SolveOptions | None" = None,
                  workers: Any = None, checkpoint: Any = None) -> "EditResult":
        """Edit validated ``facts`` into ``model`` (left applied) and return the result with the
        originals of every weight written. ``solve`` overrides the method's update rule where it has
        one (AlphaEdit's projected solve); ``model_hash`` is the weights hash before the edit
        (computed when not given); ``solve_options`` say how a large linear system is solved;
        ``workers`` / ``checkpoint`` shard the per-fact work on a pool (editors with
        ``shards_facts`` only). On an exception the weights are as before the call."""
        ...


def refuse_workers(method: str, workers: Any, checkpoint: Any) -> None:
    """``ValueError`` when a pool or a shard log is given to a method that runs in one process."""
    if workers is not None or checkpoint is not None:
        raise ValueError(f"{method} cannot shard its work on workers (it edits the facts one after another or in "
                         "one optimisation over all of them): leave workers= and checkpoint= out for it; they "
                         "shard the target optimisation of pmet, memit, alphaedit and emmet")


def edited_params(model: HookedTransformer, hparams: "MethodHyperParams") -> dict[str, torch.nn.Parameter]:
    """Parameter name -> parameter of every weight an edit with ``hparams`` may write."""
    return {site.param_name: site.param(model) for site in hparams.editor().sites(model, hparams)}


class WrittenWeights:
    """The originals of the weights an edit writes, each kept at its first write, and the total change.

    ``keep(site, ...)`` matches the engine's ``on_write`` hook; :meth:`rollback` writes every kept
    original back (bit for bit) after a failure; :meth:`total_change` is each weight's change since
    its original.
    """

    def __init__(self, model: HookedTransformer) -> None:
        self.model = model
        self.originals: dict[str, torch.Tensor] = {}
        self.sites: dict[str, EditSite] = {}

    def keep(self, site: EditSite, delta: torch.Tensor | None = None) -> None:
        """Remember ``site``'s weight as it is now, if not yet remembered."""
        if site.param_name not in self.originals:
            self.originals[site.param_name] = site.param(self.model).detach().clone()
            self.sites[site.param_name] = site

    def rollback(self) -> None:
        """Write every kept original back."""
        with torch.no_grad():
            for name, orig in self.originals.items():
                self.sites[name].param(self.model).copy_(orig)

    def total_change(self) -> dict[str, torch.Tensor]:
        """Per kept weight, its current value minus its original (the float64 difference, recorded in
        :func:`~pmet_lens.editing.delta.delta_dtype`: float32, float64 for a float64 weight)."""
        from pmet_lens.editing.delta import delta_dtype

        return {name: (self.sites[name].param(self.model).detach().double() - orig.double()).to(delta_dtype(orig.dtype))
                for name, orig in self.originals.items()}
