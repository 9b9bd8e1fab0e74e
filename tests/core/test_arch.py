"""Architecture: its hook names and weights on tiny models (sequential and parallel blocks), and a
source scan that keeps it the only place naming hooks and parameters."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model
from pmet_lens.core.arch import (
    Architecture,
    apply_ln_affine,
    architecture,
    block_index,
    optional_state_key,
    transposed_linear_weights,
)

PACKAGE = Path(__file__).resolve().parents[2] / "pmet_lens"
ARCH_FILE = PACKAGE / "core" / "arch.py"


@pytest.fixture(scope="module", params=[False, True], ids=["sequential", "parallel"])
def model(request):
    return make_tiny_model(parallel=request.param, norm="LN", gated=not request.param, n_layers=3)


def _per_layer_hooks(arch: Architecture, layer: int) -> dict[str, str]:
    return {
        "resid_pre": arch.resid_pre_hook(layer), "attn_input": arch.attn_input_hook(layer),
        "ffn_input": arch.ffn_input_hook(layer), "attn_out": arch.attn_out_hook(layer),
        "mlp_out": arch.mlp_out_hook(layer), "mlp_key": arch.mlp_key_hook(layer),
        "attn_key": arch.attn_key_hook(layer), "attn_k": arch.attn_k_hook(layer),
        "attn_v": arch.attn_v_hook(layer), "attn_pattern": arch.attn_pattern_hook(layer),
        "resid_post": arch.resid_post_hook(layer), "ln_mhsa": arch.ln_normalized_hook(layer, "mhsa"),
        "ln_ffn": arch.ln_normalized_hook(layer, "ffn"),
    }


def test_facts_from_cfg(model):
    arch = architecture(model)
    assert arch == Architecture(n_layers=3, parallel=model.cfg.parallel_attn_mlp, normalization_type="LN")


def test_every_hook_name_exists_and_fires(model):
    """Each name is a hook point of the model, and a forward pass reaches it with the documented shape."""
    arch = architecture(model)
    names = {arch.embed_hook()} | {n for l in range(arch.n_layers) for n in _per_layer_hooks(arch, l).values()}
    assert names <= set(model.hook_dict), names - set(model.hook_dict)
    seen: dict[str, tuple[int, ...]] = {}

    def record(activation: torch.Tensor, hook) -> None:
        seen[hook.name] = tuple(activation.shape)

    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with model.hooks(fwd_hooks=[(n, record) for n in names]):
        model(tokens)
    assert set(seen) == names
    cfg = model.cfg
    assert seen[arch.embed_hook()] == (1, 5, cfg.d_model)
    assert seen[arch.attn_k_hook(1)] == seen[arch.attn_v_hook(1)] == (1, 5, cfg.n_heads, cfg.d_head)
    assert seen[arch.attn_pattern_hook(2)] == (1, cfg.n_heads, 5, 5)
    assert seen[arch.mlp_key_hook(0)] == (1, 5, cfg.d_mlp)


def test_ffn_input_follows_the_block_layout(model):
    """Parallel blocks feed the FFN from resid_pre; sequential ones from resid_mid (after the MHSA)."""
    arch = architecture(model)
    for l in range(arch.n_layers):
        assert arch.attn_input_hook(l) == arch.resid_pre_hook(l)
        if arch.parallel:
            assert arch.ffn_input_hook(l) == arch.resid_pre_hook(l)
        else:
            assert arch.ffn_input_hook(l) != arch.resid_pre_hook(l)
    # the recorded FFN input plus both outputs rebuild the block's output, in either layout
    store: dict[str, torch.Tensor] = {}

    def keep(activation: torch.Tensor, hook) -> None:
        store[hook.name] = activation.clone()

    names = [arch.resid_pre_hook(1), arch.ffn_input_hook(1), arch.attn_out_hook(1), arch.mlp_out_hook(1),
             arch.resid_post_hook(1)]
    with model.hooks(fwd_hooks=[(n, keep) for n in set(names)]):
        model(torch.tensor([[7, 8, 9]]))
    pre, ffn_in, a, m, post = (store[n] for n in names)
    if arch.parallel:
        torch.testing.assert_close(post, pre + a + m)
    else:
        torch.testing.assert_close(ffn_in, pre + a)
        torch.testing.assert_close(post, ffn_in + m)


def test_hook_names_carry_their_block_index(model):
    arch = architecture(model)
    for l in range(arch.n_layers):
        for name in _per_layer_hooks(arch, l).values():
            assert block_index(name) == l
    with pytest.raises(ValueError, match="not a block hook"):
        block_index(arch.embed_hook())


def test_weights_and_norms_are_the_model_s_own(model):
    arch = architecture(model)
    cfg = model.cfg
    for l in range(arch.n_layers):
        assert arch.w_out(model, l) is model.blocks[l].mlp.W_out
        assert tuple(arch.w_out(model, l).shape) == (cfg.d_mlp, cfg.d_model)
        assert arch.w_o(model, l) is model.blocks[l].attn.W_O
        assert tuple(arch.w_o(model, l).shape) == (cfg.n_heads, cfg.d_head, cfg.d_model)
    # the norm feeding each component turns its hook_normalized into the norm's output
    store: dict[str, torch.Tensor] = {}

    def keep(activation: torch.Tensor, hook) -> None:
        store[hook.name] = activation.clone()

    ffn_norm = arch.ln_module(model, 1, "ffn")
    out: dict[str, torch.Tensor] = {}
    handle = ffn_norm.register_forward_hook(lambda mod, inp, o: out.setdefault("ln2", o.detach().clone()))
    try:
        with model.hooks(fwd_hooks=[(arch.ln_normalized_hook(1, "ffn"), keep)]):
            model(torch.tensor([[3, 1, 4, 1, 5]]))
    finally:
        handle.remove()
    torch.testing.assert_close(apply_ln_affine(store[arch.ln_normalized_hook(1, "ffn")], ffn_norm), out["ln2"])


def test_bad_layer_and_component(model):
    arch = architecture(model)
    with pytest.raises(ValueError, match="out of range: this model has 3 layers"):
        arch.resid_pre_hook(3)
    with pytest.raises(ValueError, match="out of range"):
        arch.attn_pattern_hook(-1)
    with pytest.raises(TypeError, match="layer must be an int"):
        arch.attn_k_hook(True)
    with pytest.raises(ValueError, match="component must be 'mhsa' or 'ffn'"):
        arch.ln_normalized_hook(0, "mlp")


def test_attention_only_models_are_refused():
    model = make_tiny_model(parallel=False, norm="LN", gated=False, n_layers=1)
    model.cfg.attn_only = True
    try:
        with pytest.raises(ValueError, match="attention-only"):
            architecture(model)
    finally:
        model.cfg.attn_only = False


def test_transposed_weights_and_optional_keys():
    gated = make_tiny_model(parallel=False, norm="RMS", gated=True, n_layers=1)
    plain = make_tiny_model(parallel=False, norm="LN", gated=False, n_layers=1)
    for name in transposed_linear_weights(gated.blocks[0].mlp):
        assert isinstance(getattr(gated.blocks[0].mlp, name), torch.nn.Parameter)
    assert set(transposed_linear_weights(gated.blocks[0].mlp)) == {"W_in", "W_gate", "W_out"}
    assert transposed_linear_weights(gated.unembed) == ("W_U",)
    assert transposed_linear_weights(plain.blocks[0].mlp) == ()
    keys = set(gated.state_dict())
    optional = {k for k in keys if optional_state_key(k)}
    assert any(k.endswith("b_in") for k in optional)
    assert not any(k.endswith(("W_in", "W_out", "W_Q", "W_U", "W_E")) for k in optional)


# ---------------------------------------------------------------------------------- source scan
# A hook or parameter name in a string: "hook_..." anywhere, a "blocks." path, or a whole
# TransformerLens weight/bias name ("W_out", "b_in"), possibly inside a dotted path.
_NAME = re.compile(r"hook_|(^|\.)blocks\.|(^|[.\s'\"])(W|b)_[A-Za-z]+($|\.)")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            # a string statement is documentation (module/class/function docstring or the
            # attribute docstrings that follow a constant), never a name that reaches code
            for stmt in body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    ids.add(id(stmt.value))
    return ids


def name_literals(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every string literal (f-string parts included) that names a hook or parameter."""
    tree = ast.parse(source)
    docs = _docstring_nodes(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            text = node.value
            if " " not in text.strip() and _NAME.search(text):
                hits.append((node.lineno, text))
    return hits


def test_the_scan_finds_names():
    src = 'x = f"blocks.{l}.hook_resid_pre"\ny = ("W_in", "W_gate")\nz = "hook_embed"\nw = ".attn.W_O"\n'
    assert sorted(name_literals(src)) == [(1, ".hook_resid_pre"), (1, "blocks."), (2, "W_gate"), (2, "W_in"),
                                          (3, "hook_embed"), (4, ".attn.W_O")]
    ok = '"""Docstring naming ``blocks.{l}.hook_resid_post`` and W_out."""\nmsg = "restore W_out later"\nk = "mlp"\n'
    assert name_literals(ok) == []


def test_only_arch_names_hooks_and_parameters():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if path == ARCH_FILE:
            continue
        offenders += [f"pmet_lens/{rel}:{line}: {text!r}" for line, text in name_literals(path.read_text(encoding="utf-8"))]
    assert not offenders, "hook / parameter names belong in core/arch.py (Architecture):\n" + "\n".join(offenders)
