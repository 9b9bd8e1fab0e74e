"""Second-moment statistics C^l = E[k kᵀ] of the edited weights' keys (MEMIT eq. 14's K0K0ᵀ/n).

A :class:`CovarianceStore` is an object the caller passes in (no module-level cache). It
streams a text corpus through the model with a progress bar, reading the keys of as many layers per
pass as its working-set budget allows (``working_bytes``: each layer being accumulated holds one
float64 ``[d_k, d_k]`` sum), and keeps every finished matrix on the CPU: a caller moves one matrix to
the model's device for its own layer's solve only. It caches each matrix on disk under a key naming
the model (hash of the weights the keys depend on), the tokenizer, the hook (hence the layer),
the corpus (content hash), the token count, the sequence length and the dtype. Files are written
atomically (temporary file + ``os.replace``); a truncated, corrupt or mismatching file is
detected, logged as a warning and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, cast

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import EDIT_WEIGHTS, architecture, block_index
from pmet_lens.core.cachefile import read_matrix, write_matrix
from pmet_lens.core.models import default_cache_dir, require_model
from pmet_lens.core.paths import file_locks
from pmet_lens.core.tokens import tokenizer_of
from pmet_lens.data import wikitext_path
from pmet_lens.editing.identity import weights_hashes

logger = logging.getLogger(__name__)

__all__ = ["CovarianceStore", "covariance_sums"]

_FORMAT = 1


class CovarianceStore:
    """Builds and caches C = E[k kᵀ] per (model, hook, corpus, token count, dtype).

    Args:
        cache_dir: directory of the ``.safetensors`` cache files; default
            ``default_cache_dir() / "covariance"``. ``False`` disables the disk cache.
        corpus: default the shipped WikiText-2 raw validation + test splits
            (:func:`pmet_lens.data.wikitext_path`). A ``str`` or ``Path``: one text file, which
            must exist. Otherwise an iterable whose items are texts (``str``), text files
            (``Path``) or records holding their text under ``text_field``, such as the rows of a
            ``datasets.Dataset`` (read whole: pass ``dataset.select(range(n))`` of a large one).
            A corpus with fewer tokens than a requested C needs is an error, not a smaller sample.
        text_field: the field of a record that holds its text (``datasets`` corpora).
        batch_size: corpus chunks per forward pass.
        progress: show a tqdm progress bar while streaming the corpus.
        working_bytes: most bytes of float64 accumulators held at once while C is built: the
            requested layers are grouped, in ascending order, into corpus passes whose ``8 d_k²``
            sums fit (at least one layer per pass). ``None``: every layer in one pass. Each
            grouping gives the same C bit for bit (each layer's sum sees the same float32 batch
            products in the same order); more passes cost more forward blocks (a pass runs the
            blocks up to its highest layer).
    """

    def __init__(
        self,
        cache_dir: str | Path | None | bool = None,
        corpus: str | Path | Iterable[str | Path | Mapping[str, Any]] | None = None,
        batch_size: int = 4,
        progress: bool = True,
        text_field: str = "text",
        working_bytes: int | None = 2 * 2**30,
    ) -> None:
        if cache_dir is False:
            self.cache_dir: Path | None = None
        else:
            self.cache_dir = (Path(cast("str | Path", cache_dir)) if cache_dir not in (None, True)
                              else default_cache_dir() / "covariance")
        self._texts = _corpus_texts(corpus, text_field)
        self.corpus_hash = hashlib.sha256("\x00".join(self._texts).encode()).hexdigest()[:16]
        self.batch_size = batch_size
        self.progress = progress
        if working_bytes is not None and (isinstance(working_bytes, bool) or not isinstance(working_bytes, int)
                                          or working_bytes < 1):
            raise ValueError(f"working_bytes must be a positive int or None, got {working_bytes!r}")
        self.working_bytes = working_bytes
        self._memory: dict[str, torch.Tensor] = {}
        self._tokenizer_hashes: dict[int, tuple[Any, str]] = {}  # id -> (tokenizer, hash)
        self.last_build_seconds: float = 0.0

    # ------------------------------------------------------------------ public
    def get(
        self,
        model: HookedTransformer,
        hooks: Sequence[str],
        n_tokens: int,
        dtype: str = "float32",
        seq_len: int = 256,
        *,
        layer_hashes: dict[int, str] | None = None,
        workers: Any = None,
    ) -> dict[str, Float[torch.Tensor, "d d"]]:
        """C for each key hook name (``EditSite.key_hook``: the input of W_out
        or of W_O at a layer), on the CPU, in ``dtype``. Missing matrices are built by streaming the
        corpus (layers grouped into passes by ``working_bytes``); a caller moves one matrix to the
        model's device for its own layer's solve only (``cov.to(keys.device)``), so the device never
        holds every layer's C at once.

        ``layer_hashes`` (layer -> ``weights_hash(model, upto_layer=layer)``, e.g. from
        :func:`~pmet_lens.editing.identity.weights_hashes`) saves the pass over the weights that
        computes them; they must be the model's current hashes.

        ``workers`` (an int or a :class:`~pmet_lens.parallel.Workers` pool) builds a missing C on a pool:
        each worker sums k kᵀ over a share of the corpus chunks (:func:`covariance_sums`) and the
        float64 sums are added in chunk order, so C equals the single-process one up to float64
        rounding. A matrix being built by another process is waited for (a lock per entry), not
        built twice."""
        layers = sorted({block_index(h) for h in hooks})
        if layer_hashes is None or any(l not in layer_hashes for l in layers):
            layer_hashes = weights_hashes(model, layers)[1]
        tok = self._tokenizer_hash(model)
        keys = {h: self._key_for(layer_hashes[block_index(h)], tok, h, n_tokens, dtype, seq_len) for h in hooks}
        out: dict[str, torch.Tensor] = {}
        missing = []
        for hook, key in keys.items():
            cov = self._memory.get(key)
            if cov is None:
                cov = self._read(key)
            if cov is None:
                missing.append(hook)
            else:
                self._memory[key] = cov
                out[hook] = cov
        if missing:
            # several processes (pool workers, parallel runs) may miss the same entries: the first to take
            # the entries' locks builds and writes them, the others wait, then read what it wrote
            with file_locks(self._lock_path(keys[h]) for h in missing if self.cache_dir is not None):
                for hook in list(missing):
                    cov = self._read(keys[hook])
                    if cov is not None:
                        self._memory[keys[hook]] = out[hook] = cov
                        missing.remove(hook)
                if missing:
                    import time

                    start = time.perf_counter()
                    built = self._build(model, missing, n_tokens, getattr(torch, dtype), seq_len, workers=workers)
                    self.last_build_seconds = time.perf_counter() - start
                    for hook, cov in built.items():
                        self._memory[keys[hook]] = cov
                        self._write(keys[hook], cov)
                        out[hook] = cov
        return {h: out[h] for h in hooks}

    def cache_key(self, model: HookedTransformer, hook: str, n_tokens: int, dtype: str = "float32",
                  seq_len: int = 256, *, layer_hashes: dict[int, str] | None = None) -> str:
        """The name of one matrix in the cache (hook, weights hash up to its layer, tokenizer, corpus,
        token count, sequence length, dtype); statistics derived from C (the null-space projector of
        :class:`~pmet_lens.editing.nullspace.NullspaceStore`) are cached under it. ``layer_hashes``
        as in :meth:`get`."""
        layer = block_index(hook)
        if layer_hashes is None or layer not in layer_hashes:
            layer_hashes = weights_hashes(model, [layer])[1]
        return self._key_for(layer_hashes[layer], self._tokenizer_hash(model), hook, n_tokens, dtype, seq_len)

    def path_for(self, model: HookedTransformer, hook: str, n_tokens: int, dtype: str = "float32",
                 seq_len: int = 256) -> Path | None:
        """Cache file of one matrix (``None`` without a disk cache)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self._key(model, hook, n_tokens, dtype, seq_len)}.safetensors"

    # ----------------------------------------------------------------- private
    def _key(self, model: HookedTransformer, hook: str, n_tokens: int, dtype: str, seq_len: int) -> str:
        layer = block_index(hook)
        return self._key_for(weights_hashes(model, [layer])[1][layer], self._tokenizer_hash(model), hook, n_tokens,
                             dtype, seq_len)

    def _key_for(self, model_hash: str, tokenizer_hash: str, hook: str, n_tokens: int, dtype: str, seq_len: int) -> str:
        name = hook.replace(".", "-")
        return (f"{name}_m{model_hash[:16]}_t{tokenizer_hash}_c{self.corpus_hash}_n{n_tokens}_s{seq_len}_{dtype}")

    def _tokenizer_hash(self, model: HookedTransformer) -> str:
        """Hash of the tokenizer (it decides which keys the corpus gives), once per tokenizer object."""
        tok = tokenizer_of(model)
        known = self._tokenizer_hashes.get(id(tok))
        if known is None or known[0] is not tok:
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                # the vocabulary, merges, normalizer, ...; not the padding / truncation settings, which
                # every call of the tokenizer may change
                spec: Any = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
            else:  # a slow tokenizer: its vocabulary
                spec = sorted(tok.get_vocab().items())
            spec = json.dumps(spec, sort_keys=True)
            known = (tok, hashlib.sha256(f"{type(tok).__name__}\x00{spec}".encode()).hexdigest()[:12])
            self._tokenizer_hashes[id(tok)] = known
        return known[1]

    def _read(self, key: str) -> torch.Tensor | None:
        found = read_matrix(self.cache_dir, key, "cov", _FORMAT, what="Covariance")
        return None if found is None else found[0]

    def _write(self, key: str, cov: torch.Tensor) -> None:
        write_matrix(self.cache_dir, key, "cov", _FORMAT, cov)

    def _chunks(self, model: HookedTransformer, n_tokens: int, seq_len: int) -> list[list[int]]:
        tok = tokenizer_of(model)
        ids: list[int] = []
        for text in self._texts:
            for para in text.split("\n"):
                if para.strip():
                    ids.extend(tok(para, add_special_tokens=False)["input_ids"])
                    if len(ids) >= n_tokens:
                        break
            if len(ids) >= n_tokens:
                break
        if len(ids) < n_tokens:
            raise ValueError(f"the covariance corpus has {len(ids)} tokens but C needs {n_tokens} (cov_tokens): pass a "
                             "larger corpus to CovarianceStore(corpus=...) or lower cov_tokens in the hyper-parameters")
        ids = ids[:n_tokens]
        return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]

    def _lock_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.lock"

    def _build(self, model: HookedTransformer, hooks: Sequence[str], n_tokens: int, dtype: torch.dtype,
               seq_len: int, workers: Any = None) -> dict[str, torch.Tensor]:
        """C of each hook, built in passes over the corpus (:meth:`_passes`), each returned on the CPU;
        with ``workers`` each pass's corpus is split into shards of whole batches on a pool and the
        float64 sums added in corpus order."""
        chunks = self._chunks(model, n_tokens, min(seq_len, model.cfg.n_ctx))
        out: dict[str, torch.Tensor] = {}
        passes = self._passes(model, hooks)
        logger.info("Estimating E[k k^T] for %s over %d tokens in %d corpus pass(es)", list(hooks),
                    sum(map(len, chunks)), len(passes))
        for group in passes:
            sums, count = self._sums(model, group, chunks, dtype, workers)
            for h in group:
                total = sums.pop(h)
                out[h] = total.div_(count).to(device="cpu", dtype=dtype)
                del total
        return out

    def _passes(self, model: HookedTransformer, hooks: Sequence[str]) -> list[list[str]]:
        """The hooks grouped into corpus passes, layers ascending: a pass's float64 sums (``8 d_k²``
        bytes each, ``d_k`` the width of the hook's activation) stay within ``working_bytes``."""
        ordered = sorted(hooks, key=lambda h: (block_index(h), h))
        if self.working_bytes is None:
            return [ordered]
        groups: list[list[str]] = []
        used = 0
        for hook in ordered:
            need = 8 * _key_width(model, hook) ** 2
            if groups and used + need <= self.working_bytes:
                groups[-1].append(hook)
                used += need
            else:
                groups.append([hook])
                used = need
        return groups

    def _sums(self, model: HookedTransformer, hooks: Sequence[str], chunks: list[list[int]], dtype: torch.dtype,
              workers: Any) -> tuple[dict[str, torch.Tensor], int]:
        """One corpus pass: :func:`covariance_sums` of every chunk, here or on a pool in shards of whole
        batches (so every forward sees the rows it sees in one process), summed in corpus order."""
        if workers is None:
            return covariance_sums(model, chunks, hooks, dtype, self.batch_size, self.progress)
        from pmet_lens.parallel import pool_size, run_shards, shard_ranges

        per = self.batch_size * max(1, -(-len(chunks) // (self.batch_size * 4 * pool_size(workers))))
        parts = run_shards(model, covariance_sums, [(chunks[a:b],) for a, b in shard_ranges(len(chunks), per)],
                           common={"hooks": list(hooks), "dtype": dtype, "batch_size": self.batch_size},
                           workers=workers, desc="covariance", progress=self.progress)
        sums = {h: parts[0][0][h] for h in hooks}
        for part in parts[1:]:  # float64, in corpus order
            for h in hooks:
                sums[h].add_(part[0][h].to(sums[h].device))
        return sums, sum(p[1] for p in parts)


def _key_width(model: HookedTransformer, hook: str) -> int:
    """Width d_k of a key hook's activation: the input width of the output weight it feeds
    (:meth:`~pmet_lens.core.arch.Architecture.edit_key_hook`; W_O's flattened over the heads), or
    ``max(d_mlp, d_model)`` for any other hook (a bound for the working-set budget)."""
    arch = architecture(model)
    layer = block_index(hook)
    for weight in EDIT_WEIGHTS:
        if arch.edit_key_hook(weight, layer) == hook:
            param = arch.edit_param(model, weight, layer)
            return param.numel() // param.shape[-1]  # [d_k, d_model] or [heads, d_head, d_model]
    return max(int(model.cfg.d_mlp or 0), int(model.cfg.d_model))


def covariance_sums(model: HookedTransformer, chunks: Sequence[Sequence[int]], hooks: Sequence[str],
                    dtype: torch.dtype, batch_size: int = 4,
                    progress: bool = False) -> tuple[dict[str, Float[torch.Tensor, "d d"]], int]:
    """Σ k kᵀ (float64) at each key hook over the tokens of ``chunks`` (token-id lists,
    ``batch_size`` per forward, padding excluded) and the number of tokens summed: one shard of C's
    corpus pass. C = the sum over all chunks / the count."""
    require_model(model, "pmet_lens.editing.covariance.covariance_sums")
    from pmet_lens.core.tokens import pad

    sums: dict[str, torch.Tensor] = {}
    count = 0
    stop = max(block_index(h) for h in hooks) + 1
    mask_holder: dict[str, torch.Tensor] = {}

    def accumulate(act: torch.Tensor, hook) -> None:
        flat = act.reshape(act.shape[0] * act.shape[1], -1)[mask_holder["mask"]].to(dtype)  # [batch*pos, d] real tokens
        prod = flat.T @ flat  # [d, d] in dtype
        if hook.name in sums:
            sums[hook.name].add_(prod)  # float64 += dtype, converted element by element (no float64 copy)
        else:
            sums[hook.name] = prod.to(torch.float64)

    bar = tqdm(range(0, len(chunks), batch_size), desc="covariance", disable=not progress)
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, accumulate) for h in hooks]):
        for start in bar:
            batch = pad(model, [list(c) for c in chunks[start:start + batch_size]])
            width = batch.tokens.shape[1]
            mask = (torch.arange(width, device=batch.tokens.device)[None, :] < batch.lengths[:, None]).reshape(-1)
            mask_holder["mask"] = mask
            count += int(mask.sum())
            model(batch.tokens, stop_at_layer=stop)
    return sums, count


def _corpus_texts(corpus: str | Path | Iterable[str | Path | Mapping[str, Any]] | None, text_field: str) -> list[str]:
    """The corpus as a list of texts (see :class:`CovarianceStore`)."""
    if corpus is None:
        return [p.read_text(encoding="utf-8") for p in wikitext_path()]
    if isinstance(corpus, (str, Path)):
        corpus = [Path(corpus)]
    texts = []
    for i, item in enumerate(corpus):
        if isinstance(item, Path):
            if not item.is_file():
                raise FileNotFoundError(f"covariance corpus file {item} does not exist")
            texts.append(item.read_text(encoding="utf-8"))
        elif isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping):
            if text_field not in item:
                raise ValueError(f"covariance corpus record #{i} has no {text_field!r} field (it has {sorted(item)}); "
                                 "name the text field with CovarianceStore(text_field=...)")
            texts.append(str(item[text_field]))
        else:
            raise TypeError(f"covariance corpus item #{i} is a {type(item).__name__}; expected a text (str), a file "
                            "(Path) or a record (mapping) with a text field")
    if not any(t.strip() for t in texts):
        raise ValueError("the covariance corpus is empty")
    return texts
