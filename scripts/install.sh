#!/usr/bin/env bash
# Sets up fedprompt from scratch in a virtual environment (default: .venv in the checkout).
#
#   bash scripts/install.sh            # create/update .venv with the project and dev tools
#
# Environment variables:
#   PYTHON          interpreter used to create the venv (default: python3)
#   FEDPROMPT_VENV  where the venv lives (default: <checkout>/.venv)
#   TORCH_SPEC      the torch requirement installed first (default: torch==2.13.0)
#
# Order matters: torch goes in first so that no other package pulls a different (CUDA)
# build; CrypTen 0.4.1 goes in last with --no-deps because its declared requirements are
# broken (torchvision, the obsolete "sklearn" name); the requirements it really needs are
# dependencies of fedprompt. The compatibility shim in fedprompt/secure/crypten_compat.py
# makes it import on torch 2.13; the last step checks that it does.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDPROMPT_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[install] creating virtual environment in $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip setuptools wheel
echo "[install] $torch_spec"
"${pip[@]}" install --quiet "$torch_spec"
echo "[install] fedprompt and its dependencies"
"${pip[@]}" install --quiet -e "$root[dev]"
echo "[install] crypten==0.4.1 (without its broken declared requirements)"
"${pip[@]}" install --quiet --no-deps "crypten==0.4.1"
"$venv/bin/python" -m fedprompt.secure.crypten_compat
echo "[install] done: $venv"
