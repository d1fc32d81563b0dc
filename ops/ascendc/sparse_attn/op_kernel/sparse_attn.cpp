// SparseAttn kernel entry (KERNEL_TYPE_MIX_AIC_1_2). One GM pointer per OpDef input/output in declaration
// order, then workspace, then tiling. Tiling keys (tiling_rules.h): 0 bf16/fp16 KV, 1 FP8 KV (950), +10 when
// the index list is split across cores (partials + combine pass). Evidence: written only (no CANN here).
#include "kernel_operator.h"
#include "sparse_attn_kernel.h"

using namespace AscendC;

extern "C" __global__ __aicore__ void sparse_attn(GM_ADDR q, GM_ADDR kv, GM_ADDR idx, GM_ADDR sink, GM_ADDR out,
                                                  GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(td, tiling);
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    GM_ADDR user = GetUserWorkspace(workspace);
    if (TILING_KEY_IS(0)) {
        ascend_v4::SparseAttnKernel<DTYPE_Q, false, false> op;
        op.Init(q, kv, idx, sink, out, user, &td);
        op.Process();
    } else if (TILING_KEY_IS(10)) {
        ascend_v4::SparseAttnKernel<DTYPE_Q, false, true> op;
        op.Init(q, kv, idx, sink, out, user, &td);
        op.Process();
    }
}

// kv: uint8 [N, entryBytes] FP8 cache entries (layout in sparse_attn_kernel.h DequantRow).
extern "C" __global__ __aicore__ void sparse_attn_kv_quant(GM_ADDR q, GM_ADDR kv, GM_ADDR idx, GM_ADDR sink,
                                                           GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(td, tiling);
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    GM_ADDR user = GetUserWorkspace(workspace);
    if (TILING_KEY_IS(1)) {
        ascend_v4::SparseAttnKernel<bfloat16_t, true, false> op;
        op.Init(q, kv, idx, sink, out, user, &td);
        op.Process();
    } else if (TILING_KEY_IS(11)) {
        ascend_v4::SparseAttnKernel<bfloat16_t, true, true> op;
        op.Init(q, kv, idx, sink, out, user, &td);
        op.Process();
    }
}
