#!/usr/bin/env bash
# Runs every test of the workspace: the runtime crate and daain-tools (which needs the
# libtorch installed by tools/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
cargo test --workspace "$@"
