#!/usr/bin/env bash
# GRPO with rollouts on a vLLM server: `trl vllm-serve` on VLLM_GPUS, the grpo stage on
# TRAIN_GPUS (NOT RUN where this was written: no GPU was available).
#
#   VLLM_GPUS=0 TRAIN_GPUS=1 infra/grpo_vllm_server.sh            # one GPU each
#   VLLM_GPUS=0,1 VLLM_TP=2 TRAIN_GPUS=2 infra/grpo_vllm_server.sh # a model that needs two
#
# params.yaml must set grpo.vllm (infra/presets/grpo-vllm-server.yaml). The server loads the
# policy the stage starts from (POLICY, default the RFT model) and receives the trainer's weights
# after every step. TRL_VLLM_PYTHON: an environment with trl and vllm (GPU build) together; the
# main .venv has no vLLM and .venv-vllm no TRL (their pins differ).
# VLLM_SPECULATIVE: speculative decoding on the server, vLLM's JSON (`vllm serve --speculative-config`),
# e.g. '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}' — the server-side
# counterpart of grpo.speculative's prompt-lookup drafter. The online-trained EAGLE drafter of
# grpo.speculative (steps/core/drafter.py) is the in-process engine's: a server would need the
# drafter's weights pushed with the policy's after every step, which TRL's weight sync does not do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
TRL_VLLM_PYTHON="${TRL_VLLM_PYTHON:?set TRL_VLLM_PYTHON to a python with trl==1.16.0 and vllm (CUDA)}"
VLLM_GPUS="${VLLM_GPUS:-0}"
TRAIN_GPUS="${TRAIN_GPUS:-1}"
VLLM_TP="${VLLM_TP:-1}"
POLICY="${POLICY:-data/rft/model}"

# The stage's own config, read as the stage reads it: a wrong key fails here, by name.
cfg=$("$PYTHON" - <<'PY'
from steps.core.config import load_config
from steps.grpo import GrpoConfig
s = load_config(GrpoConfig, "grpo").vllm_server
if s.mode != "server" or s.base_url:
    raise SystemExit("params.yaml: section 'grpo': set vllm: {mode: server, host, port} "
                     "(infra/presets/grpo-vllm-server.yaml); base_url means the server runs elsewhere")
print(s.host, s.port)
PY
)
read -r HOST PORT <<< "$cfg"
log=.cache/trl-vllm-serve.log
mkdir -p .cache
CUDA_VISIBLE_DEVICES="$VLLM_GPUS" "$(dirname "$TRL_VLLM_PYTHON")/trl" vllm-serve --model "$POLICY" \
  --host "$HOST" --port "$PORT" --tensor_parallel_size "$VLLM_TP" \
  ${VLLM_SPECULATIVE:+--speculative_config "$VLLM_SPECULATIVE"} > "$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://$HOST:$PORT/health" > /dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "trl vllm-serve exited; see $log" >&2; exit 1; }
  sleep 1
done
curl -sf "http://$HOST:$PORT/health" > /dev/null || { echo "trl vllm-serve not up after 600 s; see $log" >&2; exit 1; }
CUDA_VISIBLE_DEVICES="$TRAIN_GPUS" "$PYTHON" -m dvc repro --single-item grpo
