"""CovarianceStore: cache files, corpora, cache keys."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.editing.covariance import CovarianceStore as _Store

CORPUS = ["The Eiffel Tower is in Paris. It was built for the 1889 World's Fair.\n\nParis is the capital of France.\n"
          + "The tower is 330 metres tall and was the tallest structure in the world for 41 years. " * 5,
          "Danielle Darrieux was a French actress.\nShe spoke French.\n" + "Her career spanned eight decades. " * 20]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_covariance_equals_plain_run_with_cache(tiny_model, dtype):
    """C = Σ k kᵀ / n written out: the corpus's paragraphs tokenised one by one without special tokens,
    cut to n tokens and into chunks of seq_len, each chunk run ALONE with plain ``run_with_cache`` (no
    padding, no BOS although this model prepends one by default, no early stop), k kᵀ summed over
    every position in float64 and divided by the number of tokens. The store batches 4 chunks, pads
    the short last one, stops at the last hooked layer and must give the same C for W_out's and W_O's
    keys."""
    n_tokens, seq_len = 250, 48  # chunks 48 x 5 + 10: the second batch pads its 10-token chunk to 48
    hooks = ["blocks.1.mlp.hook_post", "blocks.2.attn.hook_z"]
    tok = tiny_model.tokenizer
    ids = [t for text in CORPUS for para in text.split("\n") if para.strip()
           for t in tok(para, add_special_tokens=False)["input_ids"]]
    assert len(ids) >= n_tokens
    ids = ids[:n_tokens]
    sums = {h: 0.0 for h in hooks}
    with_bos = {h: 0.0 for h in hooks}
    for start in range(0, n_tokens, seq_len):
        chunk = ids[start:start + seq_len]
        for bos, acc in ((False, sums), (True, with_bos)):
            tokens = torch.tensor([[tok.bos_token_id] * bos + chunk])
            _, cache = tiny_model.run_with_cache(tokens, names_filter=hooks)
            for h in hooks:
                k = cache[h][0].reshape(tokens.shape[1], -1).double()  # [pos, d_k] (hook_z: [pos, heads, d_head])
                acc[h] = acc[h] + k.T @ k
    reference = {h: sums[h] / n_tokens for h in hooks}
    tiny_model.cfg.default_prepend_bos = True
    try:
        got = _Store(False, corpus=CORPUS, batch_size=4, progress=False).get(tiny_model, hooks, n_tokens, dtype, seq_len)
    finally:
        tiny_model.cfg.default_prepend_bos = False
    for h in hooks:
        assert got[h].dtype == getattr(torch, dtype)
        ref, tol = reference[h], 1e-5 * float(reference[h].abs().max())
        torch.testing.assert_close(got[h].double(), ref, rtol=1e-5, atol=tol)
        # the details matter at this tolerance: a BOS per chunk, or n counting the padding, gives another C
        assert (with_bos[h] / (n_tokens + 6) - ref).abs().max() > 100 * tol
        assert (ref * n_tokens / (6 * seq_len) - ref).abs().max() > 100 * tol


def test_covariance_cache_corrupt_rebuilt(tiny_model, tmp_path, caplog):
    store = _Store(tmp_path, progress=False)
    hook = "blocks.1.mlp.hook_post"
    c1 = store.get(tiny_model, [hook], 500, "float32", 64)[hook]
    path = store.path_for(tiny_model, hook, 500, "float32", 64)
    assert path.is_file() and torch.allclose(c1, c1.T)
    path.write_bytes(path.read_bytes()[:50])  # truncate
    fresh = _Store(tmp_path, progress=False)
    with caplog.at_level("WARNING"):
        c2 = fresh.get(tiny_model, [hook], 500, "float32", 64)[hook]
    assert "corrupt" in caplog.text
    torch.testing.assert_close(c1, c2)
    assert _Store(tmp_path, progress=False)._read(path.stem) is not None  # rebuilt file is valid


def test_covariance_corpus_inputs(tiny_model, tmp_path):
    import datasets

    hook = "blocks.1.mlp.hook_post"
    texts = ["The Eiffel Tower is in Paris. " * 40, "Danielle Darrieux was a French actress. " * 40]
    from_texts = _Store(False, corpus=texts, progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    from_records = _Store(False, corpus=records, progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    dataset = datasets.Dataset.from_list(records)
    from_dataset = _Store(False, corpus=dataset, progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    file = tmp_path / "corpus.txt"
    file.write_text("\n".join(texts))
    from_file = _Store(False, corpus=str(file), progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    assert torch.equal(from_texts, from_records) and torch.equal(from_texts, from_dataset)
    assert torch.equal(from_texts, from_file)  # paragraphs are tokenised one by one either way
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _Store(False, corpus=str(tmp_path / "typo.txt"))
    with pytest.raises(ValueError, match="no 'text' field"):
        _Store(False, corpus=[{"body": "x"}])
    # records name their text field; the corpus hash is the text's (sha256 of the texts, joined), not the container's
    import hashlib

    by_field = _Store(False, corpus=[{"body": texts[0]}], text_field="body")
    assert by_field.corpus_hash == _Store(False, corpus=[texts[0]]).corpus_hash == hashlib.sha256(texts[0].encode()).hexdigest()[:16]
    assert _Store(False, corpus=texts).corpus_hash == hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    assert _Store(False, corpus=texts).corpus_hash != by_field.corpus_hash
    with pytest.raises(TypeError, match="expected a text"):
        _Store(False, corpus=[3])
    with pytest.raises(ValueError, match="has .* tokens but C needs 100000"):
        _Store(False, corpus=texts, progress=False).get(tiny_model, [hook], 100_000, "float32", 64)


def test_covariance_key_names_every_input(tiny_model, tmp_path):
    from conftest import TINY_VARIANTS, make_tiny_model

    hook = "blocks.1.mlp.hook_post"
    store = _Store(tmp_path, progress=False)
    key = store.path_for(tiny_model, hook, 500, "float32", 64).stem
    other_corpus = _Store(tmp_path, corpus=["Another text entirely. " * 50], progress=False)
    variants = [store.path_for(tiny_model, hook, 600, "float32", 64), store.path_for(tiny_model, hook, 500, "float64", 64),
                store.path_for(tiny_model, hook, 500, "float32", 128),
                store.path_for(tiny_model, "blocks.2.mlp.hook_post", 500, "float32", 64),
                other_corpus.path_for(tiny_model, hook, 500, "float32", 64)]
    assert len({key, *(p.stem for p in variants)}) == 6
    other_weights = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"], seed=1)
    assert store.path_for(other_weights, hook, 500, "float32", 64).stem.split("_m")[1][:16] != key.split("_m")[1][:16]
    with torch.no_grad():  # a change below the layer changes the key; the tokenizer is part of it too
        saved = tiny_model.blocks[0].mlp.W_out.clone()
        tiny_model.blocks[0].mlp.W_out.add_(1.0)
        try:
            assert store.path_for(tiny_model, hook, 500, "float32", 64).stem != key
        finally:
            tiny_model.blocks[0].mlp.W_out.copy_(saved)
    assert store.path_for(tiny_model, hook, 500, "float32", 64).stem == key
    assert f"_t{store._tokenizer_hash(tiny_model)}_" in key
    # calls that set the tokenizer's padding / truncation do not change its hash
    tiny_model.tokenizer(["a", "a longer text"], padding=True, truncation=True, max_length=4)
    assert _Store(tmp_path, progress=False).path_for(tiny_model, hook, 500, "float32", 64).stem == key
