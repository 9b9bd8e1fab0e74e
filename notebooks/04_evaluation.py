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
# # 04 · Evaluation: CounterFact / zsRE metrics and the edit dashboard
#
# The metrics of MEMIT Appendix C / PMET Appendix B on SmolLM2-135M-Instruct, before and after one PMET edit.
# Efficacy / Paraphrase / Neighborhood Success compare P(o*) and P(o^c) (mean token log-probability of the object);
# Fluency is ROME's n-gram entropy of top-k=5 samples (100 tokens with the prompt); `consistency_proxy` is this
# package's offline proxy of the papers' Consistency (see `pmet_lens.evaluation.consistency`), not comparable with
# the papers' numbers. Cases come from the REPORT part of the fixed CounterFact split (hyper-parameters were tuned
# on the TUNE part only).

# %% tags=["parameters"]
N_CASES = 4    # report-split cases evaluated
N_ZSRE = 20    # zsRE records evaluated
GEN_LENGTH = 100  # tokens per generated text, prompt included (ROME's max_out_len)
HPARAMS = {}   # overrides of the PMET preset, e.g. {'steps': 10}

# %%
import logging
import time

import pmet_lens
from pmet_lens.data.splits import split_facts
from pmet_lens.evaluation import evaluate_counterfact, evaluate_zsre, format_table

logging.getLogger('pmet_lens').setLevel(logging.ERROR)
t_start = time.time()
model = pmet_lens.load_model()
facts = split_facts('report', limit=N_CASES)
[(f.case_id, f.text, f.target_true, '->', f.target_new) for f in facts]

# %% [markdown]
# ## The unedited model
# Generation metrics on every 4th case only (one case: 10 sampled texts), to keep the notebook fast.

# %%
before, s_before = evaluate_counterfact(model, facts, gen_every=4, max_length=GEN_LENGTH, progress=False)
before

# %% [markdown]
# ## One PMET edit (the first case), previewed as hooks
# `pmet_lens.edit(..., apply=False)` returns an `EditResult`; `model.hooks(fwd_hooks=result.as_hooks())` evaluates
# the edited model without touching the weights.

# %%
from pmet_lens.editing import preset

hp = preset('SmolLM2-135M-Instruct', 'pmet').with_(**HPARAMS)
result = pmet_lens.edit(model, facts[:1], hparams=hp, apply=False, progress=False)
with model.hooks(fwd_hooks=result.as_hooks()):
    after, s_after = evaluate_counterfact(model, facts[:1], gen_every=1, max_length=GEN_LENGTH, progress=False)
after

# %%
format_table({f'SmolLM2 (unedited, {N_CASES} cases)': s_before, 'PMET (1 edit, its case)': s_after})

# %% [markdown]
# ## Dashboard
# Before/after probabilities on the edit, paraphrase and neighborhood prompts; the logit lens at the subject's last
# token; per-layer ΔW norms; the last token's attention to the subject (PMET: MHSA extracts, the FFN stores — an
# FFN edit should leave attention before the edited layers untouched); the batch view of the unedited metrics. The
# same content is written as a self-contained HTML report.

# %%
board = pmet_lens.dashboard(model, facts[0], result, batch={'unedited': before, 'PMET': after},
                            html_path='dashboard_case.html')
board.show()

# %%
board.tables['attention_to_subject'].pivot(index='layer', columns='phase', values='attention_to_subject').round(4).T

# %% [markdown]
# ## zsRE (MEMIT Appendix C.1): top-1 token accuracy, unedited model

# %%
z_records = pmet_lens.load_zsre(limit=N_ZSRE)
z_per, z_sum = evaluate_zsre(model, z_records, progress=False)
format_table({f'SmolLM2 (unedited, {N_ZSRE} records)': z_sum})

# %%
print(f'notebook runtime {time.time() - t_start:.0f} s')
