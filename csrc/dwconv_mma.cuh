// Tensor-core and asynchronous-copy primitives shared by the tensor-core kernels (sm_80+ PTX;
// they compile to nothing on older targets, where the host never launches those kernels).
// Element type float means TF32: fp32 storage, tensor-core products of values rounded to TF32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "dwconv_core.cuh"

namespace lkpatch {

__device__ __forceinline__ uint32_t bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <typename T> __device__ __forceinline__ T bits_to(unsigned short b);
template <> __device__ __forceinline__ __half bits_to<__half>(unsigned short b) { return __ushort_as_half(b); }
template <> __device__ __forceinline__ __nv_bfloat16 bits_to<__nv_bfloat16>(unsigned short b) { return __ushort_as_bfloat16(b); }
// Two 16-bit values in one register, `lo` in the low half (the order of mma fragments).
template <typename T> __device__ __forceinline__ uint32_t pack2(T lo, T hi) { return bits(lo) | (bits(hi) << 16); }

// Two consecutive elements as one 4- or 8-byte store (aligned so).
template <typename T>
__device__ __forceinline__ void store2(T* at, T lo, T hi) {
  if constexpr (std::is_same_v<T, float>) *reinterpret_cast<float2*>(at) = make_float2(lo, hi);
  else *reinterpret_cast<uint32_t*>(at) = pack2(lo, hi);
}

// Two consecutive elements as one 4- or 8-byte load (aligned so).
template <typename T>
__device__ __forceinline__ void load2(const T* at, T& lo, T& hi) {
  if constexpr (std::is_same_v<T, float>) {
    const float2 f = *reinterpret_cast<const float2*>(at);
    lo = f.x; hi = f.y;
  } else {
    const uint32_t both = *reinterpret_cast<const uint32_t*>(at);
    lo = bits_to<T>((unsigned short)(both & 0xffffu));
    hi = bits_to<T>((unsigned short)(both >> 16));
  }
}

// An fp32 value rounded to TF32 (to nearest, ties away), as an mma operand register.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#endif
  return r;
}

// Elements of one mma k-step: 16 half values or 8 TF32 values, 32 bytes either way.
template <typename T> constexpr int kStep = 32 / (int)sizeof(T);

// d += A * B for one m16n8 tile with fp32 accumulators, K = kStep<T>. Half types: m16n8k16, A
// row-major 16 x 16 (a0..a3, two values a register), B column-major 16 x 8 (b0, b1). float:
// m16n8k8 TF32, A 16 x 8 (a0..a3), B 8 x 8 (b0, b1), one TF32 value a register. Not volatile: it
// has no side effects, and the compiler may schedule it.
template <typename T>
__device__ __forceinline__ void mma_tile(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, float>)
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else if constexpr (std::is_same_v<T, __half>)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Four 8 x 8 matrices of 16-bit values from shared memory; lane l gives the address of row l % 8
// of matrix l / 8 (16-byte aligned). TRANS: each matrix transposed, so lane l's row is a column of
// the result (an operand stored K-major, such as an image index that runs slowest, becomes a fragment).
template <bool TRANS = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], unsigned addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// Two 8 x 8 matrices: lanes 0 .. 15 give the row addresses (the other lanes' are not read).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[4], unsigned addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#endif
}

// BYTES (4, 8 or 16, aligned so) from global to shared memory asynchronously; zeros if !valid
// (src must still be a valid address).
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(BYTES),
                 "r"(valid ? BYTES : 0));
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N committed groups are pending.
template <int N>
__device__ __forceinline__ void copy_async_wait_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Elements x .. x + 16 / sizeof(T) - 1 of a row of `len` as one 16-byte vector, zeros outside
// [0, len) and where !row_in: for rows whose elements are not aligned for 16-byte copies (widths
// not a multiple of 16 bytes, odd ones in 2-byte types), which narrower copies or element loads
// would move a few bytes per instruction.
// The one or two aligned vectors holding them are loaded (only those holding an element of the
// row: never outside the 16-byte-aligned span the tensor covers, which PyTorch's allocator, handing
// out 512-byte blocks, always owns) and shifted together.
template <typename T>
__device__ __forceinline__ uint4 load_shifted16(const T* row, int x, int len, bool row_in) {
  constexpr int E = 16 / (int)sizeof(T), EW = 4 / (int)sizeof(T);  // elements a vector, a word
  uint4 out = make_uint4(0, 0, 0, 0);
  if (!row_in || x >= len || x + E <= 0) return out;
  const uintptr_t a = reinterpret_cast<uintptr_t>(row) + (intptr_t)x * (intptr_t)sizeof(T);
  const int mis = (int)(a & 15);                                 // bytes past the aligned vector
  const uint4* v = reinterpret_cast<const uint4*>(a - mis);
  const int split = x + (16 - mis) / (int)sizeof(T);             // the first element of vector 1
  uint4 w0 = out, w1 = out;
  if (split > 0) w0 = __ldg(v);                                  // holds elements from max(x, 0)
  if (mis != 0 && split < len) w1 = __ldg(v + 1);
  const uint32_t w[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
  uint32_t u[6], r[5];  // words mis / 4 .. mis / 4 + 4, by two selects (no indexed registers)
#pragma unroll
  for (int k = 0; k < 6; ++k) u[k] = (mis & 8) ? w[k + 2] : w[k];
#pragma unroll
  for (int k = 0; k < 5; ++k) r[k] = (mis & 4) ? u[k + 1] : u[k];
  const unsigned bits = 8u * (unsigned)(mis & 3);
  uint32_t o[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) o[j] = __funnelshift_r(r[j], r[j + 1], bits);
  if (x < 0 || x + E > len) {  // an edge vector: clear the elements outside the row
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int k = 0; k < EW; ++k) {
        const int e = x + j * EW + k;
        if (e < 0 || e >= len) o[j] &= ~(EW == 1 ? 0xffffffffu : 0xffffu << (16 * k));
      }
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// Rows y0 .. y0 + nrows - 1, columns x0 .. x0 + ncols - 1 of `planes` planes of an H x W map
// (plane k at src + k * plane_stride) into dst[k * dplane + r * dpitch + e], in 16-byte units;
// zeros outside the map and in planes from `valid` on. vec 16: asynchronous 16-byte copies (x0,
// W and the plane starts aligned to them; the caller commits and waits); 0: 16-byte loads shifted
// into place, kBatch in flight a thread. ncols, dpitch and dplane are multiples of 16 bytes. The
// block's threads step through the (plane, row, unit) items, without a division per item.
template <typename T, int kBatch>
__device__ __forceinline__ void stage_rows16(T* dst, int dplane, int dpitch, const T* src, int64_t plane_stride,
                                             int planes, int valid, int H, int W, int y0, int nrows, int x0, int ncols,
                                             int vec) {
  constexpr int per = 16 / (int)sizeof(T);
  const int units = ncols / per;
  if (planes <= 0 || nrows <= 0 || units <= 0) return;
  const int drows = (int)blockDim.x / units, dk = (int)blockDim.x - drows * units;  // one step of the block
  int k = (int)threadIdx.x % units, r = (int)threadIdx.x / units, pl = r / nrows;
  r -= pl * nrows;
  auto carry = [&]() {  // rows past the plane's last into the next planes
    for (; r >= nrows; r -= nrows) ++pl;
  };
  auto advance = [&]() {
    k += dk;
    r += drows;
    if (k >= units) {
      k -= units;
      ++r;
    }
    carry();
  };
  if (vec) {
    for (; pl < planes; advance()) {
      const int y = y0 + r, x = x0 + k * per;
      const bool in = pl < valid && y >= 0 && y < H && x >= 0 && x < W;  // a copy is wholly in or out
      copy_async<16>(dst + pl * dplane + r * dpitch + k * per, in ? src + pl * plane_stride + (int64_t)y * W + x : src,
                     in);
    }
    return;
  }
  while (pl < planes) {
    uint4 v[kBatch];
    int to[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const bool item = pl < planes, row_in = item && pl < valid && y0 + r >= 0 && y0 + r < H;
      v[b] = load_shifted16<T>(row_in ? src + pl * plane_stride + (int64_t)(y0 + r) * W : src, x0 + k * per, W, row_in);
      to[b] = item ? pl * dplane + r * dpitch + k * per : -1;
      if (item) advance();
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      if (to[b] >= 0) *reinterpret_cast<uint4*>(dst + to[b]) = v[b];
  }
}

// An fp32 value rounded to TF32, kept as fp32 (staged operands of the TF32 kernels: rounded once,
// not at every fragment load).
__device__ __forceinline__ float round_tf32(float v) { return __uint_as_float(to_tf32(v)); }

// Item u of stage_planes: the column pair x, x + 1 of row y of image m. round_staged_planes walks
// the same items, so that each thread rounds exactly the elements it copied.
template <int COLS>
struct StagedPair {
  int x, m, y;
  __device__ StagedPair(int u, int rows) : x(2 * (u % (COLS / 2))) {
    const int r = u / (COLS / 2);
    m = r / rows;
    y = r - m * rows;
  }
  __device__ int offset(int pitch) const { return m * pitch + y * COLS + x; }
};

// Planes of images n_begin .. n_begin + 16 * groups - 1 of channel c (rows x cols each, in an
// N x C x rows x cols tensor) into dst[image][row][COLS], `pitch` elements per image: zeros past
// the nimg real images and past each row's end. `pairs`: two elements a copy (even cols, aligned
// base): 4- or 8-byte asynchronous copies (the caller commits and waits); else plain loads. float
// (TF32): then round_staged_planes. For the small-map kernels.
template <int COLS, typename T>
__device__ __forceinline__ void stage_planes(T* dst, const T* src, int C, int c, int n_begin, int nimg, int groups,
                                             int rows, int cols, int pitch, bool pairs, T zero) {
  for (int u = threadIdx.x; u < 16 * groups * rows * (COLS / 2); u += blockDim.x) {
    const StagedPair<COLS> e(u, rows);
    const int x = e.x, m = e.m, y = e.y;
    T* d = dst + e.offset(pitch);
    const T* from = src + ((int64_t)(n_begin + m) * C + c) * rows * cols + y * cols + x;
    const bool img = m < nimg;
    if (pairs) {
      copy_async<2 * sizeof(T)>(d, img && x < cols ? from : src, img && x < cols);
    } else {
      d[0] = img && x < cols ? from[0] : zero;
      d[1] = img && x + 1 < cols ? from[1] : zero;
    }
  }
}

// TF32: rounds the elements this thread staged with stage_planes<COLS, float>, in place, once its
// copies have landed (after copy_async_wait_group, before the block's barrier).
template <int COLS>
__device__ __forceinline__ void round_staged_planes(float* dst, int groups, int rows, int pitch) {
  for (int u = threadIdx.x; u < 16 * groups * rows * (COLS / 2); u += blockDim.x) {
    float2* d = reinterpret_cast<float2*>(dst + StagedPair<COLS>(u, rows).offset(pitch));
    const float2 v = *d;
    *d = make_float2(round_tf32(v.x), round_tf32(v.y));
  }
}

// stage_planes for an NHWC tensor (N x rows x cols x C): channels c0 .. c0 + CG - 1 of 16 images
// from n_begin into dst[channel][image][row][COLS] (pitch elements per image, cpitch per
// channel), zeros past the nimg real images, past each row's end and past channel C. Each thread
// loads one pixel's CG channels (one 16- or 8-byte vector where `vec`: C a multiple of CG, aligned
// base), kBatch pixels in flight, and scatters them to the channel planes: the transpose happens
// here. kSumStride > 0: also adds each channel's values to sum[channel * kSumStride], this
// thread's running sums (in shared memory: the caller's registers stay free), in a fixed order.
template <int CG, int COLS, int kBatch = 4, int kSumStride = 0, typename T>
__device__ __forceinline__ void stage_planes_nhwc(T* dst, const T* src, int C, int c0, int n_begin, int nimg,
                                                  int rows, int cols, int pitch, int cpitch, bool vec,
                                                  float* sum = nullptr) {
  static_assert(CG * sizeof(T) == 16 || CG * sizeof(T) == 8, "one 16- or 8-byte vector per pixel");
  using Vec = std::conditional_t<CG * sizeof(T) == 16, uint4, uint2>;
  const T zero = from_float<T>(0.f);
  const int total = 16 * rows * COLS;
  for (int base = threadIdx.x; base < total; base += kBatch * blockDim.x) {
    union Pixel {
      Vec u;
      T h[CG];
    } v[kBatch];
    int at[kBatch];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      const int u = base + q * blockDim.x;
      const int x = u % COLS, r = u / COLS, m = r / rows, y = r - m * rows;
      at[q] = u < total ? m * pitch + y * COLS + x : -1;
      const bool valid = u < total && m < nimg && x < cols;
      const T* from = src + (((int64_t)(n_begin + m) * rows + y) * cols + x) * C + c0;
      if (valid && vec) {
        v[q].u = __ldg(reinterpret_cast<const Vec*>(from));
      } else {
#pragma unroll
        for (int ch = 0; ch < CG; ++ch) v[q].h[ch] = valid && c0 + ch < C ? from[ch] : zero;
      }
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q)
      if (at[q] >= 0)
#pragma unroll
        for (int ch = 0; ch < CG; ++ch) dst[ch * cpitch + at[q]] = v[q].h[ch];
    if constexpr (kSumStride > 0) {  // zeros where nothing was loaded
#pragma unroll
      for (int ch = 0; ch < CG; ++ch) {
        float t = 0.f;
#pragma unroll
        for (int q = 0; q < kBatch; ++q) t += to_float(v[q].h[ch]);
        sum[ch * kSumStride] += t;
      }
    }
  }
}

// A lane's places in the banded weight-gradient's fragments (banded_weight_grad_row, both
// families), g = lane / 4, t = lane % 4. A: Toeplitz values from lane_off0 columns into the staged
// input row (half types: rows g, g + 8 and columns 2t, 2t + 1, 2t + 8, 2t + 9, which then come in
// pairs; TF32: columns t, t + 4). B: the ldmatrix row b_row of a kernel-row tile pair (kernel row 8 (l >> 4) + (l & 7)),
// b_col elements (16 bytes) into a chunk's columns where (l >> 3) & 1.
template <typename T>
struct BandedWgradLane {
  int lane_off0, b_row, b_col;
  __device__ explicit BandedWgradLane(int lane)
      : lane_off0(std::is_same_v<T, float> ? (lane >> 2) + (lane & 3) : (lane >> 2) + 2 * (lane & 3)),
        b_row((lane & 7) + 8 * (lane >> 4)), b_col((16 / (int)sizeof(T)) * ((lane >> 3) & 1)) {}
};

template <int JT, int IT>
__device__ __forceinline__ void zero_taps(float (&acc)[JT][IT][4]) {
#pragma unroll
  for (int a = 0; a < JT; ++a)
#pragma unroll
    for (int b = 0; b < IT; ++b)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[a][b][q] = 0.f;
}

// A warp's tile of taps into its [16 JT][8 IT] scratch `to`; C fragment: (j = 16 jt + g [+ 8],
// i = 8 it + 2t [+ 1]), g = lane / 4, t = lane % 4.
template <int JT, int IT>
__device__ __forceinline__ void store_taps(float* to, const float (&acc)[JT][IT][4], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int jt = 0; jt < JT; ++jt)
#pragma unroll
    for (int it = 0; it < IT; ++it)
#pragma unroll
      for (int q = 0; q < 4; ++q) to[(16 * jt + g + 8 * (q >> 1)) * 8 * IT + 8 * it + 2 * t + (q & 1)] = acc[jt][it][q];
}

// The banded weight-gradient's inner loop (dwconv_tc_wgrad.cu, dwconv_rows.cuh): one staged input
// row q against the output-gradient rows q + pad_t - i of a 16 JT x 8 IT tile of taps, over
// `width` output columns (a multiple of kStep<T>), one chunk of K = kStep<T> columns at a time:
//   acc[jt][it] (j, i) += sum_k x[q][ox0 + k - pad_l + j] * g[q + pad_t - i][ox0 + k].
// A is Toeplitz, so each lane needs only the pairs x[o], x[o + 1] at o = lane_off + ox0 + 8m (half
// types), or the values x[o] at o = lane_off + ox0 + 4m (TF32), of the staged row `xrow`, and
// consecutive chunks share all but two of them. baddr[bp]: the ldmatrix lane address of kernel-row
// tile pair bp's B rows (the last pair is one tile where IT is odd) at output column 0 (rows outside the plane point at a zero row); pairs
// that are not `live` are skipped. The next chunk's B fragments load during this chunk's mma
// (after the last chunk they read past the row, harmlessly: shared memory follows).
template <typename T, int JT, int IT>
__device__ __forceinline__ void banded_weight_grad_row(float (&acc)[JT][IT][4], const T* xrow, int lane_off,
                                                       const unsigned (&baddr)[(IT + 1) / 2],
                                                       const bool (&live)[(IT + 1) / 2],
                                                       int width) {
  constexpr bool kTF32 = std::is_same_v<T, float>;
  constexpr int KS = kStep<T>;
  constexpr int NP = kTF32 ? 4 * JT : 2 * JT + 1;  // A values alive per chunk
  const uint32_t* xl = reinterpret_cast<const uint32_t*>(xrow) + (kTF32 ? lane_off : lane_off >> 1);
  const unsigned sel = (lane_off & 1) ? 0x5432u : 0x3210u;  // odd offsets straddle two words
  auto pair = [&](int m, int ox0) -> uint32_t {
    if constexpr (kTF32) {
      return xl[ox0 + 4 * m];
    } else {
      const int w = (ox0 >> 1) + 4 * m;
      return __byte_perm(xl[w], xl[w + 1], sel);
    }
  };
  uint32_t P[NP];
#pragma unroll
  for (int m = 0; m < NP - 2; ++m) P[m] = pair(m, 0);
  constexpr int NB = (IT + 1) / 2;  // B loads: two kernel-row tiles each, one where IT is odd
  auto load_b = [&](uint32_t(&r)[4], int bp, unsigned addr) {
    if (2 * bp + 1 < IT) ldmatrix_x4(r, addr);
    else ldmatrix_x2(r, addr);
  };
  uint32_t B[NB][4];
#pragma unroll
  for (int bp = 0; bp < NB; ++bp) load_b(B[bp], bp, baddr[bp]);
  for (int ox0 = 0; ox0 < width; ox0 += KS) {
    P[NP - 2] = pair(NP - 2, ox0);
    P[NP - 1] = pair(NP - 1, ox0);
    uint32_t Bn[NB][4];
#pragma unroll
    for (int bp = 0; bp < NB; ++bp) load_b(Bn[bp], bp, baddr[bp] + (unsigned)((ox0 + KS) * sizeof(T)));
#pragma unroll
    for (int bp = 0; bp < NB; ++bp) {
      if (!live[bp]) continue;
#pragma unroll
      for (int jt = 0; jt < JT; ++jt) {
        // A rows 16 jt .. 16 jt + 15: registers a0..a3 as the Toeplitz values fall.
        const uint32_t a0 = P[kTF32 ? 4 * jt : 2 * jt], a1 = P[kTF32 ? 4 * jt + 2 : 2 * jt + 1],
                       a2 = P[kTF32 ? 4 * jt + 1 : 2 * jt + 1], a3 = P[kTF32 ? 4 * jt + 3 : 2 * jt + 2];
        mma_tile<T>(acc[jt][2 * bp], a0, a1, a2, a3, B[bp][0], B[bp][1]);
        if (2 * bp + 1 < IT) mma_tile<T>(acc[jt][2 * bp + 1], a0, a1, a2, a3, B[bp][2], B[bp][3]);
      }
    }
#pragma unroll
    for (int m = 0; m < NP - 2; ++m) P[m] = P[m + 2];
#pragma unroll
    for (int bp = 0; bp < NB; ++bp)
#pragma unroll
      for (int q = 0; q < 4; ++q) B[bp][q] = Bn[bp][q];
  }
}

}  // namespace lkpatch
