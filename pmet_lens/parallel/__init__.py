"""Scale-out on Ray: run the shards of a stage on a pool of workers and get the single-process result.

Every embarrassingly parallel stage of pmet-lens (PMET Fig. 2 per prompt, causal traces per fact
or position, target optimisation per fact, the key statistics C per corpus chunk, evaluation per
record, perplexity per text window) has a per-shard function that both its single-process path
and the workers call. The stage cuts its items into shards and hands them to :func:`run_shards`,
which runs them in this process (``workers=None``) or on a :class:`Workers` pool (an int: a local
pool of that size, started and shut down around the call) and returns the shards' results in
shard order; the stage combines them exactly as it combines its own batches.

A :class:`Workers` pool joins a Ray cluster (``address`` or ``RAY_ADDRESS``) or starts a local one;
each worker is a Ray actor holding one copy of the model, built from its config, tokenizer and
weights sent through Ray's object store (no shared disk, unsaved or edited models work). Before every
call the pool sends the parameters that changed on the driver since the last call, so workers always
compute with the driver model's current weights. A worker that dies mid-shard is restarted and the
shard runs again; a shard that keeps failing ends the call with a :class:`ShardError` naming it and
its cause. A :class:`ShardLog` writes every finished shard to disk, so a killed run resumes with the
unfinished shards only.

Ray is an optional extra (``pip install pmet-lens[ray]``) and is imported only when a pool is made:
importing this package does not import it.
"""

from __future__ import annotations

from pmet_lens.parallel.pool import Workers, weights_digest
from pmet_lens.parallel.shards import (
    ShardError,
    ShardLog,
    auto_shard_size,
    one_pool,
    pool_of,
    pool_size,
    run_shards,
    shard_ranges,
)

__all__ = [
    "ShardError",
    "ShardLog",
    "Workers",
    "auto_shard_size",
    "one_pool",
    "pool_of",
    "pool_size",
    "run_shards",
    "shard_ranges",
    "weights_digest",
]
