"""CovarianceStore: cache files, corpora, cache keys."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.editing.covariance import CovarianceStore as _Store


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
    assert _Store(False, corpus=[{"body": texts[0]}], text_field="body").corpus_hash
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
