#!/usr/bin/env bash
# Re-tune the SmolLM2 editing presets on the TUNE part of the CounterFact split (never the report part),
# by coordinate search: stage 1 sweeps steps x lr (x λ) at the preset's clamp c; stage 2 sweeps c (x λ) at
# stage 1's best steps and lr, and writes the best (c, steps, lr, λ) of stage 2 into
# the user preset directory (its editing.json; copy an entry into the shipped pmet_lens/presets/editing.json by hand to ship it). The grids are fixed: ½x, 1x and 2x the papers' steps and lr (PMET: 30, 0.2;
# MEMIT: 25, 0.5), stage 1 at the clamp chosen before the φ fix (PMET 1.5, MEMIT 0.75), and λ at a third of,
# at, and three times the presets' λ of 2026-11-23 (PMET 30, MEMIT 300). Every run edits the same first N tune
# facts in one mass edit. Outputs: figures/tune_<method>_steps_lr/ and figures/tune_<method>_clamp/.
# Stage 3 (MEMIT only) extends λ below the grid at the written targets, since stage 2's lowest λ (100) tied
# with its best; it writes the final MEMIT λ (figures/tune_memit_lam/). It was added after the 2026-11-30
# search and first run by hand with the same command (logs/tune_memit_lam.log, then without --write).
#
#   bash analyses/tune_presets.sh [N=48] > logs/tune_presets.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-48}"
best() {  # best() DIR FIELD: a field of the best row that tune_editing.py stored
    python3 -c "import json,sys; r=next(iter(json.load(open(sys.argv[1]+'/tune_editing.json')).values())); print(r[sys.argv[2]])" "$1" "$2"
}
run() {  # run() METHOD STEPS LRS CLAMPS LAMS OUT [--write]
    python3 analyses/tune_editing.py --methods "$1" --limit "$N" --steps "$2" --lrs "$3" --clamps "$4" \
        --lams "$5" --out "$6" "${@:7}"
}
run pmet 15,30,60 0.1,0.2,0.4 1.5 10,30,100 figures/tune_pmet_steps_lr
run pmet "$(best figures/tune_pmet_steps_lr steps)" "$(best figures/tune_pmet_steps_lr lr)" 0.75,1.5,3 \
    10,30,100 figures/tune_pmet_clamp --write
run memit 12,25,50 0.25,0.5,1.0 0.75 100,300,1000 figures/tune_memit_steps_lr
run memit "$(best figures/tune_memit_steps_lr steps)" "$(best figures/tune_memit_steps_lr lr)" 0.75,1.5,3 \
    100,300,1000 figures/tune_memit_clamp --write
python3 analyses/tune_editing.py --methods memit --limit "$N" --lams 3,10,30,100,300 --out figures/tune_memit_lam --write
