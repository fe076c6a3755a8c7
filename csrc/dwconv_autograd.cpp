// lkpatch_ext::dwconv2d_autograd: the eager training path of a layer whose every pass runs on
// lkpatch's kernels (NCHW), with its autograd in C++.
//
// The Python autograd Function (lkpatch/_ops.py, EagerDepthwiseConv2d) costs host time on every
// call: the engine takes the GIL to run its backward, and each pass goes through Python. Where
// lkpatch.dispatch sends every pass of a call to the kernels, lkpatch/_ops.py calls this op
// instead, and the backward runs on the autograd engine's thread without Python. Decisions stay
// in Python: this file only runs the kernels the caller asked for (the bias gradient on the
// kernel or as PyTorch's sum). Under create_graph the backward calls the differentiable
// lkpatch:: ops (registered from Python), as the Python Function does.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using ForwardSig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef, bool);
using InputGradSig = Tensor(const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef, bool);
using WeightGradSig = Tensor(const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef, bool);
using BiasGradSig = Tensor(const Tensor&);
// The differentiable ops of lkpatch/_ops.py (no tf32 argument: they read PyTorch's switch).
using OpInputGradSig = Tensor(const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef);
using OpWeightGradSig = Tensor(const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef);

class DwConv2d : public torch::autograd::Function<DwConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                        std::vector<int64_t> padding, bool tf32, bool bias_kernel) {
    static const auto fwd = op<ForwardSig>("lkpatch_ext::dwconv2d");
    const std::optional<Tensor> b = bias.has_value() ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
    Tensor y = fwd.call(x, w.contiguous(), b, padding, tf32);
    ctx->save_for_backward({x, w});
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["tf32"] = tf32;
    ctx->saved_data["bias_kernel"] = bias_kernel;
    ctx->saved_data["has_bias"] = b.has_value();  // needs_input_grad counts tensor inputs only
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> input_size{x.size(2), x.size(3)}, kernel_size{w.size(2), w.size(3)};
    const bool bias_grad_needed = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    Tensor gx, gw, gb;
    if (at::GradMode::is_enabled()) {  // create_graph: the differentiable ops, for double backward
      static const auto input_grad = op<OpInputGradSig>("lkpatch::dwconv2d_input_grad");
      static const auto weight_grad = op<OpWeightGradSig>("lkpatch::dwconv2d_weight_grad");
      static const auto bias_grad = op<BiasGradSig>("lkpatch::dwconv2d_bias_grad");
      const Tensor& g = grads[0];
      if (ctx->needs_input_grad(0)) gx = input_grad.call(g, w, input_size, padding);
      if (ctx->needs_input_grad(1)) gw = weight_grad.call(g, x, kernel_size, padding);
      if (bias_grad_needed) gb = bias_grad.call(g);
    } else {
      static const auto input_grad = op<InputGradSig>("lkpatch_ext::dwconv2d_input_grad");
      static const auto weight_grad = op<WeightGradSig>("lkpatch_ext::dwconv2d_weight_grad");
      static const auto bias_grad = op<BiasGradSig>("lkpatch_ext::dwconv2d_bias_grad");
      const bool tf32 = ctx->saved_data["tf32"].toBool();
      const Tensor g = grads[0].contiguous();
      if (ctx->needs_input_grad(0)) gx = input_grad.call(g, w.contiguous(), input_size, padding, tf32);
      if (ctx->needs_input_grad(1)) gw = weight_grad.call(g, x, kernel_size, padding, tf32);
      if (bias_grad_needed) gb = ctx->saved_data["bias_kernel"].toBool() ? bias_grad.call(g) : g.sum({0, 2, 3});
    }
    return {gx, gw, gb, Tensor(), Tensor(), Tensor()};
  }
};

Tensor dwconv2d_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                         at::IntArrayRef padding, bool tf32, bool bias_kernel) {
  TORCH_CHECK(x.is_contiguous(), "lkpatch: dwconv2d_autograd takes a contiguous NCHW input");
  return DwConv2d::apply(x, w, bias, padding.vec(), tf32, bias_kernel);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lkpatch_ext, m) {
  m.def("dwconv2d_autograd(Tensor input, Tensor weight, Tensor? bias, int[4] padding, bool tf32, bool bias_kernel) "
        "-> Tensor");
}

// Its own autograd: the one kernel for every dispatch key (it calls the CUDA ops inside).
TORCH_LIBRARY_IMPL(lkpatch_ext, CompositeImplicitAutograd, m) {
  m.impl("dwconv2d_autograd", &dwconv2d_autograd);
}
