#!/usr/bin/env bash
# Set up everything on a fresh Debian machine with Python 3.11:
#   scripts/setup.sh test   the Debian packages with the real data (the suite runs the experiment's quick
#                           profile on them), a venv with the package, pytest and Ray (the [ray] extra)
#   scripts/setup.sh demo   the same data packages and venv
# Safe to re-run: apt and pip skip what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${1:-test}"
case "$profile" in
  test|demo) apt_packages=(fonts-dejavu-core fonts-noto-color-emoji fonts-ipafont-gothic dataset-fashion-mnist
                           gnome-backgrounds plasma-workspace-wallpapers adwaita-icon-theme) ;;
  *) echo "usage: scripts/setup.sh [test|demo]" >&2; exit 2 ;;
esac

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "error: Python 3.11 or newer is needed as '$python' (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  apt_packages+=(python3-venv)
fi

missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
    echo "warning: cannot install ${missing[*]} without root; install them and re-run" >&2
  else
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: pip takes these two from local files on the project's machines.
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
if [ "$profile" = test ]; then extras="test,ray"; else extras="test"; fi
.venv/bin/pip install -q -e ".[$extras]"
device=$(.venv/bin/python -c 'import torch, curate; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')
echo "ready: .venv ($device)"
