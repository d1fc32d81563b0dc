// Tiling data of MoeGemm (both kernel variants). Field meanings: ops/npu/tiling.py MoeGemmTiling and
// MxWorkspace. Evidence: written only.
#ifndef ASCEND_V4_MOE_GEMM_TILING_H
#define ASCEND_V4_MOE_GEMM_TILING_H

#include "register/op_def_registry.h"
#include "register/tilingdata_base.h"
#include "tiling/tiling_api.h"

namespace optiling {

BEGIN_TILING_DATA_DEF(MoeGemmTilingData)
TILING_DATA_FIELD_DEF(uint32_t, M)            // routed rows (sorted by group)
TILING_DATA_FIELD_DEF(uint32_t, N)
TILING_DATA_FIELD_DEF(uint32_t, K)
TILING_DATA_FIELD_DEF(uint32_t, E)            // groups (weights in the list)
TILING_DATA_FIELD_DEF(uint32_t, scaleBlockN)
TILING_DATA_FIELD_DEF(uint32_t, scaleBlockK)
TILING_DATA_FIELD_DEF(uint32_t, mTile)
TILING_DATA_FIELD_DEF(uint32_t, nTile)
TILING_DATA_FIELD_DEF(uint32_t, kTile)
TILING_DATA_FIELD_DEF(uint32_t, kStep)
TILING_DATA_FIELD_DEF(uint32_t, nNTile)
TILING_DATA_FIELD_DEF(uint32_t, coreNum)
TILING_DATA_FIELD_DEF(uint64_t, wsPerCore)    // dequantised weight tiles, ping-pong (dequant path)
// native MX path only (keys 11 / 12; op_host/moe_gemm_mx_rules.h MxWorkspace): byte offsets in the workspace
TILING_DATA_FIELD_DEF(uint64_t, wsXq)         // e4m3 activations [align(M, 16), K]
TILING_DATA_FIELD_DEF(uint64_t, wsXs)         // e8m0 activation scales [align(M, 16), K/32]
TILING_DATA_FIELD_DEF(uint64_t, wsSlab)       // first core's slab pair; core c at wsSlab + c * slabPerCore
TILING_DATA_FIELD_DEF(uint64_t, slabPerCore)
TILING_DATA_FIELD_DEF_STRUCT(TCubeTiling, mmTiling)  // [mTile, nTile, K] with base [mTile, nTile, kTile]
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(MoeGemm, MoeGemmTilingData)

ge::graphStatus TilingMoeGemm(gert::TilingContext *context);

}  // namespace optiling

namespace ge {
ge::graphStatus InferShapeMoeGemm(gert::InferShapeContext *context);
ge::graphStatus InferDataTypeMoeGemm(gert::InferDataTypeContext *context);
}  // namespace ge

#endif  // ASCEND_V4_MOE_GEMM_TILING_H
