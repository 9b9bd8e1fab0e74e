"""PMET Fig. 2 analysis: structure, invariants on tiny models, and an independent check on the
real model computed with transformers' own modules (not the library)."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.analysis.similarity import COLUMNS, component_similarity, similarity_scores, topk_change, topk_jaccard

PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is",
           "Apple was founded by", "The capital of Japan is"]


def test_dataframe_shape(tiny_model):
    df = component_similarity(tiny_model, PROMPTS, k=5, variant="both", progress=False)
    assert list(df.columns) == COLUMNS
    assert len(df) == 2 * tiny_model.cfg.n_layers * 2 * 2
    assert set(df.component) == {"mhsa", "ffn"} and set(df.metric) == {"cosine", "jaccard"}
    assert (df.n == len(PROMPTS)).all()
    assert ((df.ci_low <= df["mean"] + 1e-12) & (df["mean"] <= df.ci_high + 1e-12)).all()
    jac = df[df.metric == "jaccard"]["mean"]
    assert ((0 <= jac) & (jac <= 1)).all()


def _manual_scores(model, prompt, k):
    """Reference from a full run_with_cache and module forward hooks (no library helpers)."""
    outs = {}
    handles = []
    for l, block in enumerate(model.blocks):
        handles.append(block.ln1.register_forward_hook(lambda m, i, o, l=l: outs.__setitem__(("ln1", l), o[0, -1])))
        handles.append(block.ln2.register_forward_hook(lambda m, i, o, l=l: outs.__setitem__(("ln2", l), o[0, -1])))
    try:
        _, cache = model.run_with_cache(prompt)
    finally:
        for h in handles:
            h.remove()
    res = {}
    for l in range(model.cfg.n_layers):
        a, m = cache[f"blocks.{l}.hook_attn_out"][0, -1], cache[f"blocks.{l}.hook_mlp_out"][0, -1]
        ffn_in = cache[f"blocks.{l}.hook_resid_pre" if model.cfg.parallel_attn_mlp else f"blocks.{l}.hook_resid_mid"][0, -1]
        pairs = {
            "paper": [(outs[("ln1", l)], a), (outs[("ln2", l)], m)],
            "logit_lens": [(cache[f"blocks.{l}.hook_resid_pre"][0, -1], a), (ffn_in, m)],
        }
        for variant, comp_pairs in pairs.items():
            for c, (x, y) in enumerate(comp_pairs):
                if variant == "paper":
                    px, py = x @ model.W_E.T, y @ model.W_E.T
                else:
                    px, py = (model.unembed(model.ln_final(v[None, None]))[0, 0] for v in (x, y))
                tx, ty = set(px.topk(k).indices.tolist()), set(py.topk(k).indices.tolist())
                res[(variant, l, c)] = (torch.nn.functional.cosine_similarity(x, y, dim=0).item(),
                                        len(tx & ty) / len(tx | ty))
    return res


@torch.no_grad()
def test_matches_manual_computation_and_is_batch_invariant(tiny_model):
    k = 7
    scores = similarity_scores(tiny_model, PROMPTS, k=k, variant="both", batch_size=3, progress=False)
    for i, prompt in enumerate(PROMPTS):
        ref = _manual_scores(tiny_model, prompt, k)
        for (variant, l, c), (cos, jac) in ref.items():
            assert scores[variant].cosine[i, l, c].item() == pytest.approx(cos, abs=1e-4)
            assert scores[variant].jaccard[i, l, c].item() == pytest.approx(jac, abs=1e-6)


def test_topk_jaccard():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[4, 3, 2, 1], [5, 6, 7, 1]])
    assert topk_jaccard(a, b).tolist() == [1.0, pytest.approx(1 / 7)]


def _manual_topk(model, prompt, layer, component, variant, k):
    """Top-k token ids of the component's input and output, from a full run_with_cache and module hooks."""
    seen = {}
    ln = model.blocks[layer].ln1 if component == "mhsa" else model.blocks[layer].ln2
    handle = ln.register_forward_hook(lambda m, i, o: seen.__setitem__("ln", o[0, -1]))
    try:
        _, cache = model.run_with_cache(prompt)
    finally:
        handle.remove()
    out = cache[f"blocks.{layer}.hook_attn_out" if component == "mhsa" else f"blocks.{layer}.hook_mlp_out"][0, -1]
    if variant == "paper":
        x, project = seen["ln"], (lambda v: v @ model.W_E.T)
    else:
        parallel_or_attn = component == "mhsa" or model.cfg.parallel_attn_mlp
        x = cache[f"blocks.{layer}.hook_resid_pre" if parallel_or_attn else f"blocks.{layer}.hook_resid_mid"][0, -1]
        project = lambda v: model.unembed(model.ln_final(v[None, None]))[0, 0]  # noqa: E731
    return project(x).topk(k).indices.tolist(), project(out).topk(k).indices.tolist()


@pytest.mark.parametrize("component, variant", [("ffn", "paper"), ("mhsa", "logit_lens")])
@torch.no_grad()
def test_topk_change(tiny_model, component, variant):
    k, layer = 5, 1
    ch = topk_change(tiny_model, PROMPTS[0], layer=layer, component=component, k=k, variant=variant)
    before, after = _manual_topk(tiny_model, PROMPTS[0], layer, component, variant, k)
    dec = lambda ids: [tiny_model.tokenizer.decode([i]) for i in ids]  # noqa: E731
    assert (ch.layer, ch.component, ch.variant) == (layer, component, variant)
    assert ch.before == dec(before) and ch.after == dec(after)  # in rank order
    assert ch.kept == dec([i for i in before if i in after])
    assert ch.left == dec([i for i in before if i not in after])
    assert ch.entered == dec([i for i in after if i not in before])
    assert ch.jaccard == pytest.approx(len(set(before) & set(after)) / len(set(before) | set(after)))
    with pytest.raises(ValueError, match="component must be one of"):
        topk_change(tiny_model, PROMPTS[0], layer=layer, component="mlp")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(prompts=[]), ValueError, "empty"),
    (dict(prompts=["ok", "  "]), ValueError, "prompt #1"),
    (dict(prompts="a single string"), TypeError, "list of strings"),
    (dict(prompts=PROMPTS, variant="nope"), ValueError, "unknown variant"),
    (dict(prompts=PROMPTS, k=0), ValueError, "k must be"),
    (dict(prompts=PROMPTS, batch_size=0), ValueError, "batch_size"),
])
def test_bad_input(tiny_model, kwargs, err, match):
    with pytest.raises(err, match=match):
        component_similarity(tiny_model, progress=False, **kwargs)
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_dict.values())


@pytest.mark.slow
def test_independent_transformers_computation(default_model, default_hf):
    """Same quantities computed with transformers' LlamaForCausalLM modules agree to 1e-3."""
    hf, tok = default_hf
    prompts = ["The Colosseum is located in the city of", "Barack Obama was born in the state of",
               "The Beatles were a band from", "Mount Fuji is the highest mountain in",
               "The currency of the United Kingdom is the", "Albert Einstein developed the theory of"]
    k, n_layers = 50, hf.config.num_hidden_layers
    acc = torch.zeros(2, n_layers, 2, 2, dtype=torch.float64)  # variant, layer, component, metric
    W_E = hf.model.embed_tokens.weight
    for prompt in prompts:
        rec = {}
        hooks = []
        for l, layer in enumerate(hf.model.layers):
            hooks += [
                layer.input_layernorm.register_forward_hook(
                    lambda m, i, o, l=l: rec.update({("in1", l): i[0][0, -1], ("ln1", l): o[0, -1]})),
                layer.self_attn.register_forward_hook(lambda m, i, o, l=l: rec.update({("attn", l): o[0][0, -1]})),
                layer.post_attention_layernorm.register_forward_hook(
                    lambda m, i, o, l=l: rec.update({("in2", l): i[0][0, -1], ("ln2", l): o[0, -1]})),
                layer.mlp.register_forward_hook(lambda m, i, o, l=l: rec.update({("mlp", l): o[0, -1]})),
            ]
        try:
            with torch.no_grad():
                hf(tok(prompt, return_tensors="pt").input_ids)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for l in range(n_layers):
                for v, (proj, b1, b2) in enumerate([
                    (lambda h: h @ W_E.T, rec[("ln1", l)], rec[("ln2", l)]),
                    (lambda h: hf.lm_head(hf.model.norm(h)), rec[("in1", l)], rec[("in2", l)]),
                ]):
                    for c, (x, y) in enumerate([(b1, rec[("attn", l)]), (b2, rec[("mlp", l)])]):
                        tx, ty = set(proj(x).topk(k).indices.tolist()), set(proj(y).topk(k).indices.tolist())
                        acc[v, l, c, 0] += torch.nn.functional.cosine_similarity(x, y, dim=0).item()
                        acc[v, l, c, 1] += len(tx & ty) / len(tx | ty)
    acc /= len(prompts)
    df = component_similarity(default_model, prompts, k=k, variant="both", progress=False)
    for v, variant in enumerate(("paper", "logit_lens")):
        for c, component in enumerate(("mhsa", "ffn")):
            for m, metric in enumerate(("cosine", "jaccard")):
                ours = df[(df.variant == variant) & (df.component == component) & (df.metric == metric)].sort_values("layer")["mean"]
                diff = (torch.tensor(ours.to_numpy()) - acc[v, :, c, m]).abs().max().item()
                assert diff < 1e-3, (variant, component, metric, diff)
