// Host tiling of SparseAttn / SparseAttnKvQuant. The rules live in ../../common/tiling_rules.h (the C++ port
// of ops/npu/tiling.py, compared with it in CI); this file only reads shapes and platform capacities, calls
// them and fills SparseAttnTilingData, block dim, tiling key and workspace size. Evidence: written only.
#include "sparse_attn_tiling.h"

#include <algorithm>

#include "tiling/platform/platform_ascendc.h"
#include "tiling_rules.h"

namespace optiling {

namespace tr = ascend_v4::tiling;

constexpr size_t Q_INDEX = 0;
constexpr size_t KV_INDEX = 1;
constexpr size_t IDX_INDEX = 2;
constexpr size_t ATTR_SCALE_INDEX = 0;
constexpr size_t ATTR_ROPE_DIM_INDEX = 1;  // SparseAttnKvQuant only
constexpr int64_t KV_SCALE_BLOCK = 64;     // nope dims per UE8M0 byte of an FP8 entry
constexpr int64_t KV_ENTRY_ALIGN = 8;      // entries are zero-padded to a multiple of 8 bytes
constexpr int64_t KV_ROPE_ALIGN = 16;      // kernel: rope bytes (2 per dim) a whole number of 32-byte UB blocks

// Bytes of one FP8 cache entry (ops/reference/kv_fp8.py kv_fp8_layout): nope e4m3 + rope bf16 + scales, padded.
static int64_t KvFp8EntryBytes(int64_t headDim, int64_t ropeDim)
{
    const int64_t scales = (headDim - ropeDim) / KV_SCALE_BLOCK;
    return headDim - ropeDim + 2 * ropeDim + (scales + KV_ENTRY_ALIGN - 1) / KV_ENTRY_ALIGN * KV_ENTRY_ALIGN;
}

static tr::SocCaps ReadCaps(const platform_ascendc::PlatformAscendC &plat, bool nativeMx)
{
    uint64_t ub = 0, l1 = 0, l0a = 0, l0b = 0, l0c = 0;
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L1, l1);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L0_A, l0a);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L0_B, l0b);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L0_C, l0c);
    // The rules keep UB_RESERVED free themselves; the platform value is already net of the runtime's share.
    return tr::SocCaps{static_cast<int64_t>(ub), static_cast<int64_t>(l1), static_cast<int64_t>(l0a),
                       static_cast<int64_t>(l0b), static_cast<int64_t>(l0c), nativeMx};
}

static ge::graphStatus DoTiling(gert::TilingContext *context, bool kvFp8)
{
    const gert::StorageShape *qShape = context->GetInputShape(Q_INDEX);
    const gert::StorageShape *kvShape = context->GetInputShape(KV_INDEX);
    const gert::StorageShape *idxShape = context->GetInputShape(IDX_INDEX);
    const float *scale = context->GetAttrs()->GetAttrPointer<float>(ATTR_SCALE_INDEX);
    if (qShape == nullptr || kvShape == nullptr || idxShape == nullptr || scale == nullptr) {
        return ge::GRAPH_FAILED;
    }
    const gert::Shape &q = qShape->GetStorageShape();
    const gert::Shape &kv = kvShape->GetStorageShape();
    const gert::Shape &idx = idxShape->GetStorageShape();
    if (q.GetDimNum() != 3 || kv.GetDimNum() != 2 || idx.GetDimNum() != 2 || idx.GetDim(0) != q.GetDim(0)) {
        return ge::GRAPH_FAILED;
    }
    // BF16 KV: a row is D values. FP8 KV: a row is one packed entry whose width follows from D and rope_dim.
    int64_t ropeDim = 0;
    int64_t entryBytes = 0;
    if (kvFp8) {
        const int64_t *rope = context->GetAttrs()->GetAttrPointer<int64_t>(ATTR_ROPE_DIM_INDEX);
        if (rope == nullptr) {
            return ge::GRAPH_FAILED;
        }
        ropeDim = *rope;
        const int64_t nope = q.GetDim(2) - ropeDim;
        if (ropeDim < 0 || ropeDim % KV_ROPE_ALIGN != 0 || nope <= 0 || nope % KV_SCALE_BLOCK != 0) {
            return ge::GRAPH_FAILED;
        }
        entryBytes = KvFp8EntryBytes(q.GetDim(2), ropeDim);
        if (kv.GetDim(1) != entryBytes) {
            return ge::GRAPH_FAILED;
        }
    } else if (kv.GetDim(1) != q.GetDim(2)) {
        return ge::GRAPH_FAILED;
    }

    auto plat = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
    const bool is950 = plat.GetSocVersion() == platform_ascendc::SocVersion::ASCEND950;
    const int64_t cores = plat.GetCoreNumAic();
    tr::SparseAttnTiling t = tr::ComputeSparseAttnTiling(ReadCaps(plat, is950), q.GetDim(0), q.GetDim(1),
                                                         q.GetDim(2), idx.GetDim(1), cores, kvFp8);
    if (!t.ok) {
        return ge::GRAPH_FAILED;
    }

    SparseAttnTilingData data;
    data.set_T(q.GetDim(0));
    data.set_H(q.GetDim(1));
    data.set_D(q.GetDim(2));
    data.set_K(idx.GetDim(1));
    data.set_N(kv.GetDim(0));
    data.set_scale(*scale);
    data.set_hTile(t.hTile);
    data.set_kvBlock(t.kvBlock);
    data.set_dQk(t.dQk);
    data.set_dPv(t.dPv);
    data.set_nHBlk(t.nHBlk);
    data.set_nKvBlk(t.nKvBlk);
    data.set_kvSplits(t.kvSplits);
    data.set_blocksPerSplit(t.blocksPerSplit);
    data.set_units(t.units);
    data.set_usedCores(t.usedCores);
    data.set_ropeDim(static_cast<uint32_t>(ropeDim));
    data.set_entryBytes(static_cast<uint32_t>(entryBytes));
    // GM workspace: the one layout table (tiling_rules.h ComputeSparseAttnWorkspace = tiling.py
    // sparse_attn_workspace); test_tiling.py checks these set_ calls and the kernel's SetGlobalBuffer lines.
    data.set_wsPerCore(t.ws.perCore);
    data.set_wsKvOff(t.ws.kv);
    data.set_wsSOff(t.ws.s);
    data.set_wsPOff(t.ws.p);
    data.set_wsOOff(t.ws.o);
    data.set_wsPartOOff(t.ws.partO);
    data.set_wsPartStatOff(t.ws.partStats);
    // Cube tiling of the two matmuls, pinned to the blocks chosen above (base M/N/K = the L0 tiles checked
    // against capacity by the rules; each AIV multiplies its hTile/2 rows, padded to the 16-row fractal).
    const auto dt = context->GetInputDesc(Q_INDEX)->GetDataType() == ge::DT_FLOAT16 ? matmul_tiling::DataType::DT_FLOAT16
                                                                                  : matmul_tiling::DataType::DT_BF16;
    const int32_t m = std::max<int32_t>(16, t.hTile / 2);
    matmul_tiling::MatmulApiTiling mm1(plat);
    mm1.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt);
    mm1.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt, true);
    mm1.SetCType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::DT_FLOAT);
    mm1.SetShape(m, t.kvBlock, q.GetDim(2));
    mm1.SetOrgShape(m, t.kvBlock, q.GetDim(2));
    mm1.SetFixSplit(m, t.kvBlock, t.dQk);
    mm1.SetBufferSpace(-1, -1, -1);
    matmul_tiling::MatmulApiTiling mm2(plat);
    mm2.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt);
    mm2.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt);
    mm2.SetCType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, matmul_tiling::DataType::DT_FLOAT);
    mm2.SetShape(m, q.GetDim(2), t.kvBlock);
    mm2.SetOrgShape(m, q.GetDim(2), t.kvBlock);
    mm2.SetFixSplit(m, t.dPv, t.kvBlock);
    mm2.SetBufferSpace(-1, -1, -1);
    if (mm1.GetTiling(data.mm1Tiling) == -1 || mm2.GetTiling(data.mm2Tiling) == -1) {
        return ge::GRAPH_FAILED;
    }
    data.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
    context->GetRawTilingData()->SetDataSize(data.GetDataSize());

    context->SetBlockDim(t.usedCores);  // MIX 1:2: block dim counts cube cores
    context->SetTilingKey(t.tilingKey);
    if (t.kvSplits > 1) {
        // The split kernels (keys 10 / 11) run SyncAll: batch mode, so every core of the op is started together
        // (asc-devkit docs .../核间同步/SyncAll.md 约束说明: "通过TilingContext的SetScheduleMode接口来设置
        // batchmode模式"; gert::TilingContext::SetScheduleMode(uint32_t), 1 = batch mode; same call in
        // hicann/ops-nn index/scatter_elements_v2/op_host/arch22/scatter_elements_v2_tiling.cpp).
        context->SetScheduleMode(1);
    }
    size_t *ws = context->GetWorkspaceSizes(1);
    ws[0] = static_cast<size_t>(t.workspaceBytes) + plat.GetLibApiWorkSpaceSize();
    return ge::GRAPH_SUCCESS;
}

ge::graphStatus TilingSparseAttn(gert::TilingContext *context) { return DoTiling(context, false); }
ge::graphStatus TilingSparseAttnKvQuant(gert::TilingContext *context) { return DoTiling(context, true); }

}  // namespace optiling
