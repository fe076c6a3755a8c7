// Bias-gradient: grad_b[c] = sum over n, y, x of grad_out[n, c, y, x].
//
// Block (c, s) sums images [s * per, (s + 1) * per) of channel c: its planes as one run of
// vector loads (small planes would otherwise leave most threads idle), each thread a strided
// share, then a fixed tree. With several image slices the partial sums go to a workspace and a second
// kernel adds them in order -- deterministic, and enough blocks to fill the GPU when C is small.
#include <algorithm>

#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

constexpr int kThreads = 256;

// B bytes of consecutive elements, loaded at once.
template <int B>
struct alignas(B) Chunk {
  unsigned char bytes[B];
};

// B: bytes per load (16, 8, or one element), where HW and the tensor's address allow it. The
// block's images are one run of HW / V loads per plane; each thread takes every kThreads-th load,
// kUnroll in flight.
template <typename T, int B, typename O>
__global__ void __launch_bounds__(kThreads) bias_grad(const T* __restrict__ grad, O* __restrict__ out, int N, int C,
                                                      int64_t HW, int per) {
  constexpr int V = B / sizeof(T), kUnroll = 4;
  const int c = blockIdx.x, slice = blockIdx.y;
  const int n_end = min(N, (slice + 1) * per);
  const int64_t loads = HW / V;  // per plane
  // Load i of image n; each step moves kThreads loads on: dn images and di loads.
  const int dn = (int)(kThreads / loads), di = (int)(kThreads % loads);
  int n = slice * per + (int)(threadIdx.x / loads);
  int64_t i = threadIdx.x % loads;
  float sum = 0.f;
  while (n < n_end) {
    Chunk<B> v[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      ok[u] = n < n_end;
      if (ok[u]) v[u] = reinterpret_cast<const Chunk<B>*>(grad + ((int64_t)n * C + c) * HW)[i];
      n += dn;
      i += di;
      if (i >= loads) {
        i -= loads;
        ++n;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (!ok[u]) continue;
      const T* e = reinterpret_cast<const T*>(v[u].bytes);
#pragma unroll
      for (int k = 0; k < V; ++k) sum += to_float(e[k]);
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
    const uintptr_t addr = reinterpret_cast<uintptr_t>(grad_out);
    const int64_t bytes = HW * (int64_t)sizeof(T);  // per plane
    auto run = [&](auto chunk) -> cudaError_t {
      constexpr int B = decltype(chunk)::value;
      if (slices == 1) {
        bias_grad<T, B, T><<<dim3(C, 1), kThreads, 0, stream>>>(g, static_cast<T*>(grad_b), (int)N, C, HW, per);
        return cudaGetLastError();
      }
      bias_grad<T, B, float><<<dim3(C, slices), kThreads, 0, stream>>>(g, workspace, (int)N, C, HW, per);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
      sum_slices<T><<<(C + 255) / 256, 256, 0, stream>>>(workspace, static_cast<T*>(grad_b), slices, C);
      return cudaGetLastError();
    };
    if (bytes % 16 == 0 && addr % 16 == 0) return run(std::integral_constant<int, 16>());
    if (bytes % 8 == 0 && addr % 8 == 0) return run(std::integral_constant<int, 8>());
    return run(std::integral_constant<int, (int)sizeof(T)>());
  });
}

}  // namespace lkpatch
