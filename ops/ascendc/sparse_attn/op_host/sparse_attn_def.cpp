// OpDef of SparseAttn (A2/A3: BF16/FP16 KV) and SparseAttnKvQuant (950: FP8 cache entries).
// Generated API: aclnnSparseAttn(q, kv, idx, sink, scale, out) / aclnnSparseAttnKvQuant(q, kv, idx, sink, scale,
// rope_dim, out). Semantics = ops/reference/attention.py::sparse_attn (model-spec.md §4.6); the KvQuant kv is
// uint8 [N, entry] packed entries = ops/reference/kv_fp8.py (§10.2): [nope e4m3 | rope bf16 LE | UE8M0 per 64
// nope dims, 0-padded to 8 B], 584 B for D = 512, rope_dim = 64.
// Evidence: written only (no CANN here). See docs/npu.md.
#include "register/op_def_registry.h"
#include "sparse_attn_tiling.h"

namespace ops {

// opFile: the kernel entry file op_kernel/<opFile>.cpp of each op. Each op has its own file: the FP8 code of
// SparseAttnKvQuant must not be compiled for the A2/A3 SoCs SparseAttn is built for. ExtendCfgInfo("opFile.value",
// ...) as in hicann/ops-nn activation/threshold_grad_v2_d/op_host/threshold_grad_v2_d_def.cpp; OpAICoreConfig::
// ExtendCfgInfo: asc-devkit docs/zh/api/Utils-API/原型注册与管理/OpAICoreConfig/ExtendCfgInfo-284.md (that page
// documents only aclnnSupport.value; opFile.value is taken from the ops-nn op defs).
static OpAICoreConfig MakeConfig(const char *opFile)
{
    OpAICoreConfig config;
    config.DynamicCompileStaticFlag(true)
        .DynamicFormatFlag(false)
        .DynamicRankSupportFlag(true)
        .DynamicShapeSupportFlag(true)
        .NeedCheckSupportFlag(false)
        .PrecisionReduceFlag(true)
        .ExtendCfgInfo("opFile.value", opFile)
        .ExtendCfgInfo("aclnnSupport.value", "support_aclnn");
    return config;
}

class SparseAttn : public OpDef {
public:
    explicit SparseAttn(const char *name) : OpDef(name)
    {
        this->Input("q").ParamType(REQUIRED).DataType({ge::DT_BF16, ge::DT_FLOAT16})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND}).AutoContiguous();
        this->Input("kv").ParamType(REQUIRED).DataType({ge::DT_BF16, ge::DT_FLOAT16})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND}).AutoContiguous();
        this->Input("idx").ParamType(REQUIRED).DataType({ge::DT_INT32, ge::DT_INT32})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND}).AutoContiguous();
        this->Input("sink").ParamType(REQUIRED).DataType({ge::DT_FLOAT, ge::DT_FLOAT})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND});
        this->Output("out").ParamType(REQUIRED).DataType({ge::DT_BF16, ge::DT_FLOAT16})
            .Format({ge::FORMAT_ND, ge::FORMAT_ND});
        this->Attr("scale").AttrType(REQUIRED).Float(1.0f);

        this->SetInferShape(ge::InferShapeSparseAttn).SetInferDataType(ge::InferDataTypeSparseAttn);
        this->AICore().SetTiling(optiling::TilingSparseAttn);
        OpAICoreConfig config = MakeConfig("sparse_attn");  // op_kernel/sparse_attn.cpp: no fp8 code
        this->AICore().AddConfig("ascend910b", config);
        this->AICore().AddConfig("ascend910_93", config);
        this->AICore().AddConfig("ascend950", config);
    }
};

class SparseAttnKvQuant : public OpDef {
public:
    explicit SparseAttnKvQuant(const char *name) : OpDef(name)
    {
        this->Input("q").ParamType(REQUIRED).DataType({ge::DT_BF16}).Format({ge::FORMAT_ND}).AutoContiguous();
        // raw entry bytes: the e4m3, bf16 and UE8M0 parts share one row, so the tensor is uint8
        this->Input("kv").ParamType(REQUIRED).DataType({ge::DT_UINT8}).Format({ge::FORMAT_ND}).AutoContiguous();
        this->Input("idx").ParamType(REQUIRED).DataType({ge::DT_INT32}).Format({ge::FORMAT_ND}).AutoContiguous();
        this->Input("sink").ParamType(REQUIRED).DataType({ge::DT_FLOAT}).Format({ge::FORMAT_ND});
        this->Output("out").ParamType(REQUIRED).DataType({ge::DT_BF16}).Format({ge::FORMAT_ND});
        this->Attr("scale").AttrType(REQUIRED).Float(1.0f);
        this->Attr("rope_dim").AttrType(REQUIRED).Int(64);  // trailing bf16 dims of each entry

        this->SetInferShape(ge::InferShapeSparseAttn).SetInferDataType(ge::InferDataTypeSparseAttn);
        this->AICore().SetTiling(optiling::TilingSparseAttnKvQuant);
        // FP8 exists only on 950 (ascend-notes §0.1): op_kernel/sparse_attn_kv_quant.cpp, compiled for 950 alone
        this->AICore().AddConfig("ascend950", MakeConfig("sparse_attn_kv_quant"));
    }
};

OP_ADD(SparseAttn);
OP_ADD(SparseAttnKvQuant);

}  // namespace ops
