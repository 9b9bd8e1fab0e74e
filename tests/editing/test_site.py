"""Edit sites and the parameter names they come from (pmet_lens.editing.site, Architecture)."""

from __future__ import annotations

import pytest


def test_block_index():
    from pmet_lens.core.arch import block_index

    assert block_index("blocks.12.mlp.W_out") == 12 and block_index("blocks.0.hook_mlp_out") == 0
    for bad in ("embed.W_E", "blocks.x.mlp.W_out", "blocks.3"):
        with pytest.raises(ValueError, match="not a block hook or parameter name"):
            block_index(bad)


@pytest.mark.parametrize("weight", ["W_out", "W_O"])
def test_site_names_round_trip_and_reach_the_parameter(tiny_model, weight):
    """An EditSite names its parameter as model.named_parameters() does (the saved-file format),
    parses back from that name, and its accessor returns that very parameter."""
    from pmet_lens.core.arch import architecture
    from pmet_lens.editing.site import edit_site, site_of_param

    arch = architecture(tiny_model)
    site = edit_site(arch, weight, 2)
    expected = "blocks.2.attn.W_O" if weight == "W_O" else "blocks.2.mlp.W_out"
    assert site.param_name == expected
    assert site.param(tiny_model) is dict(tiny_model.named_parameters())[expected]
    assert site_of_param(arch, expected) == site
    assert site.key_hook == (arch.attn_key_hook(2) if weight == "W_O" else arch.mlp_key_hook(2))
    assert site.out_hook == (arch.attn_out_hook(2) if weight == "W_O" else arch.mlp_out_hook(2))
    assert {site.key_hook, site.out_hook} <= set(tiny_model.hook_dict)


def test_bad_site_names_raise(tiny_model):
    from pmet_lens.core.arch import architecture
    from pmet_lens.editing.site import edit_site, site_of_param

    arch = architecture(tiny_model)
    for bad in ("blocks.2.mlp.W_in", "blocks.2.attn.W_out", "embed.W_E", "blocks.2.mlp.W_out.x"):
        with pytest.raises(ValueError, match="not an editable output weight|not a block"):
            site_of_param(arch, bad)
    with pytest.raises(ValueError, match="out of range"):
        site_of_param(arch, "blocks.9.mlp.W_out")
    with pytest.raises(ValueError, match="weight must be one of"):
        edit_site(arch, "W_in", 1)
