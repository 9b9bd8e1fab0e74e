"""The worker pool itself: model sync, faults, closing, resources, resuming, and cache races."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from pmet_lens.analysis.averaged import average_traces
from pmet_lens.analysis.similarity import component_similarity
from pmet_lens.parallel import ShardError, ShardLog, Workers, run_shards, weights_digest

from .pool_helpers import PROMPTS, known_facts

REPO = Path(__file__).resolve().parents[2]


def test_workers_follow_edits_made_on_the_driver(pool, model):
    assert pool.broadcast(model, weights_digest) == [weights_digest(model)] * pool.n
    before = component_similarity(model, PROMPTS, k=10, batch_size=4, progress=False, workers=pool)
    W = model.blocks[1].mlp.W_out
    original = W.detach().clone()
    try:
        with torch.no_grad():
            W.add_(0.5 * torch.randn_like(W))
        after = component_similarity(model, PROMPTS, k=10, batch_size=4, progress=False, workers=pool)
        # only the edited tensor travelled
        assert pool.timings["last_send_bytes"] == W.numel() * W.element_size()
        assert pool.broadcast(model, weights_digest) == [weights_digest(model)] * pool.n
        single = component_similarity(model, PROMPTS, k=10, batch_size=4, progress=False)
        assert not after["mean"].equals(before["mean"])
        assert (after["mean"] - single["mean"]).abs().max() <= 1e-6
    finally:
        with torch.no_grad():
            W.copy_(original)
    assert pool.broadcast(model, weights_digest) == [weights_digest(model)] * pool.n


SHARD = 1200
"""Prompts per shard of the worker-kill tests."""
KILL_AFTER = 0.5
"""Seconds after the call starts at which the tests kill a worker."""


def test_a_worker_killed_mid_shard_does_not_change_the_result(pool, model):
    # two shards of SHARD prompts: about 3 s each on one thread of the 2-core CI machine, so the kill at
    # KILL_AFTER lands mid-shard with a wide margin on faster CPUs too (a shard of 300 took 0.8 s there)
    prompts = PROMPTS * (2 * SHARD // len(PROMPTS))
    single = component_similarity(model, prompts, k=10, batch_size=60, progress=False)
    pool.sync(model)
    start = len(pool.history)
    victim = pool.pids[0]
    timer = threading.Timer(KILL_AFTER, os.kill, (victim, signal.SIGKILL))
    timer.start()
    try:
        sharded = component_similarity(model, prompts, k=10, batch_size=60, progress=False, workers=pool,
                                       shard_size=SHARD)
    finally:
        timer.cancel()
    runs = pool.history[start:]
    retried = [r for r in runs if r["attempts"] > 1]
    assert retried and retried[0]["first_pid"] == victim and retried[0]["pid"] != victim, runs  # killed mid-shard
    assert (sharded["mean"] - single["mean"]).abs().max() <= 1e-6
    assert victim not in pool.pids  # the restarted worker took its place


def test_a_failing_shard_ends_the_call_naming_it(pool, model):
    from pmet_lens.analysis.tracing import trace

    shards = [("The Eiffel Tower is in", "Eiffel Tower"), ("Paris is nice", "London")]
    with pytest.raises(ShardError, match=r"shard 1 of 2 failed .*ValueError") as info:
        run_shards(model, trace, shards, common={"samples": 1}, workers=pool, desc="traces")
    assert info.value.shard == 1 and isinstance(info.value.cause, ValueError)
    # a worker that dies on every try: no partial table, an error naming the shard
    retries, pool.retries = pool.retries, 0
    pool.sync(model)
    victim = pool.pids[0]
    timer = threading.Timer(KILL_AFTER, os.kill, (victim, signal.SIGKILL))
    timer.start()
    try:
        with pytest.raises(ShardError, match=r"shard 0 of 2 failed: its worker died 1 times"):
            component_similarity(model, PROMPTS * (2 * SHARD // len(PROMPTS)), k=10, batch_size=60, progress=False,
                                 workers=pool, shard_size=SHARD)
    finally:
        timer.cancel()
        pool.retries = retries


def test_hooks_on_the_driver_model_are_refused(pool, model):
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda act, hook: act)]):
        with pytest.raises(ValueError, match="hooks attached"):
            component_similarity(model, PROMPTS, k=10, progress=False, workers=pool)


def test_an_unsatisfiable_pool_is_a_clear_error(pool):
    with pytest.raises(ValueError, match="need 3 CPUs .* has 2"):
        Workers(3, threads_per_worker=1)
    with pytest.raises(ValueError, match="need 2 GPUs"):
        Workers(2, threads_per_worker=1, gpus_per_worker=1)


_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, "tests")
from conftest import TINY_VARIANTS, make_tiny_model
from pmet_lens.analysis.averaged import average_traces
from pmet_lens.parallel import ShardLog
from parallel.pool_helpers import known_facts

saved = []
original = ShardLog.save

def save_then_die(self, i, value):
    original(self, i, value)
    saved.append(i)
    if len(saved) == 2:  # the driver is killed right after its second finished shard
        print("ray imported:", "ray" in sys.modules, flush=True)  # a run without workers never imports it
        os.kill(os.getpid(), signal.SIGKILL)

ShardLog.save = save_then_die
model = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])
average_traces(model, known_facts(model), kinds=("hidden",), samples=2, window=2, progress=False,
               checkpoint=ShardLog(sys.argv[1]))
"""


def test_resume_after_a_killed_driver_redoes_only_unfinished_shards(model, tmp_path, monkeypatch):
    log_dir = tmp_path / "shards"
    out = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(log_dir)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert "ray imported: False" in out.stdout  # import pmet_lens and a workers=None run leave Ray alone
    finished = sorted(log_dir.glob("shard-*.pt"))
    assert len(finished) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}

    import pmet_lens.analysis.averaged as averaged

    computed = []
    real = averaged.fact_traces
    monkeypatch.setattr(averaged, "fact_traces", lambda m, fact, i, **kw: computed.append(i) or real(m, fact, i, **kw))
    facts = known_facts(model)
    resumed = average_traces(model, facts, kinds=("hidden",), samples=2, window=2, progress=False,
                             checkpoint=ShardLog(log_dir, resume=True))
    assert sorted(computed) == [i for i in range(len(facts)) if f"shard-{i:06d}.pt" not in stamps]
    assert {p.name: p.stat().st_mtime_ns for p in log_dir.glob("shard-*.pt") if p.name in stamps} == stamps
    monkeypatch.setattr(averaged, "fact_traces", real)
    whole = average_traces(model, facts, kinds=("hidden",), samples=2, window=2, progress=False)
    assert resumed.fact_ids == whole.fact_ids
    torch.testing.assert_close(resumed.mean["hidden"], whole.mean["hidden"], atol=0, rtol=0, equal_nan=True)
    # a log of another call is refused, not mixed in
    with pytest.raises(ValueError, match="different call"):
        average_traces(model, facts, kinds=("hidden",), samples=3, window=2, progress=False,
                       checkpoint=ShardLog(log_dir, resume=True))


_RACER = """
import sys, time
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import TINY_VARIANTS, make_tiny_model
import pmet_lens.editing.nullspace as ns
from pmet_lens.editing import CovarianceStore

cache, me = Path(sys.argv[1]), sys.argv[2]
model = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])
projections = []
real = ns.nullspace_projection
ns.nullspace_projection = lambda cov, tau: projections.append(1) or real(cov, tau)
store = CovarianceStore(cache / "cov", progress=False)
(cache / f"ready-{me}").touch()
while len(list(cache.glob("ready-*"))) < 2:  # both processes ask at the same moment
    time.sleep(0.01)
hook = "blocks.2.mlp.hook_post"
cov = store.get(model, [hook], 4000, "float32", 64)[hook]
key = store.cache_key(model, hook, 4000, "float32", 64)
P = ns.NullspaceStore(cache / "ns").get(key, cov, 0.05).P
print(f"built_C={store.last_build_seconds > 0} built_P={len(projections)} C={float(cov.double().sum())!r} "
      f"P={float(P.sum())!r}")
"""


def test_two_processes_racing_on_one_cache_entry_build_it_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), str(i)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [o[0].strip().splitlines()[-1] for o in outs]
    fields = [dict(part.split("=", 1) for part in line.split()) for line in lines]
    assert sorted(f["built_C"] for f in fields) == ["False", "True"], lines  # one built C, the other read it
    assert sorted(f["built_P"] for f in fields) == ["0", "1"], lines
    assert fields[0]["C"] == fields[1]["C"] and fields[0]["P"] == fields[1]["P"]
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not leftovers and len(list((tmp_path / "cov").glob("*.safetensors"))) == 1


def test_shard_log_refuses_bad_names_and_cleans_up(tmp_path, model):
    log = ShardLog(tmp_path / "log")
    with pytest.raises(ValueError, match="plain file name"):
        log.child("../x")
    results = run_shards(model, _square, [(i,) for i in range(3)], checkpoint=log)
    assert results == [0, 1, 4] and len(list((tmp_path / "log").glob("shard-*.pt"))) == 3
    log.remove()
    assert not (tmp_path / "log").exists()


def _square(model, i: int) -> int:
    return i * i


def test_average_traces_with_a_limit_stops_starting_shards(pool, model):
    facts = known_facts(model) * 4
    kwargs = dict(kinds=("hidden",), severed=False, samples=1, window=2, limit=1, progress=False)
    single = average_traces(model, facts, **kwargs)
    start = len(pool.history)
    sharded = average_traces(model, facts, **kwargs, workers=pool)
    assert (sharded.fact_ids, sharded.n_seen) == (single.fact_ids, single.n_seen)
    assert len(pool.history) - start <= single.n_seen + 2 * pool.n < len(facts)  # at most 2 shards per worker ahead


def test_closed_pool_is_a_clear_error_and_an_int_makes_its_own(pool, model, ray_cluster):
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        component_similarity(model, PROMPTS, k=10, progress=False, workers=pool)
    with pytest.raises(RuntimeError, match="closed"):
        pool.sync(model)
    pool.close()  # twice is fine
    single = component_similarity(model, PROMPTS, k=10, batch_size=4, progress=False)
    own = component_similarity(model, PROMPTS, k=10, batch_size=4, progress=False, workers=2)  # started and closed here
    assert (own["mean"] - single["mean"]).abs().max() <= 1e-6
    assert ray_cluster.is_initialized()  # the session's Ray was joined, not shut down


_MODEL_RACER = """
import sys, time
from pathlib import Path
import pmet_lens.core.models as models

cache, me = Path(sys.argv[1]), sys.argv[2]
conversions = []
real = models.load_default_hf
models.load_default_hf = lambda *a, **k: conversions.append(1) or real(*a, **k)
(cache / f"ready-{me}").touch()
while len(list(cache.glob("ready-*"))) < 2:
    time.sleep(0.01)
model = models.load_model(device="cpu", cache_dir=cache)
print(f"converted={len(conversions)} digest={float(model.W_U.double().sum())!r}")
"""


@pytest.mark.slow
def test_two_processes_loading_the_default_model_convert_it_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _MODEL_RACER, str(tmp_path), str(i)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    fields = [dict(part.split("=", 1) for part in o[0].strip().splitlines()[-1].split()) for o in outs]
    assert sorted(f["converted"] for f in fields) == ["0", "1"] and fields[0]["digest"] == fields[1]["digest"]
    assert not [p.name for p in tmp_path.rglob("*") if ".tmp" in p.name]
