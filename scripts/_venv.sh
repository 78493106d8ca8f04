# Shared by scripts/serve and scripts/test: create .venv when missing and install the project
# with the given extras, skipping pip when pyproject.toml has not changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
  echo "installing foundry-local-py $spec into .venv (llama-cpp-python compiles on first install: ~6-8 min" \
       "on 2 cores; pip caches the wheel, later installs take seconds)" >&2
  # pip's own output, reduced to one line per step, and a heartbeat with the elapsed time while a
  # step is silent (compiling llama.cpp prints nothing for minutes). Full log: .venv/install.log.
  log=.venv/install.log
  .venv/bin/python -m pip install --progress-bar off --editable "$spec" >"$log" 2>&1 &
  pip_pid=$!
  started=$SECONDS
  shown=0
  last_beat=$SECONDS
  while kill -0 "$pip_pid" 2>/dev/null; do
    sleep 2
    total=$(wc -l <"$log")
    if [ "$total" -gt "$shown" ]; then
      sed -n "$((shown + 1)),${total}p" "$log" \
        | grep -E '^(Collecting|Building wheel|  Building wheel|Installing collected|Successfully)' \
        | sed -E 's/^ +//; s/^/  pip: /' | cut -c1-110 >&2 || true
      shown=$total
    fi
    if [ $((SECONDS - last_beat)) -ge 20 ]; then
      step=$(grep -E '^(Collecting|  Building wheel|Building wheel|Installing)' "$log" | tail -1 | sed -E 's/^ +//' | cut -c1-70)
      printf '  ... %dm%02ds elapsed: %s\n' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)) \
        "${step:-starting}" >&2
      last_beat=$SECONDS
    fi
  done
  if ! wait "$pip_pid"; then
    echo "pip install failed; the last lines of $log:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  printf 'installed in %dm%02ds\n' $(((SECONDS - started) / 60)) $(((SECONDS - started) % 60)) >&2
  touch "$stamp"
fi
