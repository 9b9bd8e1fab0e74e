"""Invariants of causal tracing (issue 4) on tiny random models of every layout and on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.analysis.averaged import token_class_rows
from pmet_lens.analysis.layers import critical_layers
from pmet_lens.analysis.tracing import trace, window_layers

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


def _close(a, b, rel=1e-4):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, rtol=rel, atol=1e-7 * float(b.abs().max()) + 1e-12)


def _naive_cell(model, prompt, subject, result, t, layer, sample_seed_eps):
    """One restored cell computed with plain hooks and a full forward (reference)."""
    from pmet_lens.core.tokens import encode, subject_range

    ids = torch.tensor([encode(model, prompt)])
    s0, s1 = subject_range(model, prompt, subject)
    _, clean = model.run_with_cache(ids)
    name = f"blocks.{layer}.hook_resid_post"

    def noise(act, hook):
        act[:, s0:s1] += sample_seed_eps
        return act

    def restore(act, hook):
        act[:, t] = clean[name][:, t]
        return act

    logits = model.run_with_hooks(ids, fwd_hooks=[("hook_embed", noise), (name, restore)])
    return torch.softmax(logits[0, -1], -1)[result.target_ids[0]].item()


def test_invariants_tiny(tiny_model):
    r = trace(tiny_model, PROMPT, SUBJECT, samples=3, seed=1)
    s0, s1 = r.subject_range
    assert r.scores.shape == (len(r.tokens), tiny_model.cfg.n_layers)
    assert "".join(r.tokens[s0:s1]).strip() == SUBJECT
    # restoring h at the last token in the last layer gives back the clean probability
    assert _close(r.scores[-1, -1], r.high_score)
    # restoring a position before the subject changes nothing
    assert s0 > 0 and _close(r.scores[:s0], torch.full_like(r.scores[:s0], r.low_score))
    # reproducible from the seed, different for another seed
    assert torch.equal(trace(tiny_model, PROMPT, SUBJECT, samples=3, seed=1).scores, r.scores)
    assert not torch.equal(trace(tiny_model, PROMPT, SUBJECT, samples=3, seed=2).scores, r.scores)


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_noise_zero_gives_clean_tiny(tiny_model, kind):
    r = trace(tiny_model, PROMPT, SUBJECT, kind=kind, window=2, samples=2, noise=0.0)
    assert _close(r.low_score, r.high_score)
    assert _close(r.scores, torch.full_like(r.scores, r.high_score))


def test_matches_naive_reference_tiny(tiny_model):
    """The batched, suffix-only computation equals a plain full forward per cell."""
    from pmet_lens.analysis.tracing import embedding_std

    r = trace(tiny_model, PROMPT, SUBJECT, samples=1, seed=3)
    gen = torch.Generator().manual_seed(3)
    s0, s1 = r.subject_range
    eps = torch.randn(1, s1 - s0, tiny_model.cfg.d_model, generator=gen) * 3.0 * embedding_std(tiny_model)
    # (0, 1): before the subject trace() returns the corrupted score without computing; the plain
    # full forward must agree
    for t, layer in [(0, 1), (s0, 0), (s1 - 1, 1), (len(r.tokens) - 1, 2)]:
        assert _close(r.scores[t, layer], _naive_cell(tiny_model, PROMPT, SUBJECT, r, t, layer, eps[0]), rel=1e-3)


@pytest.mark.parametrize("sever", ["mlp", "attn"])
def test_severed_differs_only_where_path_exists_tiny(tiny_model, sever):
    plain = trace(tiny_model, PROMPT, SUBJECT, samples=3)
    cut = trace(tiny_model, PROMPT, SUBJECT, samples=3, sever=sever)
    s0, _ = plain.subject_range
    # no later layer after the last one; nothing corrupted before the subject
    assert _close(cut.scores[:, -1], plain.scores[:, -1])
    assert _close(cut.scores[:s0], plain.scores[:s0])
    # inside the subject, at earlier layers, the severed path does matter
    assert not _close(cut.scores[s0:, :-1], plain.scores[s0:, :-1])


def test_multi_token_target_tiny(tiny_model):
    """A multi-token target scores exp(mean token log-probability), teacher-forced after the prompt: clean,
    corrupted (mean over the noise samples) and with the last token's final state restored."""
    from pmet_lens.analysis.tracing import embedding_std
    from pmet_lens.core.tokens import encode

    r = trace(tiny_model, PROMPT, SUBJECT, samples=2, seed=4, target="Paris France")
    tgt = tiny_model.tokenizer(" Paris France", add_special_tokens=False)["input_ids"]
    assert r.target_ids == tgt and len(tgt) >= 2
    ids = torch.tensor([encode(tiny_model, PROMPT) + tgt[:-1]])
    n = ids.shape[1] - len(tgt) + 1  # prompt tokens

    def score(logits):  # [pos, vocab] -> geometric mean of the target tokens' probabilities
        lp = logits.log_softmax(-1)
        return float(torch.stack([lp[n - 1 + i, t] for i, t in enumerate(tgt)]).mean().exp())

    with torch.no_grad():
        assert _close(r.high_score, score(tiny_model(ids)[0]))
        s0, s1 = r.subject_range
        gen = torch.Generator().manual_seed(4)
        eps = torch.randn(2, s1 - s0, tiny_model.cfg.d_model, generator=gen) * 3.0 * embedding_std(tiny_model)

        def corrupted(e):
            def noise(act, hook):
                act[:, s0:s1] += e
                return act
            return tiny_model.run_with_hooks(ids, fwd_hooks=[("hook_embed", noise)])[0]

        assert _close(r.low_score, sum(score(corrupted(e)) for e in eps) / 2, rel=1e-3)
    assert abs(r.low_score - r.high_score) > 1e-3 * r.high_score  # the noise changed the score
    assert _close(r.scores[:r.subject_range[0]], torch.full((r.subject_range[0], r.n_layers), r.low_score))


def test_bad_inputs(tiny_model):
    n = tiny_model.cfg.n_layers
    with pytest.raises(ValueError, match="does not occur"):
        trace(tiny_model, PROMPT, "Louvre")
    with pytest.raises(ValueError, match="empty prompt"):
        trace(tiny_model, "", SUBJECT)
    with pytest.raises(ValueError, match="larger than the model"):
        trace(tiny_model, PROMPT, SUBJECT, kind="mlp", window=n + 1)
    with pytest.raises(ValueError, match="samples"):
        trace(tiny_model, PROMPT, SUBJECT, samples=0)
    with pytest.raises(ValueError, match="noise"):
        trace(tiny_model, PROMPT, SUBJECT, noise=-1.0)
    with pytest.raises(ValueError, match="kind"):
        trace(tiny_model, PROMPT, SUBJECT, kind="mlpp")
    with pytest.raises(ValueError, match="severing"):
        trace(tiny_model, PROMPT, SUBJECT, kind="mlp", window=2, sever="mlp")
    with pytest.raises(ValueError, match="out of range"):
        trace(tiny_model, PROMPT, SUBJECT, positions=[99])


def test_window_and_classes_and_rule():
    assert list(window_layers(0, 10, 30)) == list(range(0, 5))
    assert list(window_layers(15, 10, 30)) == list(range(10, 20))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30))
    rows = token_class_rows((1, 4), 8)
    assert rows["first subject token"] == [1] and rows["middle subject tokens"] == [2]
    assert rows["last subject token"] == [3] and rows["first subsequent token"] == [4]
    assert rows["further tokens"] == [5, 6] and rows["last token"] == [7]
    plain = torch.tensor([0.1, 0.5, 0.6, 0.6, 0.6, 0.5, 0.3, 0.2])
    mlp = torch.tensor([0.1, 0.1, 0.1, 0.2, 0.5, 0.5, 0.3, 0.2])
    assert critical_layers(plain, mlp, size=3) == ([1, 2, 3], 3)
    with pytest.raises(ValueError, match=r"size must be an int in 1\.\.8, got 0"):
        critical_layers(plain, mlp, size=0)


@pytest.mark.slow
def test_invariants_real_model(default_model):
    prompt, subject = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
    n = default_model.cfg.n_layers
    r = trace(default_model, prompt, subject, samples=2, positions=[0, len(default_model.to_tokens(prompt)[0]) - 1])
    s0, _ = r.subject_range
    assert r.target.strip() == "French" and r.high_score > r.low_score
    assert _close(r.scores[-1, -1], r.high_score)
    assert s0 > 0 and _close(r.scores[0], torch.full((n,), r.low_score))
    z = trace(default_model, prompt, subject, kind="mlp", samples=1, noise=0.0, positions=[s0])
    assert _close(z.scores[s0], torch.full((n,), z.high_score))
    cut = trace(default_model, prompt, subject, samples=2, sever="mlp", positions=[0, len(r.tokens) - 1])
    assert _close(cut.scores[0], r.scores[0]) and _close(cut.scores[-1, -1], r.scores[-1, -1])
