#!/usr/bin/env bash
# Build the ascend-v4 NPU op library with CANN: the custom OPP package (SparseAttn, SparseAttnKvQuant, MoeGemm)
# and the torch binding, installed into the git-ignored ops/_lib/ (code-style.md §7.4; never run by pip).
#
#   tools/build_npu_ops.sh --soc ascend910b      # A2 (910B); also ascend910_93 (A3), ascend950
#   tools/build_npu_ops.sh --soc ascend910b,ascend910_93 --jobs 16
#   tools/build_npu_ops.sh --check               # what is missing, build nothing
#   options: --jobs N, --build-dir DIR (default build/npu_ops, git-ignored)
#
# Steps (ascend-notes.md §3.2-3.4):
#   1. msopgen generates a framework (aclnn) custom-op project from ops/ascendc/ascend_v4_ops.json for the SoCs;
#   2. our op_host / op_kernel sources and ops/ascendc/common/tiling_rules.h replace the generated stubs, and
#      ops/ascendc/CMakeLists.txt is included from the generated op_kernel CMake (per-op compile options);
#   3. CMakePresets.json gets ASCEND_COMPUTE_UNIT, vendor_name=ascend_v4 and the CANN path; build.sh runs opbuild
#      (generates aclnn_<op>.{h,cpp}), compiles host libs and per-SoC kernels with bisheng, packs a makeself .run;
#   4. the .run is installed with --install-path=ops/_lib  ->  ops/_lib/vendors/ascend_v4/...;
#   5. ops/csrc is built with CMake against torch + torch_npu (located with `pip show`, never imported)
#      -> ops/_lib/libascend_v4_npu.so.
# Needs: CANN toolkit (source <toolkit>/set_env.sh; no NPU required to compile), msopgen, cmake >= 3.18, g++,
# the pinned torch / torch_npu in the active Python. Without an NPU set SOC via --soc (ascend-notes §3.3).
# Evidence: written only -- this script has not been run (no CANN on the development machines).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$ROOT/ops/ascendc
OUT=$ROOT/build/npu_ops
LIB=$ROOT/ops/_lib
SOCS=""
JOBS=$(nproc 2>/dev/null || echo 4)
CHECK=0
VENDOR=ascend_v4

usage() { sed -n '2,8p' "$0"; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --soc) SOCS=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --build-dir) OUT=$2; shift 2 ;;
        --check) CHECK=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown argument: $1" >&2; usage 2 ;;
    esac
done

missing=()
[[ -n "${ASCEND_HOME_PATH:-}" && -d "${ASCEND_HOME_PATH:-/nonexistent}" ]] || \
    missing+=("CANN toolkit: source /usr/local/Ascend/ascend-toolkit/set_env.sh (sets ASCEND_HOME_PATH)")
command -v msopgen >/dev/null || missing+=("msopgen (ships with the CANN toolkit, python/site-packages/bin)")
command -v cmake >/dev/null || missing+=("cmake >= 3.18")
command -v g++ >/dev/null || missing+=("g++")
PY=${PYTHON:-python3}
TORCH_NPU_LOC=$({ $PY -m pip show torch-npu 2>/dev/null || true; } | awk '/^Location:/ {print $2}')
[[ -n "$TORCH_NPU_LOC" ]] || missing+=("torch-npu (pip install the pinned set, see docker/Dockerfile.npu)")
if [[ -z "$SOCS" ]]; then
    missing+=("--soc ascend910b|ascend910_93|ascend950 (comma-separated; required without an NPU)")
fi
if ((${#missing[@]})); then
    printf 'missing: %s\n' "${missing[@]}" >&2
    exit 1
fi
if ((CHECK)); then
    echo "ok: CANN at $ASCEND_HOME_PATH, torch_npu at $TORCH_NPU_LOC, SoCs $SOCS"
    exit 0
fi

IFS=, read -r -a SOC_LIST <<<"$SOCS"
for s in "${SOC_LIST[@]}"; do
    case $s in ascend910b|ascend910_93|ascend950) ;; *) echo "unsupported SoC $s" >&2; exit 2 ;; esac
done
COMPUTE_UNITS=$(IFS=';'; echo "${SOC_LIST[*]}")

# 1. generate the project (msopgen takes one compute unit; the preset below lists all of them)
rm -rf "$OUT"
mkdir -p "$OUT"
msopgen gen -i "$SRC/ascend_v4_ops.json" -c "ai_core-${SOC_LIST[0]}" -lan cpp -out "$OUT/opp"

# 2. our sources replace the generated stubs
rm -f "$OUT"/opp/op_host/*.cpp "$OUT"/opp/op_host/*.h "$OUT"/opp/op_kernel/*.cpp "$OUT"/opp/op_kernel/*.h
for op in sparse_attn moe_gemm; do
    cp "$SRC/$op"/op_host/* "$OUT/opp/op_host/"
    cp "$SRC/$op"/op_kernel/* "$OUT/opp/op_kernel/"
done
# the rm above also drops msopgen's stub op_kernel/sparse_attn_kv_quant.cpp: ours must have replaced it (one
# kernel entry per OpDef, opFile.value in sparse_attn_def.cpp), or the SparseAttnKvQuant build has no kernel
for f in sparse_attn.cpp sparse_attn_kv_quant.cpp; do
    [[ -f "$OUT/opp/op_kernel/$f" ]] || { echo "missing kernel entry op_kernel/$f" >&2; exit 1; }
done
cp "$SRC/common/tiling_rules.h" "$OUT/opp/op_host/"
cp "$SRC/common/tiling_rules.h" "$OUT/opp/op_kernel/"  # tiling data layout shared by host and kernel
echo "include($SRC/CMakeLists.txt)" >>"$OUT/opp/op_kernel/CMakeLists.txt"

# 3. presets: compute units, vendor, CANN path; then build the .run
$PY - "$OUT/opp/CMakePresets.json" "$COMPUTE_UNITS" "$VENDOR" "$ASCEND_HOME_PATH" <<'PYEOF'
import json, sys
path, units, vendor, cann = sys.argv[1:]
p = json.load(open(path))
for preset in p["configurePresets"]:
    cv = preset["cacheVariables"]
    cv["ASCEND_COMPUTE_UNIT"]["value"] = units
    cv["vendor_name"]["value"] = vendor
    cv["ASCEND_CANN_PACKAGE_PATH"]["value"] = cann
    cv["ENABLE_SOURCE_PACKAGE"]["value"] = "True"
    cv["ENABLE_BINARY_PACKAGE"]["value"] = "True"
json.dump(p, open(path, "w"), indent=2)
PYEOF
(cd "$OUT/opp" && bash build.sh -j"$JOBS")
RUN=$(ls "$OUT"/opp/build_out/custom_opp_*.run | head -1)

# 4. install the OPP package into ops/_lib (vendors/ascend_v4/...)
rm -rf "$LIB"
mkdir -p "$LIB"
bash "$RUN" --quiet --install-path="$LIB"
VENDOR_DIR=$LIB/vendors/$VENDOR
[[ -f "$VENDOR_DIR/op_api/lib/libcust_opapi.so" ]] || { echo "install did not produce $VENDOR_DIR" >&2; exit 1; }

# 5. torch binding
TORCH_PREFIX=$($PY -c 'import torch; print(torch.utils.cmake_prefix_path)')
TORCH_MINOR=$($PY -m pip show torch | awk '/^Version:/ {split($2, v, "."); print v[2]}')
cmake -S "$ROOT/ops/csrc" -B "$OUT/binding" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
    -DTORCH_NPU_PATH="$TORCH_NPU_LOC/torch_npu" -DVENDOR_LIB_DIR="$VENDOR_DIR/op_api/lib" \
    -DTORCH_NPU_VERSION_MACRO="V2R${TORCH_MINOR}" -DPython3_EXECUTABLE="$(command -v $PY)"
cmake --build "$OUT/binding" -j "$JOBS"
cmake --install "$OUT/binding" --prefix "$LIB"

echo "installed: $VENDOR_DIR and $LIB/libascend_v4_npu.so"
echo "check with: ascend-v4 doctor"
