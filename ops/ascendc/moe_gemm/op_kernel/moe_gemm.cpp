// MoeGemm kernel entry (KERNEL_TYPE_MIX_AIC_1_2). Inputs in OpDef order: x, weight (list), scale (list),
// group_list, then y, workspace, tiling. Tiling keys (= the weight_fmt attribute): 0 bf16, 1 FP8, 2 FP4 weights
// with vector-unit dequantisation (moe_gemm_kernel.h; A2/A3, also valid on 950); 11 FP8 / 12 FP4 on the native
// MX path (moe_gemm_mx_kernel.h), compiled only for the 950 (dav-3510): MX types and the MX cube exist only
// there, and the host tiling never hands out 11 / 12 elsewhere. Evidence: written only (no CANN here).
#include "kernel_operator.h"
#include "moe_gemm_kernel.h"
#if defined(__NPU_ARCH__) && (__NPU_ARCH__ == 3510)
#include "moe_gemm_mx_kernel.h"
#endif

using namespace AscendC;

extern "C" __global__ __aicore__ void moe_gemm(GM_ADDR x, GM_ADDR weight, GM_ADDR scale, GM_ADDR groupList,
                                               GM_ADDR y, GM_ADDR workspace, GM_ADDR tiling)
{
    GET_TILING_DATA(td, tiling);
    KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
    GM_ADDR user = GetUserWorkspace(workspace);
    if (TILING_KEY_IS(0)) {
        ascend_v4::MoeGemmKernel<DTYPE_X, ascend_v4::FMT_BF16> op;
        op.Init(x, weight, scale, groupList, y, user, &td);
        op.Process();
    } else if (TILING_KEY_IS(1)) {
        ascend_v4::MoeGemmKernel<DTYPE_X, ascend_v4::FMT_FP8> op;
        op.Init(x, weight, scale, groupList, y, user, &td);
        op.Process();
    } else if (TILING_KEY_IS(2)) {
        ascend_v4::MoeGemmKernel<DTYPE_X, ascend_v4::FMT_FP4> op;
        op.Init(x, weight, scale, groupList, y, user, &td);
        op.Process();
    }
#if defined(__NPU_ARCH__) && (__NPU_ARCH__ == 3510)
    else if (TILING_KEY_IS(11)) {
        ascend_v4::MoeGemmMxKernel<DTYPE_X, ascend_v4::FMT_FP8> op;
        op.Init(x, weight, scale, groupList, y, user, &td);
        op.Process();
    } else if (TILING_KEY_IS(12)) {
        ascend_v4::MoeGemmMxKernel<DTYPE_X, ascend_v4::FMT_FP4> op;
        op.Init(x, weight, scale, groupList, y, user, &td);
        op.Process();
    }
#endif
}
