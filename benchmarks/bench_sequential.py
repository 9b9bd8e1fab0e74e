"""What AlphaEdit's projection costs a sequential session, beside the plain solve in the same run.

For ``--batches`` batches of ``--n`` TUNE facts on the default model, per batch: the target
optimisation (shared by both, timed once per batch), the weight update (keys + solve of every
layer) with MEMIT's plain solve and with the projected solve (P(K1ᵀK1 + KpKp) + αI) X = P K1ᵀR, and
the projection's extra work after the batch (recomputing the batch's keys on the edited model for
KpKp). The added time is reported as a fraction of the plain batch (targets + plain update); the
one-time cost of P (eigendecomposition of C per layer) is reported apart. Memory: peak RSS, and
the bytes of the session's statistics (P and KpKp per layer, kept once) against the per-batch state
(ΔW and the batch's keys), after each batch.

    python benchmarks/bench_sequential.py --n 8 --batches 3
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from pmet_lens import load_model
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, engine, preset
from pmet_lens.editing.hparams import settings_for
from pmet_lens.editing.nullspace import NullspaceStore, nullspace_projection
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.session import EditSession
from pmet_lens.editing.targets import optimise_targets

from machine import machine_line  # benchmarks/machine.py (the script's folder is on sys.path)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="facts per batch")
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    print(machine_line())
    model = load_model()
    hp = preset(str(model.cfg.model_name), "alphaedit")
    facts = split_facts("tune", limit=args.n * args.batches)
    batches = [facts[i:i + args.n] for i in range(0, len(facts), args.n)]
    cov_store = CovarianceStore(progress=False)
    session = EditSession(model, hparams=hp, cov_store=cov_store, nullspace_store=NullspaceStore(False), progress=False)
    start = time.perf_counter()
    for cov in session.covs.values():
        nullspace_projection(cov, hp.nullspace_threshold)
    p_seconds = time.perf_counter() - start
    print(f"one-time P (eigh of {len(session.covs)} covariances {tuple(next(iter(session.covs.values())).shape)}): "
          f"{p_seconds:.2f} s; null-space dims {session.null_dims}")
    settings = settings_for(hp)
    print("batch | targets s | plain update s | projected update s | KpKp keys s | added / plain batch | "
          "stats MB (P, KpKp) | per-batch MB (ΔW, keys)")
    for b, batch in enumerate(batches, 1):
        t = time.perf_counter()
        opt = optimise_targets(model, prepare_requests(model, batch, session.prefixes), session.hparams)
        t_targets = time.perf_counter() - t
        values = {s: opt.value(s).detach() for s in settings.kept_sites}
        # plain solve on the same state, then undo it bit for bit
        before = {n: p.detach().clone() for n, p in engine.edited_params(model, hp).items()}
        t = time.perf_counter()
        result = engine.run_batch(model, batch, session.hparams, session.covs, None, targets=values)
        t_plain = time.perf_counter() - t
        result.restore(force=True)
        assert all(torch.equal(before[n], p) for n, p in engine.edited_params(model, hp).items())
        # the session's projected batch with the same targets (update + KpKp keys timed inside)
        t = time.perf_counter()
        engine.run_batch(model, batch, session.hparams, session.covs, session._solver(), targets=values).restore(force=True)
        t_proj = time.perf_counter() - t
        t = time.perf_counter()
        engine.batch_keys(model, batch, session.hparams, sorted(session.projections))
        t_keys = time.perf_counter() - t
        session.edit(batch, targets=values)
        added = (t_proj + t_keys - t_plain) / (t_targets + t_plain)
        stats = nbytes([p.P for p in session.projections.values()]) + nbytes(session.prev.values())
        per_batch = sum(nbytes(r.deltas.values()) + nbytes(r.keys.values()) for r in session.history)
        print(f"{b} | {t_targets:.1f} | {t_plain:.2f} | {t_proj:.2f} | {t_keys:.2f} | {100 * added:+.1f}% | "
              f"{stats / 2**20:.0f} | {per_batch / 2**20:.1f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")


if __name__ == "__main__":
    main()
