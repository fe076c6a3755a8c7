// Bias-gradient: grad_b[c] = sum over n, y, x of grad_out[n, c, y, x]; NCHW or channels_last.
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
  sum = warp_sum(sum);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    sum = warp_sum(threadIdx.x < kThreads / 32 ? part[threadIdx.x] : 0.f);
    if (threadIdx.x == 0) out[(int64_t)slice * C + c] = from_float<O>(sum);
  }
}

// channels_last: grad is rows x C with rows = N * H * W. Block (b, slice) sums rows [slice * per,
// (slice + 1) * per) of channels 32 V b ..: lane l takes V consecutive channels (one B-byte load; a
// warp reads a row's run of 32 V channels), the warps take rows in turn, kUnroll loads in flight,
// and the warps' sums are added in a fixed order.
template <typename T, int B, typename O>
__global__ void __launch_bounds__(kThreads) bias_grad_nhwc(const T* __restrict__ grad, O* __restrict__ out,
                                                           int64_t rows, int C, int64_t per) {
  constexpr int V = B / sizeof(T), kUnroll = 4, kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = (blockIdx.x * 32 + lane) * V;  // C is a multiple of V: c < C means all V are
  const int64_t r_end = min(rows, (int64_t)(blockIdx.y + 1) * per);
  float sum[V] = {};
  if (c < C) {
    for (int64_t r = (int64_t)blockIdx.y * per + warp; r < r_end; r += kWarps * kUnroll) {
      Chunk<B> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (r + u * kWarps < r_end) v[u] = *reinterpret_cast<const Chunk<B>*>(grad + (r + u * kWarps) * C + c);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (r + u * kWarps >= r_end) continue;
        const T* e = reinterpret_cast<const T*>(v[u].bytes);
#pragma unroll
        for (int k = 0; k < V; ++k) sum[k] += to_float(e[k]);
      }
    }
  }
  __shared__ float red[kWarps][32 * V];
#pragma unroll
  for (int k = 0; k < V; ++k) red[warp][lane * V + k] = sum[k];
  __syncthreads();
  for (int e = threadIdx.x; e < 32 * V; e += kThreads) {
    const int cc = blockIdx.x * 32 * V + e;
    if (cc >= C) continue;
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red[w][e];
    out[(int64_t)blockIdx.y * C + cc] = from_float<O>(total);
  }
}

// out[c] = sum over slices of parts[slice][c]: 32 channels a block, its 8 warps each a strided
// share of the slices (short dependent chains), added in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_slices(const float* __restrict__ parts, T* __restrict__ out,
                                                       int slices, int C) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c = blockIdx.x * 32 + lane;
  float sum = 0.f;
  if (c < C)
    for (int s = warp; s < slices; s += kWarps) sum += parts[(int64_t)s * C + c];
  __shared__ float red[kWarps][32];
  red[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && c < C) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red[w][lane];
    out[c] = from_float<T>(total);
  }
}

int slices_for(int64_t N, int C, int64_t HW, int sms) {
  // Aim at ~4 blocks per SM, but keep at least ~16K elements per block.
  const int64_t by_gpu = std::max<int64_t>(1, (4LL * sms + C - 1) / C);
  const int64_t by_work = std::max<int64_t>(1, N * HW / (16 * 1024));
  return (int)std::min<int64_t>({by_gpu, by_work, N, 65535});
}

// channels_last: row slices for ~4 blocks per SM (counting blocks of 256 channels, the 16-byte
// half-type case), at least 64 rows each, at most 256 slices. The workspace and the launch both
// take it from here.
int nhwc_slices_for(int64_t rows, int C, int sms) {
  const int64_t by_gpu = std::max<int64_t>(1, ceil_div(4 * sms, ceil_div(C, 256)));
  return (int)std::min<int64_t>({by_gpu, std::max<int64_t>(1, rows / 64), 256});
}

// Bytes a thread loads per row: 16 where C and the address allow it (8 channels of a half type, 4
// floats), else one element.
template <typename T>
int nhwc_load_bytes(int C, const void* grad) {
  return C % (16 / (int)sizeof(T)) == 0 && reinterpret_cast<uintptr_t>(grad) % 16 == 0 ? 16 : (int)sizeof(T);
}

}  // namespace

size_t dwconv2d_bias_grad_workspace(int64_t N, int C, int64_t HW, bool channels_last) {
  DeviceLimits lim;
  if (N == 0 || C == 0 || device_limits(&lim) != cudaSuccess) return 0;
  const int slices = channels_last ? nhwc_slices_for(N * HW, C, lim.sms) : slices_for(N, C, HW, lim.sms);
  return slices > 1 ? sizeof(float) * slices * (size_t)C : 0;
}

cudaError_t dwconv2d_bias_grad(DType t, const void* grad_out, void* grad_b, float* workspace, int64_t N, int C,
                               int64_t HW, bool channels_last, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  if (N == 0 || HW == 0) return cudaMemsetAsync(grad_b, 0, elem_bytes(t) * (size_t)C, stream);
  DeviceLimits lim;
  cudaError_t err = device_limits(&lim);
  if (err != cudaSuccess) return err;
  if (channels_last) {
    return with_dtype(t, [&](auto tag) -> cudaError_t {
      using T = decltype(tag);
      const T* g = static_cast<const T*>(grad_out);
      const int bytes = nhwc_load_bytes<T>(C, grad_out);
      const int col_blocks = ceil_div(C, 32 * bytes / (int)sizeof(T));  // 32 loads of a row each
      const int64_t rows = N * HW;
      const int slices = nhwc_slices_for(rows, C, lim.sms);
      if (slices > 1 && workspace == nullptr) return cudaErrorInvalidValue;
      const int64_t per = (rows + slices - 1) / slices;
      auto run = [&](auto chunk) -> cudaError_t {
        constexpr int B = decltype(chunk)::value;
        const dim3 grid(col_blocks, slices);
        if (slices == 1) {
          bias_grad_nhwc<T, B, T><<<grid, kThreads, 0, stream>>>(g, static_cast<T*>(grad_b), rows, C, per);
          return cudaGetLastError();
        }
        bias_grad_nhwc<T, B, float><<<grid, kThreads, 0, stream>>>(g, workspace, rows, C, per);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
        sum_slices<T><<<(C + 31) / 32, kThreads, 0, stream>>>(workspace, static_cast<T*>(grad_b), slices, C);
        return cudaGetLastError();
      };
      if (bytes == 16) return run(std::integral_constant<int, 16>());
      return run(std::integral_constant<int, (int)sizeof(T)>());
    });
  }
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
      sum_slices<T><<<(C + 31) / 32, kThreads, 0, stream>>>(workspace, static_cast<T*>(grad_b), slices, C);
      return cudaGetLastError();
    };
    if (bytes % 16 == 0 && addr % 16 == 0) return run(std::integral_constant<int, 16>());
    if (bytes % 8 == 0 && addr % 8 == 0) return run(std::integral_constant<int, 8>());
    return run(std::integral_constant<int, (int)sizeof(T)>());
  });
}

}  // namespace lkpatch
