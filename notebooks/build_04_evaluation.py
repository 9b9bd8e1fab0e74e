"""Build and execute notebooks/04_evaluation.ipynb (nbformat + nbclient).

    python notebooks/build_04_evaluation.py
"""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent
md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

cells = [
    md("# 04 · Evaluation: CounterFact / zsRE metrics and the edit dashboard\n\n"
       "The metrics of MEMIT Appendix C / PMET Appendix B on SmolLM2-135M-Instruct, before and after one PMET edit. "
       "Efficacy / Paraphrase / Neighborhood Success compare P(o*) and P(o^c) (mean token log-probability of the "
       "object); Fluency is ROME's n-gram entropy of top-k=5 samples (100 tokens with the prompt); "
       "`consistency_proxy` is this package's offline proxy of the papers' Consistency (see "
       "`pmet_lens.evaluation.consistency`), not comparable with the papers' numbers. Cases come from the REPORT part of the "
       "fixed CounterFact split (hyper-parameters were tuned on the TUNE part only)."),
    code("import logging, time\n"
         "import pandas as pd\n"
         "import pmet_lens\n"
         "from pmet_lens.evaluation import evaluate_counterfact, evaluate_zsre, format_table\n"
         "from pmet_lens.data.splits import split_facts\n"
         "logging.getLogger('pmet_lens').setLevel(logging.ERROR)\n"
         "t_start = time.time()\n"
         "model = pmet_lens.load_model()\n"
         "facts = split_facts('report', limit=4)\n"
         "[(f.case_id, f.text, f.target_true, '->', f.target_new) for f in facts]"),
    md("## The unedited model\nGeneration metrics on every 4th case only (one case: 10 sampled texts), to keep the notebook fast."),
    code("before, s_before = evaluate_counterfact(model, facts, gen_every=4, progress=False)\n"
         "before"),
    md("## One PMET edit (the first case), previewed as hooks\n"
       "`pmet_lens.edit(..., apply=False)` returns an `EditResult`; `model.hooks(fwd_hooks=result.as_hooks())` "
       "evaluates the edited model without touching the weights."),
    code("result = pmet_lens.edit(model, facts[:1], method='pmet', apply=False, progress=False)\n"
         "with model.hooks(fwd_hooks=result.as_hooks()):\n"
         "    after, s_after = evaluate_counterfact(model, facts[:1], gen_every=1, progress=False)\n"
         "after"),
    code("format_table({'SmolLM2 (unedited, 4 cases)': s_before, 'PMET (1 edit, its case)': s_after})"),
    md("## Dashboard\nBefore/after probabilities on the edit, paraphrase and neighborhood prompts; the logit lens at the "
       "subject's last token; per-layer ΔW norms; the last token's attention to the subject (PMET: MHSA extracts, "
       "the FFN stores — an FFN edit should leave attention before the edited layers untouched); the batch view "
       "of the unedited metrics. The same content is written as a self-contained HTML report."),
    code("board = pmet_lens.viz.dashboard(model, facts[0], result, batch={'unedited': before, 'PMET': after},\n"
         "                            html_path='dashboard_case.html')\n"
         "board.show()"),
    code("board.tables['attention_to_subject'].pivot(index='layer', columns='phase', values='attention_to_subject').round(4).T"),
    md("## zsRE (MEMIT Appendix C.1): top-1 token accuracy, unedited model"),
    code("z_records = pmet_lens.load_zsre(limit=20)\n"
         "z_per, z_sum = evaluate_zsre(model, z_records, progress=False)\n"
         "format_table({'SmolLM2 (unedited, 20 records)': z_sum})"),
    code("print(f'notebook runtime {time.time() - t_start:.0f} s')"),
]

nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
nbformat.write(nb, HERE / "04_evaluation.ipynb")
print("wrote", HERE / "04_evaluation.ipynb")
