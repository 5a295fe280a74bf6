#!/usr/bin/env bash
# The GPU figures of the README's performance sections, in parts that each fit one device call
# (under 10 minutes on an H200). Run on the GPU host from the repository root, after staging the
# kit the part needs (../shared/device/README.md):
#
#   source .device/mlx-b/install.sh     && bash scripts/gpu_figures.sh mlx-profile|mlx-sft|mlx-head-chunk|mlx-levers|mlx-knobs|mlx-graphs|mlx-rl|mlx-grpo-step|mlx-grpo-parts
#   source .device/unsloth-b/install.sh && bash scripts/gpu_figures.sh cuda-bars|cuda-1b|cuda-8b|cuda-8b-4bit|cuda-sync|cuda-host|cuda-ab|cuda-tests
#   (cuda-first-forward, cuda-sync, cuda-host and cuda-ab need no kit: the host's torch is enough;
#   scripts/one_call_kit.sh packs the unsloth kit for one call: source .device/unsloth-one/install.sh, no staging call first)
#
# mlx-*: the MLX core on MLX's CUDA backend beside mlx-lm-lora 5.10.2 (issue 12's rows);
# cuda-*: cuda_bridge beside Unsloth (issue 13's rows) and the GPU tests. Every row is one
# command printing both sides; the random Llama-shaped models take the tokenizer in $TOKENIZER
# (default .device/tok). mlx-lm-lora comes from the wheels in .whl/ (mlx_lm_lora, gguf, and
# datasets with its dependencies), installed with --target into /tmp/site-peer.
# Each command's whole output goes to $OUT/<row>.log (default ./gpu-figures); the figures are
# echoed. A row that fails or runs past $LIMIT seconds (default 280) does not stop the others.
# BUNDLE=1 packs $OUT's files into one $OUT/<part>.tgz at the end (the device returns 8 files a call).
set -uo pipefail

PART=${1:?"usage: scripts/gpu_figures.sh mlx-profile|mlx-sft|mlx-head-chunk|mlx-levers|mlx-knobs|mlx-graphs|mlx-rl|mlx-grpo-step|mlx-grpo-parts|cuda-1b|cuda-8b|cuda-8b-4bit|cuda-bars|cuda-first-forward|cuda-sync|cuda-host|cuda-ab|cuda-tests"}
OUT=${OUT:-gpu-figures}
TOKENIZER=${TOKENIZER:-.device/tok}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:/tmp/site-peer${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SHAPE=(--model-shape llama-3.2-1b --tokenizer "$TOKENIZER")

row() {  # row NAME COMMAND...: run it, keep its output, echo its figures
    local name=$1
    shift
    echo "== $name: $*"
    timeout "${LIMIT:-280}" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $?"
    grep -E "tokens/s|steps/s|ratio|first|peak|grad norm|rror|passed|failed|TFLOP|GB|ms|waits|\.py:" "$OUT/$name.log" | tail -25
}

peer_site() {
    if [ -d .whl ] && [ ! -d /tmp/site-peer ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-peer .whl/*.whl >/dev/null 2>&1 ||
            echo "note: could not install .whl/ into /tmp/site-peer: rows without the peer"
    fi
}

# `python3 -m macft ARGS` with one module constant set first: "${PATCHED[@]}" MODULE NAME INTEGER ARGS...
PATCHED=(python3 -c "import importlib, runpy, sys
module, name, value = sys.argv[1:4]
setattr(importlib.import_module(module), name, int(value))
sys.argv[:4] = ['macft']
runpy.run_module('macft', run_name='__main__')")

shape_model() {  # shape_model NAME: the random model of that shape, written once to /tmp/shape-NAME; prints its path
    local model=/tmp/shape-$1
    [ -f "$model/config.json" ] ||
        python3 -c "from macft.bench_hf import build_shape_dir as b; b('$1', '$model', tokenizer_dir='$TOKENIZER')" >&2
    echo "$model"
}

case "$PART" in
mlx-profile)  # where the step's time and memory go, piece by piece
    export MACFT_BACKEND=mlx
    row mlx-profile-bf16 python3 scripts/profile_mlx_step.py --tokenizer "$TOKENIZER"
    row mlx-profile-4bit python3 scripts/profile_mlx_step.py --tokenizer "$TOKENIZER" --only step --load-in-4bit
    MACFT_DEQUANTIZE=0 row mlx-profile-4bit-qmm python3 scripts/profile_mlx_step.py --tokenizer "$TOKENIZER" \
        --only step --load-in-4bit
    ;;
mlx-sft)  # issue 12: SFT bf16 / 4-bit / checkpointed, >= 1.3x mlx-lm-lora tokens/s at <= 0.7x its peak
    # (memory pacing on, the GPU's default; mlx-levers times it against MACFT_PACE_MEMORY=0)
    export MACFT_BACKEND=mlx
    peer_site
    sft=(python3 -m macft bench sft --backend mlx "${SHAPE[@]}" --seq-len 2048 --batch-size 4 --lora-rank 16
         --steps 6 --warmup 3 --peer-python python3)
    for base in ${SFT_BASES:-bf16 4bit ckpt}; do  # SFT_BASES: a subset, to split the part over calls
        case $base in bf16) flag=() ;; 4bit) flag=(--load-in-4bit) ;; ckpt) flag=(--grad-checkpoint) ;; esac
        row "mlx-sft-$base" "${sft[@]}" "${flag[@]}" --json "$OUT/mlx-sft-$base.json"
    done
    ;;
mlx-head-chunk)  # the output head's chunk (macft/mlx/logps.py CHUNK_LOGITS_BYTES) against the bf16 step's
    # speed and peak, macft alone: 512 MB (1,024 tokens at the 128k vocabulary), 256 MB, 128 MB (the default)
    export MACFT_BACKEND=mlx
    for mb in 512 256 128; do
        row "mlx-head-chunk-${mb}mb" "${PATCHED[@]}" macft.mlx.logps CHUNK_LOGITS_BYTES $((mb << 20)) bench sft \
            --backend mlx "${SHAPE[@]}" --seq-len 2048 --batch-size 4 --lora-rank 16 --steps 6 --warmup 3 \
            --json "$OUT/mlx-head-chunk-${mb}mb.json"
    done
    ;;
mlx-levers)  # what two of the MLX step's levers change on their own, each beside its baseline: memory
    # pacing (bf16, the default against MACFT_PACE_MEMORY=0, macft only) and the fused-width padding
    # (an odd width, 2,000 tokens a row, beside mlx-lm-lora)
    export MACFT_BACKEND=mlx
    peer_site
    sft=(python3 -m macft bench sft --backend mlx "${SHAPE[@]}" --batch-size 4 --lora-rank 16 --steps 6 --warmup 3)
    MACFT_PACE_MEMORY=0 row mlx-sft-bf16-unpaced "${sft[@]}" --seq-len 2048 --json "$OUT/mlx-sft-bf16-unpaced.json"
    row mlx-sft-bf16-paced "${sft[@]}" --seq-len 2048 --json "$OUT/mlx-sft-bf16-paced.json"
    row mlx-sft-bf16-2000 "${sft[@]}" --seq-len 2000 --peer-python python3 --json "$OUT/mlx-sft-bf16-2000.json"
    ;;
mlx-knobs)  # MLX-CUDA's command buffers: kernels per CUDA graph (MLX_MAX_OPS_PER_BUFFER, default 20), the
    # graph cache (MLX_CUDA_GRAPH_CACHE_SIZE, default 100, emptied whole when full), graphs off; each on
    # a rollout's decoding steps and on the compiled training step, macft alone
    export MACFT_BACKEND=mlx
    model=$(shape_model llama-3.2-1b)  # shared by the part's rows
    for knobs in MLX_USE_CUDA_GRAPHS=1 "MLX_MAX_OPS_PER_BUFFER=200 MLX_CUDA_GRAPH_CACHE_SIZE=2000" MLX_USE_CUDA_GRAPHS=0; do
        tag=$(echo "$knobs" | tr ' =' '_-')
        row "knobs-decode-$tag" env $knobs python3 scripts/bench_decode_steps.py --model "$model" --max-tokens 128 \
            --repeats 1
        [ -n "${KNOBS_DECODE_ONLY:-}" ] ||
            row "knobs-step-$tag" env $knobs python3 scripts/profile_mlx_step.py --model "$model" --only decode,step
    done
    ;;
mlx-graphs)  # MLX-CUDA's graphs on (the default) and off (MLX_USE_CUDA_GRAPHS=0, read once per process), on
    # the compiled training step and on the GRPO rollout; a warm-up run first, so that neither side's
    # time holds MLX's kernel compilation (the 2026-12-05 H100 call's graphs-off step ran first, paying
    # it, and past its limit)
    export MACFT_BACKEND=mlx
    model=$(shape_model llama-3.2-1b)  # shared by the part's rows
    LIMIT=150 row graphs-warm-up python3 scripts/profile_mlx_step.py --model "$model" --only step
    for graphs in 1 0; do
        MLX_USE_CUDA_GRAPHS=$graphs LIMIT=120 row "graphs-$graphs-step" python3 scripts/profile_mlx_step.py \
            --model "$model" --only step
        MLX_USE_CUDA_GRAPHS=$graphs LIMIT=120 row "graphs-$graphs-grpo" python3 -m macft bench grpo --backend mlx \
            --model "$model" --num-prompts 2 --group-size 8 --max-tokens 256
    done
    ;;
mlx-rl)  # issue 12: DPO step; GRPO rollouts (>= 10,000 tokens/s) eager and compiled (the full step: mlx-grpo-step)
    export MACFT_BACKEND=mlx
    peer_site
    row mlx-dpo python3 -m macft bench dpo --backend mlx "${SHAPE[@]}" --seq-len 1024 --batch-size 4 --lora-rank 16 \
        --steps 6 --warmup 3 --peer-python python3 --json "$OUT/mlx-dpo.json"
    grpo=(python3 -m macft bench grpo --backend mlx "${SHAPE[@]}" --num-prompts 2 --group-size 8 --max-tokens 256)
    MACFT_COMPILED_DECODE=0 row mlx-grpo-eager "${grpo[@]}" --json "$OUT/mlx-grpo-eager.json"
    MACFT_COMPILED_DECODE=1 row mlx-grpo-compiled "${grpo[@]}" --peer-python python3 --json "$OUT/mlx-grpo-compiled.json"
    ;;
mlx-grpo-step)  # issue 12: whole GRPO steps (rollout, loss, update) beside mlx-lm-lora's, a call of its own
    # (the 2026-12-05 lease's row ran past its limit with the rollout comparisons in front of it)
    export MACFT_BACKEND=mlx
    peer_site
    LIMIT=${LIMIT:-560} row mlx-grpo-step python3 -m macft bench grpo --backend mlx "${SHAPE[@]}" --num-prompts 2 \
        --group-size 8 --max-tokens 256 --repeats 1 --full-step --steps 2 --warmup 1 --lora-rank 16 \
        --peer-python python3 --json "$OUT/mlx-grpo-step.json"
    ;;
mlx-grpo-parts)  # the GRPO step's gradient in parts of prompt groups (macft/trainers/grpo.py LOSS_PART_TOKENS,
    # 2,048 token slots) against the whole micro-batch at once, macft alone (mlx-grpo-step: beside the peer)
    export MACFT_BACKEND=mlx
    for slots in 1000000000 2048; do
        LIMIT=${LIMIT:-200} row "mlx-grpo-parts-$slots" "${PATCHED[@]}" macft.trainers.grpo LOSS_PART_TOKENS "$slots" \
            bench grpo --backend mlx "${SHAPE[@]}" --num-prompts 2 --group-size 8 --max-tokens 256 --repeats 1 \
            --full-step --steps 2 --warmup 1 --lora-rank 16 --json "$OUT/mlx-grpo-parts-$slots.json"
    done
    ;;
cuda-1b)  # issue 13: 1B, batch 4: bf16 >= 1.1x Unsloth, 4-bit >= 1.0x, at <= its peak
    export MACFT_BACKEND=cuda
    sft=(python3 -m macft bench sft --backend cuda "${SHAPE[@]}" --seq-len 2048 --batch-size 4 --lora-rank 16
         --steps 6 --warmup 3 --grad-checkpoint --offload-checkpoints --unsloth-python python3)
    # each with Unsloth's kernel table beside macft's (profile_cuda_step.py): where the two steps differ
    for base in bf16 4bit; do
        flag=()
        [ "$base" = 4bit ] && flag=(--load-in-4bit)
        MACFT_PEER_PROFILE="$OUT/unsloth-kernels-$base.txt" row "cuda-1b-$base" "${sft[@]}" "${flag[@]}" \
            --json "$OUT/cuda-1b-$base.json"
        LIMIT=150 row "cuda-kernels-$base" python3 scripts/profile_cuda_step.py --tokenizer "$TOKENIZER" "${flag[@]}" \
            --rows 45 --copies --idle
    done
    ;;
cuda-8b | cuda-8b-4bit)  # issue 13: 8B, batch 1 (one call each: the 16 GB random model is written each time)
    export MACFT_BACKEND=cuda
    sft=(python3 -m macft bench sft --backend cuda --model-shape llama-3.1-8b --tokenizer "$TOKENIZER" --seq-len 2048
         --batch-size 1 --lora-rank 16 --steps 6 --warmup 3 --grad-checkpoint --offload-checkpoints
         --unsloth-python python3)
    if [ "$PART" = cuda-8b ]; then
        LIMIT=${LIMIT:-560} row cuda-8b-bf16 "${sft[@]}" --json "$OUT/cuda-8b-bf16.json"
    else
        LIMIT=${LIMIT:-560} row cuda-8b-4bit "${sft[@]}" --load-in-4bit --json "$OUT/cuda-8b-4bit.json"
    fi
    ;;
cuda-bars)  # issue 13's four rows in one call: 1B b4 and 8B b1, bf16 (with HF + PEFT's first loss) and 4-bit,
    # each beside Unsloth; the models written once (not yet run as one part: its rows took ~6 minutes in all)
    export MACFT_BACKEND=cuda
    for shape in llama-3.2-1b:4 llama-3.1-8b:1; do
        name=${shape%%:*}
        model=$(shape_model "$name")
        sft=(python3 -m macft bench sft --backend cuda --model "$model" --seq-len 2048 --batch-size "${shape##*:}"
             --lora-rank 16 --steps 6 --warmup 3 --grad-checkpoint --offload-checkpoints --unsloth-python python3)
        LIMIT=150 row "cuda-bars-$name-bf16" "${sft[@]}" --json "$OUT/cuda-bars-$name-bf16.json"
        LIMIT=120 row "cuda-bars-$name-4bit" "${sft[@]}" --load-in-4bit --json "$OUT/cuda-bars-$name-4bit.json"
    done
    ;;
cuda-first-forward)  # issue 13: the fused first forward of checkpointed blocks (lora.FUSED_FIRST_FORWARD) on
    # and off, macft alone, alternating (the bench's speed moves from run to run), then where the 8B step's host
    # time goes (the 8B step waits on its host: 165 ms of kernels in a 283 ms step on an H100)
    export MACFT_BACKEND=cuda
    for shape in llama-3.2-1b:4 llama-3.1-8b:1; do  # each model written once, read by the four rows
        model=$(shape_model "${shape%%:*}")
        for fused in 0 1 0 1; do
            LIMIT=90 row "cuda-first-forward-${shape%%:*}-$fused" "${PATCHED[@]}" cuda_bridge.lora FUSED_FIRST_FORWARD \
                "$fused" bench sft --backend cuda --model "$model" --seq-len 2048 --batch-size "${shape##*:}" \
                --lora-rank 16 --steps 6 --warmup 3 --grad-checkpoint --offload-checkpoints --no-hf-peer
        done
    done
    LIMIT=150 row cuda-host-8b python3 scripts/profile_cuda_step.py --tokenizer "$TOKENIZER" --model-shape llama-3.1-8b \
        --batch-size 1 --sort cpu_time_total --rows 40 --idle
    ;;
cuda-sync)  # issue 13: why the bridge's 4-bit step idles the GPU (its kernels take a bf16 step's GPU time):
    # where the host waits for the GPU, and the host's time by operator (no kit needed)
    export MACFT_BACKEND=cuda
    for base in 4bit bf16; do
        flag=()
        [ "$base" = 4bit ] && flag=(--load-in-4bit)
        LIMIT=120 row "cuda-sync-$base" python3 scripts/profile_cuda_step.py --tokenizer "$TOKENIZER" "${flag[@]}" \
            --sync-points --warmup 2
        LIMIT=120 row "cuda-host-$base" python3 scripts/profile_cuda_step.py --tokenizer "$TOKENIZER" "${flag[@]}" \
            --sort cpu_time_total --rows 30
    done
    # the device-to-device copies (23 ms of a 158 ms bf16 step on the H200), by call site
    LIMIT=120 row cuda-copies-bf16 python3 scripts/profile_cuda_step.py --tokenizer "$TOKENIZER" --copies --rows 40
    ;;
cuda-ab)  # what a change buys on one host: this tree against the one in $BASE (default .device/base, made with
    # `git archive COMMIT algorithms convert cuda_bridge macft scripts | tar -x -C .device/base`), 1B b4 bf16,
    # macft alone, alternating (no kit needed); the same first loss and gradient norms say the change kept the math
    export MACFT_BACKEND=cuda
    model=$(shape_model llama-3.2-1b)
    base=$(cd "${BASE:-.device/base}" && pwd)
    sft=(-m macft bench sft --backend cuda --model "$model" --seq-len 2048 --batch-size 4 --lora-rank 16 --steps 20
         --warmup 3 --grad-checkpoint --offload-checkpoints --no-hf-peer)
    for round in 1 2; do
        LIMIT=90 row "cuda-ab-base-$round" env PYTHONPATH="$base:$PYTHONPATH" python3 -P "${sft[@]}"
        LIMIT=90 row "cuda-ab-this-$round" python3 "${sft[@]}"
    done
    ;;
cuda-host)  # issue 13: the host's time, where a step's Python goes, and checkpointing's share (no kit needed)
    export MACFT_BACKEND=cuda
    # cuda_bridge.checkpoint against torch's checkpointing (its install made a no-op), same process kind
    TORCH_CHECKPOINT=(python3 -c "import runpy, sys, cuda_bridge.checkpoint as c
c.install = lambda model, checkpointer: checkpointer
sys.argv[0] = 'macft'
runpy.run_module('macft', run_name='__main__')")
    sft=(bench sft --backend cuda "${SHAPE[@]}" --seq-len 2048 --batch-size 4 --lora-rank 16 --steps 6 --warmup 3
         --grad-checkpoint --no-hf-peer)
    for base in bf16 4bit; do
        flag=()
        [ "$base" = 4bit ] && flag=(--load-in-4bit)
        row "cuda-ckpt-torch-$base" "${TORCH_CHECKPOINT[@]}" "${sft[@]}" "${flag[@]}"
        row "cuda-ckpt-macft-$base" python3 -m macft "${sft[@]}" "${flag[@]}"
    done
    LIMIT=60 row cuda-quant-host python3 scripts/bench_quant_host.py
    for checkpoint in torch macft; do  # the 1B's blocks, narrow: the step's host time alone
        LIMIT=90 row "cuda-host-step-$checkpoint" python3 scripts/bench_host_step.py --tokenizer "$TOKENIZER" \
            --checkpoint "$checkpoint"
        LIMIT=90 row "cuda-host-step-$checkpoint-4bit" python3 scripts/bench_host_step.py --tokenizer "$TOKENIZER" \
            --checkpoint "$checkpoint" --load-in-4bit
    done
    LIMIT=150 row cuda-cprofile-4bit python3 scripts/bench_host_step.py --tokenizer "$TOKENIZER" --load-in-4bit \
        --model-shape llama-3.2-1b --batch-size 4 --seq-len 2048 --checkpoint offload --steps 4 --rows 45
    LIMIT=150 row cuda-kernels-bf16 python3 scripts/profile_cuda_step.py --tokenizer "$TOKENIZER" --rows 45 --copies
    ;;
cuda-tests)  # the GPU tests: kernels against their references with time and peak, offload, QLoRA
    export MACFT_BACKEND=cuda MACFT_TEST_TOKENIZER="$PWD/$TOKENIZER"
    LIMIT=${LIMIT:-480} row cuda-tests python3 -m pytest -q -m gpu tests/cuda_bridge -p no:cacheprovider
    LIMIT=60 row cuda-lora-layer python3 scripts/bench_lora_layer.py --rows 8192 --in 2048 --out 8192
    LIMIT=60 row cuda-lora-order python3 scripts/bench_lora_order.py  # the 1B MLP's gate/up shape
    LIMIT=60 row cuda-lora-order-qkv python3 scripts/bench_lora_order.py --out 2048
    ;;
*)
    echo "unknown part $PART" >&2
    exit 2
    ;;
esac

if [ "${BUNDLE:-0}" = 1 ]; then
    (cd "$OUT" && tar czf "$PART.tgz" --exclude='*.tgz' -- * && find . -maxdepth 1 -type f ! -name '*.tgz' -delete)
fi
