// Registers lkpatch's CUDA kernels with PyTorch as torch.ops.lkpatch_ext.*.
//
// The user-facing ops (torch.ops.lkpatch.*, with autograd, fake tensors and autocast) are defined
// in lkpatch/_ops.py; their CUDA implementations call these. Inputs arrive contiguous (NCHW; the
// to_nchw / to_channels_last copies change formats); this file checks them, allocates outputs and
// workspaces through PyTorch's caching allocator, and launches on the current stream -- nothing
// here synchronizes with the host. Last, dwconv2d_autograd: the eager training path with its
// autograd in C++ (see there).
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "dwconv.h"

namespace {

using at::Tensor;

// Error messages are built from strings only: streaming integers through the extension's
// std::ostream crashed (a libstdc++ mismatch between this library and torch's).
std::string str(int64_t v) { return std::to_string(v); }
std::string str(at::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}
std::string str(const at::Device& d) { return d.str(); }
std::string str(at::ScalarType t) { return c10::toString(t); }

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lkpatch: ", what, " failed: ", cudaGetErrorString(err));
}

lkpatch::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return lkpatch::DType::f32;
    case at::kHalf: return lkpatch::DType::f16;
    case at::kBFloat16: return lkpatch::DType::bf16;
    default: TORCH_CHECK(false, "lkpatch: ", name, " must be float32, float16 or bfloat16, got ", str(t.scalar_type()));
  }
}

// channels_last in memory (and not NCHW as well, as tensors with C == 1 or H == W == 1 are).
bool channels_last(const Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// `nhwc_ok`: the pass may take a channels_last tensor (the caller checks that the kernels do).
void check_activation(const Tensor& t, const char* name, bool nhwc_ok = false) {
  TORCH_CHECK(t.is_cuda(), "lkpatch: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4, "lkpatch: ", name, " must be 4-D (N, C, H, W), got ", str(t.dim()), "-D");
  TORCH_CHECK(t.size(2) > 0 && t.size(3) > 0, "lkpatch: ", name, " has an empty map: ", str(t.sizes()));
  dtype_of(t, name);
  TORCH_CHECK(t.is_contiguous() || (nhwc_ok && channels_last(t)), "lkpatch: ", name, " must be contiguous NCHW",
              nhwc_ok ? " or channels_last" : "");
}

at::MemoryFormat format_of(const lkpatch::DwShape& s) {
  return s.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// A channels_last call runs only where the plan reads that layout as it is.
void check_nhwc(const lkpatch::Plan& plan, const char* pass) {
  TORCH_CHECK(plan.nhwc, "lkpatch: no channels_last ", pass, " kernel for this call (its ",
              lkpatch::family_name(plan.family), " kernels read NCHW); pass NCHW tensors");
}

void check_padding(at::IntArrayRef padding) {
  TORCH_CHECK(padding.size() == 4, "lkpatch: padding must be (top, bottom, left, right)");
  for (auto p : padding) TORCH_CHECK(p >= 0 && p <= 4096, "lkpatch: padding must be in [0, 4096], got ", str(p));
}

void check_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, "lkpatch: ", what, " = ", str(v), " is too large for the kernel");
}

lkpatch::DwShape forward_shape(int64_t N, int64_t C, int64_t H, int64_t W, int64_t KH, int64_t KW,
                               at::IntArrayRef padding) {
  TORCH_CHECK(KH >= 1 && KH <= 63 && KW >= 1 && KW <= 63, "lkpatch: kernel ", str(KH), "x", str(KW),
              " is outside the supported 1..63");
  const int64_t OH = H + padding[0] + padding[1] - KH + 1, OW = W + padding[2] + padding[3] - KW + 1;
  TORCH_CHECK(OH >= 1 && OW >= 1, "lkpatch: the padded input is smaller than the kernel");
  check_int(N * C, "N*C");
  check_int(H * W, "H*W");
  check_int(OH * OW, "OH*OW");
  lkpatch::DwShape s{};
  s.planes = N * C;
  s.C = (int)C;
  s.H = (int)H; s.W = (int)W;
  s.KH = (int)KH; s.KW = (int)KW;
  s.OH = (int)OH; s.OW = (int)OW;
  s.pad_t = (int)padding[0];
  s.pad_l = (int)padding[2];
  return s;
}

void check_weight(const Tensor& w, const Tensor& like, int64_t C) {
  TORCH_CHECK(w.device() == like.device(), "lkpatch: weight is on ", str(w.device()), ", input on ",
              str(like.device()));
  TORCH_CHECK(w.scalar_type() == like.scalar_type(), "lkpatch: weight dtype ", str(w.scalar_type()),
              " differs from input dtype ", str(like.scalar_type()));
  TORCH_CHECK(w.dim() == 4 && w.size(0) == C && w.size(1) == 1, "lkpatch: weight must be (C, 1, KH, KW) with C = ",
              str(C), ", got ", str(w.sizes()));
  TORCH_CHECK(w.is_contiguous(), "lkpatch: weight must be contiguous");
}

// fp32 tensors with `tf32` (PyTorch allows TF32 convolutions) may take the TF32 tensor-core kernels.
lkpatch::DType compute_type(const Tensor& t, const char* name, bool tf32) {
  const lkpatch::DType d = dtype_of(t, name);
  return tf32 && d == lkpatch::DType::f32 ? lkpatch::DType::tf32 : d;
}

Tensor dwconv2d(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, at::IntArrayRef padding,
                bool tf32) {
  check_activation(x, "input", true);
  check_padding(padding);
  const int64_t C = x.size(1);
  check_weight(w, x, C);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == C && bias->is_contiguous(),
                "lkpatch: bias must be a contiguous (C,) tensor on the input's device and dtype");
  }
  auto s = forward_shape(x.size(0), C, x.size(2), x.size(3), w.size(2), w.size(3), padding);
  s.nhwc = channels_last(x);
  c10::cuda::CUDAGuard guard(x.device());
  if (s.nhwc) check_nhwc(lkpatch::dwconv2d_plan(compute_type(x, "input", tf32), s, lkpatch::Pass::forward), "forward");
  Tensor y = at::empty({x.size(0), C, s.OH, s.OW}, x.options(), format_of(s));
  check_cuda(lkpatch::dwconv2d_forward(compute_type(x, "input", tf32), x.data_ptr(), w.data_ptr(),
                                       bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), s, false,
                                       c10::cuda::getCurrentCUDAStream().stream()),
             "depthwise forward");
  return y;
}

Tensor dwconv2d_input_grad(const Tensor& grad, const Tensor& w, at::IntArrayRef input_size, at::IntArrayRef padding,
                           bool tf32) {
  check_activation(grad, "grad_output", true);
  check_padding(padding);
  TORCH_CHECK(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0,
              "lkpatch: input_size must be (H, W), neither empty");
  const int64_t C = grad.size(1);
  check_weight(w, grad, C);
  auto f = forward_shape(grad.size(0), C, input_size[0], input_size[1], w.size(2), w.size(3), padding);
  TORCH_CHECK(f.OH == grad.size(2) && f.OW == grad.size(3), "lkpatch: grad_output is ", str(grad.sizes()),
              " but the forward output would be ", str(f.OH), "x", str(f.OW));
  f.nhwc = channels_last(grad);
  const lkpatch::DwShape s = lkpatch::dwconv2d_input_grad_shape(f);
  const lkpatch::DType t = compute_type(grad, "grad_output", tf32);
  c10::cuda::CUDAGuard guard(grad.device());
  if (s.nhwc) check_nhwc(lkpatch::dwconv2d_plan(t, f, lkpatch::Pass::input_grad), "input-grad");
  Tensor gx = at::empty({grad.size(0), C, input_size[0], input_size[1]}, grad.options(), format_of(s));
  check_cuda(lkpatch::dwconv2d_forward(t, grad.data_ptr(), w.data_ptr(), nullptr, gx.data_ptr(), s, true,
                                       c10::cuda::getCurrentCUDAStream().stream()),
             "depthwise input-grad");
  return gx;
}

// `grad_b`: where not null and the weight-gradient kernel sums the bias gradient along the way
// (the plan's takes_bias), set to it; else left as it is.
Tensor weight_grad(const Tensor& grad, const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                   bool tf32, Tensor* grad_b) {
  check_activation(grad, "grad_output", true);
  check_activation(x, "input", true);
  check_padding(padding);
  TORCH_CHECK(kernel_size.size() == 2, "lkpatch: kernel_size must be (KH, KW)");
  TORCH_CHECK(grad.device() == x.device(), "lkpatch: grad_output and input are on different devices");
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "lkpatch: grad_output and input dtypes differ");
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == x.size(1), "lkpatch: grad_output ", str(grad.sizes()),
              " does not match input ", str(x.sizes()));
  auto s = forward_shape(x.size(0), x.size(1), x.size(2), x.size(3), kernel_size[0], kernel_size[1], padding);
  TORCH_CHECK(s.OH == grad.size(2) && s.OW == grad.size(3), "lkpatch: grad_output is ", str(grad.sizes()),
              " but the forward output would be ", str(s.OH), "x", str(s.OW));
  // channels_last if either is (only); then both must be, as a tensor that is NCHW too is.
  s.nhwc = channels_last(grad) || channels_last(x);
  TORCH_CHECK(!s.nhwc || (grad.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                          x.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "lkpatch: grad_output and input must both be NCHW or both channels_last");
  c10::cuda::CUDAGuard guard(x.device());
  Tensor gw = at::empty({x.size(1), 1, kernel_size[0], kernel_size[1]}, x.options());
  const lkpatch::DType t = compute_type(x, "input", tf32);
  const lkpatch::Plan plan = lkpatch::dwconv2d_plan(t, s, lkpatch::Pass::weight_grad);
  if (s.nhwc) check_nhwc(plan, "weight-grad");
  const bool with_bias = grad_b != nullptr && plan.takes_bias;
  Tensor gb;
  if (with_bias) gb = at::empty({x.size(1)}, x.options());
  const size_t ws_bytes = lkpatch::dwconv2d_weight_grad_workspace(t, s, with_bias);
  Tensor ws;
  if (ws_bytes) ws = at::empty({(int64_t)(ws_bytes / sizeof(float))}, x.options().dtype(at::kFloat));
  check_cuda(lkpatch::dwconv2d_weight_grad(t, grad.data_ptr(), x.data_ptr(), gw.data_ptr(),
                                           ws_bytes ? ws.data_ptr<float>() : nullptr, s,
                                           c10::cuda::getCurrentCUDAStream().stream(),
                                           with_bias ? gb.data_ptr() : nullptr),
             "depthwise weight-grad");
  if (with_bias) *grad_b = gb;
  return gw;
}

Tensor dwconv2d_weight_grad(const Tensor& grad, const Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                            bool tf32) {
  return weight_grad(grad, x, kernel_size, padding, tf32, nullptr);
}

Tensor dwconv2d_bias_grad(const Tensor& grad) {
  check_activation(grad, "grad_output", true);
  check_int(grad.size(0), "N");
  check_int(grad.size(1), "C");
  const bool nhwc = channels_last(grad);
  c10::cuda::CUDAGuard guard(grad.device());
  Tensor gb = at::empty({grad.size(1)}, grad.options());
  const int64_t hw = grad.size(2) * grad.size(3);
  const size_t ws_bytes = lkpatch::dwconv2d_bias_grad_workspace(grad.size(0), (int)grad.size(1), hw, nhwc);
  Tensor ws;
  if (ws_bytes) ws = at::empty({(int64_t)(ws_bytes / sizeof(float))}, grad.options().dtype(at::kFloat));
  check_cuda(lkpatch::dwconv2d_bias_grad(dtype_of(grad, "grad_output"), grad.data_ptr(), gb.data_ptr(),
                                         ws_bytes ? ws.data_ptr<float>() : nullptr, grad.size(0), (int)grad.size(1), hw,
                                         nhwc, c10::cuda::getCurrentCUDAStream().stream()),
             "depthwise bias-grad");
  return gb;
}

// The kernels take NCHW; channels_last tensors change format through these copies.
Tensor to_nchw(const Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "lkpatch: to_nchw takes a 4-D CUDA tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "lkpatch: to_nchw takes a channels_last tensor");
  const auto t = dtype_of(x, "input");
  c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty(x.sizes(), x.options());
  check_cuda(lkpatch::transpose_batched(t, x.data_ptr(), y.data_ptr(), x.size(0), x.size(2) * x.size(3), x.size(1),
                                        c10::cuda::getCurrentCUDAStream().stream()),
             "channels_last to NCHW copy");
  return y;
}

Tensor to_channels_last(const Tensor& x) {
  check_activation(x, "input");
  c10::cuda::CUDAGuard guard(x.device());
  Tensor y = at::empty(x.sizes(), x.options(), at::MemoryFormat::ChannelsLast);
  check_cuda(lkpatch::transpose_batched(dtype_of(x, "input"), x.data_ptr(), y.data_ptr(), x.size(0), x.size(1),
                                        x.size(2) * x.size(3), c10::cuda::getCurrentCUDAStream().stream()),
             "NCHW to channels_last copy");
  return y;
}

// The plan of one pass on the current device, for lkpatch.dispatch: "FAMILY LAYOUT BIAS MACS
// STAGED" -- the kernel family (dwconv.h), "nhwc" where channels_last tensors are read as they are
// (else "nchw": they need NCHW copies), "bias" where the weight-gradient also gives the bias
// gradient (else "-"), the multiply-adds its tiles issue (Plan::macs), the elements its blocks
// stage (Plan::staged) -- or "none - - 0 0 WHY" where no kernel takes the call.
// `device`: [multiprocessors, shared memory a block may opt in to (bytes), compute capability
// major] of a GPU to plan for instead of the current one (tests without a GPU).
std::string plan(const std::string& pass, at::IntArrayRef size, at::IntArrayRef kernel_size, at::IntArrayRef padding,
                 at::ScalarType dtype, bool tf32, bool channels_last, at::OptionalIntArrayRef device) {
  auto none = [](const std::string& why) { return "none - - 0 0 " + why; };
  if (size.size() != 4 || kernel_size.size() != 2 || padding.size() != 4) return none("malformed shape");
  lkpatch::DType t;
  switch (dtype) {
    case at::kFloat: t = tf32 ? lkpatch::DType::tf32 : lkpatch::DType::f32; break;
    case at::kHalf: t = lkpatch::DType::f16; break;
    case at::kBFloat16: t = lkpatch::DType::bf16; break;
    default: return none("no kernel for " + str(dtype));
  }
  lkpatch::Pass p;
  if (pass == "forward") p = lkpatch::Pass::forward;
  else if (pass == "input_grad") p = lkpatch::Pass::input_grad;
  else if (pass == "weight_grad") p = lkpatch::Pass::weight_grad;
  else return none("unknown pass");
  const int64_t N = size[0], C = size[1], H = size[2], W = size[3], KH = kernel_size[0], KW = kernel_size[1];
  for (auto v : padding)
    if (v < 0 || v > 4096) return none("padding outside [0, 4096]");
  const int64_t OH = H + padding[0] + padding[1] - KH + 1, OW = W + padding[2] + padding[3] - KW + 1;
  if (N < 0 || C < 0 || H < 0 || W < 0 || N * C > INT32_MAX || H * W > INT32_MAX || OH * OW > INT32_MAX || C > INT32_MAX)
    return none("too large for the kernels' 32-bit indexing");
  lkpatch::DwShape s{};
  s.planes = N * C; s.C = (int)C;
  s.H = (int)H; s.W = (int)W;
  s.KH = (int)KH; s.KW = (int)KW;
  s.OH = (int)OH; s.OW = (int)OW;
  s.pad_t = (int)padding[0]; s.pad_l = (int)padding[2];
  s.nhwc = channels_last;
  lkpatch::DeviceLimits described{};
  if (device.has_value()) {
    if (device->size() != 3) return none("device must be [multiprocessors, block shared memory, major]");
    described.sms = (int)(*device)[0];
    described.max_smem_optin = (int)(*device)[1];
    described.cc_major = (int)(*device)[2];
  }
  struct Describe {  // the described GPU for this question only, also if the plan throws
    explicit Describe(const lkpatch::DeviceLimits* d) { lkpatch::describe_device(d); }
    ~Describe() { lkpatch::describe_device(nullptr); }
  } describe(device.has_value() ? &described : nullptr);
  const lkpatch::Plan q = lkpatch::dwconv2d_plan(t, s, p);
  if (q.family == lkpatch::Family::none) return none(q.why);
  char work[80];
  std::snprintf(work, sizeof(work), " %.0f %.0f", q.macs, q.staged);
  return std::string(lkpatch::family_name(q.family)) + (q.nhwc ? " nhwc " : " nchw ") + (q.takes_bias ? "bias" : "-") +
         work;
}

// ---- dwconv2d_autograd: the eager training path of a layer whose every pass runs on the kernels
// (NCHW), with its autograd in C++. The Python autograd Function (lkpatch/_ops.py,
// EagerDepthwiseConv2d) costs host time on every call: the engine takes the GIL to run its
// backward, and each pass goes through Python. Where lkpatch.dispatch sends every pass of a call
// to the kernels, lkpatch/_ops.py calls this op instead, and the backward runs on the autograd
// engine's thread without Python. Decisions stay in Python: this only runs the kernels the caller
// asked for (the bias gradient on the kernel or as PyTorch's sum). Under create_graph the backward
// calls the differentiable lkpatch:: ops (registered from Python), as the Python Function does.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The differentiable ops of lkpatch/_ops.py (no tf32 argument: they read PyTorch's switch).
using GradSig = Tensor(const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef);
using BiasGradSig = Tensor(const Tensor&);

class DwConv2d : public torch::autograd::Function<DwConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& w_in,
                        const std::optional<Tensor>& bias_in, std::vector<int64_t> padding, bool tf32, bool bias_kernel,
                        std::optional<at::ScalarType> cast) {
    // Under autocast (`cast`: its dtype) the inputs are cast here, as PyTorch's convolutions cast
    // theirs, and the backward casts the gradients back: one autograd node, not one per cast.
    const auto to = [&](const Tensor& t) {
      return cast.has_value() && t.is_floating_point() && t.scalar_type() != at::kDouble ? t.to(*cast) : t;
    };
    const Tensor x = to(x_in), w = to(w_in).contiguous();
    const std::optional<Tensor> b = bias_in.has_value() ? std::optional<Tensor>(to(*bias_in).contiguous()) : std::nullopt;
    Tensor y = dwconv2d(x, w, b, padding, tf32);
    ctx->saved_data["dtypes"] = std::vector<int64_t>{(int64_t)x_in.scalar_type(), (int64_t)w_in.scalar_type(),
                                                     bias_in.has_value() ? (int64_t)bias_in->scalar_type() : 0};
    // As the Python Function: the input only for the weight's gradient, the weight only for the
    // input's (a frozen weight keeps no activation alive).
    ctx->save_for_backward({w_in.requires_grad() ? x : Tensor(), x_in.requires_grad() ? w : Tensor()});
    ctx->saved_data["input_size"] = std::vector<int64_t>{x.size(2), x.size(3)};
    ctx->saved_data["kernel_size"] = std::vector<int64_t>{w.size(2), w.size(3)};
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["tf32"] = tf32;
    ctx->saved_data["bias_kernel"] = bias_kernel;
    ctx->saved_data["has_bias"] = b.has_value();  // needs_input_grad counts tensor inputs only
    ctx->saved_data["channels_last"] = channels_last(x);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> input_size = ctx->saved_data["input_size"].toIntVector();
    const std::vector<int64_t> kernel_size = ctx->saved_data["kernel_size"].toIntVector();
    const bool bias_grad_needed = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    const at::MemoryFormat fmt =  // the input's: the gradients' layout
        ctx->saved_data["channels_last"].toBool() ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    Tensor gx, gw, gb;
    // Batched output gradients (autograd.grad's is_grads_batched) have no storage of their own:
    // the ops, which vmap runs slice by slice, and no memory format (vmap cannot ask for one).
    const bool batched = at::isBatchedTensor(grads[0]);
    if (at::GradMode::is_enabled() || batched) {  // create_graph: the differentiable ops, for double backward
      static const auto input_grad = op<GradSig>("lkpatch::dwconv2d_input_grad");
      static const auto weight_grad = op<GradSig>("lkpatch::dwconv2d_weight_grad");
      static const auto bias_grad = op<BiasGradSig>("lkpatch::dwconv2d_bias_grad");
      const Tensor& g = grads[0];
      // in the input's format, whatever the output gradient's, as the Python path returns it
      if (ctx->needs_input_grad(0)) {
        gx = input_grad.call(g, w, input_size, padding);
        if (!batched) gx = gx.contiguous(fmt);
      }
      if (ctx->needs_input_grad(1)) gw = weight_grad.call(g, x, kernel_size, padding);
      if (bias_grad_needed) gb = bias_grad.call(g);
    } else {
      const bool tf32 = ctx->saved_data["tf32"].toBool();  // PyTorch's TF32 switch as it was at the forward
      const Tensor g = grads[0].contiguous(fmt);
      // .contiguous(fmt): a 1 x 1 output gradient reads as NCHW, and so does its input gradient
      if (ctx->needs_input_grad(0)) gx = dwconv2d_input_grad(g, w.contiguous(), input_size, padding, tf32).contiguous(fmt);
      const bool bias_kernel = ctx->saved_data["bias_kernel"].toBool();
      // The weight-gradient kernel may sum the bias gradient on the way (then gb is set here).
      if (ctx->needs_input_grad(1))
        gw = weight_grad(g, x, kernel_size, padding, tf32, bias_grad_needed && bias_kernel ? &gb : nullptr);
      if (bias_grad_needed && !gb.defined()) gb = bias_kernel ? dwconv2d_bias_grad(g) : g.sum({0, 2, 3});
    }
    // each gradient in its input's dtype (the casts' backward, under autocast)
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    Tensor* grad_of[3] = {&gx, &gw, &gb};
    for (int i = 0; i < 3; ++i)
      if (grad_of[i]->defined() && grad_of[i]->scalar_type() != (at::ScalarType)dtypes[i])
        *grad_of[i] = grad_of[i]->to((at::ScalarType)dtypes[i]);
    return {gx, gw, gb, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor dwconv2d_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                         at::IntArrayRef padding, bool tf32, bool bias_kernel, std::optional<at::ScalarType> cast) {
  TORCH_CHECK(x.is_contiguous() || channels_last(x),
              "lkpatch: dwconv2d_autograd takes a contiguous NCHW or channels_last input");
  // Fake and other Python-dispatched tensors have no data for the kernels.
  TORCH_CHECK(!x.key_set().has(c10::DispatchKey::Python) && !w.key_set().has(c10::DispatchKey::Python),
              "lkpatch: dwconv2d_autograd takes plain CUDA tensors (no fake or subclass tensors)");
  return DwConv2d::apply(x, w, bias, padding.vec(), tf32, bias_kernel, cast);
}

}  // namespace

TORCH_LIBRARY(lkpatch_ext, m) {
  m.def("dwconv2d(Tensor input, Tensor weight, Tensor? bias, int[4] padding, bool tf32=False) -> Tensor");
  m.def("dwconv2d_input_grad(Tensor grad_output, Tensor weight, int[2] input_size, int[4] padding, "
        "bool tf32=False) -> Tensor");
  m.def("dwconv2d_weight_grad(Tensor grad_output, Tensor input, int[2] kernel_size, int[4] padding, "
        "bool tf32=False) -> Tensor");
  m.def("dwconv2d_bias_grad(Tensor grad_output) -> Tensor");
  m.def("to_nchw(Tensor x) -> Tensor");
  m.def("to_channels_last(Tensor x) -> Tensor");
  m.def("dwconv2d_autograd(Tensor input, Tensor weight, Tensor? bias, int[4] padding, bool tf32, bool bias_kernel, "
        "ScalarType? cast=None) -> Tensor");
  m.def("plan(str pass_, int[] size, int[] kernel_size, int[] padding, ScalarType dtype, bool tf32, "
        "bool channels_last, int[]? device=None) -> str", &plan);
}

TORCH_LIBRARY_IMPL(lkpatch_ext, CUDA, m) {
  m.impl("dwconv2d", &dwconv2d);
  m.impl("dwconv2d_input_grad", &dwconv2d_input_grad);
  m.impl("dwconv2d_weight_grad", &dwconv2d_weight_grad);
  m.impl("dwconv2d_bias_grad", &dwconv2d_bias_grad);
  m.impl("to_nchw", &to_nchw);
  m.impl("to_channels_last", &to_channels_last);
}

// Its own autograd: one kernel for every dispatch key (it calls the CUDA ones above).
TORCH_LIBRARY_IMPL(lkpatch_ext, CompositeImplicitAutograd, m) {
  m.impl("dwconv2d_autograd", &dwconv2d_autograd);
}
