// SparseAttnKvQuant kernel entry (KERNEL_TYPE_MIX_AIC_1_2): FP8 KV-cache entries, Ascend 950 only. This is the
// op's own kernel file (the build compiles op_kernel/<snake_case op name>.cpp per OpDef; op_host/
// sparse_attn_def.cpp pins it with ExtendCfgInfo("opFile.value", "sparse_attn_kv_quant")) and the only file that
// includes the FP8 decoder, so the fp8 Cast is compiled for ascend950 alone (the OpDef registers no other SoC).
// kv: uint8 [N, entryBytes] cache entries (layout: sparse_attn_kv_fp8.h). Tiling keys (tiling_rules.h): 1, +10
// when the index list is split across cores. Evidence: written only (no CANN here).
#include "kernel_operator.h"
#include "sparse_attn_kernel.h"
#include "sparse_attn_kv_fp8.h"

using namespace AscendC;

// REGIST_MATMUL_OBJ in the entry scope, before Init(): see sparse_attn.cpp.
extern "C" __global__ __aicore__ void sparse_attn_kv_quant(GM_ADDR q, GM_ADDR kv, GM_ADDR idx, GM_ADDR sink,
                                                           GM_ADDR out, GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(td, tiling);
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    GM_ADDR user = GetUserWorkspace(workspace);
    TPipe pipe;
    if (TILING_KEY_IS(1)) {
        ascend_v4::SparseAttnKernel<bfloat16_t, ascend_v4::KvFp8Decoder, false> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm1, &td.mm1Tiling, op.mm2, &td.mm2Tiling);
        op.Init(&pipe, q, kv, idx, sink, out, user, &td);
        op.Process();
    } else if (TILING_KEY_IS(11)) {
        ascend_v4::SparseAttnKernel<bfloat16_t, ascend_v4::KvFp8Decoder, true> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm1, &td.mm1Tiling, op.mm2, &td.mm2Tiling);
        op.Init(&pipe, q, kv, idx, sink, out, user, &td);
        op.Process();
    }
}
