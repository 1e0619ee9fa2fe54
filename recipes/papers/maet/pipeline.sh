#!/usr/bin/env bash
# MAET (Chen et al. 2024, "Extracting and Transferring Abilities For Building Multi-lingual
# Ability-enhanced Large Language Models") at the paper's scale: Llama-3-8B, math ability
# learned from English, transferred to es, zh, bn and te.
#
#   MODEL=./Llama-3-8B DATA=./data OUT=./maet-run recipes/papers/maet/pipeline.sh
#   DRY_RUN=1 MODEL=... DATA=... OUT=... recipes/papers/maet/pipeline.sh   # every step --dry-run
#
# DATA holds: math-en-probe.jsonl and general-LANG-probe.txt (the small probe corpora),
# math-en.jsonl (e.g. OpenWebMath) and general-LANG.txt for LANG in en es zh bn te.
# The neuroloc command is taken from PATH, or from $NEUROLOC if set. With DRY_RUN=1 every
# step checks its inputs' headers and prints what it would write and hold; since nothing is
# written, each later step needs the earlier steps' outputs to exist already.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NEUROLOC=${NEUROLOC:-neuroloc}
MODEL=${MODEL:?set MODEL to the base checkpoint folder (Llama-3-8B)}
DATA=${DATA:?set DATA to the corpus folder}
OUT=${OUT:?set OUT to the folder every step writes into}
LANGS=(es zh bn te)       # L1..Ln: the languages the ability is transferred to (MGSM)

step() {  # step ARGS...: one neuroloc command, with --dry-run under DRY_RUN=1
    echo "+ neuroloc $*" >&2
    if [[ -n ${DRY_RUN:-} ]]; then "$NEUROLOC" "$@" --dry-run; else "$NEUROLOC" "$@"; fi
}

[[ -n ${DRY_RUN:-} ]] || mkdir -p "$OUT"

# §3.2, Eq. 1: probe CPT, full parameters, on a small corpus of the ability (English math)
# and of each language; the change of each neuron approximates its accumulated gradient.
step train "$MODEL" --config "$HERE/train-probe.yaml" --data "$DATA/math-en-probe.jsonl" -o "$OUT/probe-math-en"
for L in en "${LANGS[@]}"; do
    step train "$MODEL" --config "$HERE/train-probe.yaml" --data "$DATA/general-$L-probe.txt" -o "$OUT/probe-$L"
done

# §3.2, Eq. 1: key neurons N_A and N_L = the top k1 = 5 % of row neurons by ‖Θ~_j − Θo_j‖,
# ranked over the whole model (§4.1, "the top 5% relevant neurons").
step locate delta "$MODEL" "$OUT/probe-math-en" --top 0.05 -o "$OUT/n-math.safetensors"
for L in en "${LANGS[@]}"; do
    step locate delta "$MODEL" "$OUT/probe-$L" --top 0.05 -o "$OUT/n-$L.safetensors"
done

# Algorithm 1, line 11: the ability model trains N_A ∪ N_L0.
step mask union "$OUT/n-math.safetensors" "$OUT/n-en.safetensors" -o "$OUT/n-math-en.safetensors"

# §3.2, Eq. 2: masked CPT (Table 5: lr 5e-5, batches of 1M tokens, 2B tokens):
# Θ_{A,L0} on the ability + general English mixture over N_A ∪ N_L0, Θ_{L0} on general English over N_L0.
step train "$MODEL" --config "$HERE/train-masked-cpt.yaml" --train-mask "$OUT/n-math-en.safetensors" \
    --data "$DATA/math-en.jsonl:0.5" --data "$DATA/general-en.txt:0.5" -o "$OUT/cpt-math-en"
step train "$MODEL" --config "$HERE/train-masked-cpt.yaml" --train-mask "$OUT/n-en.safetensors" \
    --data "$DATA/general-en.txt" -o "$OUT/cpt-en"

# §3.3, Eq. 3: Θ_{L_i}, masked CPT of each target language over N_{L_i}.
for L in "${LANGS[@]}"; do
    step train "$MODEL" --config "$HERE/train-masked-cpt.yaml" --train-mask "$OUT/n-$L.safetensors" \
        --data "$DATA/general-$L.txt" -o "$OUT/cpt-$L"
done

# Eq. 2 and 3 as delta checkpoints: R(A) = 0.8·Δ(A,L0) − 0.2·Δ(L0), R_Lang = Σ 0.25·Δ(L_i).
langs_set=()
for i in "${!LANGS[@]}"; do langs_set+=(--set "languages.$i.model=$OUT/cpt-${LANGS[$i]}"); done
step merge "$HERE/ability-vector.yaml" --set "base_model=$MODEL" \
    --set "ability.model=$OUT/cpt-math-en" --set "ability.language_model=$OUT/cpt-en" -o "$OUT/r-ability"
step merge "$HERE/language-vector.yaml" --set "base_model=$MODEL" "${langs_set[@]}" -o "$OUT/r-lang"

# Eq. 4: every tensor's dot product <R(A)[τ], R_Lang[τ]>, sorted descending (the merge below
# takes the last k2 of this order as T; this table is for reading).
step rank "$OUT/r-ability" "$OUT/r-lang" --metric dot

# Eq. 5: the MAET merge, γ = 0.2, η = 1.0, k2 = 80 % (math).
step merge "$HERE/maet-math.yaml" --set "base_model=$MODEL" \
    --set "ability.model=$OUT/cpt-math-en" --set "ability.language_model=$OUT/cpt-en" "${langs_set[@]}" -o "$OUT/maet-math"
