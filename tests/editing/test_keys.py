"""request_keys: the one function that reads the keys of edit requests."""

from __future__ import annotations

import torch
from editing_helpers import FACT, FACT2

from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode
from pmet_lens.data import as_facts
from pmet_lens.editing import prepare_requests, request_keys
from pmet_lens.editing.site import edit_site


def test_keys_are_the_prefix_mean_of_each_prompts_key(tiny_model):
    """k_i = mean over the context templates of the weight input at the subject's last token, each
    prompt run alone (right padding changes nothing); W_O keys are flattened over the heads."""
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
            torch.testing.assert_close(reading.keys[site][i], torch.stack(per_prompt[site]).mean(0), rtol=1e-5, atol=1e-5)
