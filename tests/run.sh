#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine and runs it:
#   system packages (PostgreSQL, Slurm + munge, graphviz, tmux, systemd-analyze, Chromium
#   and chromedriver, nginx) when root
#   and missing,
#   a virtualenv with calloop and its test extras, ruff, mypy, then pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k store -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || missing+=(postgresql)
command -v slurmctld > /dev/null || missing+=(slurm-wlm)
command -v munged > /dev/null || [ -x /usr/sbin/munged ] || missing+=(munge)
command -v dot > /dev/null || missing+=(graphviz)
command -v tmux > /dev/null || missing+=(tmux)
command -v systemd-analyze > /dev/null || missing+=(systemd)
command -v chromium > /dev/null || missing+=(chromium)          # the control room's
command -v chromedriver > /dev/null || missing+=(chromium-driver)  # browser tests
command -v nginx > /dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)  # conddb cache
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -qq
    timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
  else
    echo "== not root: cannot install ${missing[*]}; tests needing them skip (fail under CI=true)"
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "== installing calloop[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
  | grep -v "^WARNING: Location" || true

echo "== ruff check"; .venv/bin/ruff check .
echo "== ruff format --check"; .venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
