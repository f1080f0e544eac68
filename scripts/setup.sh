#!/usr/bin/env bash
# One-time (and idempotent) set-up of radgate on a Debian machine, as root:
# the Debian packages it talks to and tests against, and a virtual environment with its Python deps.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the browser tests (console, OHIF viewer). postgresql: the store tests run on a throwaway
# PostgreSQL server of their own as well as on SQLite (its packaged service is never started here).
# docker-compose only validates docker/compose.yaml in the tests (no engine runs here).
DEBIAN_PACKAGES=(orthanc orthanc-python orthanc-dicomweb dcmtk dicom3tools pixelmed-apps dcm2niix python3-venv docker-compose
  chromium chromium-driver postgresql)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
# A JDK: the tests run pixelmed's validator from a small Java runner (dicom_io/testing/) they compile.
command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (or install these packages yourself): ${missing[*]}" >&2
    exit 1
  fi
  # The packaged Orthanc service must not start on its own: radgate starts Orthanc where it needs one.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own Python 3.11 first, even where another one comes first on PATH (a pyenv shim): it is the
# Python the orthanc-python plugin embeds, and it is built with PGO and LTO, so radgate's processes start
# and run faster on it than on a default source build (bench/README.md, "tests"). PYTHON overrides it.
PYTHON=${PYTHON:-$(command -v /usr/bin/python3.11 || command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), "radgate needs Python 3.11+"'
interpreter=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
if [ -x .venv/bin/python ] &&
  [ "$(.venv/bin/python -c 'import os, sys; print(os.path.realpath(sys._base_executable))')" != "$interpreter" ]; then
  echo "setup: .venv was made with another Python; making it again with $interpreter"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.radgate-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  # The CPU build of torch lies on disk here; a bare 'torch' would pull a multi-GB CUDA build.
  # On a GPU machine install the CUDA build of the same version first (see docker/).
  .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
  # torch stays at the version installed above. nnU-Net's network library needs timm, which lists
  # torchvision but runs without it; PyPI's torchvision does not load beside the CPU build of torch
  # ("operator torchvision::nms does not exist") and would break every nnU-Net import, so it is removed.
  .venv/bin/pip install -q -c scripts/constraints.txt -e ".[dev,brain,nnunet,ray]"
  .venv/bin/pip uninstall -q -y torchvision 2>/dev/null || true
  echo "$want" > "$stamp"
fi
# OHIF Viewer for `radgate demo --viewer`: the prebuilt dist/ of the npm package @ohif/app, unpacked into
# .ohif/ (git-ignored). `npm pack` fetches that one tarball (50 MB, integrity-checked by npm) and none of the
# package's build dependencies; dist/ort (onnxruntime-web, 136 MB, only for OHIF's in-browser AI tools) is left out.
OHIF_VERSION=3.13.2
if [ "$(cat .ohif/VERSION 2>/dev/null)" != "$OHIF_VERSION" ]; then
  echo "setup: installing OHIF Viewer $OHIF_VERSION into .ohif/"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  rm -rf .ohif && mkdir .ohif
  tar -xzf "$tmp/ohif-app-$OHIF_VERSION.tgz" -C .ohif --strip-components=1 --exclude=package/dist/ort \
    package/dist package/LICENSE
  rm -rf "$tmp"
  echo "$OHIF_VERSION" > .ohif/VERSION
fi
echo "setup: ready (.venv/bin/radgate)"
