#!/usr/bin/env bash
# The supported Pythons that this machine lacks, provisioned by the project:
# CPython 3.14 and 3.15 come from Debian testing ("forky"), where they are
# binary packages, in a chroot that debootstrap builds once and that is cached
# outside the checkout. The checkout is bind-mounted into it, each interpreter
# gets a virtualenv there with conveyor installed (editable, so the C
# accelerator is compiled for it), and commands run in that virtualenv.
#
#   scripts/pythons.sh status                          what this machine can run, and how
#   scripts/pythons.sh ensure                          build the chroot (or check the cached one)
#   scripts/pythons.sh quick [VERSION...] [-- ARGS]    the quick tests (pytest -m quick ARGS) on
#                                                      each VERSION (default: all of the chroot's)
#   scripts/pythons.sh shell VERSION [-- COMMAND...]   COMMAND (default: an interactive bash) in
#                                                      the chroot, in VERSION's virtualenv, at the
#                                                      checkout, e.g.
#       scripts/pythons.sh shell 3.14 -- python -m pytest -q tests/contract
#
# Building the chroot needs root, unshare and chroot (util-linux, coreutils) and
# debootstrap (installed with apt-get when missing). Where that is impossible,
# `quick` says why and skips (exit code 0): the other commands fail.
#
# Its own messages go to stderr: the standard output of `shell` is COMMAND's.
#
# Each run mounts /proc, /dev, /dev/pts, /dev/shm, the checkout (at /checkout),
# the host's resolv.conf and CA bundle in a mount namespace of its own
# (unshare): concurrent runs from several checkouts do not see one another's
# mounts, and nothing stays mounted after a run, even a killed one.
#
# Settings (environment variables):
#   CONVEYOR_CHROOT          where the chroot lives
#                            (default: ${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/forky)
#   CONVEYOR_DEBIAN_MIRROR   the Debian mirror debootstrap uses (default: the first Debian
#                            mirror of this machine's apt sources, else deb.debian.org)
#   CONVEYOR_CHROOT_EXTRAS   the extras installed in the chroot's virtualenvs (default: all,test)
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SELF="$ROOT/scripts/pythons.sh"
CHROOT="${CONVEYOR_CHROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/conveyor/forky}"
# Beside the chroot: its lock, the virtualenvs' locks, the build's log.
CHROOT_LOCK="$CHROOT.lock"
BUILD_LOG="$CHROOT-build.log"
CHROOT_EXTRAS="${CONVEYOR_CHROOT_EXTRAS:-all,test}"
# The interpreters the chroot provides, and the Debian packages that make it.
CHROOT_PYTHONS=(3.14 3.15)
SUITE=forky
DEBOOTSTRAP_PACKAGES="python3.14,python3.14-venv,python3.14-dev,python3.15,python3.15-venv,python3.15-dev,gcc,libc6-dev"
# Installed with apt-get inside the chroot once debootstrap is done: the Redis
# tests need redis-server, the TLS ones make certificates with openssl, and
# tests/test_channel_cpython.py runs CPython's own test_queue against Channel.
CHROOT_APT_PACKAGES=(redis-server openssl libpython3.14-testsuite libpython3.15-testsuite)
# Written last into a chroot that is complete, with what it was made of: a
# chroot without it, or made of something else, is checked (and completed, or
# rebuilt) before use.
MARKER=.conveyor-chroot-complete
RECIPE="$SUITE $DEBOOTSTRAP_PACKAGES ${CHROOT_APT_PACKAGES[*]}"
# Where the checkout and the virtualenvs are inside the chroot.
CHECKOUT=/checkout
VENVS=/opt/conveyor

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//'
}

# --- can this machine provision them? --------------------------------------------

# Prints why the chroot cannot be used here (and returns 1), or nothing.
why_unavailable() {
    if [[ "$(uname -s)" != Linux ]]; then
        echo "the Debian chroot needs Linux"
    elif [[ "$(id -u)" != 0 ]]; then
        echo "building and entering the Debian chroot needs root (this user is $(id -un))"
    elif ! command -v unshare >/dev/null 2>&1 || ! command -v chroot >/dev/null 2>&1; then
        echo "unshare and chroot are needed (util-linux, coreutils)"
    elif ! marked_complete "$CHROOT" && ! command -v debootstrap >/dev/null 2>&1 &&
        ! command -v apt-get >/dev/null 2>&1; then
        echo "debootstrap is not installed, and apt-get is not there to install it"
    else
        return 0
    fi
    return 1
}

# True when VERSION is one of the chroot's interpreters.
provided() {
    local v
    for v in "${CHROOT_PYTHONS[@]}"; do
        [[ "$v" == "$1" ]] && return 0
    done
    return 1
}

# --- building the chroot ---------------------------------------------------------

# The first Debian mirror of this machine's apt sources (deb822 or one-line).
debian_mirror() {
    if [[ -n "${CONVEYOR_DEBIAN_MIRROR:-}" ]]; then
        echo "$CONVEYOR_DEBIAN_MIRROR"
        return 0
    fi
    local url
    url="$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        2>/dev/null |
        grep -oE '^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)https?://[^[:space:]]+/debian/?([[:space:]]|$)' |
        grep -oE 'https?://[^[:space:]]+' | head -n1)" || true
    echo "${url:-http://deb.debian.org/debian}"
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null 2>&1 && return 0
    echo "Installing debootstrap (apt-get install debootstrap)..." >&2
    local log
    log="$(mktemp "${TMPDIR:-/tmp}/conveyor-apt.XXXXXX")"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap ||
        { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; }; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        rm -f "$log"
        die "apt-get could not install debootstrap: see the output above."
    fi
    rm -f "$log"
}

# Everything mounted below DIR, deepest first (in this mount namespace).
mounts_under() {
    awk -v dir="$1" '$2 == dir || index($2, dir "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}

# Remove a chroot directory, refusing if anything is still mounted in it (a
# recursive delete would go through the mount into /dev or a checkout).
remove_tree() {
    local dir="$1"
    [[ -e "$dir" ]] || return 0
    if [[ -n "$(mounts_under "$dir")" ]]; then
        die "cannot remove $dir: something is mounted in it (see: grep '$dir' /proc/mounts);" \
            "unmount it first."
    fi
    rm -rf --one-file-system -- "$dir"
}

# True when the chroot at DIR has what debootstrap installs: every interpreter
# (with venv and headers), gcc and apt-get.
chroot_has_base() {
    local dir="$1" v
    for v in "${CHROOT_PYTHONS[@]}"; do
        [[ -x "$dir/usr/bin/python$v" && -f "$dir/usr/include/python$v/Python.h" ]] || return 1
        chroot "$dir" "/usr/bin/python$v" -c 'import ensurepip, venv' >/dev/null 2>&1 || return 1
    done
    [[ -x "$dir/usr/bin/gcc" && -x "$dir/usr/bin/apt-get" ]]
}

# True when the chroot at DIR has the packages of CHROOT_APT_PACKAGES too.
chroot_has_everything() {
    local dir="$1" p
    chroot_has_base "$dir" || return 1
    for p in "${CHROOT_APT_PACKAGES[@]}"; do
        # shellcheck disable=SC2016  # ${Status} is dpkg-query's, not the shell's
        chroot "$dir" dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
            return 1
    done
}

# Mark the chroot at DIR complete (the marker's first line is the recipe).
mark_complete() {
    printf '%s\n%s\n' "$RECIPE" "$(date -u +%FT%TZ)" >"$1/$MARKER"
}

# True when the chroot at DIR is marked complete for the current recipe.
marked_complete() {
    [[ -f "$1/$MARKER" && "$(head -n1 "$1/$MARKER")" == "$RECIPE" ]]
}

# Install CHROOT_APT_PACKAGES into the chroot at DIR (in a mount namespace of
# this run: the mounts go away with it).
install_apt_packages() {
    local dir="$1" log="$2"
    echo "Installing ${CHROOT_APT_PACKAGES[*]} in the chroot (apt-get)..." >&2
    unshare --mount --propagation private -- bash "$SELF" _apt "$dir" "${CHROOT_APT_PACKAGES[@]}" \
        >>"$log" 2>&1 || {
        tail -n 30 "$log" >&2
        die "apt-get could not install ${CHROOT_APT_PACKAGES[*]} in $dir (log: $log)"
    }
}

# Build a new chroot at CHROOT: debootstrap into a temporary folder beside it,
# add the packages, write the marker, then move it in place.
build_chroot() {
    ensure_debootstrap
    local mirror building log
    mirror="$(debian_mirror)"
    building="$CHROOT.building"
    log="$BUILD_LOG"
    remove_tree "$building"
    step "Building the Debian $SUITE chroot with Python ${CHROOT_PYTHONS[*]} at $CHROOT" \
        "(debootstrap from $mirror; about 90 s and 1 GB; log: $log)" >&2
    local started=$SECONDS
    # In a mount namespace of its own: what debootstrap mounts in the new
    # system goes away with it, even if it is interrupted.
    if ! unshare --mount --propagation private -- debootstrap --variant=minbase --include="$DEBOOTSTRAP_PACKAGES" \
        "$SUITE" "$building" "$mirror" /usr/share/debootstrap/scripts/sid >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        die "debootstrap failed (log: $log). CONVEYOR_DEBIAN_MIRROR sets the mirror."
    fi
    install_apt_packages "$building" "$log"
    chroot_has_everything "$building" ||
        die "the new chroot at $building lacks an interpreter, gcc or a package (log: $log)"
    mark_complete "$building"
    mv -T -- "$building" "$CHROOT"
    echo "==> Chroot built in $((SECONDS - started)) s: $CHROOT" >&2
}

# `lock FD MODE WHAT`: flock FD (-x or -s), saying what it waits for when
# another run holds it.
lock() {
    flock -n "$2" "$1" && return 0
    echo "Waiting for another run to release $3..." >&2
    flock -w 1800 "$2" "$1" || die "timed out after 30 minutes waiting for $3"
}

# Make sure a complete chroot is at CHROOT. Holds the chroot's lock (fd 7):
# shared while the caller's run uses it, exclusive while building or checking
# it, so that no run ever sees a chroot being built or removed.
ensure_chroot() {
    mkdir -p "$(dirname "$CHROOT")"
    exec 7>"$CHROOT_LOCK"
    lock 7 -s "the chroot ($CHROOT_LOCK)"
    if marked_complete "$CHROOT"; then
        echo "==> Cached chroot: $CHROOT (complete since $(sed -n 2p "$CHROOT/$MARKER"))" >&2
        return 0
    fi
    lock 7 -x "the chroot ($CHROOT_LOCK)"
    if marked_complete "$CHROOT"; then
        echo "==> Chroot: $CHROOT (built by another run meanwhile)" >&2
    elif [[ -d "$CHROOT" ]]; then
        # Built by hand, or by an older version of this script: complete it if
        # debootstrap's part is there (adding the apt packages), else build it anew.
        step "Checking the chroot at $CHROOT (not marked complete for this recipe)" >&2
        if chroot_has_base "$CHROOT" && ! chroot_has_everything "$CHROOT"; then
            install_apt_packages "$CHROOT" "$BUILD_LOG"
        fi
        if chroot_has_everything "$CHROOT"; then
            mark_complete "$CHROOT"
            echo "==> The chroot is complete: marked it ($CHROOT/$MARKER)." >&2
        else
            echo "The chroot at $CHROOT is incomplete: building it anew." >&2
            remove_tree "$CHROOT"
            build_chroot
        fi
    else
        build_chroot
    fi
    lock 7 -s "the chroot ($CHROOT_LOCK)"
}

# --- running in the chroot (these run in a mount namespace of their own) ---------

# Mount what a run needs into the chroot at DIR; the EXIT trap unmounts it all.
mount_chroot() {
    local dir="$1" checkout="${2:-}"
    trap 'unmount_chroot "'"$dir"'"' EXIT
    mount -t proc proc "$dir/proc"
    mount --bind /dev "$dir/dev"
    mount --bind /dev/pts "$dir/dev/pts"
    mount --bind /dev/shm "$dir/dev/shm"
    # Name resolution and the CA bundle (which may hold a proxy's CA) of the host.
    [[ -e "$dir/etc/resolv.conf" ]] || : >"$dir/etc/resolv.conf"
    mount --bind /etc/resolv.conf "$dir/etc/resolv.conf"
    if [[ -f /etc/ssl/certs/ca-certificates.crt && -f "$dir/etc/ssl/certs/ca-certificates.crt" ]]; then
        mount --bind /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
    fi
    if [[ -n "$checkout" ]]; then
        mkdir -p "$dir$CHECKOUT"
        mount --bind "$checkout" "$dir$CHECKOUT"
    fi
}

unmount_chroot() {
    local dir="$1" m
    while read -r m; do
        [[ -n "$m" ]] && { umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; }
    done < <(mounts_under "$dir")
}

# The environment of commands in the chroot: a clean one, plus what configures
# pip, proxies, CI and the tests.
chroot_env() {
    local venv="$1" name
    printf '%s\n' "HOME=/root" "LANG=C.UTF-8" "TERM=${TERM:-dumb}" \
        "PATH=$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    [[ -n "$venv" ]] && printf '%s\n' "VIRTUAL_ENV=$venv"
    while read -r name; do
        case "$name" in
            CI | COLUMNS | NO_COLOR | FORCE_COLOR | PYTEST_ADDOPTS | PIP_* | CONVEYOR_* | HYPOTHESIS_* | \
                SSL_CERT_FILE | REQUESTS_CA_BUNDLE | [Hh][Tt][Tt][Pp]_[Pp][Rr][Oo][Xx][Yy] | \
                [Hh][Tt][Tt][Pp][Ss]_[Pp][Rr][Oo][Xx][Yy] | [Nn][Oo]_[Pp][Rr][Oo][Xx][Yy])
                printf '%s=%s\n' "$name" "${!name}"
                ;;
        esac
    done < <(compgen -e)
}

# Run COMMAND... in the chroot at DIR with the environment of VENV, in WORKDIR.
in_chroot() {
    local dir="$1" venv="$2" workdir="$3"
    shift 3
    local -a env_args=()
    mapfile -t env_args < <(chroot_env "$venv")
    # shellcheck disable=SC2016  # expanded by the chroot's sh
    chroot "$dir" /usr/bin/env -i "${env_args[@]}" /bin/sh -c 'cd "$1" && shift && exec "$@"' \
        sh "$workdir" "$@"
}

# The virtualenv of VERSION, with conveyor[CHROOT_EXTRAS] installed from the
# checkout (editable: the accelerator is compiled for VERSION into the
# checkout's src/conveyor). Reinstalled when pyproject.toml, the accelerator's
# source, the extras or the interpreter change, or when the compiled module is
# missing from this checkout. The version's lock (fd 8) is held shared while
# the caller's run uses it, exclusive while installing.
ensure_chroot_venv() {
    local dir="$1" version="$2" venv="$VENVS/venv-$2" key
    local what="the virtualenv of Python $version ($CHROOT.venv-$version.lock)"
    key="$({
        cat "$ROOT/pyproject.toml" "$ROOT/src/conveyor/_speedups.c"
        printf 'extras=%s\n' "$CHROOT_EXTRAS"
        in_chroot "$dir" "" / "python$version" -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1)"
    exec 8>"$CHROOT.venv-$version.lock"
    lock 8 -s "$what"
    if venv_up_to_date "$dir" "$venv" "$key"; then
        echo "==> Python $version: the virtualenv is up to date ($dir$venv)" >&2
        return 0
    fi
    lock 8 -x "$what"
    if ! venv_up_to_date "$dir" "$venv" "$key"; then
        install_venv "$dir" "$version" "$venv" "$key"
    fi
    lock 8 -s "$what"
}

# True when the virtualenv VENV was installed for KEY and imports the accelerator
# from this checkout.
venv_up_to_date() {
    local dir="$1" venv="$2" key="$3" stamp="$1$2/.conveyor-install-stamp"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] &&
        in_chroot "$dir" "$venv" / python -c 'import conveyor._speedups' >/dev/null 2>&1
}

install_venv() {
    local dir="$1" version="$2" venv="$3" key="$4"
    local started=$SECONDS log="$dir$venv.log" stamp="$dir$venv/.conveyor-install-stamp"
    if [[ ! -x "$dir$venv/bin/python" ]] || ! in_chroot "$dir" "$venv" / python -m pip --version \
        >/dev/null 2>&1; then
        rm -rf --one-file-system -- "${dir:?}$venv"
        in_chroot "$dir" "" / "python$version" -m venv "$venv" ||
            die "python$version -m venv $venv failed in the chroot"
    fi
    echo "==> Python $version: installing conveyor[$CHROOT_EXTRAS] into $dir$venv (editable; log: $log)" >&2
    rm -f -- "$stamp"
    if ! in_chroot "$dir" "$venv" "$CHECKOUT" python -m pip install --disable-pip-version-check \
        -e "${CHECKOUT}[$CHROOT_EXTRAS]" >"$log" 2>&1; then
        grep -v "^WARNING: Location .* is ignored" "$log" | tail -n 30 >&2
        die "pip install -e '.[$CHROOT_EXTRAS]' failed on Python $version (log: $log)"
    fi
    in_chroot "$dir" "$venv" / python -c 'import conveyor._speedups' ||
        die "the C accelerator was not built for Python $version (log: $log)"
    printf '%s\n' "$key" >"$stamp"
    echo "==> Python $version: installed in $((SECONDS - started)) s" >&2
}

# `_enter VERSION COMMAND...`: in a mount namespace of its own.
enter() {
    local version="$1"
    shift
    mount_chroot "$CHROOT" "$ROOT"
    ensure_chroot_venv "$CHROOT" "$version"
    local rc=0
    in_chroot "$CHROOT" "$VENVS/venv-$version" "$CHECKOUT" "$@" || rc=$?
    return "$rc"
}

# `_apt DIR PACKAGE...`: apt-get install in the chroot at DIR, in a mount
# namespace of its own. A policy-rc.d keeps the packages' services from starting.
apt_in_chroot() {
    local dir="$1"
    shift
    mount_chroot "$dir"
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
    chmod 755 "$dir/usr/sbin/policy-rc.d"
    local rc=0
    {
        in_chroot "$dir" "" / env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -q --no-install-recommends "$@" ||
            {
                in_chroot "$dir" "" / apt-get update -q &&
                    in_chroot "$dir" "" / env DEBIAN_FRONTEND=noninteractive \
                        apt-get install -y -q --no-install-recommends "$@"
            }
    } || rc=$?
    rm -f "$dir/usr/sbin/policy-rc.d"
    return "$rc"
}

# Run COMMAND... with VERSION in the chroot (building what is missing).
run_in_chroot() {
    local version="$1"
    shift
    ensure_chroot
    unshare --mount --propagation private -- bash "$SELF" _enter "$version" "$@"
}

# --- commands ------------------------------------------------------------------

cmd_status() {
    local reason v
    if reason="$(why_unavailable)"; then
        if marked_complete "$CHROOT"; then
            echo "chroot: $CHROOT (complete since $(sed -n 2p "$CHROOT/$MARKER"))"
        elif [[ -d "$CHROOT" ]]; then
            echo "chroot: $CHROOT (not marked complete: the next run checks it)"
        else
            echo "chroot: not built yet (the next run builds it at $CHROOT)"
        fi
        for v in "${CHROOT_PYTHONS[@]}"; do
            if [[ -f "$CHROOT$VENVS/venv-$v/.conveyor-install-stamp" ]]; then
                echo "Python $v: in the chroot, virtualenv $CHROOT$VENVS/venv-$v"
            else
                echo "Python $v: in the chroot (no virtualenv yet)"
            fi
        done
    else
        echo "chroot: unavailable here: $reason"
    fi
}

cmd_quick() {
    local -a versions=() args=()
    while (($#)); do
        if [[ "$1" == -- ]]; then
            shift
            args=("$@")
            break
        fi
        versions+=("$1")
        shift
    done
    ((${#versions[@]})) || versions=("${CHROOT_PYTHONS[@]}")
    local v reason
    local -a wanted=()
    for v in "${versions[@]}"; do
        if provided "$v"; then
            wanted+=("$v")
        else
            echo "==> Python $v: not on this machine and not provided by the chroot" \
                "(${CHROOT_PYTHONS[*]}): skipped."
        fi
    done
    ((${#wanted[@]})) || return 0
    if ! reason="$(why_unavailable)"; then
        echo "==> Python ${wanted[*]}: skipped: $reason."
        return 0
    fi
    local started
    for v in "${wanted[@]}"; do
        step "Python $v (Debian $SUITE chroot): pytest -m quick ${args[*]}"
        started=$SECONDS
        run_in_chroot "$v" python -m pytest -m quick "${args[@]}" ||
            die "the quick tests failed on Python $v"
        echo "==> Python $v: quick tests passed in $((SECONDS - started)) s"
    done
}

cmd_shell() {
    (($#)) || die "usage: scripts/pythons.sh shell VERSION [-- COMMAND...]"
    local version="$1" reason
    shift
    provided "$version" || die "Python $version is not one of the chroot's (${CHROOT_PYTHONS[*]})"
    [[ "${1:-}" == -- ]] && shift
    (($#)) || set -- bash -i
    reason="$(why_unavailable)" || die "$reason"
    run_in_chroot "$version" "$@"
}

main() {
    local command="${1:-}"
    shift || true
    case "$command" in
        status) cmd_status ;;
        ensure)
            local reason
            reason="$(why_unavailable)" || die "$reason"
            ensure_chroot
            ;;
        quick) cmd_quick "$@" ;;
        shell) cmd_shell "$@" ;;
        _enter) enter "$@" ;;
        _apt) apt_in_chroot "$@" ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
