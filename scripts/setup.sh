#!/usr/bin/env bash
# One-time setup of a fresh Debian 12 / Python 3.11 machine (root): the system libraries
# napari needs to draw under Xvfb and a C compiler (the dMoE layer builds its CPU kernel
# on first use; without one it runs slower pure-torch code), then this project with every
# dependency.
# torch and torchvision are pinned in the same pip command as everything that depends on
# them, so pip takes the local builds instead of downloading several GB.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends xvfb xauth libxcb-icccm4 libxcb-keysyms1 \
    libxcb-cursor0 libxkbcommon-x11-0 libgl1 libegl1 libdbus-1-3 libfontconfig1 \
    gcc libc6-dev >/dev/null
fi

python -m pip install -q --disable-pip-version-check \
  torch==2.14.1 torchvision==0.29.1 -e ".[all,test]"
