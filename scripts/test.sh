#!/usr/bin/env bash
# Set-up (as scripts/setup.sh), then ruff (lint, format) and the tests on two workers. Arguments go to pytest:
#   scripts/test.sh                      the whole suite, as CI runs it
#   scripts/test.sh -m "not slow"        the quick tier, for the edit-test loop
#   scripts/test.sh --cov                with quantcli's line coverage, the quantcli processes the tests
#                                        start included ([tool.coverage] in pyproject.toml)
#   scripts/test.sh tests/test_recipe.py one file (any pytest selection)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .            # lint ([tool.ruff] in pyproject.toml)
ruff format --check .   # the one code format
# the test processes write the bytecode of what set-up did not compile (scripts/setup.sh), once
unset PYTHONDONTWRITEBYTECODE
# whole files to each worker, in tests/conftest.py's order (slow files first; CONTRIBUTING.md, test tiers)
python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@"
