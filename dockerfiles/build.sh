#!/usr/bin/env bash
# Build one NEO image from the repository root with podman (default) or docker.
#
# usage: dockerfiles/build.sh IMAGE [EXTRA BUILD ARGS...]
#   IMAGE: gateway | gpu-worker | cpu-attention | operator
# Environment (all optional):
#   NEO_BUILDER           podman (default) or docker
#   NEO_IMAGE_TAG         tag to give the image (default: neo-IMAGE:VERSION)
#   NEO_BASE_IMAGE        --build-arg BASE_IMAGE (default: the Dockerfile's pinned public image)
#   NEO_PODMAN_ROOT, NEO_PODMAN_RUNROOT, NEO_PODMAN_STORAGE_DRIVER
#                         podman storage (scripts/image-tools.sh --env prints the ones it prepared)
#   NEO_BUILD_CONTEXT     build from this copy of the repository (default: the repository itself)
#   NEO_PIP_SECRETS       1 (default): hand this machine's pip index settings and CA bundle to pip
#                         inside the build as build secrets (never stored in a layer); 0: plain PyPI
# With podman, builds run with --isolation=chroot (no daemon, no user namespaces) and --format docker
# (the OCI format has no HEALTHCHECK).
set -euo pipefail

IMAGE=${1:?usage: dockerfiles/build.sh IMAGE [EXTRA BUILD ARGS...]}
shift
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONTEXT=${NEO_BUILD_CONTEXT:-$ROOT_DIR}
DOCKERFILE=$CONTEXT/dockerfiles/$IMAGE.Dockerfile
[[ -f $DOCKERFILE ]] || { echo "build.sh: no $DOCKERFILE" >&2; exit 2; }
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$CONTEXT/pyproject.toml" | head -n1)
TAG=${NEO_IMAGE_TAG:-neo-$IMAGE:${VERSION:-dev}}
BUILDER=${NEO_BUILDER:-podman}

args=(build -f "$DOCKERFILE" -t "$TAG" --build-arg "VERSION=${VERSION:-dev}")
# Commit time, not build time: labels stay reproducible and do not defeat the layer cache.
created=$(git -C "$ROOT_DIR" log -1 --format=%cI 2>/dev/null || true)
[[ -n $created ]] && args+=(--build-arg "CREATED=$created")
rev=$(git -C "$ROOT_DIR" rev-parse --short HEAD 2>/dev/null || true)
[[ -n $rev ]] && args+=(--build-arg "REVISION=$rev")
[[ -n ${NEO_BASE_IMAGE:-} ]] && args+=(--build-arg "BASE_IMAGE=$NEO_BASE_IMAGE")

cmd=("$BUILDER")
if [[ $BUILDER == podman ]]; then
    [[ -n ${NEO_PODMAN_ROOT:-} ]] && cmd+=(--root "$NEO_PODMAN_ROOT")
    [[ -n ${NEO_PODMAN_RUNROOT:-} ]] && cmd+=(--runroot "$NEO_PODMAN_RUNROOT")
    [[ -n ${NEO_PODMAN_STORAGE_DRIVER:-} ]] && cmd+=(--storage-driver "$NEO_PODMAN_STORAGE_DRIVER")
    args+=(--isolation=chroot --format docker --layers)
fi

# pip inside the build sees what pip here sees: the index settings of `pip config` (http(s) ones only;
# local file:// indexes do not exist inside the build) and the CA bundle pip trusts, as build secrets.
secrets_dir=""
if [[ ${NEO_PIP_SECRETS:-1} == 1 ]]; then
    secrets_dir=$(mktemp -d)
    trap 'rm -rf "$secrets_dir"' EXIT
    python3 - "$secrets_dir" <<'EOF'
import os, re, shutil, ssl, subprocess, sys

out = sys.argv[1]
try:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, check=False).stdout
except OSError:
    listing = ""
conf = {}
for line in listing.splitlines():
    m = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line.strip())
    if m:
        conf[m.group(1)] = m.group(2)
for key in ("index-url", "extra-index-url", "trusted-host"):
    value = os.environ.get("PIP_" + key.upper().replace("-", "_"), conf.get(key, ""))
    conf[key] = value
lines = ["[global]"]
for key in ("index-url", "extra-index-url"):
    urls = [u for u in conf[key].split() if u.startswith(("http://", "https://"))]
    if urls:
        lines.append(f"{key} = " + " ".join(urls))
if conf["trusted-host"].strip():
    lines.append("trusted-host = " + conf["trusted-host"].strip())
ca = os.environ.get("PIP_CERT") or conf.get("cert") or ssl.get_default_verify_paths().cafile
if ca and os.path.isfile(ca):
    shutil.copyfile(ca, os.path.join(out, "cacert"))
    lines.append("cert = /run/secrets/cacert")
with open(os.path.join(out, "pipconf"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
EOF
    args+=(--secret "id=pipconf,src=$secrets_dir/pipconf")
    [[ -f $secrets_dir/cacert ]] && args+=(--secret "id=cacert,src=$secrets_dir/cacert")
fi

echo "build.sh: ${cmd[*]} ${args[*]} $* $CONTEXT" >&2
"${cmd[@]}" "${args[@]}" "$@" "$CONTEXT"
