"""Train MEND's editor network for a model (MEND Alg. 1) on zsRE's training records or CounterFact's tune split.

Data (never the reported records):

* ``--dataset zsre``: the shipped zsRE **training**-split records (``load_zsre_train``: 998 of its 1000
  records, two have no new answer; none in the eval subset); the last ``--val`` (100) validate, the
  first ``--train`` (the rest) train. x_e' is the
  question and its rephrase, x_loc the record's Natural Questions prompt and answer.
* ``--dataset counterfact``: the ``tune`` part of the CounterFact split (100 cases; never the ``report``
  part); the first ``--train`` train, the last ``--val`` validate. x_e' is the prompt and its
  paraphrases, x_loc its neighbourhood prompts (``--loc-per-edit`` of them per step).

The network (the one with the lowest validation loss) is written to the user's cache,
``default_cache_dir()/mend/<model>/<name>.safetensors``, where ``method="mend"`` finds it
(``MENDHyperParams(network=<name>)``); ``--ship`` also copies it into the package's
``pmet_lens/presets/mend/<model>/`` (for the default model's shipped networks). A checkpoint beside it
makes the run resumable (``--resume``). The training curve goes to ``<figures>/<name>_curve.csv`` and
``.png`` and the summary (settings, time, validation figures of the kept network for batched and single
edits beside the unedited model's) to ``<figures>/<name>_summary.json``.

    nice -n 10 python analyses/train_mend.py --dataset zsre --threads 1 > logs/train_mend_zsre.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from pmet_lens import load_model
from pmet_lens.data import load_zsre_train
from pmet_lens.data.splits import split_facts
from pmet_lens.editing.identity import weights_hash
from pmet_lens.editing.mend import save_network, shipped_network_dir, user_network_dir
from pmet_lens.editing.mend_training import (
    MENDTrainingParams,
    counterfact_examples,
    evaluate_network,
    prepare_edits,
    train_mend,
    zsre_examples,
)

logger = logging.getLogger("train_mend")

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def examples(dataset: str, n_train: int, n_val: int):
    """(train, val) edits of ``dataset``: the first ``n_train`` and the last ``n_val`` records."""
    if dataset == "zsre":
        records = zsre_examples(load_zsre_train())
    else:
        records = counterfact_examples(split_facts("tune"))
    if n_train + n_val > len(records):
        raise SystemExit(f"--train {n_train} + --val {n_val} exceed the {len(records)} {dataset} training records")
    return records[:n_train], records[len(records) - n_val:]


def plot_curve(curve: pd.DataFrame, unedited: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = curve.dropna(subset=["val_loss"]) if "val_loss" in curve else curve.iloc[0:0]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0, 0]
    ax.plot(curve["step"], curve["train_loss"], label="train L (mean since last row)")
    ax.plot(val["step"], val["val_loss"], "o-", label="validation L")
    ax.set_ylabel("c_e·L_e + c_loc·L_loc")
    ax.legend()
    ax = axes[0, 1]
    ax.plot(curve["step"], curve["train_edit_loss"], label="train L_e")
    ax.plot(val["step"], val["val_edit_loss"], "o-", label="validation L_e")
    ax.axhline(unedited["edit_loss"], color="grey", ls="--", label="unedited model")
    ax.set_ylabel("NLL of the new object on x_e'")
    ax.legend()
    ax = axes[1, 0]
    ax.plot(val["step"], val["val_efficacy"], "o-", label="validation efficacy (edit prompt)")
    ax.plot(val["step"], val["val_paraphrase"], "o-", label="validation paraphrase")
    ax.plot(val["step"], val["val_loc_agree"], "s:", label="validation x_loc: top-1 token unchanged")
    ax.axhline(unedited["efficacy"], color="grey", ls="--", label="unedited (edit prompt)")
    ax.set_ylabel("share of tokens")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    ax.plot(curve["step"], curve["train_loc_loss"], label="train L_loc")
    ax.plot(val["step"], val["val_loc_loss"], "o-", label="validation L_loc")
    ax.set_ylabel("KL(unedited ‖ edited) on x_loc")
    ax.legend()
    for a in axes.flat:
        a.set_xlabel("training step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_title(summary: dict, curve: pd.DataFrame) -> str:
    step0 = "; step 0 = the untrained network" if 0 in set(curve["step"]) else ""
    return (f"MEND training for {summary['model']} on {summary['dataset']} ({summary['n_train']} train / "
            f"{summary['n_val']} validation edits, batch {summary['params']['batch_size']}, rank "
            f"{summary['params']['rank']}{step0})\n{summary['cpu']}, {summary['threads']} "
            f"thread(s), {summary['train_seconds'] / 60:.0f} min of training steps; kept: step {summary['best_step']}")


def replot(figures: Path, name: str) -> None:
    """Draw ``<name>_curve.png`` again from the run's CSV and summary (no model, no training)."""
    summary = json.loads((figures / f"{name}_summary.json").read_text())
    curve = pd.read_csv(figures / f"{name}_curve.csv")
    plot_curve(curve, summary["val_unedited"], figures / f"{name}_curve.png", curve_title(summary, curve))


def main(argv: list[str] | None = None) -> int:
    defaults = MENDTrainingParams()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["zsre", "counterfact"], required=True)
    p.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--name", default=None, help="network name (default: the dataset's name)")
    p.add_argument("--train", type=int, default=None, help="training records (default: zsre all but --val, counterfact 80)")
    p.add_argument("--val", type=int, default=None, help="validation records (default: zsre 100, counterfact 20)")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="edits per step (one batched edit)")
    p.add_argument("--rank", type=int, default=defaults.rank)
    p.add_argument("--n-hidden", type=int, default=defaults.n_hidden)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--lr-alpha", type=float, default=defaults.lr_alpha)
    p.add_argument("--alpha-init", type=float, default=defaults.alpha_init)
    p.add_argument("--c-edit", type=float, default=defaults.c_edit)
    p.add_argument("--c-loc", type=float, default=defaults.c_loc)
    p.add_argument("--loc-per-edit", type=int, default=defaults.loc_per_edit)
    p.add_argument("--val-every", type=int, default=defaults.val_every)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the user's cache")
    p.add_argument("--figures", default="figures/mend", help="folder of the curve and the summary")
    p.add_argument("--ship", action="store_true", help="also copy the network into pmet_lens/presets/mend/<model>/")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (on a CPU shared with other jobs, 1 is much faster than 2)")
    p.add_argument("--replot", action="store_true", help="only draw the curve's PNG again from the saved CSV and summary")
    args = p.parse_args(argv)
    if args.replot:
        replot(Path(args.figures), args.name or args.dataset)
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    name = args.name or args.dataset
    n_val = args.val if args.val is not None else (100 if args.dataset == "zsre" else 20)
    n_train = args.train if args.train is not None else (998 - n_val if args.dataset == "zsre" else 80)
    params = MENDTrainingParams(
        rank=args.rank, n_hidden=args.n_hidden, alpha_init=args.alpha_init, lr=args.lr, lr_alpha=args.lr_alpha,
        c_edit=args.c_edit, c_loc=args.c_loc, batch_size=args.batch_size, steps=args.steps,
        loc_per_edit=args.loc_per_edit, val_every=args.val_every, checkpoint_every=args.checkpoint_every, seed=args.seed)
    train, val = examples(args.dataset, n_train, n_val)
    t_start = time.perf_counter()
    model = load_model(args.model)
    model_name = str(model.cfg.model_name)
    folder = user_network_dir(model_name)
    checkpoint = folder / f"{name}.ckpt.pt"
    logger.info("MEND for %s on %s: %d training and %d validation edits, %s; %s, %d threads", model_name,
                args.dataset, len(train), len(val), params.to_dict(), cpu_name(), torch.get_num_threads())
    model_hash = weights_hash(model)
    layers = params.resolved_layers(model)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    t0 = time.perf_counter()
    prep_train = prepare_edits(model, train, layers, progress=True, model_hash=model_hash)
    prep_val = prepare_edits(model, val, layers, progress=True, model_hash=model_hash)
    prepare_seconds = time.perf_counter() - t0
    logger.info("frozen model's factors of %d edits in %.0f s", len(train) + len(val), prepare_seconds)
    run = train_mend(model, train, val, params, checkpoint=checkpoint, resume=args.resume, progress=True,
                     prepared=(prep_train, prep_val))
    # the kept network on the validation edits, batched as in training and one edit at a time
    t0 = time.perf_counter()
    single = evaluate_network(model, run.network, prep_val, 1, params.loc_per_edit)
    single_unedited = evaluate_network(model, None, prep_val, 1, params.loc_per_edit)
    summary = {**run.summary, "dataset": args.dataset, "name": name, "model": model_name, "cpu": cpu_name(),
               "threads": torch.get_num_threads(), "prepare_seconds": prepare_seconds,
               "val_single_edit": single, "val_single_unedited": single_unedited,
               "eval_seconds": time.perf_counter() - t0, "wall_seconds": time.perf_counter() - t_start,
               "train_records": f"first {len(train)}", "val_records": f"last {len(val)}"}
    out = save_network(run.network, folder / f"{name}.safetensors", model_name=model_name, model_hash=model_hash,
                       info={k: v for k, v in summary.items() if k != "model_hash"})
    logger.info("wrote %s (%.2f MB)", out, out.stat().st_size / 1e6)
    if args.ship:
        ship = shipped_network_dir(model_name)
        if not ship.resolve().is_relative_to((REPO / "pmet_lens").resolve()):
            raise SystemExit(f"--ship writes into this checkout's package ({REPO / 'pmet_lens'}), not {ship}")
        ship.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, ship / out.name)
        logger.info("shipped as %s", ship / out.name)
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    curve = pd.DataFrame(run.curve)
    curve.to_csv(figures / f"{name}_curve.csv", index=False)
    (figures / f"{name}_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curve(curve, run.summary["val_unedited"], figures / f"{name}_curve.png", curve_title(summary, curve))
    best = run.summary["val_best"]
    print(f"best step {run.summary['best_step']}: validation L_e {best['edit_loss']:.3f} (unedited "
          f"{run.summary['val_unedited']['edit_loss']:.3f}), efficacy {best['efficacy']:.3f}, paraphrase "
          f"{best['paraphrase']:.3f}, locality KL {best['loc_loss']:.4f}, top-1 unchanged {best['loc_agree']:.3f}; "
          f"single edits: efficacy {single['efficacy']:.3f} (unedited {single_unedited['efficacy']:.3f}), "
          f"paraphrase {single['paraphrase']:.3f}, KL {single['loc_loss']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
