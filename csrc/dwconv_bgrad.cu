// Bias-gradient: grad_b[c] = sum over n, y, x of grad_out[n, c, y, x].
//
// Block (c, s) sums images [s * per, (s + 1) * per) of channel c: each thread a strided share
// (planes smaller than the block as one run of elements, which would otherwise leave most threads
// idle), then a fixed tree. With several image slices the partial sums go to a workspace and a second
// kernel adds them in order -- deterministic, and enough blocks to fill the GPU when C is small.
#include <algorithm>

#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

constexpr int kThreads = 256;

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) bias_grad(const T* __restrict__ grad, O* __restrict__ out, int N, int C,
                                                      int64_t HW, int per) {
  const int c = blockIdx.x, slice = blockIdx.y;
  const int n_end = min(N, (slice + 1) * per);
  float sum = 0.f;
  if (HW >= kThreads) {
    for (int n = slice * per; n < n_end; ++n) {
      const T* p = grad + ((int64_t)n * C + c) * HW;
      for (int64_t i = threadIdx.x; i < HW; i += kThreads) sum += load(p + i);
    }
  } else {
    // Planes smaller than the block: element i of image n, each step kThreads elements on.
    const int dn = kThreads / (int)HW, di = kThreads % (int)HW;
    int i = threadIdx.x % (int)HW, n = slice * per + threadIdx.x / (int)HW;
    for (; n < n_end; n += dn) {
      sum += load(grad + ((int64_t)n * C + c) * HW + i);
      i += di;
      if (i >= HW) {
        i -= (int)HW;
        ++n;
      }
    }
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
    if (threadIdx.x == 0) out[(int64_t)slice * C + c] = from_float<O>(sum);
  }
}

template <typename T>
__global__ void sum_slices(const float* __restrict__ parts, T* __restrict__ out, int slices, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float sum = 0.f;
  for (int s = 0; s < slices; ++s) sum += parts[(int64_t)s * C + c];
  out[c] = from_float<T>(sum);
}

int slices_for(int64_t N, int C, int64_t HW, int sms) {
  // Aim at ~4 blocks per SM, but keep at least ~16K elements per block.
  const int64_t by_gpu = std::max<int64_t>(1, (4LL * sms + C - 1) / C);
  const int64_t by_work = std::max<int64_t>(1, N * HW / (16 * 1024));
  return (int)std::min<int64_t>({by_gpu, by_work, N, 65535});
}

}  // namespace

size_t dwconv2d_bias_grad_workspace(int64_t N, int C, int64_t HW) {
  DeviceLimits lim;
  if (N == 0 || C == 0 || device_limits(&lim) != cudaSuccess) return 0;
  const int slices = slices_for(N, C, HW, lim.sms);
  return slices > 1 ? sizeof(float) * slices * (size_t)C : 0;
}

cudaError_t dwconv2d_bias_grad(DType t, const void* grad_out, void* grad_b, float* workspace, int64_t N, int C,
                               int64_t HW, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  if (N == 0 || HW == 0) return cudaMemsetAsync(grad_b, 0, elem_bytes(t) * (size_t)C, stream);
  DeviceLimits lim;
  cudaError_t err = device_limits(&lim);
  if (err != cudaSuccess) return err;
  const int slices = slices_for(N, C, HW, lim.sms);
  if (slices > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const int per = (int)((N + slices - 1) / slices);
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad_out);
    if (slices == 1) {
      bias_grad<T, T><<<dim3(C, 1), kThreads, 0, stream>>>(g, static_cast<T*>(grad_b), (int)N, C, HW, per);
      return cudaGetLastError();
    }
    bias_grad<T, float><<<dim3(C, slices), kThreads, 0, stream>>>(g, workspace, (int)N, C, HW, per);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    sum_slices<T><<<(C + 255) / 256, 256, 0, stream>>>(workspace, static_cast<T*>(grad_b), slices, C);
    return cudaGetLastError();
  });
}

}  // namespace lkpatch
