"""label_logprobs (pmet_lens.core.readout): chunked read-out equals the full log-softmax."""

from __future__ import annotations

import torch

from pmet_lens.core.readout import final_logits, label_logprobs


def test_label_logprobs_equal_the_full_log_softmax(tiny_model):
    g = torch.Generator().manual_seed(0)
    resid = torch.randn(7, tiny_model.cfg.d_model, generator=g)
    rows = torch.tensor([0, 0, 3, 6, 2, 2, 5])  # a row scored twice, a row not at all
    labels = torch.randint(0, tiny_model.cfg.d_vocab, (7,), generator=g)
    labels[1] = final_logits(tiny_model, resid[0]).argmax()  # one label that is the top-1 token
    with torch.no_grad():
        ref = torch.log_softmax(final_logits(tiny_model, resid).float(), -1)
        for max_logits in (2**24, tiny_model.cfg.d_vocab * 2, 1):  # one chunk, chunks of 2 rows, of 1 row
            logp, top1 = label_logprobs(tiny_model, resid, labels, rows, max_logits=max_logits)
            torch.testing.assert_close(logp, ref[rows, labels], rtol=1e-5, atol=1e-5)
            assert torch.equal(top1, ref.argmax(-1)[rows] == labels) and bool(top1[1])
        plain, _ = label_logprobs(tiny_model, resid, labels)  # one label per row
        torch.testing.assert_close(plain, ref[torch.arange(7), labels], rtol=1e-5, atol=1e-5)
