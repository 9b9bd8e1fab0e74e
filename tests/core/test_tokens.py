"""Tokenisation helpers (pmet_lens.core.tokens) with the default model's tokenizer on a tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from pmet_lens.core.tokens import encode, pad, pad_id, subject_last_position, subject_range, target_ids, tokenize


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(parallel=False, norm="RMS", gated=True, n_layers=1)


def _decode(model, ids):
    return model.tokenizer.decode(ids)


def test_encode_is_to_tokens(model):
    text = "The Eiffel Tower is located in"
    assert encode(model, text) == model.to_tokens(text, truncate=False)[0].tolist()
    with pytest.raises(ValueError, match="empty prompt"):
        encode(model, "")


def test_pad_and_tokenize_right_pad(model):
    texts = ["Paris", "The Eiffel Tower is located in the city of"]
    batch = tokenize(model, texts)
    ids = [encode(model, t) for t in texts]
    assert batch.lengths.tolist() == [len(i) for i in ids]
    assert batch.last.tolist() == [len(i) - 1 for i in ids]
    assert batch.tokens.shape == (2, max(len(i) for i in ids))
    for row, seq in zip(batch.tokens.tolist(), ids):
        assert row[: len(seq)] == seq  # real tokens first
        assert set(row[len(seq):]) <= {pad_id(model)}  # then only pads
    with pytest.raises(ValueError, match="empty"):
        pad(model, [])
    with pytest.raises(ValueError, match="empty token sequence"):
        pad(model, [[1, 2], []])


def test_pad_id_falls_back_to_eos(model):
    tok = model.tokenizer
    assert pad_id(model) == (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def test_target_ids_add_one_leading_space(model):
    assert target_ids(model, "English") == model.tokenizer(" English", add_special_tokens=False)["input_ids"]
    assert target_ids(model, " English") == target_ids(model, "English")
    for bad in ("", "   ", None):
        with pytest.raises(ValueError, match="non-empty string"):
            target_ids(model, bad)


def test_subject_at_the_start(model):
    text = "Paris is the capital of"
    start, end = subject_range(model, text, "Paris")
    assert start == 0
    assert _decode(model, encode(model, text)[start:end]) == "Paris"


def test_multi_token_subject(model):
    text = "The mother tongue of Danielle Darrieux is"
    start, end = subject_range(model, text, "Danielle Darrieux")
    assert end - start > 1
    assert _decode(model, encode(model, text)[start:end]).strip() == "Danielle Darrieux"
    # the lookup position of the papers is the subject's last token
    assert subject_last_position(model, "The mother tongue of {} is", "Danielle Darrieux") == end - 1


def test_last_occurrence_and_missing_subject(model):
    text = "Rome is in Italy, and Rome is"
    start, end = subject_range(model, text, "Rome")
    assert _decode(model, encode(model, text)[:start]) == "Rome is in Italy, and"
    with pytest.raises(ValueError, match="does not occur"):
        subject_range(model, text, "Paris")
    with pytest.raises(ValueError, match="subject is empty"):
        subject_range(model, text, " ")


def test_lookup_position_with_prefix_and_subject_first(model):
    template, subject = "{} is located in", "The Eiffel Tower"
    pos = subject_last_position(model, template, subject)
    assert pos == subject_range(model, template.format(subject), subject)[1] - 1
    prefix = "Because of that. "
    pos_prefixed = subject_last_position(model, template, subject, prefix=prefix)
    text = prefix + template.format(subject)
    assert pos_prefixed == subject_range(model, text, subject)[1] - 1
    assert _decode(model, encode(model, text)[: pos_prefixed + 1]).endswith("Tower")


def test_positions_count_a_prepended_bos(model):
    """With BOS prepended, positions index the BOS-prefixed ids (everything shifts by one)."""
    text = "Paris is the capital of"
    plain = subject_range(model, text, "Paris")
    model.cfg.default_prepend_bos = True
    try:
        ids = encode(model, text)
        assert ids[0] == model.tokenizer.bos_token_id
        assert subject_range(model, text, "Paris") == (plain[0] + 1, plain[1] + 1)
        assert subject_last_position(model, "{} is the capital of", "Paris") == plain[1]
    finally:
        model.cfg.default_prepend_bos = False


def test_batch_is_on_the_model_device(model):
    batch = tokenize(model, ["a b"])
    assert batch.tokens.device == torch.device(model.cfg.device)
    assert batch.tokens.dtype == torch.long
