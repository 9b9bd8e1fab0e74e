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
# # Causal tracing (ROME Fig. 1; MEMIT Fig. 3 and 8)
#
# Noise (3 x the embedding std) is added to the subject's token embeddings; each cell restores one clean state
# inside the corrupted run and shows P(answer). Hover a cell for token, layer and effect. Few noise samples here to
# keep the notebook fast; the averaged figures come from `analyses/causal_trace.py`.

# %%
import json
import pathlib

import torch

import pmet_lens
from pmet_lens.viz.tracing import trace_heatmap

torch.set_grad_enabled(False)
model = pmet_lens.load_model()

# %%
prompt, subject = 'The mother tongue of Danielle Darrieux is', 'Danielle Darrieux'
r = pmet_lens.trace(model, prompt, subject, kind='hidden', samples=2)
print(r.target, 'clean', round(r.high_score, 3), 'corrupted', round(r.low_score, 3))
trace_heatmap(r)

# %%
last = r.subject_range[1] - 1
cut = pmet_lens.trace(model, prompt, subject, samples=2, sever='mlp', positions=[last])
import pandas as pd

pd.DataFrame({'plain': r.effect[last].numpy(), 'mlp severed': cut.effect[last].numpy()}).round(3).T

# %% [markdown]
# ## Averaged traces and the chosen R (from `figures/`)

# %%
root = pathlib.Path('..') if pathlib.Path('../figures').exists() else pathlib.Path('.')
summary = root / 'figures' / 'causal_trace_summary.json'
if summary.exists():
    s = json.loads(summary.read_text())
    print('facts', s['facts_used'], 'samples', s['samples'], 'R =', s['R'], 'L =', s['L'])
    print('gap plain - MLP severed:', [round(g, 3) for g in s['gap_plain_minus_mlp_severed']])
else:
    print('run analyses/causal_trace.py first')
from pmet_lens.analysis.layers import default_critical_layers

print('preset R:', default_critical_layers('SmolLM2-135M-Instruct'))
