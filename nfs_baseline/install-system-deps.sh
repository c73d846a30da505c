#!/bin/sh
# Install the system packages the NFS baseline and the netns harness need.
#
# Idempotent and non-interactive (Debian 12).  Never fails the build when it
# cannot run as root or without apt: it prints why and exits 0, so the
# callers' available() checks later skip those approaches with a clear reason.
set -eu

# rpcbind, nfs-ganesha, nfs-ganesha-vfs: the NFS server (VFS = export a dir).
# libnfs-utils: nfs-ls/nfs-cat for debugging.  iproute2: ip netns, tc tbf.
# util-linux: nsenter/unshare.  libnfs-dev, gcc, python3-dev: `pip install
# libnfs` compiles a C extension against libnfs (there is no binary wheel).
PACKAGES="rpcbind nfs-ganesha nfs-ganesha-vfs libnfs-dev libnfs-utils \
iproute2 util-linux gcc libc6-dev python3-dev"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps.sh: not root, skipping apt-get install of:" \
         "$PACKAGES (NFS baseline and netns tests will be skipped)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps.sh: apt-get not found, install manually:" \
         "$PACKAGES" >&2
    exit 0
fi

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
    echo "install-system-deps.sh: installed:$missing"
else
    echo "install-system-deps.sh: all packages already installed"
fi

# On a systemd machine the package starts a system-wide ganesha that holds
# port 2049; the baseline runs its own servers, so switch that one off.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now nfs-ganesha.service nfs-ganesha-lock.service \
        >/dev/null 2>&1 || true
fi
