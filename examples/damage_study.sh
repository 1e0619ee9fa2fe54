#!/usr/bin/env bash
# The damage study of linguistic regions (Zhang et al. 2024, "Unveiling Linguistic Regions
# in Large Language Models"), from one command:
#
#   1. neuroloc locate gradient: per-language gradient importance, and the core, bottom,
#      random and monolingual (mono-LANG) regions, into OUT_DIR/regions/;
#   2. neuroloc ablate: one copy of MODEL per region with that region removed
#      (OUT_DIR/core-removed/, OUT_DIR/random-removed/, ..., OUT_DIR/mono-LANG-removed/);
#   3. neuroloc eval: held-out perplexity per language of MODEL and every copy, side by
#      side: the table goes to OUT_DIR/damage.txt (and stdout), the JSON document to
#      OUT_DIR/damage.json, and per-document samples to OUT_DIR/eval/.
#
# Usage:
#   examples/damage_study.sh [options] MODEL OUT_DIR LANG=TRAIN:HELDOUT LANG=TRAIN:HELDOUT [...]
#
#   LANG=TRAIN:HELDOUT  a language name, the corpus its regions are located on (.txt,
#                       .jsonl or a folder), and a held-out .jsonl of {"text": ...}
#                       records its perplexity is measured on. At least two languages;
#                       paths must not contain ':'.
#
# Options:
#   --top SHARE         share of each tensor's elements a region keeps [default 0.01]
#   --samples N         packed rows scored per language [default: locate's, 64]
#   --seq-len N         tokens per scored row [default: locate's]
#   --batch-size N      rows per backward pass [default 8]
#   --mode MODE         zero (the paper's removal), mean or noise [default zero]
#   --device DEV        device of the evaluation: cpu, cuda, cuda:N [default cpu]
#   --dtype DTYPE       dtype of the evaluation: float32, bfloat16, float16 or auto
#                       [default float32: in bfloat16 the log-probabilities are rounded so
#                       coarsely that small damage vanishes, or different models tie exactly]
#   --overwrite         replace the outputs of an earlier run in OUT_DIR
#
# The neuroloc command is taken from PATH, or from $NEUROLOC if set.
#
# Example:
#   examples/damage_study.sh --top 0.01 ./Llama-3-8B ./damage \
#       en=en-train.txt:en-held.jsonl es=es-train.txt:es-held.jsonl zh=zh-train.txt:zh-held.jsonl

set -euo pipefail

usage() {  # usage [EXIT]: on stdout for --help, else on stderr with exit 2
    local code=${1:-2}
    [[ $code -eq 0 ]] || exec >&2
    echo "usage: $(basename "$0") [--top SHARE] [--samples N] [--seq-len N] [--batch-size N] [--mode zero|mean|noise]" \
        "[--device DEV] [--dtype DTYPE] [--overwrite] MODEL OUT_DIR LANG=TRAIN:HELDOUT LANG=TRAIN:HELDOUT [...]"
    exit "$code"
}

die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

NEUROLOC=${NEUROLOC:-neuroloc}
TOP=0.01
SAMPLES=
SEQ_LEN=
BATCH_SIZE=8
MODE=zero
DEVICE=cpu
DTYPE=float32
OVERWRITE=()  # expanded as ${OVERWRITE[@]+...}: an empty array is "unbound" under set -u in bash < 4.4

positional=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --top | --samples | --seq-len | --batch-size | --mode | --device | --dtype)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
                --top) TOP=$2 ;;
                --samples) SAMPLES=$2 ;;
                --seq-len) SEQ_LEN=$2 ;;
                --batch-size) BATCH_SIZE=$2 ;;
                --mode) MODE=$2 ;;
                --device) DEVICE=$2 ;;
                --dtype) DTYPE=$2 ;;
            esac
            shift 2
            ;;
        --overwrite)
            OVERWRITE=(--overwrite)
            shift
            ;;
        -h | --help) usage 0 ;;
        --) shift; positional+=("$@"); break ;;
        -*) die "unknown option $1" ;;
        *) positional+=("$1"); shift ;;
    esac
done
[[ ${#positional[@]} -ge 4 ]] || usage

MODEL=${positional[0]}
OUT=${positional[1]}
langs=()
data=()
ppl=()
for spec in "${positional[@]:2}"; do
    lang=${spec%%=*}
    rest=${spec#*=}
    [[ $spec == *=* && -n $lang && $rest == *:* ]] || die "'$spec': expected LANG=TRAIN:HELDOUT"
    train=${rest%%:*}
    held=${rest#*:}
    [[ -n $train && -n $held && $held != *:* ]] || die "'$spec': expected LANG=TRAIN:HELDOUT (paths without ':')"
    langs+=("$lang")
    data+=(--data "$lang=$train")
    ppl+=(--ppl "$held:$lang")
done

locate_opts=(--top "$TOP" --batch-size "$BATCH_SIZE")
if [[ -n $SAMPLES ]]; then locate_opts+=(--samples "$SAMPLES"); fi
if [[ -n $SEQ_LEN ]]; then locate_opts+=(--seq-len "$SEQ_LEN"); fi

mkdir -p "$OUT"

echo "== locating regions in $OUT/regions" >&2
"$NEUROLOC" locate gradient "$MODEL" "${data[@]}" "${locate_opts[@]}" -o "$OUT/regions" ${OVERWRITE[@]+"${OVERWRITE[@]}"} >&2

models=("$MODEL")
for region in core random bottom "${langs[@]/#/mono-}"; do
    echo "== removing $region ($MODE) into $OUT/$region-removed" >&2
    "$NEUROLOC" ablate "$MODEL" "$OUT/regions/$region.safetensors" -o "$OUT/$region-removed" --mode "$MODE" ${OVERWRITE[@]+"${OVERWRITE[@]}"} >&2
    models+=("$OUT/$region-removed")
done

echo "== held-out perplexity of ${#models[@]} models" >&2
"$NEUROLOC" eval "${models[@]}" "${ppl[@]}" --device "$DEVICE" --dtype "$DTYPE" -o "$OUT/eval" ${OVERWRITE[@]+"${OVERWRITE[@]}"} | tee "$OUT/damage.txt"
cp "$OUT/eval/results.json" "$OUT/damage.json"
echo "wrote $OUT/damage.txt and $OUT/damage.json" >&2
