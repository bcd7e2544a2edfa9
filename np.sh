#!/usr/bin/env bash
# np.sh: one entry point for working on nodeproxy on a Debian 12 machine.
#
#   ./np.sh install        install the system tools and the Python package (editable) + native relay
#   ./np.sh demo           install, then run the demo on a throwaway namespace lab
#   ./np.sh test [ARGS]    install, then python3 -m pytest -q ARGS
#   ./np.sh bench [ARGS]   install, then python3 -m bench.run ARGS
#   ./np.sh lint           ruff check ., ruff format --check . and mypy (after an install; no root needed)
#   ./np.sh clean-labs [P] delete leftover lab namespaces whose names start with P (default: npt)
#
# Environment: PYTHON (default python3) picks the interpreter; NP_FORCE_INSTALL=1 redoes the pip step
# even when nothing changed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || { echo "np.sh: error: $PYTHON not found (Python 3.11 with pip is required)" >&2; exit 1; }
PYTHON=$(command -v "$PYTHON")

# Commands the daemon, the lab, the tests and the bench use, and the Debian package that provides each.
declare -A PROVIDER=(
    [iptables]=iptables [iptables-restore]=iptables [iptables-save]=iptables
    [ip]=iproute2 [ss]=iproute2 [iperf3]=iperf3 [wrk]=wrk [h2load]=nghttp2-client [haproxy]=haproxy
    [nginx]=nginx-light [curl]=curl [socat]=socat [ps]=procps [sysctl]=procps
    [killall]=psmisc [fuser]=psmisc [gcc]=build-essential [make]=build-essential
    [capsh]=libcap2-bin [setpriv]=util-linux [nghttpd]=nghttp2-server
    [vagrant]=vagrant [systemd-analyze]=systemd [strace]=strace [prlimit]=util-linux
    [prometheus]=prometheus
)
# C headers the native modules build against, and the Debian package that provides each.
declare -A HEADER_PROVIDER=(
    [/usr/include/nghttp2/nghttp2.h]=libnghttp2-dev
    [/usr/include/linux/bpf.h]=linux-libc-dev
    [/usr/include/openssl/ssl.h]=libssl-dev
)
APT_PACKAGES=(iptables iproute2 iperf3 wrk nghttp2-client nghttp2-server haproxy nginx-light curl socat procps
              psmisc build-essential libcap2-bin util-linux libnghttp2-dev linux-libc-dev vagrant systemd strace
              prometheus libssl-dev)
# Services the packages above would otherwise start (and enable) in the root namespace.
ROOT_NS_SERVICES=(nginx haproxy prometheus)
STAMP="$ROOT/build/.np-install-stamp"
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_BACKUP=/usr/sbin/policy-rc.d.np-backup

say() { printf 'np.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

need_root() {
    if [[ $EUID -ne 0 ]]; then
        die "'./np.sh $1' must be run as root (it installs packages and builds network namespaces): sudo ./np.sh $1"
    fi
}

# -- system packages ----------------------------------------------------------------------------------

python_headers_present() {
    "$PYTHON" - <<'EOF'
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
EOF
}

missing_commands() {
    local cmd header
    for cmd in "${!PROVIDER[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || printf '%s\n' "$cmd"
    done | sort
    for header in "${!HEADER_PROVIDER[@]}"; do
        [[ -e $header ]] || printf '%s\n' "$header"
    done | sort
}

restore_policy_rc() {
    rm -f "$POLICY_RC"
    if [[ -e $POLICY_RC_BACKUP ]]; then
        mv -f "$POLICY_RC_BACKUP" "$POLICY_RC"
    fi
}

install_system_packages() {
    local missing packages=("${APT_PACKAGES[@]}") fresh_services=() svc
    missing=$(missing_commands)
    local need_headers=0 need_pip=0
    python_headers_present || need_headers=1
    "$PYTHON" -m pip --version >/dev/null 2>&1 || need_pip=1
    if [[ -z $missing && $need_headers -eq 0 && $need_pip -eq 0 ]]; then
        say "system tools present; skipping apt"
        return 0
    fi
    [[ -n $missing ]] && say "missing commands: ${missing//$'\n'/ }"
    [[ $need_headers -eq 1 ]] && say "missing Python.h for $PYTHON (needed to build the native relay)"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install the packages providing the commands above"
    # Debian's own python3 comes without pip and headers; another interpreter must bring its own.
    local python_packages=()
    [[ $need_headers -eq 1 ]] && python_packages+=(python3-dev)
    [[ $need_pip -eq 1 ]] && python_packages+=(python3-pip)
    if [[ ${#python_packages[@]} -gt 0 && $PYTHON != /usr/bin/* ]]; then
        die "$PYTHON lacks what Debian's ${python_packages[*]} would give /usr/bin/python3 (pip, C headers); install that for $PYTHON"
    fi
    packages+=("${python_packages[@]}")
    for svc in "${ROOT_NS_SERVICES[@]}"; do
        command -v "$svc" >/dev/null 2>&1 || fresh_services+=("$svc")
    done

    # While installing, forbid package scripts from starting services (nginx, haproxy, iperf3) in the root
    # namespace: the lab and the bench start their own copies inside namespaces.
    if [[ -e $POLICY_RC && ! -e $POLICY_RC_BACKUP ]]; then
        mv -f "$POLICY_RC" "$POLICY_RC_BACKUP"
    fi
    trap restore_policy_rc EXIT
    trap 'restore_policy_rc; exit 130' INT TERM
    printf '#!/bin/sh\n# written by nodeproxy np.sh during apt-get install; removed afterwards\nexit 101\n' >"$POLICY_RC"
    chmod 0755 "$POLICY_RC"

    export DEBIAN_FRONTEND=noninteractive
    say "apt-get update"
    apt-get update -q
    if ! apt-cache show nginx-light >/dev/null 2>&1; then
        say "this release has no nginx-light; using nginx"
        packages=("${packages[@]/#nginx-light/nginx}")
    fi
    say "apt-get install ${packages[*]}"
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${packages[@]}"

    restore_policy_rc
    trap - EXIT INT TERM

    # Packages enable their service for the next boot; keep nginx/haproxy we just installed off the root
    # namespace there too (a copy that was already installed is left as it was).
    if command -v systemctl >/dev/null 2>&1; then
        for svc in "${fresh_services[@]}"; do
            systemctl disable --quiet "$svc" >/dev/null 2>&1 || true
        done
    fi

    missing=$(missing_commands)
    [[ -z $missing ]] || die "still missing after apt-get install: ${missing//$'\n'/ }"
    python_headers_present || die "still no Python.h for $PYTHON after installing python3-dev"
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "still no pip for $PYTHON after installing python3-pip"
}

# -- Python package -----------------------------------------------------------------------------------

install_key() {
    # Changes when the dependencies, the build, the checkout location or the interpreter change.
    {
        printf '%s\n' "$ROOT" "$(command -v "$PYTHON")"
        "$PYTHON" -c 'import sys; print(sys.version)'
        cat pyproject.toml setup.py
    } | sha256sum | cut -d' ' -f1
}

python_install_current() {
    # The editable install of *this* checkout is importable (from outside the tree) with its dependencies.
    [[ -f $STAMP && $(cat "$STAMP") == "$(install_key)" ]] || return 1
    (cd / && "$PYTHON" - "$ROOT/nodeproxy" <<'EOF'
import pathlib, sys
import nodeproxy
import uvloop, pyroute2, structlog, pydantic, yaml, re2, h11  # runtime
import pytest, pytest_timeout, hypothesis, ruff, mypy, Cython, setuptools, websockets, h2, hpack, hyperframe, grpc  # test extra
sys.exit(0 if pathlib.Path(nodeproxy.__file__).resolve().parent == pathlib.Path(sys.argv[1]) else 1)
EOF
    ) >/dev/null 2>&1
}

install_python_package() {
    "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (Debian: apt-get install python3-pip)"
    # Debian marks its Python as externally managed (PEP 668); this machine is dedicated to nodeproxy, and
    # as root pip puts the package in /usr/local (the `nodeproxy` command lands in /usr/local/bin).
    export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
    if [[ ${NP_FORCE_INSTALL:-0} != 1 ]] && python_install_current; then
        say "nodeproxy already installed (editable) from $ROOT; skipping pip"
    else
        say "pip install -e '.[test]'"
        "$PYTHON" -m pip install -q -e '.[test]'
        if ! "$PYTHON" -c 'import setuptools' >/dev/null 2>&1; then
            "$PYTHON" -m pip install -q 'setuptools>=68' wheel
        fi
        mkdir -p "$(dirname "$STAMP")"
        install_key >"$STAMP"
    fi
    # Keep the extensions beside the sources (each rebuilt only when its .pyx/.pxd changed).
    say "building the native modules (setup.py build_ext --inplace)"
    "$PYTHON" -W ignore setup.py -q build_ext --inplace >/dev/null
    local module
    for module in nodeproxy/_*.pyx; do
        module=$(basename "$module" .pyx)
        "$PYTHON" -c "import nodeproxy.$module" || die "nodeproxy.$module does not import after the build"
    done
}

do_install() {
    need_root install
    install_system_packages
    install_python_package
    say "install done"
}

# -- other commands -----------------------------------------------------------------------------------

lint() {
    "$PYTHON" -c 'import ruff, mypy' >/dev/null 2>&1 || die "ruff/mypy not installed; run: sudo ./np.sh install"
    local rc=0
    say "ruff check ."
    "$PYTHON" -m ruff check . || rc=1
    say "ruff format --check ."
    "$PYTHON" -m ruff format --check . || rc=1
    say "mypy"
    "$PYTHON" -m mypy || rc=1     # files and strictness come from [tool.mypy] in pyproject.toml
    return "$rc"
}

clean_labs() {
    # Namespaces of labs whose owner died without `lab down` (e.g. a killed test run): kill what runs in
    # them, then delete them; the veths inside go with them.
    local prefix=${1:-npt} ns pid found=0
    [[ -n $prefix ]] || die "clean-labs needs a non-empty prefix"
    while read -r ns _; do
        [[ $ns == "$prefix"* ]] || continue
        found=1
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        ip netns del "$ns" && say "deleted stale namespace $ns"
    done < <(ip netns list 2>/dev/null)
    [[ $found -eq 1 ]] || say "no namespaces starting with '$prefix'"
}

main() {
    local cmd=${1:-help}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        install)
            do_install ;;
        demo)
            need_root demo; do_install
            exec "$PYTHON" -m nodeproxy demo "$@" ;;
        test)
            need_root test; do_install
            exec "$PYTHON" -m pytest -q "$@" ;;
        bench)
            need_root bench; do_install
            exec "$PYTHON" -m bench.run "$@" ;;
        lint)
            lint ;;
        clean-labs)
            need_root clean-labs
            clean_labs "$@" ;;
        help | -h | --help)
            usage ;;
        *)
            usage >&2
            die "unknown command '$cmd'" ;;
    esac
}

main "$@"
