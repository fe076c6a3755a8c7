// The register-blocked correlation at the heart of every fp32 pass, and launch helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "dwconv.h"

namespace lkpatch {

// Storage types: tensors are float, __half or __nv_bfloat16; arithmetic is always fp32.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ float load(const T* p) { return to_float(__ldg(p)); }

// The sum of v over the warp's 32 lanes, in every lane; the same fixed order each call.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// What every forward-kernel launch takes: the tensors, the shape, whether to flip the kernel (the
// input-gradient), and the batch size.
template <typename T>
struct ConvArgs {
  const T* in;
  const T* w;
  const T* bias;
  T* out;
  DwShape s;
  int flip;
  int N;  // images: planes = N * C

  void set(const T* in_, const T* w_, const T* bias_, T* out_, const DwShape& s_, bool flip_) {
    in = in_; w = w_; bias = bias_; out = out_; s = s_; flip = flip_ ? 1 : 0;
    N = (int)(s_.planes / s_.C);
  }
};

// Calls f(T{}) with T the storage type of `t`.
template <typename F>
inline cudaError_t with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f32:
    case DType::tf32: return f(float{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

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

// 16 bytes at once; dst and src 16-byte aligned.
__device__ __forceinline__ void copy_async16(float* dst, const float* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
#else
  const float4 v = valid ? __ldg(reinterpret_cast<const float4*>(src)) : make_float4(0.f, 0.f, 0.f, 0.f);
  *reinterpret_cast<float4*>(dst) = v;
#endif
}

__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Stage rows of planes into shared memory as fp32: for plane p < nplanes and row r < nrows,
// dst[p * plane_stride + r * pitch + c] = src(p)[(row0 + r) * stride + col0 + c] for c < pitch,
// zero outside columns [0, col_end). One warp per row segment of 32, lanes along it: coalesced,
// no divisions per element. fp32 is copied asynchronously -- 16 bytes per lane when `vec4`
// (col0, stride, col_end, pitch and plane_stride multiples of 4, 16-byte aligned sources);
// half types go through registers, several loads in flight per thread before their stores.
template <typename T, typename SrcOf>
__device__ __forceinline__ void stage_rows(float* dst, int plane_stride, int pitch, int nplanes, int nrows, int row0,
                                           int col0, int stride, int col_end, SrcOf src_of, bool vec4 = false) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  if constexpr (std::is_same_v<T, float>) {
    if (vec4) {  // a 4-column chunk is then wholly inside [0, col_end) or wholly outside
      for (int pr = warp; pr < nplanes * nrows; pr += nwarps) {
        const int p = pr / nrows, r = pr - p * nrows;
        const float* src = src_of(p) + (int64_t)(row0 + r) * stride;
        float* row = dst + p * plane_stride + r * pitch;
        for (int c = 4 * lane; c < pitch; c += 128) {
          const int x = col0 + c;
          const bool valid = x >= 0 && x < col_end;
          copy_async16(row + c, valid ? src + x : src, valid);
        }
      }
      return;
    }
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
  } else {
    constexpr int kBatch = 4;
    const int segs = ceil_div(pitch, 32), total = nplanes * nrows * segs;
    for (int base = warp; base < total; base += nwarps * kBatch) {
      float v[kBatch];
      int at[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int item = base + u * nwarps;
        const int pr = item / segs, c = (item - pr * segs) * 32 + lane;
        const int p = pr / nrows, r = pr - p * nrows, x = col0 + c;
        at[u] = item < total && c < pitch ? p * plane_stride + r * pitch + c : -1;
        v[u] = at[u] >= 0 && x >= 0 && x < col_end ? load(src_of(p) + (int64_t)(row0 + r) * stride + x) : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (at[u] >= 0) dst[at[u]] = v[u];
    }
  }
}

// Store RW consecutive results of one output row (16-byte stores where aligned).
template <typename T, int RW>
__device__ __forceinline__ void store_row(T* row, const float (&v)[RW], int valid, bool aligned) {
  if (aligned && valid >= RW) {
    if constexpr (std::is_same_v<T, float>) {
#pragma unroll
      for (int j = 0; j < RW; j += 4) *reinterpret_cast<float4*>(row + j) = make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
    } else {
      static_assert(RW % 8 == 0, "16-byte stores of 8 halves");
#pragma unroll
      for (int j = 0; j < RW; j += 8) {
        union { uint4 u; T h[8]; } pack;
#pragma unroll
        for (int i = 0; i < 8; ++i) pack.h[i] = from_float<T>(v[j + i]);
        *reinterpret_cast<uint4*>(row + j) = pack.u;
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < RW; ++j)
      if (j < valid) row[j] = from_float<T>(v[j]);
  }
}

// A per-plane shared-memory stride that puts consecutive planes 16 bytes apart modulo the 32
// banks, so lanes reading the same offset of different planes do not conflict.
__host__ __device__ inline int plane_stride(int floats) { return round_up(floats, 32) + 4; }

// out[i] = sum over g of parts[g * n + i], in order.
template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ parts, T* __restrict__ out, int G, int64_t n) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float sum = 0.f;
  for (int g = 0; g < G; ++g) sum += parts[g * n + i];
  out[i] = from_float<T>(sum);
}

template <typename T>
inline cudaError_t sum_partials(const float* parts, T* out, int G, int64_t n, cudaStream_t stream) {
  sum_partials_kernel<T><<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(parts, out, G, n);
  return cudaGetLastError();
}

// A weight-gradient workspace of `slices` partial results: every slice's taps [slices][C][KH][KW],
// then, with the bias gradient, every slice's bias sums [slices][C].
inline size_t slices_workspace_bytes(int slices, const DwShape& s, bool with_bias) {
  return (size_t)slices * s.C * (s.KH * s.KW + (with_bias ? 1 : 0)) * sizeof(float);
}
inline float* slices_bias_parts(float* workspace, int slices, const DwShape& s) {
  return workspace + (int64_t)slices * s.C * s.KH * s.KW;
}
// The slices added in order into grad_w, and into grad_b where it is not null.
template <typename T>
inline cudaError_t sum_slices(float* workspace, T* grad_w, T* grad_b, int slices, const DwShape& s,
                              cudaStream_t stream) {
  const cudaError_t e = sum_partials(workspace, grad_w, slices, (int64_t)s.C * s.KH * s.KW, stream);
  if (e != cudaSuccess || grad_b == nullptr) return e;
  return sum_partials(slices_bias_parts(workspace, slices, s), grad_b, slices, (int64_t)s.C, stream);
}

// The CUDA-core kernels (exact fp32 arithmetic, NCHW): general (dwconv_fwd.cu, dwconv_wgrad.cu),
// choosing the small-map variants (dwconv_small.cu: whole planes staged, images in the register
// tile) where use_small_map says so.
cudaError_t dwconv2d_fma_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                 const DwShape& s, bool flip_kernel, cudaStream_t stream);
size_t dwconv2d_fma_weight_grad_workspace(const DwShape& s);
cudaError_t dwconv2d_fma_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                     const DwShape& s, cudaStream_t stream);
bool dwconv2d_small_forward_fits(const DwShape& s);
bool dwconv2d_small_weight_grad_fits(const DwShape& s);
cudaError_t dwconv2d_small_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                   const DwShape& s, bool flip_kernel, cudaStream_t stream);
size_t dwconv2d_small_weight_grad_workspace(const DwShape& s);
cudaError_t dwconv2d_small_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                       const DwShape& s, cudaStream_t stream);

// The CUDA-core passes that stage 32 channels of a tile (dwconv_channel_tiles.cu): any dtype,
// exact fp32 arithmetic; odd kernel widths up to 15; the forward / input-grad of channels_last
// tensors (read as they are) up to 15 rows; the weight-grad of channels_last or NCHW ones (s.nhwc;
// NCHW in fp16 / bf16) up to 49 taps (one column: 15 rows), with a workspace, and the bias
// gradient on the way where grad_b is not null (its workspace then sized with_bias).
bool dwconv2d_channel_tile_forward_fits(DType t, const DwShape& s);
cudaError_t dwconv2d_channel_tile_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                          const DwShape& s, bool flip_kernel, cudaStream_t stream);
bool dwconv2d_channel_tile_weight_grad_fits(DType t, const DwShape& s);
size_t dwconv2d_channel_tile_weight_grad_workspace(const DwShape& s, bool with_bias);
cudaError_t dwconv2d_channel_tile_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w,
                                              float* workspace, const DwShape& s, cudaStream_t stream, void* grad_b);
// The multiply-adds their tiles issue for shape s (whole tiles of 32 channels, every tap): the
// same in each pass, which all walk the output tiles.
double dwconv2d_channel_tile_macs(const DwShape& s);

// The tensor-core forward / input-grad for fp16, bf16 and TF32 (dwconv_tc.cu), where it applies:
// sm_80+, 8 or more images. LKPATCH_TENSOR_CORES=never turns it off (benchmarking).
bool dwconv2d_tc_forward_fits(DType t, const DwShape& s);
// The bytes of each asynchronous copy by which its general kernel stages this shape's NCHW rows
// (16, 8 or 4), or 0: by shifted loads (half types on odd widths), which its staging cannot
// overlap with the mma.
int dwconv2d_tc_forward_copy_bytes(DType t, const DwShape& s);
cudaError_t dwconv2d_tc_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                const DwShape& s, bool flip_kernel, cudaStream_t stream);

// The tensor-core weight-grad for fp16, bf16 and TF32 (dwconv_tc_wgrad.cu): sm_80+, output-gradient
// planes that fit in shared memory (TF32: maps from 20 x 20 in area). Takes a workspace (except
// channels_last). Where it fits and takes_bias says so (the small-map kernels, NCHW and
// channels_last, and TF32's banded one), a non-null grad_b also gets the bias gradient
// (workspace with_bias).
bool dwconv2d_tc_weight_grad_fits(DType t, const DwShape& s);
bool dwconv2d_tc_weight_grad_takes_bias(DType t, const DwShape& s);
bool dwconv2d_tc_weight_grad_banded(DType t, const DwShape& s);  // else the small-map kernels
size_t dwconv2d_tc_weight_grad_workspace(DType t, const DwShape& s, bool with_bias);
cudaError_t dwconv2d_tc_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                    const DwShape& s, cudaStream_t stream, void* grad_b);

// The rows family (dwconv_rows*.cu): tensor cores with M = 16 output rows of one image, any
// batch, NCHW or channels_last (s.nhwc), fp16 / bf16 / TF32, sm_80+. Fits: within the device's
// limits. The weight-gradient always takes a workspace; a non-null grad_b also gets the bias
// gradient (workspace with_bias).
bool dwconv2d_rows_forward_fits(DType t, const DwShape& s);
cudaError_t dwconv2d_rows_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                  const DwShape& s, bool flip_kernel, cudaStream_t stream);
bool dwconv2d_rows_weight_grad_fits(DType t, const DwShape& s);
size_t dwconv2d_rows_weight_grad_workspace(DType t, const DwShape& s, bool with_bias);
cudaError_t dwconv2d_rows_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                      const DwShape& s, cudaStream_t stream, void* grad_b);
// The elements their blocks stage into shared memory, over the whole pass (tiles with their
// halos, and the forward's B tables): the work besides the multiply-adds that grows as tiles shrink.
double dwconv2d_rows_forward_staged(DType t, const DwShape& s);
double dwconv2d_rows_weight_grad_staged(DType t, const DwShape& s);
double dwconv2d_tc_forward_staged(DType t, const DwShape& s);       // the images family's, as these
double dwconv2d_tc_weight_grad_staged(DType t, const DwShape& s);
// The blocks of the images family's channels_last (small-map) grids for shape s (half types).
int64_t dwconv2d_tc_nhwc_forward_blocks(const DwShape& s);
int64_t dwconv2d_tc_nhwc_weight_grad_blocks(const DwShape& s);

// Kernel rows [lo, hi) that reach the map from some output row (iy = oy + i - pad_t in [0, H));
// empty (hi <= lo) where none does.
struct KernelRows {
  int lo, hi;
};
__host__ __device__ inline KernelRows reaching_kernel_rows(const DwShape& s) {
  const int lo = s.pad_t - s.OH + 1, hi = s.H + s.pad_t;
  return {lo > 0 ? lo : 0, hi < s.KH ? hi : s.KH};
}

// Kernel-row tiles (8 rows each) of the banded weight-gradients' accumulators (16-column tiles:
// one, or two from 17 columns): one for kernels up to 8 rows (7 x 7, thin ones), where a second
// would only multiply zero rows.
inline int weight_grad_row_tiles(int KH) { return KH <= 8 ? 1 : KH <= 16 ? 2 : 4; }
inline int weight_grad_col_tiles(int KW) { return KW <= 16 ? 1 : 2; }

// f(JT, IT) with the tile counts above as compile-time constants (std::integral_constant): the
// banded weight-gradients' launchers instantiate their kernels for each pair here.
template <typename F>
cudaError_t with_weight_grad_tiles(int JT, int IT, F&& f) {
  auto rows = [&](auto jt) -> cudaError_t {
    if (IT == 1) return f(jt, std::integral_constant<int, 1>());
    if (IT == 2) return f(jt, std::integral_constant<int, 2>());
    return f(jt, std::integral_constant<int, 4>());
  };
  return JT == 1 ? rows(std::integral_constant<int, 1>()) : rows(std::integral_constant<int, 2>());
}

// The tensor-core small-map kernels (dwconv_tc*.cu) stage whole planes with rows padded to 16
// columns: 16-column tiles per row, 1 (every side up to 16), 2 (up to 32), or 0 (larger).
inline int small_map_tiles(const DwShape& s) {
  const int most = std::max(std::max(s.H, s.W), std::max(s.OH, s.OW));
  return most <= 16 ? 1 : most <= 32 ? 2 : 0;
}

// Their blocks take one channel's images in slices: a multiple of 16, at most `most`, and enough
// blocks for two per SM.
struct ImageSlices {
  int per_slice, slices;
};
inline ImageSlices image_slices(int N, int C, int sms, int most) {
  const int want = std::max(ceil_div(N, most), std::min(ceil_div(N, 16), ceil_div(2 * sms, C)));
  ImageSlices q{};
  q.per_slice = std::min(most, round_up(ceil_div(N, want), 16));
  q.slices = ceil_div(N, q.per_slice);
  return q;
}

// The benchmarking knobs, read once from the environment (the only place that reads them):
// LKPATCH_TENSOR_CORES=never keeps every dtype on the CUDA-core kernels; LKPATCH_SMALL_MAP=
// never|always overrides the fp32 small-map rule; LKPATCH_CHANNEL_TILES=never|always the rule for
// the CUDA-core kernel that stages 32 channels of a tile; LKPATCH_IMAGES=never|always, on maps
// above 16 x 16, the images family only where the rows family cannot take a pass / its forward
// wherever it fits;
// LKPATCH_SMALL_IMAGES and LKPATCH_TC_GROUPS set
// the images an fp32 small-map thread and the 16-image groups a general tensor-core block take;
// LKPATCH_ROWS_STEPS the tile rows a rows-family forward block, and the items a rows-family
// channels_last weight-gradient block, takes one after the other; LKPATCH_ROWS_FILL the blocks an
// SM a rows-family forward grid gets at least where fewer jobs a block can give it them (0: off).
struct Knobs {
  bool tensor_cores = true;
  char small_map = 0;  // 'n', 'a' or 0 (the rule)
  char channel_tiles = 0;  // LKPATCH_CHANNEL_TILES: 'n', 'a' or 0 (the plan's rule)
  char images = 0;     // LKPATCH_IMAGES: 'n', 'a' or 0 (the plan's rule)
  int small_images = 0, tc_groups = 0, rows_steps = 0, rows_fill = -1;  // -1: the plan's default
};
inline const Knobs& knobs() {
  static const Knobs k = [] {
    Knobs r;
    const char* e = getenv("LKPATCH_TENSOR_CORES");
    r.tensor_cores = !(e && e[0] == 'n');
    e = getenv("LKPATCH_SMALL_MAP");
    r.small_map = e && (e[0] == 'n' || e[0] == 'a') ? e[0] : 0;
    e = getenv("LKPATCH_CHANNEL_TILES");
    r.channel_tiles = e && (e[0] == 'n' || e[0] == 'a') ? e[0] : 0;
    e = getenv("LKPATCH_IMAGES");
    r.images = e && (e[0] == 'n' || e[0] == 'a') ? e[0] : 0;
    e = getenv("LKPATCH_SMALL_IMAGES");
    r.small_images = e ? atoi(e) : 0;  // 8: the fp32 small-map forward takes 8 images a thread, not 4
    e = getenv("LKPATCH_TC_GROUPS");
    r.tc_groups = e ? std::max(1, atoi(e)) : 0;
    e = getenv("LKPATCH_ROWS_STEPS");
    r.rows_steps = e ? std::max(0, atoi(e)) : 0;
    e = getenv("LKPATCH_ROWS_FILL");
    r.rows_fill = e ? std::max(0, atoi(e)) : -1;
    return r;
  }();
  return k;
}
inline bool tensor_cores_enabled() { return knobs().tensor_cores; }

// Bytes per asynchronous staging copy of NCHW rows `row_bytes` long starting at `addr`, each row's
// copies starting `lead` bytes past a 16-byte boundary of the row: the widest of 16, 8, 4 that
// every copy is aligned to (`narrow`: 8 and 4 allowed, else 16 only), else 0: the kernels' 16-byte
// loads shifted into place (load_shifted16), which stage faster than 8- or 4-byte copies where
// the kernel has registers to keep several in flight.
inline int copy_bytes(int64_t row_bytes, uintptr_t addr, int64_t lead = 0, bool narrow = false) {
  for (int v : {16, 8, 4})
    if ((v == 16 || narrow) && row_bytes % v == 0 && addr % v == 0 && lead % v == 0) return v;
  return 0;
}

// Whether an fp32 pass takes the small-map variant where it fits.
inline bool use_small_map(bool fits, const DwShape& s) {
  if (!fits || knobs().small_map == 'n') return false;
  return knobs().small_map == 'a' || s.KH * s.KW >= 25;
}

// Set (on this thread) by describe_device (dwconv.h).
inline const DeviceLimits*& described_device() {
  static thread_local const DeviceLimits* d = nullptr;
  return d;
}

// Cached per device: attribute queries are cheap but not free, and launches are frequent.
inline cudaError_t device_limits(DeviceLimits* out) {
  if (described_device() != nullptr) {
    *out = *described_device();
    return cudaSuccess;
  }
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
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&l.cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (dev < 64) {
    cache[dev] = l;
    known[dev] = true;
  }
  *out = l;
  return cudaSuccess;
}

// The GPU's limits, or zeros where it cannot be asked (plans then take their smallest grids).
inline DeviceLimits limits_or_none() {
  DeviceLimits lim{};
  if (device_limits(&lim) != cudaSuccess) lim = DeviceLimits{};
  return lim;
}

// The GPU's multiprocessors, or 0 where it cannot be asked (plans that size their grids by it).
inline int sms_or_zero() { return limits_or_none().sms; }

// Launch a kernel that uses `smem` bytes of dynamic shared memory, raising its limit when needed
// (once per kernel, device and size: the attribute call costs host time on every launch). Kernels
// launched here declare no static shared memory: up to 48 KB of dynamic memory then needs no
// raised limit.
template <typename Kernel, typename Params>
inline cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Params& p) {
  if (smem > 48 * 1024) {
    static std::mutex mu;
    static std::map<std::pair<const void*, int>, size_t> raised;
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    std::lock_guard<std::mutex> lock(mu);
    size_t& limit = raised[{reinterpret_cast<const void*>(kernel), dev}];
    if (smem > limit) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
      if (err != cudaSuccess) return err;
      limit = smem;
    }
  }
  kernel<<<grid, block, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace lkpatch
