#!/usr/bin/env bash
# Every check conveyor must pass, in order, stopping at the first failure:
#   1. the virtualenv .venv with conveyor[all,dev,docs,examples] installed (scripts/lib.sh);
#   2. redis-server on PATH (Debian's package is installed when missing);
#   3. ruff check, ruff format --check, mypy --strict src, lint-imports (layers),
#      mkdocs build --strict (the docs site: a broken link or docstring fails it);
#   4. the C accelerator was built (unless CONVEYOR_NO_EXTENSIONS=1);
#   5. pytest (the full suite, as configured in pyproject.toml), then the
#      channel tests again on the pure-Python fallback (CONVEYOR_PURE_PYTHON=1);
#   6. the quick tests (pytest -m quick; every test of the interpreter runtime,
#      which exists from 3.14, is one) on every other supported Python
#      (pyproject.toml's classifiers: 3.11 to 3.15): nox runs them on those this
#      machine has (pyenv's included), scripts/pythons.sh on 3.14 and 3.15 when
#      this machine lacks them, in a Debian chroot that it builds once and keeps
#      (root only); an interpreter that neither can provide is skipped with a
#      message.
#
#   scripts/test.sh [PYTEST ARGS...]      e.g. scripts/test.sh -k channel -x
#
# Settings (environment variables):
#   CONVEYOR_SKIP_NOX=1        skip step 6 (every other Python)
#   CONVEYOR_SKIP_CHROOT=1     skip the Pythons of the chroot only
#   CONVEYOR_NO_EXTENSIONS=1   install without the C accelerator (step 4 then checks nothing)
#   and those of scripts/lib.sh (CONVEYOR_PYTHON, CONVEYOR_VENV, CONVEYOR_EXTRAS) and
#   scripts/pythons.sh (CONVEYOR_CHROOT, CONVEYOR_DEBIAN_MIRROR, CONVEYOR_CHROOT_EXTRAS).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

# --- redis-server -------------------------------------------------------------

# Stop (and keep from restarting) a Redis service that a package started:
# the tests start their own servers on free ports.
_stop_redis_service() {
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        "$@" systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
    if command -v service >/dev/null 2>&1; then
        "$@" service redis-server stop >/dev/null 2>&1 || true
    fi
}

ensure_redis_server() {
    local found
    # The TLS tests make their certificates with the openssl command.
    if found="$(command -v redis-server)" && command -v openssl >/dev/null 2>&1; then
        echo "==> redis-server: $found ($(redis-server --version | cut -d' ' -f3 | sed s/^v=//))"
        return 0
    fi
    step "redis-server or openssl is not on PATH"
    local -a sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
            sudo=(sudo -n)
        else
            die "redis-server is not installed, and this user is not root and has no" \
                "password-less sudo to install it. Install it with:" \
                "sudo apt-get install redis-server"
        fi
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "redis-server is not installed and apt-get is not available: install" \
            "redis-server (Redis 6.2 or newer) with this system's package manager."

    echo "Installing Debian's redis-server package (apt-get update && apt-get install redis-server)..."

    # A policy-rc.d that answers 101 keeps the package's scripts from starting
    # the service (Docker images ship one already; add ours only when absent).
    local policy=/usr/sbin/policy-rc.d added_policy=0 rc=0
    if [[ ! -e "$policy" ]]; then
        if printf '#!/bin/sh\n# added by conveyor scripts/test.sh\nexit 101\n' |
            "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy"; then
            added_policy=1
        fi
    fi
    local apt_log
    apt_log="$(mktemp "${TMPDIR:-/tmp}/conveyor-apt.XXXXXX")"
    {
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -q --no-install-recommends redis-server openssl
    } >"$apt_log" 2>&1 || rc=$?
    if ((added_policy)); then
        "${sudo[@]}" rm -f "$policy"
    fi
    # In case the package started the service anyway.
    _stop_redis_service "${sudo[@]}"
    if ((rc != 0)); then
        tail -n 40 "$apt_log" >&2
        rm -f "$apt_log"
        die "apt-get could not install redis-server (exit code $rc): see the output above."
    fi
    rm -f "$apt_log"
    found="$(command -v redis-server)" ||
        die "redis-server was installed but is not on PATH ($PATH)."
    echo "==> redis-server installed: $found ($(redis-server --version | cut -d' ' -f3 | sed s/^v=//))"
}

# --- quality gates --------------------------------------------------------------

run_gates() {
    # Lint only the folders that exist (bench/ and examples/ may still be empty,
    # and git does not keep empty folders).
    local -a paths=()
    local p
    for p in src tests bench examples noxfile.py hatch_build.py; do
        [[ -e "$p" ]] && paths+=("$p")
    done

    step "ruff check ${paths[*]}"
    ruff check "${paths[@]}" || die "ruff check failed (try: ruff check --fix ${paths[*]})"

    step "ruff format --check ${paths[*]}"
    ruff format --check "${paths[@]}" || die "ruff format --check failed (try: ruff format ${paths[*]})"

    step "mypy --strict src"
    mypy --strict src || die "mypy --strict src failed"

    step "lint-imports"
    lint-imports --no-cache ||
        die "lint-imports failed: an import crosses conveyor's layers (see the contract above;" \
            "lazy and TYPE_CHECKING imports count)"

    step "mkdocs build --strict (the docs site)"
    local site
    site="$(mktemp -d "${TMPDIR:-/tmp}/conveyor-site.XXXXXX")"
    # NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2 is not about this site.
    # Not --quiet: it hides the warnings from --strict too, and the build then passes.
    NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$site" ||
        { rm -rf -- "$site"; die "mkdocs build --strict failed: see the warnings above"; }
    rm -rf -- "$site"
}

check_accelerator() {
    if [[ -n "${CONVEYOR_NO_EXTENSIONS:-}" && "${CONVEYOR_NO_EXTENSIONS}" != 0 ]]; then
        step "C accelerator: not built (CONVEYOR_NO_EXTENSIONS=$CONVEYOR_NO_EXTENSIONS)"
        return 0
    fi
    step "C accelerator: conveyor._speedups"
    python -c 'import conveyor._speedups as s; print("built:", s.__file__)' ||
        die "conveyor's C accelerator was not built (a C compiler and Python's headers are" \
            "needed; the install log is $VENV/pip-install.log). CONVEYOR_NO_EXTENSIONS=1" \
            "tests without it."
}

run_pytest() {
    step "pytest $*"
    local rc=0 started=$SECONDS
    pytest "$@" || rc=$?
    case "$rc" in
        0) echo "==> pytest passed in $((SECONDS - started)) s" ;;
        5) die "pytest collected no tests (exit code 5): treated as a failure." ;;
        *) die "pytest failed (exit code $rc)" ;;
    esac
}

# --- other interpreters ---------------------------------------------------------

run_other_pythons() {
    if [[ -n "${CONVEYOR_SKIP_NOX:-}" && "${CONVEYOR_SKIP_NOX}" != 0 ]]; then
        step "Other Pythons: skipped (CONVEYOR_SKIP_NOX=$CONVEYOR_SKIP_NOX)"
        return 0
    fi
    # The supported versions come from pyproject.toml's classifiers; the venv's
    # own version has just run the full suite.
    local others
    others="$("$VENV_PY" - <<'PY'
import sys

import nox.project

current = f"{sys.version_info[0]}.{sys.version_info[1]}"
versions = nox.project.python_versions(nox.project.load_toml("pyproject.toml"))
print(" ".join(v for v in versions if v != current))
PY
)" || die "could not read the supported Python versions from pyproject.toml"
    if [[ -z "$others" ]]; then
        step "No other supported Python versions to test"
        return 0
    fi
    # Those this machine has go to nox, the others to the chroot.
    local here v
    local -a lacking=()
    # shellcheck disable=SC2086  # $others is a list of versions
    here="$("$VENV_PY" "$ROOT/noxfile.py" $others)" ||
        die "could not tell which Python versions this machine has (python noxfile.py)"
    for v in $others; do
        [[ " $here " == *" $v "* ]] || lacking+=("$v")
    done
    if [[ -n "$here" ]]; then
        local started=$SECONDS
        step "nox: quick tests on the other supported Pythons this machine has: $here"
        # Never downloaded (NOX_DOWNLOAD_PYTHON: nox >= 2025.10.14).
        # shellcheck disable=SC2086  # $here is a list of versions
        NOX_DOWNLOAD_PYTHON=never nox --noxfile "$ROOT/noxfile.py" --sessions quick --python $here \
            --reuse-venv yes --no-error-on-missing-interpreters ||
            die "nox: the quick tests failed on another Python version"
        echo "==> nox: $here passed in $((SECONDS - started)) s"
    fi
    ((${#lacking[@]})) || return 0
    if [[ -n "${CONVEYOR_SKIP_CHROOT:-}" && "${CONVEYOR_SKIP_CHROOT}" != 0 ]]; then
        step "Python ${lacking[*]}: skipped (CONVEYOR_SKIP_CHROOT=$CONVEYOR_SKIP_CHROOT)"
        return 0
    fi
    # It skips (exit code 0) where the chroot cannot be built, saying why.
    bash "$ROOT/scripts/pythons.sh" quick "${lacking[@]}" ||
        die "the quick tests failed on Python ${lacking[*]} (scripts/pythons.sh)"
}

main() {
    ensure_venv
    ensure_redis_server
    run_gates
    check_accelerator
    run_pytest "$@"
    step "The channel tests again, on the pure-Python fallback (CONVEYOR_PURE_PYTHON=1)"
    CONVEYOR_PURE_PYTHON=1 run_pytest -q tests/test_channel*.py tests/test_speedups.py
    run_other_pythons
    step "All checks passed in $SECONDS s."
}

# Run unless sourced (sourcing gives the functions alone, for debugging).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
fi
