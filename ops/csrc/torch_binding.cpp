// Torch binding of the ascend-v4 Ascend C ops: defines ascend_v4::npu_sparse_attn and ascend_v4::npu_moe_gemm,
// registers their PrivateUse1 (NPU) kernels, which launch the generated aclnn API through EXEC_NPU_CMD, and
// their Meta kernels (shape/dtype only) so torch.compile and ACL-graph capture can trace them.
//
// Built only where torch_npu + CANN exist (tools/build_npu_ops.sh -> ops/_lib/libascend_v4_npu.so), loaded
// lazily by ops/npu/_loader.py. The public ops (ascend_v4::sparse_attn, ::moe_experts, ::quant_gemm) are
// defined in Python (ops/_library.py) with their own fake impls; their PrivateUse1 kernels are Python
// (ops/npu/kernels.py) and call these two. The schema strings must equal ops/npu/_loader.py BINDING_SCHEMAS
// (tests/unit/npu/test_hygiene.py checks it).
//
// EXEC_NPU_CMD (torch_npu include/third_party/op-plugin/op_plugin/utils/op_api_common.h) resolves
// aclnn<Op>GetWorkspaceSize / aclnn<Op> with dlsym (ASCEND_CUSTOM_OPP_PATH vendors first), converts at::Tensor,
// at::TensorList, scalars and at::ScalarType, allocates the workspace and enqueues on the current NPU stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_plugin/utils/op_api_common.h"

namespace ascend_v4 {
namespace {

constexpr int64_t FMT_BF16 = 0;  // = tiling_rules.h WeightFmt
constexpr int64_t FMT_FP8 = 1;
constexpr int64_t FMT_FP4 = 2;

// ------------------------------------------------------------------------------------------------ sparse_attn
void CheckSparseAttn(const at::Tensor &q, const at::Tensor &kv, const at::Tensor &idx, const at::Tensor &sink)
{
    TORCH_CHECK(q.dim() == 3, "npu_sparse_attn: q must be [T, H, D], got ", q.sizes());
    TORCH_CHECK(kv.dim() == 2 && kv.size(1) == q.size(2), "npu_sparse_attn: kv must be [N, D=", q.size(2), "], got ",
                kv.sizes());
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == q.size(0), "npu_sparse_attn: idx must be [T=", q.size(0),
                ", K], got ", idx.sizes());
    TORCH_CHECK(idx.scalar_type() == at::kInt, "npu_sparse_attn: idx must be int32, got ", idx.scalar_type());
    TORCH_CHECK(sink.dim() == 1 && sink.size(0) == q.size(1) && sink.scalar_type() == at::kFloat,
                "npu_sparse_attn: sink must be fp32 [H=", q.size(1), "]");
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
                "npu_sparse_attn: q must be bf16/fp16, got ", q.scalar_type());
    TORCH_CHECK(kv.scalar_type() == q.scalar_type(), "npu_sparse_attn: kv dtype ", kv.scalar_type(),
                " differs from q ", q.scalar_type(), " (the FP8-KV variant is aclnnSparseAttnKvQuant, 950 only)");
    TORCH_CHECK(q.size(2) % 64 == 0, "npu_sparse_attn: head dim must be a multiple of 64, got ", q.size(2));
    TORCH_CHECK(q.is_contiguous() && kv.is_contiguous() && idx.is_contiguous(),
                "npu_sparse_attn: q, kv and idx must be contiguous");
}

at::Tensor NpuSparseAttn(const at::Tensor &q, const at::Tensor &kv, const at::Tensor &idx, const at::Tensor &sink,
                         double scale)
{
    CheckSparseAttn(q, kv, idx, sink);
    at::Tensor out = at::empty_like(q);
    // aclnnSparseAttnGetWorkspaceSize(q, kv, idx, sink, scale, out, &ws, &executor), generated from the OpDef
    EXEC_NPU_CMD(aclnnSparseAttn, q, kv, idx, sink, scale, out);
    return out;
}

at::Tensor NpuSparseAttnMeta(const at::Tensor &q, const at::Tensor &kv, const at::Tensor &idx,
                             const at::Tensor &sink, double scale)
{
    return at::empty_like(q);
}

// ------------------------------------------------------------------------------------------------ moe_gemm
void CheckMoeGemm(const at::Tensor &x, const at::TensorList &weight, const at::TensorList &scale,
                  const at::Tensor &groupList, int64_t fmt, int64_t bn, int64_t bk)
{
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "npu_moe_gemm: x must be a contiguous [M, K]");
    TORCH_CHECK(!weight.empty() && weight.size() == scale.size(), "npu_moe_gemm: weight and scale lists differ");
    TORCH_CHECK(groupList.dim() == 1 && groupList.size(0) == static_cast<int64_t>(weight.size()) &&
                    groupList.scalar_type() == at::kLong,
                "npu_moe_gemm: group_list must be int64 [E=", weight.size(), "] row counts");
    TORCH_CHECK(fmt == FMT_FP8 || fmt == FMT_FP4 || fmt == FMT_BF16, "npu_moe_gemm: weight_fmt ", fmt);
    const int64_t K = x.size(1);
    const int64_t N = weight[0].size(0);
    const int64_t packedK = fmt == FMT_FP4 ? K / 2 : K;
    for (size_t g = 0; g < weight.size(); ++g) {
        TORCH_CHECK(weight[g].dim() == 2 && weight[g].size(0) == N && weight[g].size(1) == packedK,
                    "npu_moe_gemm: weight ", g, " must be [", N, ", ", packedK, "], got ", weight[g].sizes());
        if (fmt != FMT_BF16) {
            TORCH_CHECK(weight[g].element_size() == 1 && scale[g].element_size() == 1,
                        "npu_moe_gemm: packed weights and UE8M0 scales are passed as uint8/int8 bytes");
            TORCH_CHECK(scale[g].size(0) == (N + bn - 1) / bn && scale[g].size(1) == (K + bk - 1) / bk,
                        "npu_moe_gemm: scale ", g, " must be [ceil(N/", bn, "), ceil(K/", bk, ")]");
        }
    }
    TORCH_CHECK(N % 16 == 0 && K % 32 == 0, "npu_moe_gemm: N % 16 and K % 32 must be 0, got N=", N, " K=", K);
}

at::Tensor NpuMoeGemm(const at::Tensor &x, at::TensorList weight, at::TensorList scale, const at::Tensor &groupList,
                      int64_t weightFmt, int64_t scaleBlockN, int64_t scaleBlockK, at::ScalarType outDtype)
{
    CheckMoeGemm(x, weight, scale, groupList, weightFmt, scaleBlockN, scaleBlockK);
    // Rows past sum(group_list) belong to no group (the phantom expert of ops/npu/kernels.py): the kernel
    // never writes them, so they must start at zero.
    at::Tensor y = at::zeros({x.size(0), weight[0].size(0)}, x.options().dtype(outDtype));
    EXEC_NPU_CMD(aclnnMoeGemm, x, weight, scale, groupList, weightFmt, scaleBlockN, scaleBlockK, y);
    return y;
}

at::Tensor NpuMoeGemmMeta(const at::Tensor &x, at::TensorList weight, at::TensorList scale,
                          const at::Tensor &groupList, int64_t weightFmt, int64_t scaleBlockN, int64_t scaleBlockK,
                          at::ScalarType outDtype)
{
    return at::empty({x.size(0), weight[0].size(0)}, x.options().dtype(outDtype));
}

}  // namespace
}  // namespace ascend_v4

// FRAGMENT: the namespace ascend_v4 is also defined from Python (ops/_library.py).
TORCH_LIBRARY_FRAGMENT(ascend_v4, m)
{
    m.def("npu_sparse_attn(Tensor q, Tensor kv, Tensor idx, Tensor sink, float scale) -> Tensor");
    m.def("npu_moe_gemm(Tensor x, Tensor[] weight, Tensor[] scale, Tensor group_list, int weight_fmt, "
        "int scale_block_n, int scale_block_k, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(ascend_v4, PrivateUse1, m)
{
    m.impl("npu_sparse_attn", TORCH_FN(ascend_v4::NpuSparseAttn));
    m.impl("npu_moe_gemm", TORCH_FN(ascend_v4::NpuMoeGemm));
}

TORCH_LIBRARY_IMPL(ascend_v4, Meta, m)
{
    m.impl("npu_sparse_attn", TORCH_FN(ascend_v4::NpuSparseAttnMeta));
    m.impl("npu_moe_gemm", TORCH_FN(ascend_v4::NpuMoeGemmMeta));
}
