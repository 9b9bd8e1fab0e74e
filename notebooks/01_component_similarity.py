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
# # PMET Fig. 2: how much do MHSA and FFN change the last token's state?
#
# For each factual prompt (ROME's known facts) and each layer, we compare the last token's state *before* a
# component with the component's *output*: cosine similarity, and Jaccard similarity of their top-k vocabulary
# tokens (PMET eq. 7). Two variants: `paper` (what the official PMET notebook computes: the component's normalised
# input with its learned scale, projected with `W_E.T`) and `logit_lens` (what the paper's text describes: the
# residual stream entering the component, read out through `ln_final` and `W_U`).

# %% tags=["parameters"]
N_SAMPLE = 40  # known facts in the sample run (the full run is analyses/component_similarity.py)

# %%
import pandas as pd

import pmet_lens
from pmet_lens.analysis.similarity import component_similarity, topk_change
from pmet_lens.viz.similarity import similarity_figure

model = pmet_lens.load_model()  # embedded SmolLM2-135M-Instruct, unprocessed weights
facts = pmet_lens.load_known_facts()
len(facts), facts[0]

# %% [markdown]
# ## A sample run (`N_SAMPLE` prompts, both variants)
# The full 1209-prompt run is `python analyses/component_similarity.py`.

# %%
sample = [f.prompt for f in facts[:N_SAMPLE]]
df = component_similarity(model, sample, k=50, variant='both', progress=False)
df.head()

# %%
similarity_figure(df, title=f'Sample of {N_SAMPLE} known facts').show()

# %% [markdown]
# ## The full run, if `figures/component_similarity.csv` exists

# %%
from pathlib import Path

full = Path('../figures/component_similarity.csv')
if full.exists():
    similarity_figure(pd.read_csv(full)).show()
else:
    print('run analyses/component_similarity.py first')

# %% [markdown]
# ## Per-prompt view: which tokens enter and leave the top-k
# Pick a prompt, a layer and a component; `topk_change` lists the top-k tokens the component keeps, adds and drops.

# %%
prompt, layer = facts[0].prompt, 20
rows = []
for component in ('mhsa', 'ffn'):
    for variant in ('paper', 'logit_lens'):
        ch = topk_change(model, prompt, layer=layer, component=component, k=50, variant=variant)
        rows.append(dict(component=component, variant=variant, jaccard=round(ch.jaccard, 3),
                         top5_before=ch.before[:5], top5_after=ch.after[:5], entered=ch.entered[:8], left=ch.left[:8]))
print(prompt)
pd.DataFrame(rows)

# %%
# the logit-lens top tokens of the residual stream at every layer, for the same prompt
tops = {l: topk_change(model, prompt, layer=l, component='ffn', k=5, variant='logit_lens').before
        for l in range(0, 30, 3)}
pd.DataFrame(tops).T
