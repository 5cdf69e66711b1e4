# shellcheck shell=bash
# Helpers shared by scripts/demo.sh, scripts/test.sh and scripts/pythons.sh. Source it, do not run it.
#
# Settings (environment variables):
#   CONVEYOR_PYTHON   interpreter that creates .venv            (default: python3)
#   CONVEYOR_VENV     where the virtualenv lives                 (default: <repo>/.venv)
#   CONVEYOR_EXTRAS   extras installed into it                   (default: all,dev,docs,examples)

# The repository root: the parent of this scripts/ folder.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CONVEYOR_VENV:-$ROOT/.venv}"
VENV_PY="$VENV/bin/python"
EXTRAS="${CONVEYOR_EXTRAS:-all,dev,docs,examples}"

# Print a visible step header.
step() {
    printf '\n==> %s\n' "$*"
}

# Print an error and exit.
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# True when the venv's interpreter runs and has pip.
_venv_healthy() {
    [[ -x "$VENV_PY" ]] &&
        "$VENV_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 &&
        "$VENV_PY" -m pip --version >/dev/null 2>&1
}

# What the installed environment depends on: pyproject.toml, the C accelerator's
# source (the editable install compiles it), the extras and the interpreter. The
# install is redone whenever this changes.
_install_key() {
    {
        cat "$ROOT/pyproject.toml" "$ROOT/src/conveyor/_speedups.c"
        printf 'no-extensions=%s\n' "${CONVEYOR_NO_EXTENSIONS:-}"
        printf 'extras=%s\n' "$EXTRAS"
        "$VENV_PY" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
}

# True when conveyor's optional C accelerator imports in the venv.
_accelerator_built() {
    (cd / && "$VENV_PY" -c 'import conveyor._speedups') >/dev/null 2>&1
}

_ensure_venv_locked() {
    local python="${CONVEYOR_PYTHON:-python3}"

    if [[ -e "$VENV" ]] && ! _venv_healthy; then
        echo "The virtualenv at $VENV is broken or incomplete: recreating it."
        rm -rf -- "$VENV"
    fi
    if [[ ! -e "$VENV" ]]; then
        command -v "$python" >/dev/null 2>&1 ||
            die "$python not found: install Python 3.11 or newer (or set CONVEYOR_PYTHON)."
        "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
            die "$python is older than 3.11; conveyor needs Python 3.11 or newer."
        step "Creating the virtualenv at $VENV with $("$python" --version 2>&1)"
        "$python" -m venv "$VENV" || die "could not create the virtualenv at $VENV"
    fi

    local stamp="$VENV/.conveyor-install-stamp" key
    key="$(_install_key)"
    # The stamp also says whether the C accelerator was built: if it was and is
    # gone now (a `git clean` removes the compiled module), install again.
    if [[ -f "$stamp" && "$(head -n1 "$stamp")" == "$key" ]] &&
        "$VENV_PY" -c 'import importlib.metadata as m; m.version("conveyor")' >/dev/null 2>&1 &&
        { [[ "$(sed -n 2p "$stamp")" != "accelerator=yes" ]] || _accelerator_built; }; then
        echo "==> The virtualenv is up to date ($VENV)."
        return 0
    fi
    step "Installing conveyor with extras [$EXTRAS] into $VENV (editable)"
    rm -f -- "$stamp"
    # pip's output goes to a log, shown only when the install fails.
    local log="$VENV/pip-install.log"
    if ! PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$VENV_PY" -m pip install -e "${ROOT}[${EXTRAS}]" >"$log" 2>&1; then
        grep -v "^WARNING: Location .* is ignored" "$log" | tail -n 40 >&2
        die "pip install -e '.[$EXTRAS]' failed: see the output above (full log: $log)"
    fi
    local built=no
    _accelerator_built && built=yes
    printf '%s\naccelerator=%s\n' "$key" "$built" >"$stamp"
}

# Create (or repair) the virtualenv and install the project into it, unless a
# stamp shows that the same pyproject.toml is already installed. Puts the venv
# first on PATH, as `activate` would.
ensure_venv() {
    # Serialise concurrent runs (several terminals, several checkouts of one venv).
    local lock
    lock="${TMPDIR:-/tmp}/conveyor-venv-$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
    if command -v flock >/dev/null 2>&1; then
        (
            flock -w 900 9 || die "timed out waiting for the lock $lock"
            _ensure_venv_locked
        ) 9>"$lock" || exit 1
    else
        _ensure_venv_locked
    fi
    export VIRTUAL_ENV="$VENV"
    export PATH="$VENV/bin:$PATH"
    unset PYTHONHOME
}
