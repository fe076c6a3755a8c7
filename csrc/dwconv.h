// lkpatch: depthwise 2-D convolution kernels (stride 1, dilation 1, channel multiplier 1).
//
// Plain CUDA C++: no torch headers, so each kernel file compiles with nvcc alone. All tensors
// are contiguous NCHW (or channels_last where DwShape::nhwc says so); a "plane" is one (n, c)
// image channel. The binding (binding.cpp) checks
// arguments, allocates outputs and workspaces, and picks the stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace lkpatch {

// out[p][oy][ox] = bias[c] + sum_{kh,kw} in[p][oy - pad_t + kh][ox - pad_l + kw] * w[c][kh][kw],
// taps outside the input reading zero; p = n * C + c. Padding may be negative (a crop), which the
// input-gradient uses when a forward padding exceeds K - 1.
struct DwShape {
  int64_t planes;  // N * C
  int C;
  int H, W;    // input
  int KH, KW;  // kernel
  int OH, OW;  // output
  int pad_t, pad_l;
  bool nhwc = false;  // activations channels_last (N x H x W x C in memory), where the plan says so
};

// Element type of every tensor of a call. Arithmetic is fp32 whatever the storage: fp32 FMA for
// float, tensor cores with fp32 accumulation for half types where the GPU has them (sm_80+).
// tf32: float tensors whose products may be rounded to TF32 (PyTorch allows TF32 convolutions):
// the plan then puts passes on tensor cores where that is faster (the others run as f32).
enum class DType { f32, f16, bf16, tf32 };

inline size_t elem_bytes(DType t) { return t == DType::f16 || t == DType::bf16 ? 2 : 4; }

// The forward pass; with flip_kernel the kernel is rotated by 180 degrees, which makes it the
// input-gradient (see dwconv2d_input_grad_shape). bias may be null. channels_last tensors only
// where the plan's nhwc says so (else cudaErrorInvalidValue).
cudaError_t dwconv2d_forward(DType t, const void* in, const void* w, const void* bias, void* out, const DwShape& s,
                             bool flip_kernel, cudaStream_t stream);

// The shape that computes grad_input of the forward shape `fwd` with dwconv2d_forward_*(flip=true):
// grad_output convolved with the flipped kernel under padding K - 1 - pad.
DwShape dwconv2d_input_grad_shape(const DwShape& fwd);

// Which kernel family runs a pass, decided here alone: the launchers below follow it, and the
// binding answers lkpatch.dispatch's questions with it.
enum class Pass { forward, input_grad, weight_grad };
enum class Family {
  none,       // no lkpatch kernel takes the call (`why` says why)
  fma,        // exact fp32 arithmetic on CUDA cores (any dtype; channels_last where channel_tiles)
  tc_images,  // tensor cores, M (or K) = 16 images of a channel: 8+ images, NCHW (channels_last on maps up to 16)
  tc_rows,    // tensor cores, M = 16 output rows of one image: any batch, NCHW or channels_last
};
struct Plan {
  Family family = Family::none;
  bool nhwc = false;        // reads and writes channels_last tensors as they are (else they need NCHW copies)
  bool takes_bias = false;  // weight-grad: a non-null grad_b also gets the bias gradient
  bool channel_tiles = false;  // fma: the kernel that stages 32 channels of a tile (either layout)
  const char* why = "";     // family none: the reason
  // The multiply-adds the kernels' tiles issue (tensor cores: whole tiles, the zero band, kernel
  // rows that reach the image; fma's channel tiles: whole tiles of 32 channels): the work
  // lkpatch.dispatch's speed rule times; 0 for the other fma kernels (the rule counts effective taps).
  double macs = 0;
  // The elements its blocks stage into shared memory (the tensor-core families; else 0): the tile
  // work besides the multiply-adds, which the rule times as well.
  double staged = 0;
};
// s: the forward's shape, s.nhwc the layout of the caller's tensors. Queries the current device.
Plan dwconv2d_plan(DType t, const DwShape& s, Pass pass);
const char* family_name(Family f);

// What the plan reads of a GPU.
struct DeviceLimits {
  int sms;
  int max_smem_optin;  // bytes of dynamic shared memory one block may ask for
  int cc_major;        // compute capability: tensor-core kernels need 8 (Ampere) or later
};
// Plans on this thread read `d` instead of the current GPU until it is reset with null: plan
// questions about a described GPU, answered (and tested) without one.
void describe_device(const DeviceLimits* d);

// grad_w[c][kh][kw] = sum_{n,oy,ox} grad_out[n,c][oy][ox] * in[n,c][oy - pad_t + kh][ox - pad_l + kw].
// Deterministic: partial sums go to an fp32 `workspace` and are added in a fixed order.
// Where the plan's takes_bias says so (tensor-core kernels that walk every staged element of
// grad_out anyway: the small-map ones, NCHW and channels_last, TF32's banded one, the rows
// family's), a non-null grad_b also gets the bias gradient, as dwconv2d_bias_grad gives it; the
// workspace is then the one asked for with_bias. Elsewhere a non-null grad_b is an error.
size_t dwconv2d_weight_grad_workspace(DType t, const DwShape& s, bool with_bias = false);  // bytes (may be 0)
cudaError_t dwconv2d_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                 const DwShape& s, cudaStream_t stream, void* grad_b = nullptr);

// grad_b[c] = sum over n, y, x of grad_out[n, c, y, x]; deterministic. channels_last: grad_out is
// N x H x W x C in memory.
size_t dwconv2d_bias_grad_workspace(int64_t N, int C, int64_t HW, bool channels_last);  // bytes (may be 0)
cudaError_t dwconv2d_bias_grad(DType t, const void* grad_out, void* grad_b, float* workspace, int64_t N, int C,
                               int64_t HW, bool channels_last, cudaStream_t stream);

// out[b][c][r] = in[b][r][c] for `batch` row-major rows x cols matrices: channels_last (NHWC)
// to NCHW with rows = H * W, cols = C, and back with the two swapped.
cudaError_t transpose_batched(DType t, const void* in, void* out, int64_t batch, int64_t rows, int64_t cols,
                              cudaStream_t stream);

}  // namespace lkpatch
