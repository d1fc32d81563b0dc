// Tiling data of SparseAttn / SparseAttnKvQuant. Field meanings: ops/npu/tiling.py SparseAttnTiling.
// Evidence: written only.
#ifndef ASCEND_V4_SPARSE_ATTN_TILING_H
#define ASCEND_V4_SPARSE_ATTN_TILING_H

#include "register/tilingdata_base.h"
#include "register/op_def_registry.h"
#include "tiling/tiling_api.h"

namespace optiling {

BEGIN_TILING_DATA_DEF(SparseAttnTilingData)
TILING_DATA_FIELD_DEF(uint32_t, T)             // query tokens
TILING_DATA_FIELD_DEF(uint32_t, H)             // heads
TILING_DATA_FIELD_DEF(uint32_t, D)             // head dim (K = V latent width)
TILING_DATA_FIELD_DEF(uint32_t, K)             // index slots per query
TILING_DATA_FIELD_DEF(uint32_t, N)             // kv rows
TILING_DATA_FIELD_DEF(float, scale)            // softmax scale
TILING_DATA_FIELD_DEF(uint32_t, hTile)         // heads per unit (cube M)
TILING_DATA_FIELD_DEF(uint32_t, kvBlock)       // gathered kv rows per step (cube N of mm1, K of mm2)
TILING_DATA_FIELD_DEF(uint32_t, dQk)           // D chunk of mm1
TILING_DATA_FIELD_DEF(uint32_t, dPv)           // D chunk of mm2
TILING_DATA_FIELD_DEF(uint32_t, nHBlk)
TILING_DATA_FIELD_DEF(uint32_t, nKvBlk)
TILING_DATA_FIELD_DEF(uint32_t, kvSplits)      // > 1: partial results + combine pass
TILING_DATA_FIELD_DEF(uint32_t, blocksPerSplit)
TILING_DATA_FIELD_DEF(uint32_t, units)         // T * nHBlk * kvSplits
TILING_DATA_FIELD_DEF(uint32_t, usedCores)
// GM workspace layout (bytes), copied from tiling_rules.h ComputeSparseAttnWorkspace; the kernel does no layout
// arithmetic of its own. Per core c at c * wsPerCore: kv tile, S, P, O block; then the split partials.
TILING_DATA_FIELD_DEF(uint64_t, wsPerCore)     // one core's exchange area
TILING_DATA_FIELD_DEF(uint64_t, wsKvOff)       // [2][kvBlock][D] 16-bit, inside a core's area
TILING_DATA_FIELD_DEF(uint64_t, wsSOff)        // [2][hTile][kvBlock] fp32
TILING_DATA_FIELD_DEF(uint64_t, wsPOff)        // [2][hTile][kvBlock] 16-bit
TILING_DATA_FIELD_DEF(uint64_t, wsOOff)        // [2][hTile][D] fp32
TILING_DATA_FIELD_DEF(uint64_t, wsPartOOff)    // [units][hTile][D] fp32, from the workspace start (split keys)
TILING_DATA_FIELD_DEF(uint64_t, wsPartStatOff) // [units][2][hTile] fp32 (m, l), from the workspace start
TILING_DATA_FIELD_DEF(uint32_t, ropeDim)       // KvQuant: trailing bf16 dims of an entry (0 for SparseAttn)
TILING_DATA_FIELD_DEF(uint32_t, entryBytes)    // KvQuant: bytes per cache entry, 584 for D 512 (0 for SparseAttn)
TILING_DATA_FIELD_DEF_STRUCT(TCubeTiling, mm1Tiling)  // S = Q K^T, per AIV: [hTile/2, kvBlock, D]
TILING_DATA_FIELD_DEF_STRUCT(TCubeTiling, mm2Tiling)  // O = P V,   per AIV: [hTile/2, D, kvBlock]
END_TILING_DATA_DEF;

REGISTER_TILING_DATA_CLASS(SparseAttn, SparseAttnTilingData)
REGISTER_TILING_DATA_CLASS(SparseAttnKvQuant, SparseAttnTilingData)

ge::graphStatus TilingSparseAttn(gert::TilingContext *context);
ge::graphStatus TilingSparseAttnKvQuant(gert::TilingContext *context);

}  // namespace optiling

namespace ge {
ge::graphStatus InferShapeSparseAttn(gert::InferShapeContext *context);
ge::graphStatus InferDataTypeSparseAttn(gert::InferDataTypeContext *context);
}  // namespace ge

#endif  // ASCEND_V4_SPARSE_ATTN_TILING_H
