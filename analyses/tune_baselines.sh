#!/usr/bin/env bash
# The SmolLM2 presets of the baseline editors, on the TUNE part of the CounterFact split only (never the
# report part), every grid point one edit of the first N tune facts scored with the probability metrics:
#   FT-W  stage 1: the fine-tuned layer (2, 4, 8, 14, 20, 24) at GPT-J's weight decay 5e-4;
#         stage 2: the weight decay on ΔW (0, 5e-2, 5, 500) at stage 1's layer (figures/tune_ft_w_*/);
#   FT-L  ε (1e-4, 1e-3, 5e-3) at FT-W's layer, no weight decay (figures/tune_ft_l/);
#   EMMET α (C ← αC; 1e3, 1e4 = official, 1e5), the only setting besides the traced layer whose scale is the
#         model's: α·λ_E competes with K C⁻¹ Kᵀ, whose diagonal grows with d_mlp (figures/tune_emmet/);
#   past a grid's edge when its best sat there: FT-L ε (5e-3, 2e-2, 1e-1; figures/tune_ft_l_wide/), EMMET α
#         (100, 300, 1000; figures/tune_emmet_wide/);
#   ROME, r-ROME at their presets (the traced layer, official settings): a check, nothing chosen (figures/tune_rome/).
# Nothing is written to a preset directory (the user's is shared by every run on the machine): the best row of
# each stage is in its tune_editing.json, and the shipped presets/editing.json takes it by hand, with the grid
# in its _source.
#
#   bash analyses/tune_baselines.sh [N=24] > logs/tune_baselines.log 2>&1    # FRESH=1 redoes finished stages
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-24}"
best() {  # best() DIR FIELD: a field of the best row that tune_editing.py stored
    python3 -c "import json,sys; r=next(iter(json.load(open(sys.argv[1]+'/tune_editing.json')).values())); print(r[sys.argv[2]])" "$1" "$2"
}
tune() { python3 analyses/tune_editing.py --limit "$N" "$@"; }
stage() {  # stage() OUT ARGS...: one search into OUT; a stage whose OUT/tune_editing.json exists is kept (FRESH=1 redoes it)
    local out="$1"; shift
    if [[ -f "$out/tune_editing.json" && -z "${FRESH:-}" ]]; then echo "kept $out (FRESH=1 to redo)"; else tune "$@" --out "$out"; fi
}
stage figures/tune_ft_w_layer --methods ft-w --layers 2,4,8,14,20,24 --wds 5e-4
LAYER="$(best figures/tune_ft_w_layer layer)"
stage figures/tune_ft_w_wd --methods ft-w --layers "$LAYER" --wds 0,5e-2,5,500
stage figures/tune_ft_l --methods ft-l --layers "$LAYER" --wds 0 --eps 1e-4,1e-3,5e-3
stage figures/tune_emmet --methods emmet --lams 1000,10000,100000
# the first grids' best FT-L ε and EMMET α sat at their edges: one more step past each edge
stage figures/tune_ft_l_wide --methods ft-l --layers "$LAYER" --wds 0 --eps 5e-3,2e-2,1e-1
stage figures/tune_emmet_wide --methods emmet --lams 100,300,1000
stage figures/tune_rome --methods rome,r-rome
