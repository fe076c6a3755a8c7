// Bias-gradient: grad_b[c] = sum over n, y, x of grad_out[n, c, y, x].
//
// One block per channel; each thread sums a strided share, then the block adds the shares in a
// fixed tree, so the result is deterministic and no running sum is long.
#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) bias_grad_f32(const float* __restrict__ grad, float* __restrict__ out,
                                                          int64_t N, int C, int64_t HW) {
  const int c = blockIdx.x;
  float sum = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    const float* p = grad + (n * C + c) * HW;
    for (int64_t i = threadIdx.x; i < HW; i += kThreads) sum += __ldg(p + i);
  }
  __shared__ float part[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    sum = threadIdx.x < kThreads / 32 ? part[threadIdx.x] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (threadIdx.x == 0) out[c] = sum;
  }
}

}  // namespace

cudaError_t dwconv2d_bias_grad_f32(const float* grad_out, float* grad_b, int64_t N, int C, int64_t HW,
                                   cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  bias_grad_f32<<<C, kThreads, 0, stream>>>(grad_out, grad_b, N, C, HW);
  return cudaGetLastError();
}

}  // namespace lkpatch
