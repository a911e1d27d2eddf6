#!/usr/bin/env bash
# Builds the local cluster's components from the Go modules next to this script:
#   kube/  -> kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl
#   etcd/  -> etcd
#   kwok/  -> kwok
#   helm/  -> helm
#   coredns/ -> coredns (the real node's cluster DNS)
#
# Binaries go to ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/bin/<hash>/, where <hash>
# covers every go.mod and go.sum here, coredns/main.go, this script and the Go
# toolchain version.
# A directory with a complete .done marker is reused without building anything.
# The bin directory's path is the LAST line of stdout; everything else goes to stderr.
#
# Environment:
#   KUBETUNE_CACHE   cache root (default $HOME/.cache/kubetune)
#   GO               go command (default: `go` on PATH, else /usr/local/go/bin/go)
#   GOMODCACHE       honoured as usual (default $HOME/go/pkg/mod)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"

if [[ -n "${GO:-}" ]]; then
  go_cmd="$GO"
elif command -v go >/dev/null 2>&1; then
  go_cmd="$(command -v go)"
elif [[ -x /usr/local/go/bin/go ]]; then
  go_cmd=/usr/local/go/bin/go
else
  echo "build.sh: no Go toolchain found (install Go >= 1.26 or set GO=/path/to/go)" >&2
  exit 1
fi

# Pin the build environment: the committed go.sum is authoritative (-mod=readonly,
# never -mod=mod), no toolchain switching, no cgo.
export GOTOOLCHAIN=local
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0
export GOWORK=off
export GOCACHE="$cache_root/go-build"
unset GOOS GOARCH

modules=(kube etcd kwok helm coredns)
expected=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd kwok helm coredns)

go_version="$("$go_cmd" env GOVERSION) $("$go_cmd" env GOOS)/$("$go_cmd" env GOARCH)"
hash="$(
  {
    echo "toolchain $go_version"
    for m in "${modules[@]}"; do
      for f in go.mod go.sum; do
        echo "== $m/$f"
        cat "$here/$m/$f"
      done
    done
    echo "== coredns/main.go"
    cat "$here/coredns/main.go"
    echo "== build.sh"
    cat "$here/build.sh"
  } | sha256sum | cut -c1-16
)"
bin="$cache_root/bin/$hash"

complete() {
  [[ -f "$1/.done" ]] || return 1
  local b
  for b in "${expected[@]}"; do
    [[ -x "$1/$b" ]] || return 1
  done
}

if complete "$bin"; then
  echo "build.sh: up to date ($go_version)" >&2
  echo "$bin"
  exit 0
fi

mkdir -p "$cache_root/bin" "$GOCACHE"
# One build at a time per cache root; a second caller waits and then reuses it.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_root/bin/.lock"
  flock 9
  if complete "$bin"; then
    echo "build.sh: built by a concurrent run" >&2
    echo "$bin"
    exit 0
  fi
fi

tmp="$(mktemp -d "$cache_root/bin/.$hash.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Versions come from the committed go.mod files (single source of truth).
modver() { (cd "$here/$1" && "$go_cmd" list -m -f '{{.Version}}' "$2"); }
kube_version="$(modver kube k8s.io/kubernetes)"   # v1.34.N
helm_version="$(modver helm helm.sh/helm/v3)"     # v3.x.y
kwok_version="$(modver kwok sigs.k8s.io/kwok)"    # v0.x.y
coredns_version="$(modver coredns github.com/coredns/coredns)"  # v1.x.y
kube_major="$(echo "${kube_version#v}" | cut -d. -f1)"
kube_minor="$(echo "${kube_version#v}" | cut -d. -f2)"
build_date="$(date -u ${SOURCE_DATE_EPOCH:+-d @$SOURCE_DATE_EPOCH} +%Y-%m-%dT%H:%M:%SZ)"

build() { # module dir, then go build arguments
  local m="$1"
  shift
  echo "build.sh: [$(date -u +%H:%M:%S)] building $m" >&2
  (cd "$here/$m" && "$go_cmd" build -p 2 -trimpath "$@")
}

start=$SECONDS

# etcd takes its version from a constant in go.etcd.io/etcd/api/v3/version.
build etcd -ldflags "-s -w" \
  -o "$tmp/etcd" go.etcd.io/etcd/server/v3

build kwok -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${kwok_version#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${kube_version#v}" \
  -o "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok

build helm -ldflags "-s -w \
  -X helm.sh/helm/v3/internal/version.version=$helm_version \
  -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$kube_major \
  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kube_minor" \
  -o "$tmp/helm" helm.sh/helm/v3/cmd/helm

# CoreDNS with the plugins its main.go imports (the directive list is in main.go).
build coredns -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$coredns_version" \
  -o "$tmp/coredns" .

kube_ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $p.gitVersion=$kube_version -X $p.gitMajor=$kube_major -X $p.gitMinor=$kube_minor"
  kube_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
done
# All Kubernetes components in one go build, so shared packages compile once.
build kube -ldflags "$kube_ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kubectl

for b in "${expected[@]}"; do
  [[ -x "$tmp/$b" ]] || { echo "build.sh: $b was not produced" >&2; exit 1; }
done
{
  echo "toolchain: $go_version"
  echo "kubernetes: $kube_version"
  echo "helm: $helm_version"
  echo "kwok: $kwok_version"
  echo "etcd: $(modver etcd go.etcd.io/etcd/server/v3)"
  echo "coredns: $coredns_version"
  echo "built: $build_date in $((SECONDS - start))s"
} >"$tmp/.done.tmp"
mv "$tmp/.done.tmp" "$tmp/.done"
chmod 755 "$tmp"

rm -rf "$bin"
mv "$tmp" "$bin"
trap - EXIT
echo "build.sh: built in $((SECONDS - start))s" >&2
echo "$bin"
