#!/usr/bin/env bash
# Podman for the container test (tests/test_container.py): a daemonless engine that builds and
# runs the Dockerfile where no Docker engine exists (see shared/ENV_NOTES.md, "Docker without a
# Docker engine"). Idempotent: installs only what is missing, writes its containers.conf (saving
# once one it did not write), builds the base image only when `podman image exists` says it is
# missing.
# Never fails CI: whatever cannot be done is printed, and the container test skips saying why.
#
#   bash ci/podman-setup.sh                  # as root
#   VIDFLOW_BASE_IMAGE=localhost/debian:bookworm-slim   (the image it builds; override to rename)
#   VIDFLOW_DEBIAN_MIRROR=http://...         (default: the mirror apt is configured with)
set -uo pipefail

BASE_IMAGE="${VIDFLOW_BASE_IMAGE:-localhost/debian:bookworm-slim}"
SUITE=bookworm
PACKAGES=(podman buildah debootstrap runc uidmap slirp4netns fuse-overlayfs)
# What the Dockerfile's base stage needs; present in the base, it skips its own apt-get.
BASE_INCLUDE=python3,python3-venv,ca-certificates

say() { echo "podman-setup: $*" >&2; }
skip() {
    say "$*; the container test will be skipped"
    exit 0
}

if [ "$(id -u)" != 0 ]; then
    skip "not root"
fi

# --- packages --------------------------------------------------------------------------------
missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for another apt run (the Chromium setup) instead of failing on the dpkg lock.
    apt_get() { apt-get -o DPkg::Lock::Timeout=900 "$@"; }
    say "installing ${missing[*]}"
    if ! { apt_get update -qq && apt_get install -y -qq --no-install-recommends "${missing[@]}"; }; then
        skip "apt-get could not install ${missing[*]}"
    fi
fi
command -v podman >/dev/null 2>&1 || skip "podman is not on PATH after the install"

# --- configuration ---------------------------------------------------------------------------
# runc, not crun: crun fails on this kernel's hybrid cgroups. cgroupfs: no systemd here.
# events in a file: no journald. Default ulimits: the container otherwise inherits odd limits.
# A containers.conf this script did not write (an account's own, or a package's) is kept
# beside it, once, before it is replaced: nothing of a developer's podman set-up is lost.
mkdir -p /etc/containers
conf=/etc/containers/containers.conf
mark="# Written by vidflow's ci/podman-setup.sh (rewritten on every run)."
if [ -e "$conf" ] && [ "$(head -n 1 "$conf")" != "$mark" ] && [ ! -e "$conf.before-vidflow" ]; then
    cp -p "$conf" "$conf.before-vidflow"
    say "$conf saved as $conf.before-vidflow (move it back to undo)"
fi
cat >"$conf" <<EOF
$mark
[containers]
default_ulimits = [
  "nofile=20000:20000",
  "nproc=32768:32768",
]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

# Storage: the kernel's overlay on the host's file system when it supports it, else
# fuse-overlayfs. Written only when there is no storage.conf yet (an existing one may hold
# images created with its driver; changing the driver would orphan them).
if [ ! -e /etc/containers/storage.conf ]; then
    driver=overlay
    mount_program=""
    if ! grep -qw overlay /proc/filesystems && ! modprobe overlay 2>/dev/null; then
        mount_program=/usr/bin/fuse-overlayfs
    fi
    {
        echo "# Written by vidflow's ci/podman-setup.sh (only when missing)."
        echo "[storage]"
        echo "driver = \"$driver\""
        echo "runroot = \"/run/containers/storage\""
        echo "graphroot = \"/var/lib/containers/storage\""
        if [ -n "$mount_program" ]; then
            echo "[storage.options.overlay]"
            echo "mount_program = \"$mount_program\""
        fi
    } >/etc/containers/storage.conf
fi

podman info >/dev/null 2>&1 || skip "podman info fails: $(podman info 2>&1 | tail -n 3)"

# --- base image ------------------------------------------------------------------------------
# No registry can be pulled from here: the Dockerfile's BASE_IMAGE comes from debootstrap.
if podman image exists "$BASE_IMAGE"; then
    say "$BASE_IMAGE exists"
    exit 0
fi

# The Debian mirror apt uses (deb822 .sources or one-line .list), unless given.
debian_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -e "$file" ] || continue
        awk -v suite="$SUITE" '
            /^[[:space:]]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
            /^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/ && uri == "") uri = $i }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END { if (uri != "" && ok) print uri }
        ' "$file" | head -n 1
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk -v suite="$SUITE" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $(i + 1) == suite) { print $i; exit } }'
}
MIRROR="${VIDFLOW_DEBIAN_MIRROR:-$(debian_mirror | head -n 1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

rootfs="$(mktemp -d /var/tmp/vidflow-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
say "building $BASE_IMAGE with debootstrap from $MIRROR"
if ! debootstrap --variant=minbase --include="$BASE_INCLUDE" "$SUITE" "$rootfs" "$MIRROR" \
        >"$rootfs.log" 2>&1; then
    tail -n 20 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    skip "debootstrap $SUITE from $MIRROR failed"
fi
rm -f "$rootfs.log"
# Slim like the official image: no apt lists, caches, docs or man pages.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
if ! tar -C "$rootfs" -c . | podman import --quiet \
        --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$BASE_IMAGE" >/dev/null; then
    skip "podman import of the debootstrap tree failed"
fi
say "built $BASE_IMAGE ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
exit 0
