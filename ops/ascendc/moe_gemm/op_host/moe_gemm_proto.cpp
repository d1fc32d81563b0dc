// InferShape / InferDataType of MoeGemm: y = [x.rows, weight[0].rows], dtype of x. Evidence: written only.
#include "register/op_def_registry.h"
#include "moe_gemm_tiling.h"

namespace ge {

ge::graphStatus InferShapeMoeGemm(gert::InferShapeContext *context)
{
    const gert::Shape *x = context->GetInputShape(0);
    const gert::Shape *w0 = context->GetDynamicInputShape(1, 0);  // first tensor of the weight list
    gert::Shape *y = context->GetOutputShape(0);
    if (x == nullptr || w0 == nullptr || y == nullptr || x->GetDimNum() != 2 || w0->GetDimNum() != 2) {
        return ge::GRAPH_FAILED;
    }
    y->SetDimNum(2);
    y->SetDim(0, x->GetDim(0));
    y->SetDim(1, w0->GetDim(0));
    return ge::GRAPH_SUCCESS;
}

ge::graphStatus InferDataTypeMoeGemm(gert::InferDataTypeContext *context)
{
    context->SetOutputDataType(0, context->GetInputDataType(0));
    return ge::GRAPH_SUCCESS;
}

}  // namespace ge
