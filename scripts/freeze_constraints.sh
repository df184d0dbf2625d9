#!/usr/bin/env bash
# Regenerate constraints.txt: every distribution a fresh `pip install -e '.[dev]'` resolves,
# pinned (`pip freeze`), under a fixed header. Run after changing pyproject.toml's
# dependencies, on the Python CI and the image use (3.11), and commit the result.
#
#   scripts/freeze_constraints.sh            # writes constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."

venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -e '.[dev]'
{
  echo "# Pinned versions of every dependency (the dev extra holds every other extra's), from a fresh"
  echo "# \`pip install -e '.[dev]'\` on Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'): \`pip freeze --exclude-editable\`."
  echo "# .ci/run and the Dockerfile install with \`pip install -c constraints.txt ...\`, so CI and the"
  echo "# image get these versions whatever was released since. Regenerate with"
  echo "# scripts/freeze_constraints.sh after changing pyproject.toml's dependencies."
  "$venv/bin/pip" freeze --exclude-editable | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
