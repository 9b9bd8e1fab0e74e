"""Model identity: a content hash of the weights (not the model's name), computed once per model state.

The hash is a two-level blake2b: every parameter's bytes are hashed on their own (a 16-byte
digest), and a model hash is the blake2b of the sequence ``name|shape|dtype`` + digest of the
parameters it covers, in the model's parameter order. It does not depend on memory layout
(column-major fast-path weights hash like the stock row-major ones) or on the device.

A parameter's digest is kept by a :class:`WeightsIdentity` attached to the model
(:func:`identity_cache`) and reused while the parameter is unchanged: same storage, same
autograd version counter (every in-place write through the parameter or a ``detach()`` of it
bumps it) and the same evenly spaced sample of its entries (which catches a dense write through
``.data``, which the counter does not see). So a model whose weights did not change is never copied
to the host again, and after an edit only the edited weights are read and hashed again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, cast

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import feeds_layer

__all__ = ["HASH_SCHEME", "WeightsIdentity", "combine", "hash_named_tensors", "identity_cache", "legacy_weights_hash",
           "sample_indices", "tensor_digest", "weights_hash", "weights_hashes"]

HASH_SCHEME = "pmet-lens-weights/2"
"""Name of the hash construction above (edit and session files record it; files without it were
hashed by :func:`legacy_weights_hash`)."""

_ATTR = "pmet_weights_identity"
_SAMPLE = 256


def sample_indices(numel: int, n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``min(n, numel)`` evenly spaced flat indices ``0 .. numel − 1`` (first and last included),
    in int64 arithmetic (a float ``linspace`` rounds past ``numel − 1`` beyond 2²⁴ entries)."""
    m = min(n, numel)
    if m <= 1:
        return torch.zeros(m, dtype=torch.long, device=device)
    return torch.arange(m, dtype=torch.long, device=device) * (numel - 1) // (m - 1)


def tensor_digest(t: torch.Tensor) -> bytes:
    """blake2b (16 bytes) of a tensor's values, row-major, whatever its strides and device."""
    data = cast(bytes, t.detach().cpu().contiguous().view(torch.uint8).numpy() if t.numel() else b"")
    return hashlib.blake2b(data, digest_size=16).digest()


def _header(name: str, t: torch.Tensor) -> bytes:
    return f"{name}|{tuple(t.shape)}|{t.dtype}|".encode()


def _sample(t: torch.Tensor) -> torch.Tensor:
    """Up to ``_SAMPLE`` evenly spaced entries (row-major order) as float64, gathered without a copy
    of the tensor (fast-path weights are column-major)."""
    idx = sample_indices(t.numel(), _SAMPLE, t.device)
    return t.detach()[torch.unravel_index(idx, t.shape)].to(torch.float64)


@dataclass
class _Entry:
    key: tuple
    sample: torch.Tensor  # CPU float64
    digest: bytes


class WeightsIdentity:
    """Per-parameter digests of one model (:func:`identity_cache` attaches one to the model).

    :meth:`digests` returns ``(name, header, digest)`` for every parameter, reading and hashing
    only the parameters whose storage pointer, version counter, dtype, shape or sampled entries
    changed since the last call.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.rehashed = 0  # parameters read and hashed so far (for benchmarks and tests)

    @staticmethod
    def _key(p: torch.Tensor) -> tuple:
        return (p.data_ptr(), p._version, p.dtype, tuple(p.shape), tuple(p.stride()), str(p.device))

    def digests(self, model: torch.nn.Module) -> list[tuple[str, bytes, bytes]]:
        """``(name, header, digest)`` per parameter of ``model``, in parameter order."""
        params = [(name, p.detach()) for name, p in model.named_parameters()]
        # one host transfer per device for all samples of the parameters whose key is unchanged
        candidates = [(name, p) for name, p in params
                      if name in self._entries and self._entries[name].key == self._key(p)]
        same: set[str] = set()
        by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for name, p in candidates:
            by_device.setdefault(p.device, []).append((name, p))
        for group in by_device.values():
            samples = [_sample(p) for _, p in group]
            host = torch.cat(samples).cpu().split([s.numel() for s in samples])
            for (name, _), now in zip(group, host):
                if torch.equal(now, self._entries[name].sample):
                    same.add(name)
        out = []
        for name, p in params:
            if name not in same:
                self._entries[name] = _Entry(key=self._key(p), sample=_sample(p).cpu(), digest=tensor_digest(p))
                self.rehashed += 1
            out.append((name, _header(name, p), self._entries[name].digest))
        known = {name for name, _ in params}
        for name in [n for n in self._entries if n not in known]:
            del self._entries[name]
        return out


def identity_cache(model: HookedTransformer) -> WeightsIdentity:
    """The :class:`WeightsIdentity` attached to ``model`` (created on first use)."""
    cache = getattr(model, _ATTR, None)
    if not isinstance(cache, WeightsIdentity):
        cache = WeightsIdentity()
        setattr(model, _ATTR, cache)
    return cache


def combine(entries: Iterable[tuple[str, bytes, bytes]], upto_layers: Iterable[int]) -> tuple[str, dict[int, str]]:
    """The model hash of ``(name, header, digest)`` entries and its restriction to what blocks
    ``0..l`` depend on (embeddings and those blocks) for each ``l``."""
    layers = sorted(set(upto_layers))
    full = hashlib.blake2b(digest_size=16)
    partial = {l: hashlib.blake2b(digest_size=16) for l in layers}
    for name, header, digest in entries:
        full.update(header + digest)
        for l in layers:
            if feeds_layer(name, l):
                partial[l].update(header + digest)
    return full.hexdigest(), {l: h.hexdigest() for l, h in partial.items()}


def hash_named_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The full model hash of ``(name, tensor)`` pairs given in parameter order (each tensor read
    once, e.g. produced one at a time from another layout without building the model)."""
    return combine(((name, _header(name, t), tensor_digest(t)) for name, t in tensors), [])[0]


def weights_hash(model: HookedTransformer, upto_layer: int | None = None) -> str:
    """Hash of the model's parameters (names, shapes, dtypes and values; see the module docstring).

    ``upto_layer`` restricts the hash to what the activations of blocks ``0..upto_layer``
    depend on (embeddings and those blocks), which is all a layer's key statistics depend on.
    """
    full, partial = weights_hashes(model, [] if upto_layer is None else [upto_layer])
    return full if upto_layer is None else partial[upto_layer]


def weights_hashes(model: HookedTransformer, upto_layers: Iterable[int]) -> tuple[str, dict[int, str]]:
    """The full :func:`weights_hash` and ``weights_hash(model, l)`` for each ``l``, from the
    parameters' cached digests (:func:`identity_cache`)."""
    return combine(identity_cache(model).digests(model), upto_layers)


def _legacy_chunks(model: HookedTransformer) -> Iterator[bytes]:
    for name, param in model.named_parameters():
        t = param.detach()
        yield f"{name}|{tuple(t.shape)}|{t.dtype}".encode()
        yield cast(bytes, t.cpu().contiguous().view(torch.uint8).numpy() if t.numel() else b"")


def legacy_weights_hash(model: HookedTransformer) -> str:
    """The full weights hash as files written before :data:`HASH_SCHEME` recorded it (one blake2b
    over every parameter's header and bytes): read only to check such a file."""
    digest = hashlib.blake2b(digest_size=16)
    for chunk in _legacy_chunks(model):
        digest.update(chunk)
    return digest.hexdigest()
