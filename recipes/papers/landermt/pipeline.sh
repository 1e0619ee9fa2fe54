#!/usr/bin/env bash
# LANDeRMT (Zhu et al. 2024, "LANDeRMT: Detecting and Routing Language-Aware Neurons for
# Selectively Finetuning LLMs to Machine Translation") on a Llama-2-7B-shaped model (the paper
# uses BLOOM-7b1 and Baichuan2-7B), ten directions: en<->de, it, fr, ar, zh.
#
#   MODEL=./Llama-2-7b DATA=./data OUT=./landermt-run recipes/papers/landermt/pipeline.sh
#   DRY_RUN=1 MODEL=... DATA=... OUT=... recipes/papers/landermt/pipeline.sh
#
# DATA holds dev.S-T.jsonl (scored for awareness) and train.S-T.jsonl (finetuning) of
# {"source", "target"} pairs per direction. BLEU/chrF per direction afterwards:
# `neuroloc eval OUT/ft-S-T OUT/ft-full --translate test.S-T.jsonl --src S --tgt T` (no dry run).
# The neuroloc command is taken from PATH, or from $NEUROLOC.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NEUROLOC=${NEUROLOC:-neuroloc}
MODEL=${MODEL:?set MODEL to the base checkpoint folder (Llama-2-7B)}
DATA=${DATA:?set DATA to the corpus folder}
OUT=${OUT:?set OUT to the folder every step writes into}
DIRECTIONS=(en-de de-en en-it it-en en-fr fr-en en-ar ar-en en-zh zh-en)

step() {  # step ARGS...: one neuroloc command, with --dry-run under DRY_RUN=1
    echo "+ neuroloc $*" >&2
    if [[ -n ${DRY_RUN:-} ]]; then "$NEUROLOC" "$@" --dry-run; else "$NEUROLOC" "$@"; fi
}

[[ -n ${DRY_RUN:-} ]] || mkdir -p "$OUT"
dev=() train=()
for d in "${DIRECTIONS[@]}"; do
    dev+=(--pair "$d=$DATA/dev.$d.jsonl")
    train+=(--pair "$d=$DATA/train.$d.jsonl")
done

# §3.1 (Eq. 1-2): the k = 4 layers of largest mean-activation change; §3.2 (Eq. 3-5):
# awareness |h·∂L/∂h| per FFN neuron, ε = 0.9 of each kept layer language-general, the rest
# specific to the language of highest awareness; §3.3 (Eq. 6): the routing coefficients.
step locate awareness "$MODEL" "${dev[@]}" --layers 4 --general 0.9 -o "$OUT/neurons"

# §3.4: selective finetuning with routing (AdamW, lr 5e-5, batch 8, accumulation 10, 1 epoch).
step train "$MODEL" --config "$HERE/train-landermt.yaml" --masks "$OUT/neurons" "${train[@]}" -o "$OUT/ft"
# The baseline: full finetuning on the same data.
step train "$MODEL" --config "$HERE/train-full.yaml" "${train[@]}" -o "$OUT/ft-full"

# §3.3: one ordinary checkpoint per direction, the routing folded into the kept layers' rows.
for d in "${DIRECTIONS[@]}"; do
    step export-pair "$OUT/ft" --pair "$d" -o "$OUT/ft-$d"
done
