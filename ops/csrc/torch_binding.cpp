// Torch binding of the ascend-v4 Ascend C ops: defines ascend_v4::npu_sparse_attn, ascend_v4::npu_sparse_attn_fp8
// and ascend_v4::npu_moe_gemm, registers their PrivateUse1 (NPU) kernels, which launch the generated aclnn API
// through EXEC_NPU_CMD, and their Meta kernels (shape/dtype only) so torch.compile and ACL-graph capture can
// trace them.
//
// Built only where torch_npu + CANN exist (tools/build_npu_ops.sh -> ops/_lib/libascend_v4_npu.so), loaded
// lazily by ops/npu/_loader.py. The public ops (ascend_v4::sparse_attn, ::moe_experts, ::quant_gemm) are
// defined in Python (ops/_library.py) with their own fake impls; their PrivateUse1 kernels are Python
// (ops/npu/kernels.py; ascend_v4::sparse_attn_fp8: ops/npu/sparse_attn_fp8.py) and call these. The schema
// strings must equal ops/npu/_loader.py BINDING_SCHEMAS (tests/unit/npu/test_hygiene.py checks it) and, for
// npu_sparse_attn_fp8, ops/npu/sparse_attn_fp8.py BINDING_SCHEMA (tests/unit/ops/test_npu_sparse_attn_fp8.py).
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
                " differs from q ", q.scalar_type(), " (FP8 cache entries go to npu_sparse_attn_fp8, 950 only)");
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

// ------------------------------------------------------------------------------------------------ sparse_attn_fp8
// kv holds packed FP8 cache entries (ops/reference/kv_fp8.py, model-spec.md §10.2), one row of bytes each:
// [nope e4m3 (1 B/dim) | rope bf16 little-endian (2 B/dim) | one UE8M0 per 64 nope dims, 0-padded to 8 B];
// 584 B for D = 512, rope_dim = 64. The kernel (SparseAttnKvQuant, 950 only) decodes them while gathering.
constexpr int64_t KV_SCALE_BLOCK = 64;
constexpr int64_t KV_ENTRY_ALIGN = 8;

int64_t KvFp8EntryBytes(int64_t headDim, int64_t ropeDim)
{
    const int64_t nope = headDim - ropeDim;
    const int64_t scales = nope / KV_SCALE_BLOCK;
    return nope + 2 * ropeDim + (scales + KV_ENTRY_ALIGN - 1) / KV_ENTRY_ALIGN * KV_ENTRY_ALIGN;
}

void CheckSparseAttnFp8(const at::Tensor &q, const at::Tensor &kv, const at::Tensor &idx, const at::Tensor &sink,
                        int64_t ropeDim)
{
    TORCH_CHECK(q.dim() == 3, "npu_sparse_attn_fp8: q must be [T, H, D], got ", q.sizes());
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "npu_sparse_attn_fp8: q must be bf16, got ", q.scalar_type());
    const int64_t D = q.size(2);
    TORCH_CHECK(ropeDim >= 0 && ropeDim < D && (D - ropeDim) % KV_SCALE_BLOCK == 0 && ropeDim % 16 == 0,
                "npu_sparse_attn_fp8: rope_dim ", ropeDim, " must be a multiple of 16 that leaves a nope part "
                "D - rope_dim that is a positive multiple of 64 (D=", D, ")");
    const int64_t entry = KvFp8EntryBytes(D, ropeDim);
    TORCH_CHECK(kv.dim() == 2 && kv.scalar_type() == at::kByte && kv.size(1) == entry,
                "npu_sparse_attn_fp8: kv must be uint8 [N, ", entry, "] cache entries, got ", kv.scalar_type(), " ",
                kv.sizes());
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == q.size(0) && idx.scalar_type() == at::kInt,
                "npu_sparse_attn_fp8: idx must be int32 [T=", q.size(0), ", K], got ", idx.scalar_type(), " ",
                idx.sizes());
    TORCH_CHECK(sink.dim() == 1 && sink.size(0) == q.size(1) && sink.scalar_type() == at::kFloat,
                "npu_sparse_attn_fp8: sink must be fp32 [H=", q.size(1), "]");
    TORCH_CHECK(q.is_contiguous() && kv.is_contiguous() && idx.is_contiguous(),
                "npu_sparse_attn_fp8: q, kv and idx must be contiguous");
}

at::Tensor NpuSparseAttnFp8(const at::Tensor &q, const at::Tensor &kv, const at::Tensor &idx, const at::Tensor &sink,
                            double scale, int64_t ropeDim)
{
    CheckSparseAttnFp8(q, kv, idx, sink, ropeDim);
    at::Tensor out = at::empty_like(q);
    // aclnnSparseAttnKvQuantGetWorkspaceSize(q, kv, idx, sink, scale, ropeDim, out, &ws, &executor)
    EXEC_NPU_CMD(aclnnSparseAttnKvQuant, q, kv, idx, sink, scale, ropeDim, out);
    return out;
}

at::Tensor NpuSparseAttnFp8Meta(const at::Tensor &q, const at::Tensor &kv, const at::Tensor &idx,
                                const at::Tensor &sink, double scale, int64_t ropeDim)
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
    // 11 / 12: the same weight formats (fmt % 10) through the Ascend 950 native MX kernel (ops/npu/kernels.py).
    const int64_t base = fmt % 10;
    TORCH_CHECK((fmt < 10 || fmt == 11 || fmt == 12) && (base == FMT_FP8 || base == FMT_FP4 || base == FMT_BF16),
                "npu_moe_gemm: weight_fmt ", fmt, " (0-2, or 11/12 for the 950 MX path)");
    const int64_t K = x.size(1);
    const int64_t N = weight[0].size(0);
    const int64_t packedK = base == FMT_FP4 ? K / 2 : K;
    for (size_t g = 0; g < weight.size(); ++g) {
        TORCH_CHECK(weight[g].dim() == 2 && weight[g].size(0) == N && weight[g].size(1) == packedK,
                    "npu_moe_gemm: weight ", g, " must be [", N, ", ", packedK, "], got ", weight[g].sizes());
        if (base != FMT_BF16) {
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
    m.def("npu_sparse_attn_fp8(Tensor q, Tensor kv, Tensor idx, Tensor sink, float scale, int rope_dim) -> Tensor");
    m.def("npu_moe_gemm(Tensor x, Tensor[] weight, Tensor[] scale, Tensor group_list, int weight_fmt, "
        "int scale_block_n, int scale_block_k, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(ascend_v4, PrivateUse1, m)
{
    m.impl("npu_sparse_attn", TORCH_FN(ascend_v4::NpuSparseAttn));
    m.impl("npu_sparse_attn_fp8", TORCH_FN(ascend_v4::NpuSparseAttnFp8));
    m.impl("npu_moe_gemm", TORCH_FN(ascend_v4::NpuMoeGemm));
}

TORCH_LIBRARY_IMPL(ascend_v4, Meta, m)
{
    m.impl("npu_sparse_attn", TORCH_FN(ascend_v4::NpuSparseAttnMeta));
    m.impl("npu_sparse_attn_fp8", TORCH_FN(ascend_v4::NpuSparseAttnFp8Meta));
    m.impl("npu_moe_gemm", TORCH_FN(ascend_v4::NpuMoeGemmMeta));
}
