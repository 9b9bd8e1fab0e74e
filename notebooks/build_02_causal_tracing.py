"""Build and execute notebooks/02_causal_tracing.ipynb (nbformat + nbclient)."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

here = Path(__file__).resolve().parent
cells = [
    nbformat.v4.new_markdown_cell(
        "# Causal tracing (ROME Fig. 1; MEMIT Fig. 3 and 8)\n\n"
        "Noise (3 x the embedding std) is added to the subject's token embeddings; each cell restores one "
        "clean state inside the corrupted run and shows P(answer). Hover a cell for token, layer and effect. "
        "Few noise samples here to keep the notebook fast; the averaged figures come from "
        "`analyses/causal_trace.py`."),
    nbformat.v4.new_code_cell(
        "import json, pathlib, torch\nimport pmet_lens\nfrom pmet_lens.viz.tracing import trace_heatmap, severed_plot\n"
        "torch.set_grad_enabled(False)\nmodel = pmet_lens.load_model()"),
    nbformat.v4.new_code_cell(
        "prompt, subject = 'The mother tongue of Danielle Darrieux is', 'Danielle Darrieux'\n"
        "r = pmet_lens.trace(model, prompt, subject, kind='hidden', samples=2)\n"
        "print(r.target, 'clean', round(r.high_score, 3), 'corrupted', round(r.low_score, 3))\n"
        "trace_heatmap(r)"),
    nbformat.v4.new_code_cell(
        "last = r.subject_range[1] - 1\n"
        "cut = pmet_lens.trace(model, prompt, subject, samples=2, sever='mlp', positions=[last])\n"
        "import pandas as pd\n"
        "pd.DataFrame({'plain': r.effect[last].numpy(), 'mlp severed': cut.effect[last].numpy()}).round(3).T"),
    nbformat.v4.new_markdown_cell("## Averaged traces and the chosen R (from `figures/`)"),
    nbformat.v4.new_code_cell(
        "root = pathlib.Path('..') if pathlib.Path('../figures').exists() else pathlib.Path('.')\n"
        "summary = root / 'figures' / 'causal_trace_summary.json'\n"
        "if summary.exists():\n"
        "    s = json.loads(summary.read_text())\n"
        "    print('facts', s['facts_used'], 'samples', s['samples'], 'R =', s['R'], 'L =', s['L'])\n"
        "    print('gap plain - MLP severed:', [round(g, 3) for g in s['gap_plain_minus_mlp_severed']])\n"
        "else:\n    print('run analyses/causal_trace.py first')\n"
        "from pmet_lens.analysis.layers import default_critical_layers\nprint('preset R:', default_critical_layers('SmolLM2-135M-Instruct'))"),
]
nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(here)}}).execute()
nbformat.write(nb, here / "02_causal_tracing.ipynb")
