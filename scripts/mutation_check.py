"""Mutation check: break a central function on purpose in a scratch copy of the repository and show that
the tests fail, naming the tests that caught it.

    python3 scripts/mutation_check.py                 # every mutation, fast tests only
    python3 scripts/mutation_check.py --slow          # also the real-model tests named for each mutation
    python3 scripts/mutation_check.py --only kl-term  # one mutation

Each mutation replaces one line of the package (the text must occur exactly once), in a copy of the
working tree (tracked and untracked, not ignored files) under a temporary directory; the named test files
run there with ``PYTHONPATH`` set to the copy, so CLI subprocesses import the broken package too. An
unbroken control run of the same tests comes first: it must pass, or the check proves nothing. Prints a
Markdown table: mutation, the tests run, the tests that failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    slow_tests: tuple[str, ...] = ()


MUTATIONS = (
    Mutation("update-solve", "MEMIT eq. 14 without C: λI + KᵀK in place of λC + KᵀK",
             "pmet_lens/editing/update.py",
             "    rhs = K.T.contiguous() if low_rank else K.T @ R  # [d_k, n] or [d_k, d_out]",
             "    cov = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)\n"
             "    rhs = K.T.contiguous() if low_rank else K.T @ R  # [d_k, n] or [d_k, d_out]",
             ("tests/editing/test_update.py",),
             ("tests/editing/test_official_loss.py::test_update_uses_group_weighted_keys",)),
    Mutation("covariance-count", "C = Σ kkᵀ / n with n counting the padded positions too",
             "pmet_lens/editing/covariance.py",
             "count += int(mask.sum())",
             "count += int(mask.numel())",
             ("tests/editing/test_covariance.py",)),
    Mutation("covariance-padding", "C accumulates the keys of padding positions",
             "pmet_lens/editing/covariance.py",
             'flat = act.reshape(act.shape[0] * act.shape[1], -1)[mask_holder["mask"]].to(dtype)',
             "flat = act.reshape(act.shape[0] * act.shape[1], -1).to(dtype)",
             ("tests/editing/test_covariance.py",)),
    Mutation("projected-solve", "AlphaEdit eq. 12 without P on the batch's keys (Q = K1ᵀ in place of P K1ᵀ)",
             "pmet_lens/editing/nullspace.py",
             "Q = matmul64(P, K.T.contiguous(), opts.block_bytes)  # [d_k, u] = P K1ᵀ",
             "Q = K.T.contiguous()  # [d_k, u] = K1ᵀ, P left out",
             ("tests/editing/test_nullspace.py", "tests/editing/test_session.py")),
    Mutation("kl-term", "the KL term in the other direction, KL(P_init ‖ P_edited)",
             "pmet_lens/editing/targets.py",
             "return (edited.exp() * (edited - init)).sum(-1)",
             "return (init.exp() * (init - edited)).sum(-1)",
             ("tests/editing/test_targets.py::test_kl_term_is_kl_of_the_edited_from_the_initial_distribution",),
             ("tests/editing/test_official_loss.py::test_final_loss_is_the_official_loss",)),
    Mutation("zsre-official", "the official zsRE score compares the answer's own token ids (no decode / re-encode)",
             "pmet_lens/evaluation/zsre.py",
             "rows.append((context, int(expected[0]) if expected else pad_id(model)))",
             "rows.append((context, int(t)))",
             ("tests/evaluation/test_zsre.py",)),
)


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _run_tests(tree: Path, tests: list[str], slow: bool, junit: Path) -> tuple[int, list[str], list[str]]:
    """pytest in ``tree`` on ``tests``: (return code, tests run, tests failed or errored)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
    if not slow:
        args += ["-m", "not slow"]
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    ran, failed = [], []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            if case.find("skipped") is not None:
                continue
            ran.append(name)
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
    return done.returncode, ran, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", action="store_true", help="also run each mutation's real-model tests")
    parser.add_argument("--only", nargs="*", help="mutation names (default: all)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        parser.error(f"unknown mutation; known: {[m.name for m in MUTATIONS]}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pmet_lens_mutation_") as tmp:
        tree = Path(tmp) / "repo"
        _copy_tree(tree)
        every = list(dict.fromkeys(t for m in chosen for t in (*m.tests, *(m.slow_tests if args.slow else ()))))
        code, ran, failed = _run_tests(tree, every, args.slow, Path(tmp) / "control.xml")
        if code != 0 or failed:
            raise SystemExit(f"the control run (no mutation) fails: {failed}; fix that first")
        print(f"control: {len(ran)} tests pass without a mutation", file=sys.stderr, flush=True)
        for m in chosen:
            tests = list(m.tests) + (list(m.slow_tests) if args.slow else [])
            target = tree / m.path
            original = target.read_text(encoding="utf-8")
            if original.count(m.old) != 1:
                raise SystemExit(f"{m.name}: the line to break occurs {original.count(m.old)} times in {m.path}")
            target.write_text(original.replace(m.old, m.new), encoding="utf-8")
            try:
                code, ran, failed = _run_tests(tree, tests, args.slow, Path(tmp) / f"{m.name}.xml")
            finally:
                target.write_text(original, encoding="utf-8")
            rows.append((m, len(ran), failed))
            print(f"{m.name}: {len(failed)} of {len(ran)} tests failed", file=sys.stderr, flush=True)
    print("| mutation | what is broken | tests run | caught by |\n| --- | --- | ---: | --- |")
    for m, n, failed in rows:
        grouped: dict[str, int] = {}
        for f in failed:  # one entry per test function, with its number of failing parametrizations
            base = f.split("[", 1)[0]
            grouped[base] = grouped.get(base, 0) + 1
        caught = "<br>".join(f"`{t}`" + (f" ({k} cases)" if k > 1 else "") for t, k in grouped.items())
        caught = caught or "**nothing: the mutation survived**"
        print(f"| `{m.name}` (`{m.path}`) | {m.what} | {n} | {caught} |")
    if any(not failed for _, _, failed in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
