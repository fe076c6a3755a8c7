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

__device__ __forceinline__ void load4(float* dst, const float* src) {
  const float4 v = *reinterpret_cast<const float4*>(src);
  dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
}

// One row step of `correlate`: all chunks of A row `a` against B rows brow - r * b_pitch for the
// rows r whose bit is set in `rows` (ALL: every row, checked at compile time).
template <int RH, int RW, int CH, bool ALL>
__device__ __forceinline__ void correlate_row(float (&acc)[RH][RW], const float* a, const float* brow, int b_pitch,
                                              int nchunks, unsigned rows) {
  float win[RW + CH];
#pragma unroll
  for (int i = 0; i < RW; i += 4) load4(win + i, a + i);
  for (int c = 0; c < nchunks; ++c) {
#pragma unroll
    for (int i = 0; i < CH; i += 4) load4(win + RW + i, a + RW + i);
#pragma unroll
    for (int r = 0; r < RH; ++r) {
      if (!ALL && !(rows >> r & 1u)) continue;
      float wv[CH];
#pragma unroll
      for (int i = 0; i < CH; i += 4) load4(wv + i, brow - r * b_pitch + i);
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

// acc[r][j] += sum_{d in [d_lo, d_hi)} sum_{k in chunks} B[d - r][k] * A[d][k + j],  0 <= d - r < b_rows
//
// One thread owns an RH x RW block of results. A (shared memory, row pitch a_pitch) is read
// through a sliding window of RW + CH values, so each chunk loads only CH new values; B (row
// pitch b_pitch) must read zero in columns past the valid ones. Pairs (d, r) whose B row falls
// outside [0, b_rows) are skipped, not multiplied by zero. `a` points at A's row for d == 0 (rows
// before d_lo are never touched), `b` at B's row 0; both already offset to column k_lo.
// Forward: A = input, B = kernel, results = outputs. Weight-grad: A = input, B = output-gradient
// tile, results = kernel taps.
template <int RH, int RW, int CH>
__device__ __forceinline__ void correlate(float (&acc)[RH][RW], const float* __restrict__ a, int a_pitch,
                                          const float* __restrict__ b, int b_pitch, int b_rows, int d_lo, int d_hi,
                                          int nchunks) {
  static_assert(RW % 4 == 0 && CH % 4 == 0, "16-byte loads");
  for (int d = d_lo; d < d_hi; ++d) {
    const float* arow = a + d * a_pitch;
    const float* brow = b + d * b_pitch;
    if (d >= RH - 1 && d < b_rows) {
      correlate_row<RH, RW, CH, true>(acc, arow, brow, b_pitch, nchunks, 0u);
    } else {
      unsigned rows = 0;
#pragma unroll
      for (int r = 0; r < RH; ++r) rows |= (unsigned)(d - r >= 0 && d - r < b_rows) << r;
      correlate_row<RH, RW, CH, false>(acc, arow, brow, b_pitch, nchunks, rows);
    }
  }
}

// Asynchronous global -> shared copies (sm_80+), each element read once; `valid == false` stores
// a zero instead (src must still be a valid address). Older GPUs copy through registers.
__device__ __forceinline__ void copy_async(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0));
#else
  *dst = valid ? __ldg(src) : 0.f;
#endif
}

__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Stage rows of planes into shared memory: for plane p < nplanes and row r < nrows,
// dst[p * plane_stride + r * pitch + c] = src(p)[(row0 + r) * stride + col0 + c] for c < pitch,
// zero outside columns [0, col_end). One warp per row, lanes along it: coalesced, no divisions
// per element.
template <typename SrcOf>
__device__ __forceinline__ void stage_rows(float* dst, int plane_stride, int pitch, int nplanes, int nrows, int row0,
                                           int col0, int stride, int col_end, SrcOf src_of) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  for (int pr = warp; pr < nplanes * nrows; pr += nwarps) {
    const int p = pr / nrows, r = pr - p * nrows;
    const float* src = src_of(p) + (int64_t)(row0 + r) * stride;
    float* row = dst + p * plane_stride + r * pitch;
    for (int c = lane; c < pitch; c += 32) {
      const int x = col0 + c;
      const bool valid = x >= 0 && x < col_end;
      copy_async(row + c, valid ? src + x : src, valid);
    }
  }
}

// A per-plane shared-memory stride that puts consecutive planes 16 bytes apart modulo the 32
// banks, so lanes reading the same offset of different planes do not conflict.
__host__ __device__ inline int plane_stride(int floats) { return round_up(floats, 32) + 4; }

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
