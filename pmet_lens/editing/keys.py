"""Keys of edit requests: the input k^l of an edited weight at the subject's last token.

The key of fact i at layer l is the weight's input at the lookup position averaged over the
context-prefixed prompts pref_j ⊕ p(s_i) (MEMIT eq. 14's k_i; PMET eq. 10) as the official
``compute_ks`` averages it: the mean within each group of templates (the bare prompt; the prefixed
prompts), then the mean over the groups, so the bare prompt carries half the weight.
:func:`request_keys` is the one place that computes it: the weight update and any statistic over
the edited keys (e.g. K_p K_pᵀ of earlier batches) read keys from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.editing.prepared import PreparedRequests, PromptRows
from pmet_lens.editing.site import EditSite

__all__ = ["KEY_TOKENS", "LayerReading", "PromptRun", "prefix_mean", "request_keys"]


KEY_TOKENS = 8192
"""Default token budget of one forward when keys are read (:class:`PromptRun`): rows x padded width."""


@dataclass(frozen=True)
class PromptRun:
    """The prompt rows of prepared requests with the residual stream entering block ``start``
    computed once (blocks before the lowest edited layer never change during an update), in
    chunks of consecutive rows of at most ``max_tokens`` tokens (rows x the chunk's widest row),
    so that no forward holds every fact x template at once.

    Attributes:
        rows: :meth:`PreparedRequests.rows` (no target tokens, no KL prompts).
        start: the block the cached residual stream enters.
        chunks: per chunk, its first row and its ``[chunk rows, chunk width, d_model]`` residual
            stream entering block ``start`` (rows in order, each chunk padded to its own widest row).
    """

    rows: PromptRows
    start: int
    chunks: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def build(cls, model: HookedTransformer, requests: PreparedRequests, start: int, *,
              max_tokens: int = KEY_TOKENS) -> "PromptRun":
        """Run the rows up to block ``start``, ``max_tokens`` tokens (at least one row) per forward."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        rows = requests.rows(model)
        lengths = rows.lengths.tolist()
        chunks = []
        with torch.no_grad():
            first = 0
            while first < len(lengths):
                end, width = first + 1, lengths[first]
                while end < len(lengths) and (end - first + 1) * max(width, lengths[end]) <= max_tokens:
                    width = max(width, lengths[end])
                    end += 1
                tokens = rows.tokens[first:end, :width]  # right-padded: columns past the widest row are padding
                chunks.append((first, model(tokens, stop_at_layer=start)))
                first = end
        return cls(rows=rows, start=start, chunks=tuple(chunks))


@dataclass(frozen=True)
class LayerReading:
    """What :func:`request_keys` read in one forward pass.

    Attributes:
        keys: site -> ``[facts, d_k]`` keys (W_O's flattened over the heads), averaged over the
            context templates by :func:`prefix_mean` (group-weighted).
        outputs: hook name -> ``[facts, d]`` activation at the bare prompt's lookup position.
        bare_keys: site -> ``[facts, d_k]`` keys of the bare prompt alone (ROME's k_s).
        mean_outputs: hook name -> ``[facts, d]`` activation averaged over the templates as the keys
            are (:func:`prefix_mean`; r-ROME's mean_j(k_j W + b) at the weight's own output).
    """

    keys: dict[EditSite, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    bare_keys: dict[EditSite, torch.Tensor] = field(default_factory=dict)
    mean_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def prefix_mean(per_row: torch.Tensor, requests: PreparedRequests) -> torch.Tensor:
    """``[facts · templates, d]`` row values (fact-major, as :meth:`PreparedRequests.rows`) -> ``[facts, d]``:
    per fact, the mean over the groups (:attr:`PreparedRequests.template_groups`) of the mean within
    each group. With prefixes the bare prompt's weight is 1/2 and each prefixed prompt's 1/(2·#prefixes)."""
    n, p = len(requests), len(requests.templates)
    x = per_row.reshape(n, p, -1).to(torch.promote_types(per_row.dtype, torch.float32))  # [facts, templates, d], float32+
    groups = [x[:, list(g)].mean(1) for g in requests.template_groups]    # each [facts, d]
    return torch.stack(groups).mean(0)                                    # [groups, facts, d] -> [facts, d]


def request_keys(
    model: HookedTransformer,
    requests: PreparedRequests,
    sites: Sequence[EditSite],
    *,
    outputs: Sequence[str] = (),
    stop_layer: int | None = None,
    run: PromptRun | None = None,
) -> LayerReading:
    """Keys of ``requests`` at each of ``sites`` on the model as it is now, one forward per chunk of rows.

    Args:
        sites: edit sites whose keys to read (any layers).
        outputs: hook names also read, at the bare prompt's lookup position (the update's current
            output at L).
        stop_layer: run blocks up to (excluding) this one; default one past the highest site. It must
            include the blocks of ``outputs``.
        run: prompt rows with a cached residual stream (``PromptRun.build``); default built here,
            starting at the lowest site's block, in chunks of :data:`KEY_TOKENS` tokens. Each chunk
            of rows is one forward; the keys equal those of one forward over all rows up to float
            rounding.
    """
    if run is None:
        run = PromptRun.build(model, requests, min(site.layer for site in sites))
    if stop_layer is None:
        stop_layer = max(site.layer for site in sites) + 1
    got: dict[str, list[torch.Tensor]] = {}
    window: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook) -> None:
        rows, lookup = window["rows"], window["lookup"]
        got.setdefault(hook.name, []).append(act[rows, lookup].reshape(len(rows), -1).clone())  # [rows, ...] -> [rows, d]

    names = {*(site.key_hook for site in sites), *outputs}
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, grab) for h in names]):
        for first, resid in run.chunks:
            n = resid.shape[0]
            window["rows"] = torch.arange(n, device=resid.device)
            window["lookup"] = run.rows.lookup[first:first + n].to(resid.device)
            model(resid, start_at_layer=run.start, stop_at_layer=stop_layer)
    missing = names - set(got)
    if missing:
        raise ValueError(f"hooks {sorted(missing)} did not run before block {stop_layer}: raise stop_layer")
    values = {h: torch.cat(parts) for h, parts in got.items()}  # chunks in row order -> [rows, d]
    bare = {h: run.rows.bare.to(v.device) for h, v in values.items()}
    return LayerReading(keys={site: prefix_mean(values[site.key_hook], requests) for site in sites},
                        outputs={h: values[h][bare[h]] for h in outputs},
                        bare_keys={site: values[site.key_hook][bare[site.key_hook]] for site in sites},
                        mean_outputs={h: prefix_mean(values[h], requests) for h in outputs})
