// InferShape / InferDataType of SparseAttn and SparseAttnKvQuant: out has q's shape; out dtype = q dtype.
// Evidence: written only.
#include "register/op_def_registry.h"
#include "sparse_attn_tiling.h"

namespace ge {

constexpr size_t Q_INDEX = 0;
constexpr size_t OUT_INDEX = 0;

ge::graphStatus InferShapeSparseAttn(gert::InferShapeContext *context)
{
    const gert::Shape *q = context->GetInputShape(Q_INDEX);
    gert::Shape *out = context->GetOutputShape(OUT_INDEX);
    if (q == nullptr || out == nullptr || q->GetDimNum() != 3) {
        return ge::GRAPH_FAILED;
    }
    *out = *q;  // [T, H, D]
    return ge::GRAPH_SUCCESS;
}

ge::graphStatus InferDataTypeSparseAttn(gert::InferDataTypeContext *context)
{
    context->SetOutputDataType(OUT_INDEX, context->GetInputDataType(Q_INDEX));
    return ge::GRAPH_SUCCESS;
}

}  // namespace ge
