#!/usr/bin/env bash
# The compatibility pass at the old end of the declared ranges: a venv with every direct dependency at its lower
# bound (ci/minimum-versions.txt, which must agree with pyproject.toml), then the selection in ci/compat-tests.txt.
# The newest end is the ordinary suite (.ci/run) in an environment resolved today.
#
#   bash ci/compat.sh                      # venv in $COMPAT_VENV (default .ci-venv/min, git-ignored)
#   COMPAT_VENV=$HOME/venvs/vlalign-min bash ci/compat.sh   # any other place for the venv
#   COMPAT_FRESH=1 bash ci/compat.sh       # delete and rebuild the venv first
#
# The venv is reused when it was built from the same pins, pyproject.toml dependencies and Python; otherwise it is
# rebuilt from scratch. Either way the installed versions are checked against the pins before any test runs.
# Fails if the pins and pyproject.toml disagree, if an installed version differs from its pin, if pytest runs no
# test (its exit code 5), or if any test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1

PYTHON=${PYTHON:-python3}
VENV=${COMPAT_VENV:-$REPO/.ci-venv/min}
PINS=ci/minimum-versions.txt
TESTS=ci/compat-tests.txt
TORCH=torch==2.13.0  # the local CPU build; any other torch requirement would pull the CUDA wheels

start=$(date +%s)
stamp() {  # what the venv was built from: pins, pyproject.toml's dependency lists, the interpreter
    {
        cat "$PINS"
        "$PYTHON" - <<'EOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(sys.version, project["dependencies"], project.get("optional-dependencies"))
EOF
        echo "$TORCH"
    } | sha256sum | cut -d' ' -f1
}
want=$(stamp)

if [[ "${COMPAT_FRESH:-0}" == 1 ]]; then
    rm -rf "$VENV"
fi
if [[ -x "$VENV/bin/python" && -f "$VENV/.compat-stamp" && "$(cat "$VENV/.compat-stamp")" == "$want" ]]; then
    echo "== reusing $VENV (built from the same pins)"
    # only re-point the editable install at this checkout (CI clones into a new folder)
    "$VENV/bin/python" -m pip install -q --no-deps -e .
else
    echo "== building $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "$TORCH"
    "$VENV/bin/python" -m pip install -q -c "$PINS" -e ".[dev]"
    echo "$want" > "$VENV/.compat-stamp"
fi
installed=$(date +%s)

echo "== installed versions against $PINS"
"$VENV/bin/python" - "$PINS" "$TORCH" <<'EOF'
import sys, tomllib
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pins_file, torch_pin = sys.argv[1], sys.argv[2]
pins = {}
for line in open(pins_file):
    line = line.split("#")[0].strip()
    if line:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{pins_file}: {line!r} is not an == pin"
        pins[canonicalize_name(req.name)] = spec.version
problems = []

# the lower bounds in pyproject.toml are the pins (torch's excepted: it is not tested here)
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
for text in declared:
    req = Requirement(text)
    name = canonicalize_name(req.name)
    if name == "torch":
        continue
    lower = [s.version for s in req.specifier if s.operator == ">="]
    if not lower:
        problems.append(f"pyproject.toml: {text!r} has no lower bound")
    elif name not in pins:
        problems.append(f"pyproject.toml: {text!r} has no pin in {pins_file}")
    elif Version(lower[0]) != Version(pins[name]):
        problems.append(f"pyproject.toml: {text!r} but {pins_file} pins {name}=={pins[name]}")

print(f"{'package':<18} {'pinned':<10} installed")
for name, pinned in [*pins.items(), ("torch", torch_pin.split("==")[1])]:
    try:
        got = version(name)
    except PackageNotFoundError:
        got = "(not installed)"
    ok = got != "(not installed)" and Version(Version(got).base_version if name == "torch" else got) == Version(pinned)
    print(f"{name:<18} {pinned:<10} {got}{'' if ok else '   <-- differs'}")
    if not ok:
        problems.append(f"{name}: pinned {pinned}, installed {got}")
if problems:
    sys.exit("compat: " + "\n compat: ".join(problems))
EOF

echo "== compatibility selection ($TESTS)"
mapfile -t selection < <(grep -v '^[[:space:]]*#' "$TESTS" | grep -v '^[[:space:]]*$' || true)
if [[ ${#selection[@]} == 0 ]]; then  # pytest without arguments would run the whole suite instead
    echo "compat: $TESTS selects no test" >&2
    exit 1
fi
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "${selection[@]}"
status=$?
set -e
end=$(date +%s)
echo "== compat: install/check $((installed - start)) s, tests $((end - installed)) s, total $((end - start)) s"
if [[ $status == 5 ]]; then
    echo "compat: pytest ran no tests" >&2
    exit 1
fi
exit $status
