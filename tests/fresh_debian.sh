#!/usr/bin/env bash
# The README's two commands, as written, on a freshly bootstrapped Debian 12 (or Ubuntu 24.04): a
# minimal root (debootstrap --variant=minbase with python3 and nothing else), the facts that made
# the README say what it says checked first (no `python` command, PEP 668's marker, `python3 -m venv`
# failing without ensurepip), then the packages the README's first code block names installed, the
# committed tree cloned in, and the two commands run in it by the chroot's `sh` with a clean
# environment. Opt-in, not in CI: it needs root, debootstrap and the distribution's mirror, and takes
# about a minute and a half (of the tests, the few that need outside programs; FRESH_DEBIAN_FULL=1
# runs the second command's whole pytest as written: about 4 minutes in all).
#
#   sudo tests/fresh_debian.sh            # Debian 12 (bookworm)
#   sudo tests/fresh_debian.sh noble      # Ubuntu 24.04
#
# The root lives in a temp directory, removed at the end (FRESH_DEBIAN_KEEP=1 keeps it). Its /proc
# is mounted in a private mount namespace only (unshare), so nothing outside is ever mounted in it,
# and removing it can't reach the host's /proc or /dev. The chroot shares the host's network: the
# server's port 8080 must be free.
set -euo pipefail
suite=${1:-bookworm}
repo=$(cd "$(dirname "$0")/.." && pwd)
case $suite in
    bookworm) mirror=${FRESH_DEBIAN_MIRROR:-http://deb.debian.org/debian}; extra=() ;;
    noble)  # Debian 12's debootstrap has no noble script nor Ubuntu's key: gutsy's script, unchecked
        mirror=${FRESH_DEBIAN_MIRROR:-http://archive.ubuntu.com/ubuntu}
        extra=(--no-check-gpg) ;;
    *) echo "usage: $0 [bookworm|noble]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, chroot)" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "$0: needs debootstrap: apt-get install debootstrap" >&2; exit 2; }
if python3 -c 'import socket, sys; sys.exit(socket.socket().connect_ex(("127.0.0.1", 8080)) != 0)'; then
    echo "$0: port 8080 is taken: the README's server needs it" >&2; exit 2
fi

# The committed README's first code block: a comment naming what to apt install, then the two commands.
block=$(git -C "$repo" show HEAD:README.md | awk '/^```/ { fence++; next } fence == 1')
packages=$(sed -nE 's/^#.*apt install ([a-z0-9 .+-]+[a-z0-9]).*/\1/p' <<<"$block" | head -n 1)
mapfile -t commands < <(grep -vE '^[[:space:]]*(#|$)' <<<"$block")
if [ -z "$packages" ] || [ ${#commands[@]} -ne 2 ]; then
    echo "$0: README.md's first code block should be an 'apt install' comment and two commands" >&2; exit 1
fi

work=$(mktemp -d /tmp/fresh-debian.XXXXXX)
root=$work/root
cleanup() {
    for proc in /proc/[0-9]*; do  # anything still running in the chroot
        [ "$(readlink "$proc/root" 2>/dev/null)" = "$root" ] && kill -KILL "${proc#/proc/}" 2>/dev/null
    done
    if grep -qF " $root" /proc/mounts; then  # never: the mounts are in the namespace only
        echo "$0: something is mounted in $root: left in place" >&2
    elif [ "${FRESH_DEBIAN_KEEP:-}" = 1 ]; then
        echo "kept: $root"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
in_root() {  # in_root COMMAND...: a login shell's environment in the chroot, /proc mounted privately
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    unshare --mount --propagation private sh -c 'mount -t proc proc "$0/proc" && exec chroot "$0" "$@"' "$root" \
        env -i HOME=/root TERM=dumb LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

started=$SECONDS
echo "== debootstrap --variant=minbase --include=python3 $suite ($mirror)"
script=()
[ -e "/usr/share/debootstrap/scripts/$suite" ] || script=(/usr/share/debootstrap/scripts/gutsy)
debootstrap --variant=minbase --include=python3 "${extra[@]}" "$suite" "$root" "$mirror" "${script[@]}" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log"; exit 1; }
if [ "$suite" = noble ]; then  # python3-venv is in universe: a real installation's sources have it
    printf 'deb %s noble main universe\ndeb %s noble-updates main universe\n' "$mirror" "$mirror" \
        >"$root/etc/apt/sources.list"
fi
echo "   $(chroot "$root" dpkg-query -W -f='.\n' | wc -l) packages, $(in_root python3 --version) ($((SECONDS - started)) s)"
git clone --quiet "$repo" "$root/root/livecounter"

echo "== what a fresh $suite with python3 has"
in_root sh -c 'cd /root/livecounter
    for program in python pip pip3 git curl openssl; do
        command -v $program >/dev/null && echo "   $program: yes" || echo "   $program: no"; done
    ls /usr/lib/python3*/EXTERNALLY-MANAGED >/dev/null && echo "   PEP 668 marker: yes"
    python3 -c "import ensurepip" 2>/dev/null && echo "   ensurepip: yes" || echo "   ensurepip: no"
    if python3 -m venv /tmp/probe >/dev/null 2>&1; then echo "   python3 -m venv: works"; exit 1; fi
    echo "   python3 -m venv: fails (no ensurepip)"'

echo "== apt-get install $packages (the README's first code block)"
# shellcheck disable=SC2086
in_root sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages" \
    >"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log"; exit 1; }
# A network that intercepts TLS (a CI sandbox's proxy) signs with a CA of its own, installed on the host
# in /usr/local/share/ca-certificates: the root trusts it too, as it would trust the real sites.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    in_root update-ca-certificates >/dev/null 2>&1
fi
echo "   $(chroot "$root" dpkg-query -W -f='.\n' | wc -l) packages ($((SECONDS - started)) s)"

echo "== command 1: ${commands[0]}"
# Its own session, so that SIGTERM reaches the server and not only the shell running the chain.
in_root setsid sh -c "cd /root/livecounter && ${commands[0]}" >"$work/command1.log" 2>&1 &
chain=$!
until in_root python3 -c 'import urllib.request
assert urllib.request.urlopen("http://127.0.0.1:8080/counters/1/", timeout=2).read() == b"0\n"' 2>/dev/null; do
    if ! kill -0 $chain 2>/dev/null; then tail -n 20 "$work/command1.log"; echo "command 1 ended"; exit 1; fi
    sleep 1
done
echo "   serving http://127.0.0.1:8080/ ($((SECONDS - started)) s)"
for proc in /proc/[0-9]*; do  # SIGTERM to the server, as Ctrl+C would stop it
    if [ "$(readlink "$proc/root" 2>/dev/null)" = "$root" ] && [[ $(readlink "$proc/exe" 2>/dev/null) == */python3* ]] &&
        grep -q livecounter.py "$proc/cmdline" 2>/dev/null; then
        kill -TERM "${proc#/proc/}"
    fi
done
wait $chain || { tail -n 20 "$work/command1.log"; echo "command 1: the server did not stop cleanly"; exit 1; }

echo "== command 2: ${commands[1]}"
if [ "${FRESH_DEBIAN_FULL:-}" = 1 ]; then
    addopts=""
else  # the tests that need outside programs a fresh system lacks (curl, openssl, git)
    addopts='test_livecounter.py -k "million_counters_are_listed or over_tls or shipped_data_file"' 
fi
in_root env PYTEST_ADDOPTS="$addopts" sh -c "cd /root/livecounter && ${commands[1]}" >"$work/command2.log" 2>&1 \
    || { tail -n 30 "$work/command2.log"; echo "command 2 failed"; exit 1; }
echo "   $(tail -n 1 "$work/command2.log") (${addopts:-every test})"
echo "== the README's commands work on a fresh $suite ($((SECONDS - started)) s)"
