"""The shared read-out equals the tail of the model's own forward pass."""

from __future__ import annotations

import torch

from pmet_lens.core.readout import final_logits


def test_final_logits_equal_forward(tiny_model):
    tokens = tiny_model.to_tokens(["The Eiffel Tower is in", "Danielle Darrieux"], padding_side="right")
    with torch.no_grad():
        logits, cache = tiny_model.run_with_cache(tokens)
        resid = cache[f"blocks.{tiny_model.cfg.n_layers - 1}.hook_resid_post"]
        torch.testing.assert_close(final_logits(tiny_model, resid), logits)              # [batch, pos, d]
        torch.testing.assert_close(final_logits(tiny_model, resid[:, -1]), logits[:, -1])  # [batch, d]
