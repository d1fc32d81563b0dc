// Host tiling of MoeGemm: reads shapes / attrs / platform capacities, calls ComputeMoeGemmTiling
// (../../common/tiling_rules.h = ops/npu/tiling.py, compared in CI) or, for weight_fmt 11 / 12 (native MX path,
// Ascend 950), ComputeMoeGemmMxTiling (moe_gemm_mx_rules.h, also compared in CI), and fills MoeGemmTilingData.
// The group sizes live on the device (no host sync): the kernel builds its unit list from group_list.
// weight_fmt = tiling key: 0 bf16, 1 FP8, 2 FP4 (vector dequant -> bf16 cube); 11 FP8, 12 FP4 (MX cube). The
// caller (ops/npu/kernels.py) asks for 11 / 12 only on 950 with K % 64 == 0; anything else fails here.
// Evidence: written only.
#include "moe_gemm_tiling.h"

#include "moe_gemm_mx_rules.h"
#include "tiling/platform/platform_ascendc.h"
#include "tiling_rules.h"

namespace optiling {

namespace tr = ascend_v4::tiling;

ge::graphStatus TilingMoeGemm(gert::TilingContext *context)
{
    const gert::StorageShape *xShape = context->GetInputShape(0);
    const gert::StorageShape *w0Shape = context->GetDynamicInputShape(1, 0);
    const auto *attrs = context->GetAttrs();
    if (xShape == nullptr || w0Shape == nullptr || attrs == nullptr) {
        return ge::GRAPH_FAILED;
    }
    const int64_t fmtAttr = *attrs->GetAttrPointer<int64_t>(0);
    const int64_t bn = *attrs->GetAttrPointer<int64_t>(1);
    const int64_t bk = *attrs->GetAttrPointer<int64_t>(2);
    const gert::Shape &x = xShape->GetStorageShape();
    const gert::Shape &w0 = w0Shape->GetStorageShape();
    const int64_t M = x.GetDim(0), K = x.GetDim(1), N = w0.GetDim(0);
    const int64_t E = context->GetComputeNodeInfo()->GetInputInstanceInfo(1)->GetInstanceNum();
    const bool mx = fmtAttr >= tr::MOE_KEY_MX;
    const int64_t fmt = fmtAttr % tr::MOE_KEY_MX;
    if (fmtAttr < 0 || fmtAttr > tr::MOE_KEY_MX + 2 || fmt > 2 || (mx && fmt == 0) ||
        bn != tr::ScaleBlockN(static_cast<tr::WeightFmt>(fmt)) ||
        bk != tr::ScaleBlockK(static_cast<tr::WeightFmt>(fmt))) {
        return ge::GRAPH_FAILED;  // the scale layout is fixed per format (model-spec.md §8.3, §8.4)
    }

    auto plat = platform_ascendc::PlatformAscendC(context->GetPlatformInfo());
    uint64_t ub = 0, l1 = 0, l0a = 0, l0b = 0, l0c = 0;
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::UB, ub);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L1, l1);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L0_A, l0a);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L0_B, l0b);
    plat.GetCoreMemSize(platform_ascendc::CoreMemType::L0_C, l0c);
    const bool is950 = plat.GetSocVersion() == platform_ascendc::SocVersion::ASCEND950;
    const tr::SocCaps caps{static_cast<int64_t>(ub), static_cast<int64_t>(l1), static_cast<int64_t>(l0a),
                           static_cast<int64_t>(l0b), static_cast<int64_t>(l0c), is950};
    const int64_t cores = plat.GetCoreNumAic();
    const auto wf = static_cast<tr::WeightFmt>(fmt);
    if (mx && !tr::MxApplicable(caps, wf, K)) {
        return ge::GRAPH_FAILED;  // MX asked for off 950, or K % 64 != 0 (the MX scale K dim must be even)
    }
    // The dequant path is planned with allowMx = false explicitly: the variant is the caller's choice.
    tr::MoeGemmMxTiling r = mx ? tr::ComputeMoeGemmMxTiling(caps, M, N, K, E, wf, cores)
                               : tr::ComputeMoeGemmTilingFor(caps, M, N, K, E, wf, cores, false);
    const tr::MoeGemmTiling &t = r.t;
    if (!t.ok) {
        return ge::GRAPH_FAILED;
    }

    MoeGemmTilingData data;
    data.set_M(M);
    data.set_N(N);
    data.set_K(K);
    data.set_E(E);
    data.set_scaleBlockN(bn);
    data.set_scaleBlockK(bk);
    data.set_mTile(t.mTile);
    data.set_nTile(t.nTile);
    data.set_kTile(t.kTile);
    data.set_kStep(t.kStep);
    data.set_nNTile(t.nNTile);
    data.set_coreNum(cores);
    data.set_wsPerCore(!mx && cores > 0 ? t.workspaceBytes / cores : 0);
    data.set_wsXq(r.ws.xq);
    data.set_wsXs(r.ws.xs);
    data.set_wsSlab(r.ws.slab);
    data.set_slabPerCore(r.ws.slabPerCore);

    const auto dt = context->GetInputDesc(0)->GetDataType() == ge::DT_FLOAT16 ? matmul_tiling::DataType::DT_FLOAT16
                                                                            : matmul_tiling::DataType::DT_BF16;
    matmul_tiling::MatmulApiTiling mm(plat);
    if (mx) {
        // MxMatmul (asc-devkit Matmul docs, "MxMatmul" scenario): A = e4m3 activations [M, K] with scaleA
        // [M, K/32] (not transposed), B = e4m3 weights [N, K] (transposed) with scaleB [N, K/32]; MXMODE makes
        // the tiling reserve the scale tiles next to the data in L1 / L0.
        mm.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND,
                    matmul_tiling::DataType::DT_FLOAT8_E4M3FN, false);
        mm.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND,
                    matmul_tiling::DataType::DT_FLOAT8_E4M3FN, true);
        mm.SetScaleAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, false);
        mm.SetScaleBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, true);
        mm.SetMadType(matmul_tiling::MatrixMadType::MXMODE);
    } else {
        mm.SetAType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt);
        mm.SetBType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt, true);  // [N, K] tiles
    }
    mm.SetCType(matmul_tiling::TPosition::GM, matmul_tiling::CubeFormat::ND, dt);
    mm.SetShape(t.mTile, t.nTile, K);
    mm.SetOrgShape(M, N, K);
    mm.SetFixSplit(t.mTile, t.nTile, t.kTile);
    mm.SetBufferSpace(-1, -1, -1);
    if (mm.GetTiling(data.mmTiling) == -1) {
        return ge::GRAPH_FAILED;
    }
    data.SaveToBuffer(context->GetRawTilingData()->GetData(), context->GetRawTilingData()->GetCapacity());
    context->GetRawTilingData()->SetDataSize(data.GetDataSize());

    context->SetBlockDim(cores);  // units are built on the device; every cube core takes every cores-th one
    context->SetTilingKey(t.tilingKey);
    size_t *ws = context->GetWorkspaceSizes(1);
    ws[0] = static_cast<size_t>(t.workspaceBytes) + plat.GetLibApiWorkSpaceSize();
    return ge::GRAPH_SUCCESS;
}

}  // namespace optiling
