"""Shared fixtures: tiny random HookedTransformers covering every architecture path, tiny transformers
checkpoints, and the real default model with the suite's own covariance statistics (session-scoped,
built once; the converted weights are the user's cache, everything else the suite's own)."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

# Presets a user wrote on this machine (pmet-lens calibrate, tune scripts) must not change what the
# tests see: the suite (and every CLI subprocess it starts) reads an empty user preset directory.
os.environ["PMET_LENS_PRESETS"] = tempfile.mkdtemp(prefix="pmet_lens_test_presets_")
atexit.register(shutil.rmtree, os.environ["PMET_LENS_PRESETS"], ignore_errors=True)


def _own_cache() -> Path:
    """The suite's cache directory ($PMET_LENS_CACHE for the tests, every CLI subprocess and notebook kernel).

    The key statistics C and the null-space projectors P are built fresh in it by this version of
    the package: a cached C from an earlier version (its key changes only when a format constant is
    bumped) cannot decide a test. Only ``models/``, the default model converted from its GGUF file,
    is the user's cache directory, linked in, so the conversion is not repeated (its file name
    names the GGUF file it came from)."""
    from pmet_lens.core.models import default_cache_dir

    user_models = default_cache_dir() / "models"
    user_models.mkdir(parents=True, exist_ok=True)
    own = Path(tempfile.mkdtemp(prefix="pmet_lens_test_cache_"))
    (own / "models").symlink_to(user_models, target_is_directory=True)
    atexit.register(shutil.rmtree, own, ignore_errors=True)  # removes the link, never the user's files
    return own


os.environ["PMET_LENS_CACHE"] = str(_own_cache())

REAL_COV_TOKENS = 8192
"""Corpus tokens of C in the real-model editing tests (the presets' 100k cost ~10x the build time;
λ and the optimisation stay the preset's)."""

TINY_VARIANTS = {
    # id: (parallel_attn_mlp, normalization_type, gated_mlp)
    "seq-rms-gated": (False, "RMS", True),   # Llama / SmolLM2 layout
    "seq-ln": (False, "LN", False),          # GPT-2 layout
    "par-ln": (True, "LN", False),           # GPT-J / GPT-NeoX layout
    "par-rms-gated": (True, "RMS", True),
}


def make_tiny_model(parallel: bool, norm: str, gated: bool, seed: int = 0, n_layers: int = 4) -> HookedTransformer:
    """A tiny random model with the default model's tokenizer (so real prompts tokenise)."""
    from pmet_lens.core.models import default_gguf_path

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=64,
        d_vocab=49152, act_fn="silu" if gated else "gelu", normalization_type=norm,
        parallel_attn_mlp=parallel, gated_mlp=gated, positional_embedding_type="rotary" if gated else "standard",
        default_prepend_bos=False, seed=seed, device="cpu",
    )
    path = default_gguf_path()
    tok = _tokenizer(str(path))
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    # random LN scales/biases so that norm affine parameters matter in every test
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w",)) and p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith((".b",)) and p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    return model


_TOK_CACHE: dict[str, object] = {}


def _tokenizer(path: str):
    if path not in _TOK_CACHE:
        from pathlib import Path

        p = Path(path)
        _TOK_CACHE[path] = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return _TOK_CACHE[path]


@pytest.fixture(params=list(TINY_VARIANTS), scope="module")
def tiny_model(request) -> HookedTransformer:
    """Each tiny architecture variant in turn (sequential/parallel x RMS/LN)."""
    return make_tiny_model(*TINY_VARIANTS[request.param])


@pytest.fixture(scope="session")
def default_model() -> HookedTransformer:
    """The real embedded default model, SmolLM2-135M-Instruct (loaded once per session)."""
    from pmet_lens import load_model

    return load_model()


@pytest.fixture(scope="session")
def default_hf():
    """transformers' own de-quantised copy of the default model, ``(model, tokenizer)``, loaded once per
    session (the independent reference of parity tests). A test that changes its weights restores them."""
    from pmet_lens.core.models import load_default_hf

    return load_default_hf()


@pytest.fixture(scope="session")
def real_cov_store():
    """The covariance store of every real-model editing test: the suite's cache directory (see
    ``_own_cache``), so C is built once per session (:data:`REAL_COV_TOKENS` tokens of the shipped
    WikiText-2) and CLI subprocesses and notebooks read the same files."""
    from pmet_lens.editing import CovarianceStore

    return CovarianceStore(progress=False)


@pytest.fixture(scope="session")
def real_nullspace_store():
    """AlphaEdit's projector cache of the real-model tests, in the suite's cache directory."""
    from pmet_lens.editing.nullspace import NullspaceStore

    return NullspaceStore()


def real_hparams(method: str, **overrides):
    """The default model's preset for ``method`` with C from :data:`REAL_COV_TOKENS` tokens."""
    from pmet_lens.core.models import DEFAULT_MODEL
    from pmet_lens.editing import preset

    return preset(DEFAULT_MODEL, method).with_(cov_tokens=REAL_COV_TOKENS, **overrides)


# ------------------------------------------------------------------------- tiny transformers checkpoints
def tiny_llama_config(**kw):
    """A 4-layer Llama (GQA) config with the default model's vocabulary."""
    from transformers import LlamaConfig

    base = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, architectures=["LlamaForCausalLM"])
    return LlamaConfig(**{**base, **kw})


def save_tiny_checkpoint(config, directory: Path, *, seed: int = 0, perturb_norms: bool = False) -> Path:
    """A random transformers model of ``config`` saved in ``directory`` with the default model's tokenizer,
    so that ``load_model(directory)`` and ``pmet-lens --model directory`` load it as a user's checkpoint.
    ``perturb_norms`` draws random norm parameters, so that a wrong mapping of them shows."""
    from transformers import AutoModelForCausalLM

    from pmet_lens.core.models import default_gguf_path

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config)
    if perturb_norms:
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if p.ndim == 1 and ("norm" in name or "ln" in name):
                    p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(directory)
    _tokenizer(str(default_gguf_path())).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint directory named ``my-tiny-llama`` (no preset knows it)."""
    return save_tiny_checkpoint(tiny_llama_config(), tmp_path_factory.mktemp("models") / "my-tiny-llama")


def load_analysis(name: str) -> ModuleType:
    """Import one of the repo's ``analyses/*.py`` scripts (not a package) by name, e.g. ``"tune_editing"``."""
    path = Path(__file__).resolve().parents[1] / "analyses" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calibrate_best_row(search, method: str, defaults) -> dict:
    """The row of a calibration's λ x c search table (``CalibrationResult.search``) that it must choose for
    ``method``: the best Score (to 9 decimals); among ties, the λ and c nearest ``defaults`` (the method's
    hyper-parameters before the search) by the sum of |log ratio|."""
    import math

    rows = search[search["method"] == method].to_dict("records")
    top = max(round(r["score"], 9) for r in rows)
    tied = [r for r in rows if round(r["score"], 9) == top]
    return min(tied, key=lambda r: abs(math.log(r["lam"] / defaults.lam)) + abs(math.log(r["clamp"] / defaults.clamp_norm_factor)))


# ------------------------------------------------------------------------------------------ the CLI
def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m pmet_lens.cli ARGS`` in a new process, as a user runs it (stdout / stderr captured)."""
    return subprocess.run([sys.executable, "-m", "pmet_lens.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.fixture
def cli_main(capsys):
    """``pmet-lens`` in this process, through ``pmet_lens.cli.main(argv)`` (the code a subprocess runs,
    without a new Python per call): ``cli_main(*args)`` returns ``(exit status, stdout, stderr)``;
    argparse's own exits (usage errors, ``--help``) are returned, not raised."""
    from pmet_lens.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model inside ``pmet_lens.cli`` fails the test: for inputs that must be refused first."""
    import pmet_lens.cli

    def refuse(name):
        raise AssertionError(f"the CLI loaded a model ({name or 'the default'}) before refusing the input")

    monkeypatch.setattr(pmet_lens.cli, "_load_model", refuse)
