#!/usr/bin/env bash
# Convert a Hugging Face checkpoint to HAQ int8 and serve it with vLLM's OpenAI-compatible server.
#
#   examples/convert_and_serve.sh MODEL_DIR OUT_DIR CALIB_TEXT [PORT]
#
# MODEL_DIR: a Hugging Face model directory (safetensors; Llama, OPT, Mixtral or Qwen2-MoE family).
# CALIB_TEXT: plain text or JSONL for calibration (or wikitext2 / c4 / pile with network access).
# Environment: HAQ (default: haq from the active environment), METHOD (default haq), SAMPLES (32),
# MAX_MODEL_LEN (default: the model's), HAQ_SLOTS_PER_LAYER (MoE: experts per layer kept on the device;
# unset = all).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0"; exit 2; }
MODEL=$1 OUT=$2 CALIB=$3 PORT=${4:-8000}
HAQ=${HAQ:-haq}

# 1. Convert (resumable: rerun with --resume after an interruption; OUT appears only when complete).
[ -f "$OUT/config.json" ] || "$HAQ" convert "$MODEL" "$OUT" --method "${METHOD:-haq}" --calib "$CALIB" \
    --samples "${SAMPLES:-32}"

# 2. Serve. On the CUDA build `vllm serve "$OUT" --quantization haq` is the same; the CPU build's
#    `vllm serve` entry point is broken, so `haq serve` starts vLLM's server module directly.
"$HAQ" serve "$OUT" --host 127.0.0.1 --port "$PORT" ${MAX_MODEL_LEN:+--max-model-len "$MAX_MODEL_LEN"} &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    kill -0 $SERVER 2>/dev/null || { echo "server exited" >&2; exit 1; }
    sleep 2
done

# 3. Ask it something (any OpenAI client works; see examples/openai_client.py).
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$OUT\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16, \"temperature\": 0}"
echo
