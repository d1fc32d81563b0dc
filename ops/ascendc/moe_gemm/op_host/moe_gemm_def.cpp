// OpDef of MoeGemm: grouped GEMM y[M, N] = x[M, K] . W_g[N, K]^T over row groups (counts in group_list), one
// weight + UE8M0 scale per group (dynamic inputs -> aclTensorList). weight_fmt: 0 bf16, 1 FP8 e4m3 bytes
// (scales per 128x128), 2 FP4 e2m1 packed two per byte, low nibble first (scales per 1x32).
// Generated API: aclnnMoeGemm(x, weight, scale, group_list, weight_fmt, scale_block_n, scale_block_k, y).
// Golden: ops/reference/gemm.py (quant_gemm per group). Evidence: written only.
#include "register/op_def_registry.h"
#include "moe_gemm_tiling.h"

namespace ops {

class MoeGemm : public OpDef {
public:
    explicit MoeGemm(const char *name) : OpDef(name)
    {
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
        OpAICoreConfig config;
        config.DynamicCompileStaticFlag(true)
            .DynamicFormatFlag(false)
            .DynamicRankSupportFlag(true)
            .DynamicShapeSupportFlag(true)
            .NeedCheckSupportFlag(false)
            .PrecisionReduceFlag(true)
            .ExtendCfgInfo("aclnnSupport.value", "support_aclnn");
        // A2/A3: vector-unit dequantisation to bf16 before the cube (no FP8/FP4 cube there);
        // 950: the same OpDef, the tiling picks the native MX path (tiling key + 10).
        this->AICore().AddConfig("ascend910b", config);
        this->AICore().AddConfig("ascend910_93", config);
        this->AICore().AddConfig("ascend950", config);
    }
};

OP_ADD(MoeGemm);

}  // namespace ops
