// RoIAlign's reduction as an autograd function whose backward needs memory proportional to its output, not to
// the number of taps times channels (see src/ops/pool_rows.rs). Tensors cross as `at::Tensor*` (what tch's
// `C_tensor*` points to); every C++ exception is caught and returned as a malloc'ed message (NULL means
// success), freed through vovdet_detector_free_message.

#include <torch/csrc/autograd/custom_function.h>

#include <ATen/ATen.h>

#include <cstdlib>

#include "vovdet_shim.h"

namespace {

// Weighted bags of rows, forward and backward as embedding_bag (sum mode, per-sample weights, offsets with the
// total count appended): output row b = sum of weight[e] * features[input_row[e]] over the entries e of bag b.
// The backward is the transposed reduction, again one embedding_bag: input row r gets the weighted output rows
// of the entries that read it, found by a stable sort of `input_row` (each input row sums its entries in entry
// order). Unlike the CUDA backward of embedding_bag, which keeps a partial sum of channels per group of at most
// ten entries, it allocates only the gradient and index lists of the entries' length, and all its shapes are
// known without reading the device.
struct PoolRows : public torch::autograd::Function<PoolRows> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& features,
                            const at::Tensor& input_row, const at::Tensor& weight, const at::Tensor& offsets) {
    ctx->save_for_backward({input_row, weight, offsets});
    ctx->saved_data["rows"] = features.size(0);
    return std::get<0>(at::embedding_bag(features, input_row, offsets, false, 0, false, weight, true));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& input_row = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& offsets = saved[2];
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const int64_t entries = input_row.numel();
    const int64_t bags = offsets.numel() - 1;
    auto index_options = input_row.options();
    // The bag of every entry: how many bag ends lie at or before it.
    at::Tensor bag_of_entry =
        at::searchsorted(offsets.narrow(0, 1, bags), at::arange(entries, index_options), false, true);
    auto [sorted_rows, order] = input_row.sort(true, 0, false);
    // Input row r gathers the sorted entries from the first one reading a row >= r.
    at::Tensor row_offsets = at::searchsorted(sorted_rows, at::arange(rows + 1, index_options));
    at::Tensor grad_features =
        std::get<0>(at::embedding_bag(grads[0].contiguous(), bag_of_entry.index_select(0, order), row_offsets,
                                      false, 0, false, weight.index_select(0, order), true));
    return {grad_features, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void vovdet_detector_free_message(char* message) { std::free(message); }

// PoolRows over `features` [R, C], `input_row` [E] i64, `weight` [E] (features' kind) and `offsets` [B + 1] i64;
// stores the new [B, C] tensor in *out.
char* vovdet_pool_rows(const at::Tensor* features, const at::Tensor* input_row, const at::Tensor* weight,
                       const at::Tensor* offsets, at::Tensor** out) {
  return vovdet::guarded([&] { *out = new at::Tensor(PoolRows::apply(*features, *input_row, *weight, *offsets)); });
}

}  // extern "C"
