#!/usr/bin/env bash
# Linguistic regions (Zhang et al. 2024, "Unveiling Linguistic Regions in Large Language
# Models") at the paper's scale: Llama-2-7B, six languages.
#
#   MODEL=./Llama-2-7b DATA=./data OUT=./regions-run recipes/papers/linguistic-regions/pipeline.sh
#   DRY_RUN=1 MODEL=... DATA=... OUT=... recipes/papers/linguistic-regions/pipeline.sh
#
# DATA holds LANG.txt for each language (text the importance is scored on) and
# further-pretraining.txt (the language the freeze run learns). The public code scores six
# languages; which six is our choice below. Held-out perplexity per language (the damage
# table) is `neuroloc eval MODEL OUT/*-removed --ppl HELD.jsonl:LANG ...`, which has no dry run.
# The neuroloc command is taken from PATH, or from $NEUROLOC. With DRY_RUN=1 every step only
# checks headers and prints what it would write and hold.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NEUROLOC=${NEUROLOC:-neuroloc}
MODEL=${MODEL:?set MODEL to the base checkpoint folder (Llama-2-7B)}
DATA=${DATA:?set DATA to the corpus folder}
OUT=${OUT:?set OUT to the folder every step writes into}
LANGS=(en zh ar es ru ko)
SAMPLES=10000             # the public code saves scores after 10k (and 100k) samples
SEQ_LEN=512               # the public code's sequence length

step() {  # step ARGS...: one neuroloc command, with --dry-run under DRY_RUN=1
    echo "+ neuroloc $*" >&2
    if [[ -n ${DRY_RUN:-} ]]; then "$NEUROLOC" "$@" --dry-run; else "$NEUROLOC" "$@"; fi
}

[[ -n ${DRY_RUN:-} ]] || mkdir -p "$OUT"
data=()
for L in "${LANGS[@]}"; do data+=(--data "$L=$DATA/$L.txt"); done

# Importance |Σ_b g_b ⊙ θ| per element of the transformer blocks and language (forward and
# backward passes, no optimizer step); the core region = the top 1 % per tensor of the sum over
# languages, mono-LANG = LANG's top 1 % minus the others' top 1 %, bottom and random controls.
step locate gradient "$MODEL" "${data[@]}" --top 0.01 --samples "$SAMPLES" --seq-len "$SEQ_LEN" --batch-size 8 -o "$OUT/regions"

# The damage study: each region removed (zeroed) in its own copy of the model.
for region in core random bottom "${LANGS[@]/#/mono-}"; do
    step ablate "$MODEL" "$OUT/regions/$region.safetensors" --mode zero -o "$OUT/$region-removed"
done

# Region freezing: the paper freezes the top 5 % core region during further pretraining.
# (`locate select OUT/regions/importance/*.safetensors --top 0.05` re-selects it from the saved
# scores without running the model again, but has no dry run yet; this scores once more.)
step locate gradient "$MODEL" "${data[@]}" --top 0.05 --samples "$SAMPLES" --seq-len "$SEQ_LEN" --batch-size 8 -o "$OUT/regions-top5"
step train "$MODEL" --config "$HERE/train-freeze-core.yaml" --freeze-mask "$OUT/regions-top5/core.safetensors" \
    --data "$DATA/further-pretraining.txt" -o "$OUT/frozen-core"
# The baseline: the same further pretraining with nothing frozen.
step train "$MODEL" --config "$HERE/train-freeze-core.yaml" --data "$DATA/further-pretraining.txt" -o "$OUT/plain-cpt"
