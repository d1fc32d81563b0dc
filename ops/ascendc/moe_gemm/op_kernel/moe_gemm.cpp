// MoeGemm kernel entry (KERNEL_TYPE_MIX_AIC_1_2). Inputs in OpDef order: x, weight (list), scale (list),
// group_list, then y, workspace, tiling. Tiling keys (= the weight_fmt attribute): 0 bf16, 1 FP8, 2 FP4 weights
// with vector-unit dequantisation by table lookup (moe_gemm_kernel.h; no fp8 / fp4 data type or Cast, so it
// builds for A2/A3 and 950 alike); 11 FP8 / 12 FP4 on the native MX path (moe_gemm_mx_kernel.h), compiled only
// for the 950 (dav-3510): MX types and the MX cube exist only there, and the host tiling never hands out 11 / 12
// elsewhere.
// Each branch registers the Matmul object in this scope, before Init's InitBuffer calls, as the asc-devkit
// matmul samples do (e.g. examples/01_simd_cpp_api/04_advanced_api/00_matmul/matmul_quant/matmul_quant.asc).
// REGIST_MATMUL_OBJ (include/adv_api/matmul/matmul_intf.h -> REGIST_CUBE_OBJ in
// impl/adv_api/detail/kfc/kfc_register_obj.h) runs the cube server loop on the AIC and returns from here; on the
// AIV it declares a local KfcCommClient whose destructor (impl/basic_api/dav_c220/kfc/kfc_comm_client.h,
// dav_3510/kfc/kfc_comm_client.h) posts SERVICE_QUIT, so that client must outlive Process().
// Evidence: written only (no CANN here).
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
        TPipe pipe;
        ascend_v4::MoeGemmKernel<DTYPE_X, ascend_v4::FMT_BF16> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm, &td.mmTiling);
        op.Init(x, weight, scale, groupList, y, user, &td, &pipe);
        op.Process();
    } else if (TILING_KEY_IS(1)) {
        TPipe pipe;
        ascend_v4::MoeGemmKernel<DTYPE_X, ascend_v4::FMT_FP8> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm, &td.mmTiling);
        op.Init(x, weight, scale, groupList, y, user, &td, &pipe);
        op.Process();
    } else if (TILING_KEY_IS(2)) {
        TPipe pipe;
        ascend_v4::MoeGemmKernel<DTYPE_X, ascend_v4::FMT_FP4> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm, &td.mmTiling);
        op.Init(x, weight, scale, groupList, y, user, &td, &pipe);
        op.Process();
    }
#if defined(__NPU_ARCH__) && (__NPU_ARCH__ == 3510)
    else if (TILING_KEY_IS(11)) {
        TPipe pipe;
        ascend_v4::MoeGemmMxKernel<DTYPE_X, ascend_v4::FMT_FP8> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm, &td.mmTiling);
        op.Init(x, weight, scale, groupList, y, user, &td, &pipe);
        op.Process();
    } else if (TILING_KEY_IS(12)) {
        TPipe pipe;
        ascend_v4::MoeGemmMxKernel<DTYPE_X, ascend_v4::FMT_FP4> op;
        REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.mm, &td.mmTiling);
        op.Init(x, weight, scale, groupList, y, user, &td, &pipe);
        op.Process();
    }
#endif
}
