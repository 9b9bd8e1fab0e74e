# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 Editing facts with PMET (and MEMIT) on hooks
#
# Edit a handful of CounterFact facts (tuning split) into SmolLM2-135M-Instruct with `pmet_lens.edit`, compare
# probabilities before/after on the prompt, its paraphrases and neighbourhood prompts, preview the edit as forward
# hooks (weights untouched) and restore the model bit-for-bit.

# %% tags=["parameters"]
N_FACTS = 4    # tune-split facts edited
HPARAMS = {}   # overrides of the PMET preset, e.g. {'steps': 10}

# %%
import pandas as pd
import torch

from pmet_lens import load_model
from pmet_lens.core.tokens import encode, target_ids
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, edit, preset

model = load_model()
facts = split_facts('tune', limit=N_FACTS)
hp = preset('SmolLM2-135M-Instruct', 'pmet').with_(**HPARAMS)
hp


# %%
def score(text, target):
    ids, tg = encode(model, text), target_ids(model, target)
    with torch.no_grad():
        lp = model(torch.tensor([ids + tg[:-1]]))[0].log_softmax(-1)
    return float(torch.tensor([lp[len(ids)-1+k, t] for k, t in enumerate(tg)]).mean().exp())

def table(tag):
    rows = []
    for f in facts:
        kinds = [('prompt', [f.text]), ('paraphrase', f.paraphrase_prompts[:2]),
                 ('neighbour', f.neighborhood_prompts[:2])]
        for kind, prompts in kinds:
            for p in prompts:
                rows.append({'case': f.case_id, 'kind': kind, 'prompt': p[-60:],
                             f'P(new) {tag}': score(p, f.target_new), f'P(true) {tag}': score(p, f.target_true)})
    return pd.DataFrame(rows)

before = table('before')
before

# %%
store = CovarianceStore(progress=False)  # cached on disk after the first build
result = edit(model, facts, hparams=hp, cov_store=store, progress=False)
after = table('after')
both = before.merge(after, on=['case', 'kind', 'prompt'])
both['new wins'] = both['P(new) after'] > both['P(true) after']
both

# %%
both.groupby('kind')['new wins'].mean()  # prompt/paraphrase should be high, neighbour low

# %%
import plotly.express as px

long = both.melt(id_vars=['case', 'kind', 'prompt'],
                 value_vars=['P(new) before', 'P(new) after', 'P(true) before', 'P(true) after'],
                 var_name='quantity', value_name='probability')
px.box(long, x='kind', y='probability', color='quantity', points='all', hover_data=['case', 'prompt'],
       title='P(new object) and P(true object) before / after the PMET edit')

# %%
pd.DataFrame({'fact': [f.where for f in result.facts], 'steps': result.stats['steps'],
              'P(o*) at L after optimisation': result.stats['prob']})  # per-fact target optimisation

# %% [markdown]
# ## Preview as hooks
# Restore the weights, then apply the same edit as forward hooks (ΔW·k added at `hook_mlp_out`): the logits match
# the weight edit, and no hook survives the `with` block.

# %%
tokens = torch.tensor([encode(model, facts[0].text)])
with torch.no_grad():
    edited = model(tokens)[0, -1]
result.restore()
with torch.no_grad(), model.hooks(fwd_hooks=result.as_hooks()):
    hooked = model(tokens)[0, -1]
with torch.no_grad():
    restored = model(tokens)[0, -1]
print('max |hooked - edited| =', float((hooked - edited).abs().max()))
print('top token restored:', repr(model.tokenizer.decode(restored.argmax())),
      ' previewed:', repr(model.tokenizer.decode(hooked.argmax())))
print('hooks left:', sum(len(h.fwd_hooks) for h in model.hook_dict.values()))

# %%
restored_tab = table('restored')
assert (restored_tab['P(new) restored'].values == before['P(new) before'].values).all()  # bit-exact restore
'restore is exact'
