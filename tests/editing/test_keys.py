"""request_keys: the one function that reads the keys of edit requests."""

from __future__ import annotations

import torch
from editing_helpers import FACT, FACT2

from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode
from pmet_lens.data import as_facts
from pmet_lens.editing import prepare_requests, request_keys
from pmet_lens.editing.site import edit_site


def test_keys_are_the_group_mean_of_each_prompts_key(tiny_model):
    """k_i = ½ (weight input at the subject's last token of the bare prompt) + ½ (mean of it over the
    prefixed prompts), each prompt run alone (right padding changes nothing); W_O keys are flattened
    over the heads."""
    prefixes = ("Once upon a time", "I think")
    requests = prepare_requests(tiny_model, as_facts([FACT, FACT2]), prefixes)
    arch = architecture(tiny_model)
    sites = [edit_site(arch, "W_out", 1), edit_site(arch, "W_O", 2)]
    reading = request_keys(tiny_model, requests, sites, outputs=[arch.mlp_out_hook(2)], stop_layer=3)
    for site in sites:
        assert reading.keys[site].shape[0] == 2
    for i, fact in enumerate(requests.facts):
        per_prompt = {site: [] for site in sites}
        for j, tmpl in enumerate(requests.templates):
            text = tmpl.replace("{}", fact.prompt).format(fact.subject)
            assert list(requests.prompt_ids[i][j]) == encode(tiny_model, text)
            _, cache = tiny_model.run_with_cache(torch.tensor([encode(tiny_model, text)]))
            for site in sites:
                per_prompt[site].append(cache[site.key_hook][0, requests.lookup[i][j]].reshape(-1))
            if j == 0:
                torch.testing.assert_close(reading.outputs[arch.mlp_out_hook(2)][i],
                                           cache[arch.mlp_out_hook(2)][0, requests.lookup[i][0]], rtol=1e-5, atol=1e-5)
        for site in sites:
            k = per_prompt[site]
            torch.testing.assert_close(reading.keys[site][i], 0.5 * k[0] + 0.5 * torch.stack(k[1:]).mean(0),
                                       rtol=1e-5, atol=1e-5)


def test_prefix_mean_gives_the_bare_prompt_half_the_weight(tiny_model):
    """Official compute_ks weighting on hand-built keys: groups [bare], [prefixed]; mean within, then over
    the groups. With 3 prefixes the weights are 1/2, 1/6, 1/6, 1/6; without prefixes the bare key itself."""
    from pmet_lens.editing.keys import prefix_mean

    facts = as_facts([FACT, FACT2])
    req = prepare_requests(tiny_model, facts, ("A", "B", "C"))
    assert req.template_groups == ((0,), (1, 2, 3))
    per_row = torch.eye(4).repeat(2, 1) * torch.tensor([[1.0]] * 4 + [[2.0]] * 4)  # [facts · templates, 4]
    torch.testing.assert_close(prefix_mean(per_row, req), torch.tensor([[1 / 2, 1 / 6, 1 / 6, 1 / 6],
                                                                          [1.0, 1 / 3, 1 / 3, 1 / 3]]))
    bare = prepare_requests(tiny_model, facts, ())
    assert bare.template_groups == ((0,),)
    keys = torch.randn(2, 5)
    assert torch.equal(prefix_mean(keys, bare), keys)
