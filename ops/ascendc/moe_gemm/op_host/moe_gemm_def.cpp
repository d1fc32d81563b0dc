// OpDef of MoeGemm: grouped GEMM y[M, N] = x[M, K] . W_g[N, K]^T over row groups (counts in group_list), one
// weight + UE8M0 scale per group (dynamic inputs -> aclTensorList). weight_fmt: 0 bf16, 1 FP8 e4m3 bytes
// (scales per 128x128), 2 FP4 e2m1 packed two per byte, low nibble first (scales per 1x32); + 10 (11, 12) asks
// for the native MX kernel (Ascend 950 only; op_kernel/moe_gemm_mx_kernel.h).
// Generated API: aclnnMoeGemm(x, weight, scale, group_list, weight_fmt, scale_block_n, scale_block_k, y).
// Golden: ops/reference/gemm.py (quant_gemm per group) for 0-2, ops/reference/mx.py for 11-12.
// Evidence: written only.
#include "register/op_def_registry.h"
#include "moe_gemm_tiling.h"

namespace ops {

static OpAICoreConfig BaseConfig()
{
    OpAICoreConfig config;
    config.DynamicCompileStaticFlag(true)
        .DynamicFormatFlag(false)
        .DynamicRankSupportFlag(true)
        .DynamicShapeSupportFlag(true)
        .NeedCheckSupportFlag(false)
        .PrecisionReduceFlag(true)
        .ExtendCfgInfo("aclnnSupport.value", "support_aclnn");
    return config;
}

// Ascend 950: the dequant keys 0-2 plus the MX keys 11 / 12 (op_kernel/moe_gemm.cpp compiles those for dav-3510
// only), and two more dtype combinations, so callers may pass the FP8 weights and their scales with their real
// dtypes (float8_e4m3fn / float8_e8m0) instead of byte views: same bytes, same shapes, same kernel. FP4 stays a
// byte view (int8 [N, K/2]): a DT_FLOAT4_E2M1 tensor would count elements, not bytes, in its shape.
static OpAICoreConfig Ascend950Config()
{
    const auto nd = ge::FORMAT_ND;
    OpAICoreConfig config = BaseConfig();
    config.Input("x").ParamType(REQUIRED)
        .DataType({ge::DT_BF16, ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT16})
        .Format({nd, nd, nd, nd, nd, nd}).AutoContiguous();
    config.Input("weight").ParamType(DYNAMIC)
        .DataType({ge::DT_UINT8, ge::DT_UINT8, ge::DT_BF16, ge::DT_FLOAT16, ge::DT_FLOAT8_E4M3FN,
                   ge::DT_FLOAT8_E4M3FN})
        .Format({nd, nd, nd, nd, nd, nd});
    config.Input("scale").ParamType(DYNAMIC)
        .DataType({ge::DT_UINT8, ge::DT_UINT8, ge::DT_UINT8, ge::DT_UINT8, ge::DT_FLOAT8_E8M0, ge::DT_FLOAT8_E8M0})
        .Format({nd, nd, nd, nd, nd, nd});
    config.Input("group_list").ParamType(REQUIRED)
        .DataType({ge::DT_INT64, ge::DT_INT64, ge::DT_INT64, ge::DT_INT64, ge::DT_INT64, ge::DT_INT64})
        .Format({nd, nd, nd, nd, nd, nd});
    config.Output("y").ParamType(REQUIRED)
        .DataType({ge::DT_BF16, ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT16})
        .Format({nd, nd, nd, nd, nd, nd});
    return config;
}

class MoeGemm : public OpDef {
public:
    explicit MoeGemm(const char *name) : OpDef(name)
    {
        // default combinations (A2 / A3): packed weights and UE8M0 scales as bytes, or bf16 / fp16 weights
        this->Input("x").ParamType(REQUIRED)
            .DataType({ge::DT_BF16, ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT16})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND}).AutoContiguous();
        this->Input("weight").ParamType(DYNAMIC)
            .DataType({ge::DT_UINT8, ge::DT_UINT8, ge::DT_BF16, ge::DT_FLOAT16})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND});
        this->Input("scale").ParamType(DYNAMIC)
            .DataType({ge::DT_UINT8, ge::DT_UINT8, ge::DT_UINT8, ge::DT_UINT8})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND});
        this->Input("group_list").ParamType(REQUIRED)
            .DataType({ge::DT_INT64, ge::DT_INT64, ge::DT_INT64, ge::DT_INT64})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND});
        this->Output("y").ParamType(REQUIRED)
            .DataType({ge::DT_BF16, ge::DT_FLOAT16, ge::DT_BF16, ge::DT_FLOAT16})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND, ge::FORMAT_ND});
        this->Attr("weight_fmt").AttrType(REQUIRED).Int(2);
        this->Attr("scale_block_n").AttrType(REQUIRED).Int(1);
        this->Attr("scale_block_k").AttrType(REQUIRED).Int(32);

        this->SetInferShape(ge::InferShapeMoeGemm).SetInferDataType(ge::InferDataTypeMoeGemm);
        this->AICore().SetTiling(optiling::TilingMoeGemm);
        // A2/A3: vector-unit dequantisation to bf16 before the cube (no FP8/FP4 cube there);
        // 950: the dequant path too, plus the native MX path when the caller asks for it (weight_fmt 11 / 12).
        OpAICoreConfig config = BaseConfig();
        this->AICore().AddConfig("ascend910b", config);
        this->AICore().AddConfig("ascend910_93", config);
        this->AICore().AddConfig("ascend950", Ascend950Config());
    }
};

OP_ADD(MoeGemm);

}  // namespace ops
