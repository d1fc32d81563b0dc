// SparseAttn kernel entry (KERNEL_TYPE_MIX_AIC_1_2), built for ascend910b, ascend910_93 and ascend950: BF16 /
// FP16 KV only. The FP8-KV entry is op_kernel/sparse_attn_kv_quant.cpp (OpDef SparseAttnKvQuant, 950 only), so
// no fp8 code is compiled for A2/A3. One GM pointer per OpDef input/output in declaration order, then
// workspace, then tiling. Tiling keys (tiling_rules.h): 0 bf16/fp16 KV, +10 when the index list is split across
// cores (partials + combine pass). Evidence: written only (no CANN here).
#include "kernel_operator.h"
#include "sparse_attn_kernel.h"

using namespace AscendC;

// REGIST_MATMUL_OBJ sits here, in the scope that also runs Process(), and before Init()'s InitBuffer calls:
// on the AIC it runs the Matmul server loop and returns from this function; on the AIV it declares a local
// KfcCommClient whose destructor posts SERVICE_QUIT to the AIC, so that object must outlive every Matmul call
// (asc-devkit impl/adv_api/detail/kfc/kfc_register_obj.h REGIST_CUBE_OBJ, include/adv_api/matmul/matmul_intf.h,
// impl/basic_api/dav_c220/kfc/kfc_comm_client.h ~KfcCommClient; docs .../Matmul-Kernel侧接口/REGIST_MATMUL_OBJ.md:
// "在分离模式中，本接口必须在InitBuffer接口前调用").
extern "C" __global__ __aicore__ void sparse_attn(GM_ADDR q, GM_ADDR kv, GM_ADDR idx, GM_ADDR sink, GM_ADDR out,
                                                  GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(td, tiling);
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    GM_ADDR user = GetUserWorkspace(workspace);
    TPipe pipe;
    if (TILING_KEY_IS(0)) {
        ascend_v4::SparseAttnKernel<DTYPE_Q, ascend_v4::KvRowCopy, false> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm1, &td.mm1Tiling, op.mm2, &td.mm2Tiling);
        op.Init(&pipe, q, kv, idx, sink, out, user, &td);
        op.Process();
    } else if (TILING_KEY_IS(10)) {
        ascend_v4::SparseAttnKernel<DTYPE_Q, ascend_v4::KvRowCopy, true> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm1, &td.mm1Tiling, op.mm2, &td.mm2Tiling);
        op.Init(&pipe, q, kv, idx, sink, out, user, &td);
        op.Process();
    }
}
