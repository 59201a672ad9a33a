# Source this file to point tch at the libtorch that tools/setup.sh installed.
export LIBTORCH="${DAAIN_TORCH_DIR:-$HOME/.cache/daain-torch}/torch"
export LIBTORCH_CXX11_ABI=1
