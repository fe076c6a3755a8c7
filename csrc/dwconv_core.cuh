// The register-blocked correlation at the heart of every fp32 pass, and launch helpers.
#pragma once

#include <cuda_runtime.h>

#include "dwconv.h"

namespace lkpatch {

// Kernel columns are walked in chunks of CH; every chunk starts at a multiple of CH, so shared
// memory is read with aligned 16-byte loads.
constexpr int kChunk = 8;

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ inline int round_up(int a, int b) { return ceil_div(a, b) * b; }

// acc[r][j] += sum_{d in [d_lo, d_hi)} sum_{k in chunks} B[d - r][k] * A[d][k + j]
//
// One thread owns an RH x RW block of results. A (shared memory, row pitch a_pitch) is read
// through a sliding window of RW + CH values per row, so each chunk loads only CH new values;
// B (row pitch b_pitch) must read zero for rows d - r that are out of range and for columns past
// the valid ones. `a_row` is the A row index of d == 0 (rows before d_lo are never touched);
// `b` points at B's row 0. Forward: A = input, B = kernel, results = outputs. Weight-grad:
// A = input, B = output-gradient tile, results = kernel taps.
template <int RH, int RW, int CH>
__device__ __forceinline__ void correlate(float (&acc)[RH][RW], const float* __restrict__ A, int a_row,
                                          int a_pitch, const float* __restrict__ b, int b_pitch, int d_lo,
                                          int d_hi, int k_lo, int nchunks) {
  static_assert(RW % 4 == 0 && CH % 4 == 0, "16-byte loads");
  for (int d = d_lo; d < d_hi; ++d) {
    const float* a = A + (a_row + d) * a_pitch + k_lo;
    const float* brow = b + d * b_pitch + k_lo;
    float win[RW + CH];
#pragma unroll
    for (int i = 0; i < RW; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(a + i);
      win[i] = v.x; win[i + 1] = v.y; win[i + 2] = v.z; win[i + 3] = v.w;
    }
    for (int c = 0; c < nchunks; ++c) {
#pragma unroll
      for (int i = 0; i < CH; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(a + RW + i);
        win[RW + i] = v.x; win[RW + i + 1] = v.y; win[RW + i + 2] = v.z; win[RW + i + 3] = v.w;
      }
#pragma unroll
      for (int r = 0; r < RH; ++r) {
        float wv[CH];
#pragma unroll
        for (int i = 0; i < CH; i += 4) {
          const float4 v = *reinterpret_cast<const float4*>(brow - r * b_pitch + i);
          wv[i] = v.x; wv[i + 1] = v.y; wv[i + 2] = v.z; wv[i + 3] = v.w;
        }
#pragma unroll
        for (int cc = 0; cc < CH; ++cc)
#pragma unroll
          for (int j = 0; j < RW; ++j) acc[r][j] = fmaf(wv[cc], win[j + cc], acc[r][j]);
      }
#pragma unroll
      for (int i = 0; i < RW; ++i) win[i] = win[i + CH];
      a += CH;
      brow += CH;
    }
  }
}

struct DeviceLimits {
  int sms;
  int max_smem_optin;  // bytes of dynamic shared memory one block may ask for
};

// Cached per device: attribute queries are cheap but not free, and launches are frequent.
inline cudaError_t device_limits(DeviceLimits* out) {
  static DeviceLimits cache[64];
  static bool known[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && known[dev]) {
    *out = cache[dev];
    return cudaSuccess;
  }
  DeviceLimits l{};
  err = cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&l.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  if (dev < 64) {
    cache[dev] = l;
    known[dev] = true;
  }
  *out = l;
  return cudaSuccess;
}

// Launch a kernel that uses `smem` bytes of dynamic shared memory, raising its limit when needed.
template <typename Kernel, typename Params>
inline cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Params& p) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace lkpatch
