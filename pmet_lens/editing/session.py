"""Lifelong (sequential) editing: batches of requests edited one after another into one model.

An :class:`EditSession` runs any method of :data:`~pmet_lens.editing.hparams.METHODS` per batch
through its :class:`~pmet_lens.editing.editor.Editor`: ``memit`` / ``pmet`` / ``emmet`` / ``ft-w`` /
``ft-l`` (each batch a plain mass edit of the current model, as the papers would do), ``rome`` /
``r-rome`` (each batch's facts one after another), or any hyper-parameters with ``nullspace=True``
(``alphaedit`` = MEMIT's targets with AlphaEdit's projected update, and PMET with the projection).
What the editor prepares (prefixes, C) is taken once, on the unedited model. For the projected
methods it keeps, per edited weight (key hook),

* ``P = Û Ûᵀ`` from the covariance C of the *unedited* model (AlphaEdit eq. 7-8; computed once,
  cached by a :class:`~pmet_lens.editing.nullspace.NullspaceStore`), and
* ``KpKp = Σ_batches Kᵀ K``, each batch's keys recomputed on the model *after* that batch has been
  written to every layer (AlphaEdit's official ``cache_c``), so that the next batch's update
  (P (K1ᵀK1 + KpKp) + αI) X = P K1ᵀ R (eq. 12 transposed) is discouraged from moving them. The
  update's solution satisfies X = P X, so KpKp enters it only as ``P · KpKp · P``, which is what
  ``EditSession.prev`` accumulates (``(P Kᵀ)(P Kᵀ)ᵀ`` per batch, ``O(d_k² u)``,
  :func:`~pmet_lens.editing.nullspace.projected_gram`), so no ``d_k³`` product is paid per batch.

C itself is also taken from the unedited model once (the official code caches it by model name),
not re-estimated on the edited weights. The context prefixes are sampled once, on the unedited
model, and reused for every batch (as the official code's template cache).

State kept, all on the CPU (a layer's P, P·KpKp·P and C go to the device only inside that layer's
solve, and ΔW when it is written): the original values of the edited weights (once), each batch's ΔW
and its recomputed keys (``[u, d_k]`` per key hook, small), and the running ``P · KpKp · P`` and ``P``
once per key hook (not per batch). Undo writes the originals back and replays the kept batches' ΔW additions in order,
which reproduces each intermediate state bit for bit; ``KpKp`` is replayed from the kept keys in
the same order, also bit for bit. ``save`` / ``load`` write and read that state (safetensors +
JSON metadata) so that a resumed run equals an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.models import require_model
from pmet_lens.core.paths import atomic_path
from pmet_lens.data import DataError, Fact, as_facts
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.delta import add_delta
from pmet_lens.editing.editor import EditorState, edited_params
from pmet_lens.editing.hparams import EditHyperParams, MethodHyperParams, hparams_from_dict, preset
from pmet_lens.editing.identity import HASH_SCHEME, weights_hash
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.nullspace import NullspaceStore, Projection, projected_gram
from pmet_lens.editing.result import EditResult, check_dtype, dtype_name, file_weights_hash
from pmet_lens.editing.validate import validate_requests
from pmet_lens.parallel import one_pool

logger = logging.getLogger(__name__)

__all__ = ["BatchRecord", "EditSession"]

_FORMAT = "pmet-lens-session/1"


@dataclass
class BatchRecord:
    """One batch of a session.

    Attributes:
        facts: the batch's requests.
        deltas: parameter name -> the change this batch applied (float32, float64 for float64 weights;
            :mod:`pmet_lens.editing.delta`; on the CPU).
        keys: key hook -> ``[u, d_k]`` float64 keys of this batch recomputed on the model after it
            (the batch's contribution ``Kᵀ K`` to KpKp; on the CPU); empty for unprojected methods.
        stats: the batch's target optimisation figures (``EditResult.stats``).
        metrics: per-batch figures: ``seconds``, ``delta_norm`` / ``weight_norm`` per parameter
            (‖ΔW‖ of this batch and ‖W + ΣΔW‖ after it), ``perplexity`` when tracked.
    """

    facts: list[Fact]
    deltas: dict[str, torch.Tensor]
    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class EditSession:
    """A sequence of batch edits into ``model`` with undo, save and resume.

    Args:
        model: the model to edit (unedited when the session starts; it is edited in place).
        method: a method of :data:`~pmet_lens.editing.hparams.METHODS` (ignored when ``hparams`` is given).
        hparams: hyper-parameters (default :func:`preset` of the model and method). With
            ``nullspace=True`` the update is AlphaEdit's projected solve.
        cov_store: covariance cache (default: one under the user's cache directory).
        nullspace_store: cache of the projectors P (default: one under the user's cache directory).
        perplexity_sample: a :class:`~pmet_lens.evaluation.perplexity.PerplexitySample`-like object
            passed to ``perplexity_fn`` after every batch (both or neither).
        perplexity_fn: ``fn(model, sample) -> float``, e.g.
            :func:`pmet_lens.evaluation.perplexity.perplexity` (editing does not import evaluation).
        progress: progress bars.
        solve_options: how each layer's update is solved (:class:`~pmet_lens.editing.linsolve.SolveOptions`,
            e.g. ``SolveOptions(float64_device="cpu")`` on a GPU with slow float64).
    """

    def __init__(
        self,
        model: HookedTransformer,
        method: str = "alphaedit",
        hparams: MethodHyperParams | None = None,
        *,
        cov_store: CovarianceStore | None = None,
        nullspace_store: NullspaceStore | None = None,
        perplexity_sample: Any = None,
        perplexity_fn: Callable[[HookedTransformer, Any], float] | None = None,
        progress: bool = True,
        solve_options: SolveOptions | None = None,
    ) -> None:
        require_model(model, "EditSession")
        if hparams is None:
            hparams = preset(str(getattr(model.cfg, "model_name", "")), method)
        elif not isinstance(hparams, MethodHyperParams):
            raise TypeError(f"hparams must be a method's hyper-parameters (MethodHyperParams), got {type(hparams).__name__}")
        self._bind(model, cov_store, nullspace_store, perplexity_sample, perplexity_fn, progress, solve_options)
        self.base_hash = weights_hash(model)
        self._start(hparams)

    # ----------------------------------------------------------------- setup
    def _bind(self, model: HookedTransformer, cov_store: CovarianceStore | None, nullspace_store: NullspaceStore | None,
              perplexity_sample: Any, perplexity_fn: Callable[[HookedTransformer, Any], float] | None,
              progress: bool, solve_options: SolveOptions | None = None) -> None:
        """The model, the caches and the perplexity probe of a new or resumed session; no batch yet."""
        if (perplexity_sample is None) != (perplexity_fn is None):
            raise ValueError("pass both perplexity_sample and perplexity_fn, or neither")
        self.model = model
        self.progress = progress
        self.solve_options = solve_options
        self.cov_store = cov_store if cov_store is not None else CovarianceStore(progress=progress)
        self.nullspace_store = nullspace_store if nullspace_store is not None else NullspaceStore()
        self.perplexity_sample = perplexity_sample
        self.perplexity_fn = perplexity_fn
        self.history: list[BatchRecord] = []
        self.baseline: dict[str, Any] = {}

    def _start(self, hparams: MethodHyperParams, prefixes: tuple[str, ...] | None = None) -> None:
        """Prepare the editor on the unedited model (sample the prefixes, fetch C), fetch P, keep the
        original weights."""
        if prefixes is not None and isinstance(hparams, EditHyperParams):
            hparams = hparams.with_(context_prefixes=tuple(prefixes))
        self.state: EditorState = hparams.editor().prepare(self.model, hparams, cov_store=self.cov_store,
                                                           progress=self.progress)
        if isinstance(hparams, EditHyperParams):  # every batch uses the prefixes sampled here
            hparams = hparams.with_(context_prefixes=self.state.prefixes)
        self.hparams = hparams
        self.prefixes = self.state.prefixes
        self.covs, self._cov_keys = self.state.covs, self.state.cov_keys
        self.projections: dict[str, Projection] = {}
        if isinstance(hparams, EditHyperParams) and hparams.nullspace:
            for hook, cov in self.covs.items():
                self.projections[hook] = self.nullspace_store.get(self._cov_keys[hook], cov, hparams.nullspace_threshold)
        self.null_dims = {hook: p.dim for hook, p in self.projections.items()}
        self.prev: dict[str, torch.Tensor] = {}
        self.originals = {name: p.detach().to("cpu", copy=True) for name, p in edited_params(self.model, self.hparams).items()}
        if self.perplexity_fn is not None and not self.baseline:
            self.baseline["perplexity"] = float(self.perplexity_fn(self.model, self.perplexity_sample))

    @property
    def method(self) -> str:
        """The hyper-parameters' method (a key of ``METHODS``; PMET with the projection is "pmet")."""
        return self.hparams.method

    @property
    def projected(self) -> bool:
        """Whether the batches use AlphaEdit's projected update (hyper-parameters with ``nullspace``)."""
        return isinstance(self.hparams, EditHyperParams) and self.hparams.nullspace

    def __len__(self) -> int:
        return len(self.history)

    # ------------------------------------------------------------------ edit
    @one_pool
    def edit(self, facts: Sequence[Any], *, overwrite: bool = False,
             targets: dict[str, torch.Tensor] | None = None, workers: Any = None) -> EditResult:
        """Edit one batch into the model and return its :class:`EditResult`: a record of the batch
        (deltas, targets, optimisation stats). The deltas stay written; undo goes through the
        session (:meth:`undo`), so the result does not hold originals (``result.applied`` is False
        and its ``restore()`` does nothing).

        Args:
            facts: the batch's requests (as :func:`~pmet_lens.editing.edit` accepts).
            overwrite: allow requests with the subject and prompt of an earlier batch's request.
            targets: precomputed target vectors (site -> [facts, d_model], ``EditResult.targets``; not
                for methods without targets);
                they depend on the model they were optimised on, so targets from the unedited model
                reused here are an approximation (used by the hyper-parameter search only).
            workers: ``None`` (this process), an int (a local pool for this batch) or a
                :class:`~pmet_lens.parallel.Workers` pool: the batch's target optimisation runs in shards
                of facts on the workers (which follow the weights the earlier batches wrote); keys,
                residuals and the solve stay in this process.

        Raises:
            DataError: a request repeats or contradicts one of an earlier batch (same subject and
                prompt) and ``overwrite`` is False; or the batch itself is bad. Any exception during
                the batch leaves the weights exactly as after the previous batch.
        """
        from pmet_lens.editing import engine

        facts = validate_requests(self.model, facts, self.hparams)
        if not overwrite:
            self._check_against_history(facts)
        n = len(self.history)
        hp = self.hparams
        solve = None
        if isinstance(hp, EditHyperParams) and hp.nullspace:  # AlphaEdit eq. 12 with this session's P and KpKp
            solve = engine.projected_solver(self.projections, hp.l2, self.prev, self.solve_options)
        start = time.perf_counter()
        try:
            result = hp.editor().run_batch(self.model, facts, hp, self.state, solve=solve, progress=self.progress,
                                           targets=targets, solve_options=self.solve_options, workers=workers)
            keys = engine.batch_keys(self.model, facts, hp, sorted(self.projections)) \
                if isinstance(hp, EditHyperParams) and hp.nullspace else {}
            record = BatchRecord(facts=list(facts),
                                 deltas={k: v.detach().to("cpu", copy=True) for k, v in result.deltas.items()},
                                 keys={k: v.to("cpu") for k, v in keys.items()}, stats=dict(result.stats))
            record.metrics = self._metrics(record, time.perf_counter() - start)
        except BaseException:
            self._write_state(n)  # back to the weights after the previous batch, bit for bit
            raise
        self.history.append(record)
        self._accumulate(record)
        logger.info("batch %d: %d facts in %.1f s", n + 1, len(facts), record.metrics["seconds"])
        result._originals = {}  # the session owns undo; the result is a record of this batch
        result._written = {}
        return result

    def _check_against_history(self, facts: Sequence[Fact]) -> None:
        earlier: dict[tuple[str, str], tuple[int, Fact]] = {}
        for b, record in enumerate(self.history, 1):
            for f in record.facts:
                earlier[(f.subject, f.prompt)] = (b, f)
        for fact in facts:
            hit = earlier.get((fact.subject, fact.prompt))
            if hit is not None:
                b, old = hit
                if old.target_new is None or fact.target_new is None:
                    raise DataError(f"{fact.where}: an edit request needs a target_new")
                kind = "repeats" if old.target_new.strip() == fact.target_new.strip() else "contradicts"
                raise DataError(
                    f"{fact.where} ({fact.text!r} -> {fact.target_new!r}) {kind} batch {b}'s {old.where} "
                    f"({old.text!r} -> {old.target_new!r}); drop it, or pass overwrite=True to edit it again")

    def _accumulate(self, record: BatchRecord) -> None:
        """Add a batch's ``(P Kᵀ)(P Kᵀ)ᵀ`` to ``prev`` (P·KpKp·P per key hook, on P's device: the CPU)."""
        for hook, K in record.keys.items():
            gram = projected_gram(self.projections[hook].P, K)  # [d_k, d_k] float64
            if hook in self.prev:
                self.prev[hook].add_(gram)
            else:
                self.prev[hook] = gram

    def _metrics(self, record: BatchRecord, seconds: float) -> dict[str, Any]:
        params = edited_params(self.model, self.hparams)
        metrics: dict[str, Any] = {
            "seconds": seconds,
            "delta_norm": {n: float(d.double().norm()) for n, d in record.deltas.items()},
            "weight_norm": {n: float(p.detach().double().norm()) for n, p in params.items()},
            "weight_change_norm": {n: _change_norm(p.detach(), self.originals[n]) for n, p in params.items()},
        }
        if self.perplexity_fn is not None:
            metrics["perplexity"] = float(self.perplexity_fn(self.model, self.perplexity_sample))
        return metrics

    # ------------------------------------------------------------------ undo
    def _write_state(self, k: int) -> None:
        """Set the edited weights to their values after batch ``k`` (0 = unedited), bit for bit:
        the originals plus batches 1..k's ΔW added in order, exactly as they were written."""
        params = edited_params(self.model, self.hparams)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.originals[name])
            for record in self.history[:k]:
                for name, delta in record.deltas.items():
                    add_delta(params[name], delta)  # the write each batch made (pmet_lens.editing.delta)

    def undo(self, to: int | None = None) -> None:
        """Undo the last batch, or every batch after batch ``to`` (``to=0``: all), bit for bit.

        Raises:
            ValueError: ``to`` out of range or nothing to undo.
        """
        n = len(self.history)
        if to is None:
            if n == 0:
                raise ValueError("nothing to undo: the session has no batch")
            to = n - 1
        if not (isinstance(to, int) and 0 <= to <= n):
            raise ValueError(f"undo(to=...) must be an int in [0, {n}] (batches so far), got {to!r}")
        self._write_state(to)
        del self.history[to:]
        self.prev = {}
        for record in self.history:
            self._accumulate(record)

    # ------------------------------------------------------------ save/load
    def save(self, path: str | Path) -> Path:
        """Write the session (every batch's ΔW and keys, hparams, prefixes, metrics, the model's
        identity) to a safetensors file with JSON metadata, atomically."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        batches = []
        for b, record in enumerate(self.history):
            for name, d in record.deltas.items():
                tensors[f"batch{b}/delta/{name}"] = d.detach().cpu().contiguous()
            for hook, K in record.keys.items():
                tensors[f"batch{b}/keys/{hook}"] = K.detach().cpu().contiguous()
            batches.append({"facts": [f.to_counterfact() for f in record.facts], "stats": record.stats,
                            "metrics": record.metrics})

        dtypes = {dtype_name(p.dtype) for p in edited_params(self.model, self.hparams).values()}
        meta = {
            "format": _FORMAT,
            "model_hash": self.base_hash,
            "hash_scheme": HASH_SCHEME,
            "dtype": ",".join(sorted(dtypes)),
            "model_name": str(getattr(self.model.cfg, "model_name", "")),
            "hparams": json.dumps(self.hparams.to_dict()),
            "prefixes": json.dumps(list(self.prefixes)),
            "batches": json.dumps(batches),
            "baseline": json.dumps(self.baseline),
            "null_dims": json.dumps(self.null_dims),
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @staticmethod
    def read(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
        """The raw metadata and tensors of a session file (no model needed).

        Raises:
            ValueError: not a session file.
        """
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise ValueError(f"{path} is not a readable pmet-lens session file ({exc})") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a pmet-lens session file (format {meta.get('format')!r})")
        return meta, tensors

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: HookedTransformer,
        *,
        cov_store: CovarianceStore | None = None,
        nullspace_store: NullspaceStore | None = None,
        perplexity_sample: Any = None,
        perplexity_fn: Callable[[HookedTransformer, Any], float] | None = None,
        progress: bool = True,
        solve_options: SolveOptions | None = None,
    ) -> "EditSession":
        """Resume a saved session on ``model``, which must be the *unedited* model it was started on
        (checked by weights hash); the saved batches are written into it in order.

        Raises:
            TypeError: ``model`` is not a loaded model.
            ValueError: not a session file; a model in another dtype than the session's (the message
                names both); a model already edited (same name as the session's model, other weights:
                the message says how to load it fresh); another model.
        """

        require_model(model, "EditSession.load")
        meta, tensors = cls.read(path)
        hparams = hparams_from_dict(json.loads(meta["hparams"]))
        check_dtype(path, meta.get("dtype"), edited_params(model, hparams),
                    "resume the session on the model loaded in the dtype it was started in")
        current = file_weights_hash(meta, model)
        if current != meta["model_hash"]:
            saved_name = meta.get("model_name")
            if saved_name is not None and str(saved_name) == str(getattr(model.cfg, "model_name", "")):
                raise ValueError(
                    f"{path} was saved from a session on {saved_name!r}, and this model has that name but other "
                    f"weights (weights hash {current}; the session started from {meta['model_hash']}): it may "
                    "already be edited, e.g. the same session's model, or one a session was already loaded onto "
                    "or an edit applied to. Load the model fresh (model = pmet_lens.load_model(...), no edit "
                    "applied) and call EditSession.load(path, model) on it, once. If it is another model of the "
                    "same name, load the session on the unedited model it was started on")
            raise ValueError(
                f"{path} belongs to another model (weights hash {meta['model_hash']} of "
                f"{saved_name!r}; this model, {getattr(model.cfg, 'model_name', '')!r}, has {current}). Load it "
                "on the unedited model the session was started on (a fresh pmet_lens.load_model(), no edit applied)")
        self = cls.__new__(cls)
        self._bind(model, cov_store, nullspace_store, perplexity_sample, perplexity_fn, progress, solve_options)
        self.base_hash = current
        self.baseline = json.loads(meta.get("baseline", "{}"))
        self._start(hparams, tuple(json.loads(meta["prefixes"])))
        for b, info in enumerate(json.loads(meta["batches"])):  # history stays on the CPU
            deltas = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"batch{b}/delta/")}
            keys = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"batch{b}/keys/")}
            self.history.append(BatchRecord(facts=as_facts(info["facts"]), deltas=deltas, keys=keys,
                                            stats=info.get("stats", {}), metrics=info.get("metrics", {})))
        self._write_state(len(self.history))
        for record in self.history:
            self._accumulate(record)
        return self

    # ------------------------------------------------------------- queries
    def facts(self, batch: int | None = None) -> list[Fact]:
        """Requests of batch ``batch`` (1-based) or of every batch so far."""
        if batch is None:
            return [f for r in self.history for f in r.facts]
        if not 1 <= batch <= len(self.history):
            raise ValueError(f"batch must be in [1, {len(self.history)}], got {batch}")
        return list(self.history[batch - 1].facts)

    def curves(self) -> list[dict[str, Any]]:
        """One row per batch: batch number, facts, seconds, perplexity (if tracked), and per edited
        weight ‖ΔW‖ of the batch and ‖W + ΣΔW‖ after it (JSON-ready)."""
        rows = []
        for b, record in enumerate(self.history, 1):
            m = record.metrics
            row: dict[str, Any] = {"batch": b, "facts": len(record.facts), "seconds": m.get("seconds")}
            if "perplexity" in m:
                row["perplexity"] = m["perplexity"]
            for name, v in m.get("delta_norm", {}).items():
                row[f"delta_norm/{name}"] = v
            for name, v in m.get("weight_norm", {}).items():
                row[f"weight_norm/{name}"] = v
            for name, v in m.get("weight_change_norm", {}).items():
                row[f"weight_change_norm/{name}"] = v
            rows.append(row)
        return rows


def _change_norm(param: torch.Tensor, original: torch.Tensor, rows: int = 4096) -> float:
    """‖param − original‖ in float64, a block of rows at a time on the parameter's device (the
    original may stay on the CPU; no float64 copy of the whole weight)."""
    a = param.reshape(-1, param.shape[-1])  # [..., d_model] -> [rows, d_model]
    b = original.reshape(-1, original.shape[-1])
    total = 0.0
    for i in range(0, a.shape[0], rows):
        diff = a[i:i + rows].double() - b[i:i + rows].to(device=a.device, dtype=torch.float64)
        total += float(diff.pow(2).sum())
    return total ** 0.5
