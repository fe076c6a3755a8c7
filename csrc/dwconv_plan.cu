// The plan: which kernel family runs each pass of a call, decided in this file alone. The entry
// points below launch what it says, and the binding answers lkpatch.dispatch's questions with it,
// so that the speed rule in Python judges exactly the kernels that will run.
#include <algorithm>

#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

bool empty(const DwShape& s) { return s.planes == 0 || s.OH <= 0 || s.OW <= 0; }

// Tensor cores: fp16 / bf16, or fp32 as TF32, on sm_80+ (and not turned off for benchmarking).
bool tensor_cores(DType t) {
  if (t == DType::f32 || !tensor_cores_enabled()) return false;
  DeviceLimits lim;
  return device_limits(&lim) == cudaSuccess && lim.cc_major >= 8;
}

Plan make(Family f, bool nhwc, bool takes_bias = false) {
  Plan p;
  p.family = f;
  p.nhwc = nhwc;
  p.takes_bias = takes_bias;
  return p;
}

Plan with_work(Plan p, double macs, double staged = 0) {
  p.macs = macs;
  p.staged = staged;
  return p;
}

// The multiply-adds a tensor-core family's tiles issue for the forward of shape s (or the
// input-gradient's shape). Each kernel row that reaches the image is a band of k-steps (16 half /
// 8 TF32 input columns) per 8 output columns; M = 16 images by every output row (images family)
// or 16 output rows of each image (rows family).
double forward_macs(Family f, DType t, const DwShape& s) {
  const int N = (int)(s.planes / s.C), ks = t == DType::tf32 ? 8 : 16, steps = ceil_div(s.KW + 7, ks);
  const int64_t m = f == Family::tc_images ? (int64_t)round_up(N, 16) * s.OH : (int64_t)N * round_up(s.OH, 16);
  const int64_t rows = std::min<int64_t>(s.KH, f == Family::tc_images ? s.H + s.OH - 1 : s.H + 15);
  return (double)s.C * m * round_up(s.OW, 8) * rows * ks * steps;
}

// The weight-gradient's: every output pixel against the kernel's tiles of taps, 16 columns by 8
// rows per accumulator tile (the banded kernels; the images family's small-map kernels: 16 by 16).
double weight_grad_macs(DType t, const DwShape& s, bool banded) {
  const int JT = weight_grad_col_tiles(s.KW), IT = weight_grad_row_tiles(s.KH);
  const int64_t cols = (int64_t)ceil_div(s.KW, 16 * JT) * 16 * JT;
  const int64_t rows = banded ? (int64_t)ceil_div(s.KH, 8 * IT) * 8 * IT : round_up(s.KH, 16);
  return (double)s.planes * s.OH * round_up(s.OW, 16) * cols * rows;
}

// Whether a pass that the CUDA-core kernel staging 32 channels of a tile `fits` runs on it.
// channels_last: exact fp32 with any kernel it takes, and so the TF32 forward / input-gradient (its
// exact fp32 beat tc_rows' TF32 on most kernels up to 15 x 15); in half types the forward /
// input-gradient of thin kernels (1 x k, k x 1 up to 15) and kernels of up to 25 taps, where a
// tensor-core tile is mostly zero band; in half types and TF32 the weight-gradient of every kernel
// it takes (up to 49 taps) on 32 channels or more (fewer leave its lanes idle: tc_rows is faster
// there). NCHW (the weight-gradient alone fits): fp16 / bf16 thin kernels and kernels of up to 15
// taps, on 32 channels or more and 512 planes (images x channels) or more, on output maps over 16
// wide and tall (narrower ones fill little of its 32 x 8 or 16 x 16 tiles; maps up to 16 keep the
// images family's small-map kernels), where it was measured faster than the tensor-core families
// (maps 28 to 304 wide; not so with 25 taps, or 64 planes). LKPATCH_CHANNEL_TILES overrides
// (benchmarking).
bool channel_tiles(DType t, const DwShape& s, bool fits, Pass pass) {
  if (!fits || knobs().channel_tiles == 'n') return false;
  if (!s.nhwc) {
    if (knobs().channel_tiles == 'a') return true;
    const bool thin = std::min(s.KH, s.KW) == 1 || s.KH * s.KW <= 15;
    return (t == DType::f16 || t == DType::bf16) && tensor_cores(t) && s.C >= 32 && s.planes >= 512 && thin &&
           std::min(s.OH, s.OW) > 16;
  }
  if (knobs().channel_tiles == 'a' || t == DType::f32 || !tensor_cores(t)) return true;
  if (pass == Pass::weight_grad) return s.C >= 32;
  return t == DType::tf32 || std::min(s.KH, s.KW) == 1 || s.KH * s.KW <= 25;
}

Plan channel_tiles_plan(const DwShape& s, bool takes_bias) {
  Plan p = with_work(make(Family::fma, s.nhwc, takes_bias), dwconv2d_channel_tile_macs(s));
  p.channel_tiles = true;
  return p;
}

// Whether the images family's general forward takes a call that the rows family also fits
// (fp16 / bf16, measured), by the empty image slots of its 16-image tiles and how each family
// stages this shape's NCHW rows. Rows of whole 16-byte units, which the images family copies 16
// bytes at a time: the images family only where its tiles are full. 8-byte units, which the rows family stages by
// shifted loads: the images family unless its tiles are half empty or more. 4-byte units, which it
// copies at a fraction of the rate: only with full tiles on maps up to its 32-column tiles. Odd
// widths, where both shift: the images family on maps up to 32 columns (wider ones fill the rows
// family's 64-column tiles at least half). Small maps and TF32 keep the images family.
// LKPATCH_IMAGES overrides (benchmarking; `never` still leaves it the calls the rows family
// cannot take).
bool images_forward(DType t, const DwShape& s) {
  if (small_map_tiles(s) == 1) return true;
  if (knobs().images) return knobs().images == 'a';
  if (t == DType::tf32) return true;
  const int N = (int)(s.planes / s.C), slots = round_up(N, 16);
  switch (dwconv2d_tc_forward_copy_bytes(t, s)) {
    case 16: return slots == N;
    case 8: return 2 * N > slots;
    case 4: return slots == N && s.OW <= 32;
    default: return s.OW <= 32;
  }
}

// Whether the images family's channels_last kernels (maps up to 16 x 16) give a pass at least a
// block an SM: they take 8 (forward) or 4 (weight-gradient) channels a block, over 16 images
// (forward) or all of them (weight-gradient). With fewer blocks a pass ran several times slower
// than NCHW's small-map kernels, which take a block per channel, with their layout copies
// (docs/benchmarks.md, "channels_last on small maps"): the pass then runs through those.
bool nhwc_images_fill_gpu(int64_t blocks) {
  DeviceLimits lim;
  return device_limits(&lim) == cudaSuccess && blocks >= lim.sms;
}

// The forward (or the input-gradient's shape). The images family where it takes a call (8+
// images; channels_last only on maps up to 16, and through NCHW copies where its channels_last
// grid would leave SMs idle) and images_forward says so; then, on
// channels_last, the CUDA-core kernel for small kernels (channel_tiles); the rows family takes every
// other tensor-core call. TF32 on the rows family only from 28 x 28 maps and 9 taps a row, as the
// images family's rule (the exact CUDA-core kernels are as fast below that); channels_last TF32
// always, which saves the layout copies.
Plan forward_plan(DType t, const DwShape& s) {
  const bool tf32_worth = t != DType::tf32 || s.nhwc || (s.KW >= 9 && (int64_t)s.OH * s.OW >= 28 * 28);
  const bool rows = tensor_cores(t) && tf32_worth && dwconv2d_rows_forward_fits(t, s);
  if (tensor_cores(t) && dwconv2d_tc_forward_fits(t, s) && (!rows || images_forward(t, s))) {
    if (s.nhwc && !nhwc_images_fill_gpu(dwconv2d_tc_nhwc_forward_blocks(s))) return make(Family::fma, false);
    return with_work(make(Family::tc_images, s.nhwc), forward_macs(Family::tc_images, t, s),
                     dwconv2d_tc_forward_staged(t, s));
  }
  if (channel_tiles(t, s, dwconv2d_channel_tile_forward_fits(t, s), Pass::forward))  // channels_last only
    return channel_tiles_plan(s, false);
  if (rows)
    return with_work(make(Family::tc_rows, s.nhwc), forward_macs(Family::tc_rows, t, s),
                     dwconv2d_rows_forward_staged(t, s));
  return make(Family::fma, false);  // channels_last tensors through NCHW copies
}

// The weight-gradient: on NCHW, the CUDA-core channel tiles where channel_tiles' rule says so (thin
// and small kernels over many planes); then as the forward, the images family first
// (channels_last: where its grid fills the GPU, else through NCHW copies), then on channels_last
// the CUDA-core kernel where it takes the call (up to 49 taps) and channel_tiles' rule says so,
// then the rows family. The channel tiles sum the bias gradient on the way.
Plan weight_grad_plan(DType t, const DwShape& s) {
  if (!s.nhwc && channel_tiles(t, s, dwconv2d_channel_tile_weight_grad_fits(t, s), Pass::weight_grad))
    return channel_tiles_plan(s, true);
  if (tensor_cores(t) && dwconv2d_tc_weight_grad_fits(t, s) && (knobs().images != 'n' || small_map_tiles(s) == 1)) {
    if (s.nhwc && !nhwc_images_fill_gpu(dwconv2d_tc_nhwc_weight_grad_blocks(s))) return make(Family::fma, false);
    return with_work(make(Family::tc_images, s.nhwc, dwconv2d_tc_weight_grad_takes_bias(t, s)),
                     weight_grad_macs(t, s, dwconv2d_tc_weight_grad_banded(t, s)), dwconv2d_tc_weight_grad_staged(t, s));
  }
  if (s.nhwc && channel_tiles(t, s, dwconv2d_channel_tile_weight_grad_fits(t, s), Pass::weight_grad))
    return channel_tiles_plan(s, true);
  if (tensor_cores(t)) {
    const bool tf32_worth = t != DType::tf32 || s.nhwc || (int64_t)s.OH * s.OW >= 400;
    if (tf32_worth && dwconv2d_rows_weight_grad_fits(t, s))
      return with_work(make(Family::tc_rows, s.nhwc, true), weight_grad_macs(t, s, true),
                       dwconv2d_rows_weight_grad_staged(t, s));
  }
  return make(Family::fma, false);
}

Plan none(const char* why) {
  Plan p;
  p.why = why;
  return p;
}

}  // namespace

void describe_device(const DeviceLimits* d) { described_device() = d; }

const char* family_name(Family f) {
  switch (f) {
    case Family::none: return "none";
    case Family::fma: return "fma";
    case Family::tc_images: return "tc_images";
    case Family::tc_rows: return "tc_rows";
  }
  return "none";
}

Plan dwconv2d_plan(DType t, const DwShape& s, Pass pass) {
  if (s.KH < 1 || s.KH > 63 || s.KW < 1 || s.KW > 63) return none("the kernel is larger than 63 on a side");
  if (s.C < 1 || s.planes < 1 || s.H < 1 || s.W < 1) return none("the input is empty");
  if (s.OH < 1 || s.OW < 1) return none("the padded input is smaller than the kernel");
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess) return none("no CUDA device");
  switch (pass) {
    case Pass::forward: return forward_plan(t, s);
    case Pass::input_grad: return forward_plan(t, dwconv2d_input_grad_shape(s));
    case Pass::weight_grad: return weight_grad_plan(t, s);
  }
  return none("unknown pass");
}

cudaError_t dwconv2d_forward(DType t, const void* in, const void* w, const void* bias, void* out, const DwShape& s,
                             bool flip_kernel, cudaStream_t stream) {
  if (empty(s)) return cudaSuccess;
  const Plan plan = forward_plan(t, s);
  if (s.nhwc && !plan.nhwc) return cudaErrorInvalidValue;
  switch (plan.family) {
    case Family::tc_images: return dwconv2d_tc_forward(t, in, w, bias, out, s, flip_kernel, stream);
    case Family::tc_rows: return dwconv2d_rows_forward(t, in, w, bias, out, s, flip_kernel, stream);
    case Family::fma:
      if (plan.channel_tiles) return dwconv2d_channel_tile_forward(t, in, w, bias, out, s, flip_kernel, stream);
      return dwconv2d_fma_forward(t, in, w, bias, out, s, flip_kernel, stream);
    case Family::none: break;
  }
  return cudaErrorInvalidValue;
}

size_t dwconv2d_weight_grad_workspace(DType t, const DwShape& s, bool with_bias) {
  if (empty(s)) return 0;
  const Plan plan = weight_grad_plan(t, s);
  switch (plan.family) {
    case Family::tc_images: return dwconv2d_tc_weight_grad_workspace(t, s, with_bias && plan.takes_bias);
    case Family::tc_rows: return dwconv2d_rows_weight_grad_workspace(t, s, with_bias && plan.takes_bias);
    case Family::fma:
      return plan.channel_tiles ? dwconv2d_channel_tile_weight_grad_workspace(s, with_bias && plan.takes_bias)
                                : dwconv2d_fma_weight_grad_workspace(s);
    case Family::none: break;
  }
  return 0;
}

cudaError_t dwconv2d_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                 const DwShape& s, cudaStream_t stream, void* grad_b) {
  if (empty(s)) {
    if (grad_b != nullptr) return cudaErrorInvalidValue;
    return cudaMemsetAsync(grad_w, 0, elem_bytes(t) * (size_t)s.C * s.KH * s.KW, stream);
  }
  const Plan plan = weight_grad_plan(t, s);
  if ((s.nhwc && !plan.nhwc) || (grad_b != nullptr && !plan.takes_bias)) return cudaErrorInvalidValue;
  switch (plan.family) {
    case Family::tc_images:
      if (workspace == nullptr && !s.nhwc) return cudaErrorInvalidValue;  // channels_last: none needed
      return dwconv2d_tc_weight_grad(t, grad_out, in, grad_w, workspace, s, stream, grad_b);
    case Family::tc_rows: return dwconv2d_rows_weight_grad(t, grad_out, in, grad_w, workspace, s, stream, grad_b);
    case Family::fma:
      if (plan.channel_tiles)
        return dwconv2d_channel_tile_weight_grad(t, grad_out, in, grad_w, workspace, s, stream, grad_b);
      return dwconv2d_fma_weight_grad(t, grad_out, in, grad_w, workspace, s, stream);
    case Family::none: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace lkpatch
