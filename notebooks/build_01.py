"""Build and execute notebooks/01_component_similarity.ipynb (run from the repo root)."""

import nbformat as nbf
from nbclient import NotebookClient

cells = [
    nbf.v4.new_markdown_cell(
        "# PMET Fig. 2: how much do MHSA and FFN change the last token's state?\n\n"
        "For each factual prompt (ROME's known facts) and each layer, we compare the last token's state *before* a "
        "component with the component's *output*: cosine similarity, and Jaccard similarity of their top-k vocabulary "
        "tokens (PMET eq. 7). Two variants: `paper` (what the official PMET notebook computes: the component's normalised "
        "input with its learned scale, projected with `W_E.T`) and `logit_lens` (what the paper's text describes: the "
        "residual stream entering the component, read out through `ln_final` and `W_U`)."),
    nbf.v4.new_code_cell(
        "import pandas as pd\nimport pmet_lens\nfrom pmet_lens.analysis.similarity import component_similarity, topk_change\n"
        "from pmet_lens.viz.similarity import similarity_figure\n\n"
        "model = pmet_lens.load_model()  # embedded SmolLM2-135M-Instruct, unprocessed weights\n"
        "facts = pmet_lens.load_known_facts()\nlen(facts), facts[0]"),
    nbf.v4.new_markdown_cell("## A sample run (40 prompts, both variants)\nThe full 1209-prompt run is `python analyses/component_similarity.py`."),
    nbf.v4.new_code_cell(
        "sample = [f.prompt for f in facts[:40]]\n"
        "df = component_similarity(model, sample, k=50, variant='both', progress=False)\ndf.head()"),
    nbf.v4.new_code_cell("similarity_figure(df, title='Sample of 40 known facts').show()"),
    nbf.v4.new_markdown_cell("## The full run, if `figures/component_similarity.csv` exists"),
    nbf.v4.new_code_cell(
        "from pathlib import Path\nfull = Path('../figures/component_similarity.csv')\n"
        "if full.exists():\n    similarity_figure(pd.read_csv(full)).show()\nelse:\n    print('run analyses/component_similarity.py first')"),
    nbf.v4.new_markdown_cell(
        "## Per-prompt view: which tokens enter and leave the top-k\n"
        "Pick a prompt, a layer and a component; `topk_change` lists the top-k tokens the component keeps, adds and drops."),
    nbf.v4.new_code_cell(
        "prompt, layer = facts[0].prompt, 20\nrows = []\nfor component in ('mhsa', 'ffn'):\n"
        "    for variant in ('paper', 'logit_lens'):\n"
        "        ch = topk_change(model, prompt, layer=layer, component=component, k=50, variant=variant)\n"
        "        rows.append(dict(component=component, variant=variant, jaccard=round(ch.jaccard, 3),\n"
        "                         top5_before=ch.before[:5], top5_after=ch.after[:5], entered=ch.entered[:8], left=ch.left[:8]))\n"
        "print(prompt)\npd.DataFrame(rows)"),
    nbf.v4.new_code_cell(
        "# the logit-lens top tokens of the residual stream at every layer, for the same prompt\n"
        "tops = {l: topk_change(model, prompt, layer=l, component='ffn', k=5, variant='logit_lens').before for l in range(0, 30, 3)}\n"
        "pd.DataFrame(tops).T"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}).execute()
nbf.write(nb, "notebooks/01_component_similarity.ipynb")
print("wrote notebooks/01_component_similarity.ipynb")
