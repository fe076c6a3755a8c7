// Depthwise convolution on small feature maps (RepLKNet's 28x28, 14x14 and 7x7 stages).
//
// On such maps a large kernel reaches every input pixel from every output pixel, so per channel
// the convolution is nearly a dense product between the map's pixels and the batch's images.
// Both kernels here put images in registers, so that each shared-memory value feeds 8 FMAs:
//
// * forward / input-grad: a thread owns 8 outputs of one row for 8 images and walks exactly the
//   input pixels those outputs read; the kernel taps slide through a 16-value register window.
// * weight-grad: a thread owns an 8 x 8 block of G[o][i] = sum_n grad_out[n][o] * in[n][i]
//   (8 outputs of a row x 8 inputs of a row) for 8-column tiles whose offset is a kernel tap;
//   the block's diagonals are the taps' sums, added up per tap in a fixed order.
#include <algorithm>
#include <climits>

#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

constexpr int kTile = 8;  // outputs per thread row / columns per G tile

// Floats per staged pixel for NB images: a multiple of 4 whose quarter is odd, so that the
// staging writes (8 columns x 4 images per warp) fall in 32 different banks.
__host__ __device__ inline int pixel_stride(int NB) { return NB + ((NB / 4) % 2 == 0 ? 4 : 8); }

// Stage elements begin, begin + step, .. < end as floats in shared memory; where(t) gives each
// one's destination, source and whether it lies inside the tensor (else a zero).
template <typename T>
struct StageCopy {
  float* dst;
  const T* src;
  bool valid;
};

template <typename T, typename Where>
__device__ __forceinline__ void stage_floats(int begin, int end, int step, Where where) {
  if constexpr (std::is_same_v<T, float>) {
    for (int t = begin; t < end; t += step) {
      const StageCopy<T> e = where(t);
      copy_async(e.dst, e.src, e.valid);
    }
  } else {
    // Half types convert on the way, so no cp.async: a thread issues kBatch loads before its
    // stores, keeping that many in flight (one at a time left the copy latency-bound).
    constexpr int kBatch = 8;
    for (int t0 = begin; t0 < end; t0 += kBatch * step) {
      float v[kBatch];
      float* d[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int t = t0 + u * step;
        d[u] = nullptr;
        v[u] = 0.f;
        if (t < end) {
          const StageCopy<T> e = where(t);
          d[u] = e.dst;
          if (e.valid) v[u] = load(e.src);
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        if (d[u]) *d[u] = v[u];
    }
  }
}

// ---- forward / input-grad ----------------------------------------------------------------------

template <typename T>
struct SmallFwdParams : ConvArgs<T> {
  int IG;          // image groups per block (NB = IMG * IG images)
  int XW;          // staged input row width (W rounded up to 8; zeros past W)
  int OXT;         // 8-wide output column tiles per row
  int WP, WOFF;    // staged kernel row pitch, and the column of tap kw = 0 in it
};

// IMG images per thread: 8 (more reuse of each tap) or 4 (fewer registers, more warps per SM).
template <typename T, int IMG>
__global__ void __launch_bounds__(256, IMG == 8 ? 2 : 3) dw_small_forward(const SmallFwdParams<T> p) {
  static_assert(IMG == 4 || IMG == 8, "4 or 8 images per thread");
  extern __shared__ __align__(16) float smem[];
  const DwShape& s = p.s;
  const int NB = IMG * p.IG, NBs = pixel_stride(NB);
  const int groups = ceil_div(p.N, NB);
  const int c = blockIdx.x / groups, n0 = (blockIdx.x - c * groups) * NB;
  float* X = smem;                                   // [iy][ix][image], H x XW x NBs
  float* Wt = smem + round_up(s.H * p.XW * NBs, 4);  // [kh][WOFF + kw], KH x WP

  // Stage the NB images of channel c: a warp copies 8 columns x 4 images at a time.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int xg = p.XW / 8, ng = NB / 4;
  stage_floats<T>(warp, s.H * xg * ng, nwarps, [&](int t) {
    const int iy = t / (xg * ng), rest = t - iy * xg * ng;
    const int ix = (rest / ng) * 8 + (lane & 7), n = (rest % ng) * 4 + (lane >> 3);
    const bool valid = ix < s.W && n0 + n < p.N;
    const T* src = p.in + ((int64_t)(valid ? n0 + n : 0) * s.C + c) * s.H * s.W + iy * s.W + (valid ? ix : 0);
    return StageCopy<T>{X + (iy * p.XW + ix) * NBs + n, src, valid};
  });
  const T* wsrc = p.w + (int64_t)c * s.KH * s.KW;
  for (int i = threadIdx.x; i < s.KH * p.WP; i += blockDim.x) {
    const int kh = i / p.WP, kw = i - kh * p.WP - p.WOFF;
    const bool valid = kw >= 0 && kw < s.KW;
    Wt[i] = valid ? load(wsrc + (p.flip ? (s.KH - 1 - kh) * s.KW + (s.KW - 1 - kw) : kh * s.KW + kw)) : 0.f;
  }
  copy_async_wait();
  __syncthreads();

  const int ig = threadIdx.x % p.IG, rest = threadIdx.x / p.IG;
  const int oy = rest / p.OXT, ox0 = (rest % p.OXT) * kTile;
  if (oy >= s.OH) return;
  // This thread's images, in 16-byte groups of 4 that are contiguous across the lanes:
  // 4 * ig (and 4 * IG + 4 * ig when IMG == 8).
  const int img[2] = {4 * ig, 4 * p.IG + 4 * ig};
  const float bias = p.bias ? load(p.bias + c) : 0.f;
  float acc[kTile][IMG];  // [output column j][image e]
#pragma unroll
  for (int j = 0; j < kTile; ++j)
#pragma unroll
    for (int e = 0; e < IMG; ++e) acc[j][e] = bias;

  const int iy_lo = max(0, oy - s.pad_t), iy_hi = min(s.H, oy - s.pad_t + s.KH);
  const int ix_lo = max(0, ox0 - s.pad_l) / kTile * kTile, ix_hi = min(s.W, ox0 + kTile - 1 - s.pad_l + s.KW);
  for (int iy = iy_lo; iy < iy_hi; ++iy) {
    // wrow[ix0 + t] is the tap of input column ix0 + u for output column ox0 + j when t = u - j + 7.
    const float* wrow = Wt + (iy - oy + s.pad_t) * p.WP + p.WOFF - ox0 + s.pad_l - 7;
    const float* xrow = X + iy * p.XW * NBs;
    for (int ix0 = ix_lo; ix0 < ix_hi; ix0 += kTile) {
      float wb[2 * kTile];
#pragma unroll
      for (int t = 0; t < 2 * kTile; t += 4) load4(wb + t, wrow + ix0 + t);
      // Images of column u + 1 load while column u multiplies.
      float a[2][IMG];
#pragma unroll
      for (int h = 0; h < IMG / 4; ++h) load4(a[0] + 4 * h, xrow + ix0 * NBs + img[h]);
#pragma unroll
      for (int u = 0; u < kTile; ++u) {
        if (u + 1 < kTile) {
#pragma unroll
          for (int h = 0; h < IMG / 4; ++h) load4(a[(u + 1) & 1] + 4 * h, xrow + (ix0 + u + 1) * NBs + img[h]);
        }
#pragma unroll
        for (int j = 0; j < kTile; ++j)
#pragma unroll
          for (int e = 0; e < IMG; ++e) acc[j][e] = fmaf(wb[u - j + kTile - 1], a[u & 1][e], acc[j][e]);
      }
    }
  }

#pragma unroll
  for (int e = 0; e < IMG; ++e) {
    const int n = n0 + img[e / 4] + e % 4;
    if (n >= p.N) continue;
    T* row = p.out + ((int64_t)n * s.C + c) * s.OH * s.OW + oy * s.OW + ox0;
#pragma unroll
    for (int j = 0; j < kTile; ++j)
      if (ox0 + j < s.OW) row[j] = from_float<T>(acc[j][e]);
  }
}

// ---- weight-grad -------------------------------------------------------------------------------

template <typename T, typename O>
struct SmallWgradParams {
  const T* grad;
  const T* in;
  O* dst;  // G x C x KH x KW (fp32 partials when several image groups)
  DwShape s;
  int N, NB;       // images, images per block
  int XW, OXW;     // staged row widths of the input and the output-gradient (multiples of 8)
  int XT, OXT;     // 8-column tiles per input / output row
};

template <typename T, typename O>
__global__ void __launch_bounds__(256, 2) dw_small_weight_grad(const SmallWgradParams<T, O> p) {
  extern __shared__ __align__(16) float smem[];
  const DwShape& s = p.s;
  const int c = blockIdx.x, g = blockIdx.y, n0 = g * p.NB;
  const int nimg = min(p.NB, p.N - n0);
  const int xplane = s.H * p.XW, gplane = s.OH * p.OXW;
  float* X = smem;                    // [n][iy][ix]
  float* D = X + p.NB * xplane;       // [n][oy][ox]
  float* part = D + p.NB * gplane;    // [pair][15 diagonals]
  const int pairs = s.OH * s.H * p.OXT * p.XT;

  // Stage this block's images, zero past the row ends. Rows are short (8 or 16 columns), so the
  // copy walks the padded planes element by element with every lane busy.
  const auto stage = [&](float* dst, const T* src, int rows, int cols, int pitch) {
    const int plane = rows * pitch;
    stage_floats<T>(threadIdx.x, nimg * plane, blockDim.x, [&](int t) {
      const int n = t / plane, e = t - n * plane, y = e / pitch, x = e - y * pitch;
      const T* from = src + ((int64_t)(n0 + n) * s.C + c) * rows * cols + y * cols + min(x, cols - 1);
      return StageCopy<T>{dst + t, from, x < cols};
    });
  };
  stage(X, p.in, s.H, s.W, p.XW);
  stage(D, p.grad, s.OH, s.OW, p.OXW);
  copy_async_wait();
  __syncthreads();

  // Each pair (oy, iy, output tile, input tile) whose offset holds a tap: the 8 x 8 block of
  // G = grad_out x in^T over the images, folded into its 15 diagonals (one tap each).
  for (int pr = threadIdx.x; pr < pairs; pr += blockDim.x) {
    int r = pr;
    const int xt = r % p.XT; r /= p.XT;
    const int ot = r % p.OXT; r /= p.OXT;
    const int iy = r % s.H, oy = r / s.H;
    const int kh = iy - oy + s.pad_t;
    const int kw_base = (xt - ot) * kTile + s.pad_l;  // tap of diagonal 0 (same column in both tiles)
    if (kh < 0 || kh >= s.KH || kw_base + kTile - 1 < 0 || kw_base - (kTile - 1) >= s.KW) continue;
    float acc[kTile][kTile];  // [output column a][input column b]
#pragma unroll
    for (int a = 0; a < kTile; ++a)
#pragma unroll
      for (int b = 0; b < kTile; ++b) acc[a][b] = 0.f;
    const float* dp = D + oy * p.OXW + ot * kTile;
    const float* xp = X + iy * p.XW + xt * kTile;
    for (int n = 0; n < nimg; ++n) {
      float dv[kTile], xv[kTile];
      load4(dv, dp + n * gplane);
      load4(dv + 4, dp + n * gplane + 4);
      load4(xv, xp + n * xplane);
      load4(xv + 4, xp + n * xplane + 4);
#pragma unroll
      for (int a = 0; a < kTile; ++a)
#pragma unroll
        for (int b = 0; b < kTile; ++b) acc[a][b] = fmaf(dv[a], xv[b], acc[a][b]);
    }
#pragma unroll
    for (int d = -(kTile - 1); d < kTile; ++d) {
      float sum = 0.f;
#pragma unroll
      for (int a = 0; a < kTile; ++a)
        if (a + d >= 0 && a + d < kTile) sum += acc[a][a + d];
      part[pr * (2 * kTile - 1) + d + kTile - 1] = sum;
    }
  }
  __syncthreads();

  // Each tap adds its diagonals over the pairs in a fixed order: tile offsets xt - ot = dt put the
  // tap on diagonal kw - pad_l - 8 dt, which must lie in [-7, 7].
  for (int t = threadIdx.x; t < s.KH * s.KW; t += blockDim.x) {
    const int kh = t / s.KW, kw = t - kh * s.KW, off = kw - s.pad_l;
    const int dt_lo = -((kTile - 1 - off) >> 3), dt_hi = (off + kTile - 1) >> 3;  // floor divisions by 8
    float sum = 0.f;
    for (int oy = max(0, s.pad_t - kh); oy < min(s.OH, s.H + s.pad_t - kh); ++oy) {
      const int row = (oy * s.H + oy - s.pad_t + kh) * p.OXT;
      for (int dt = dt_lo; dt <= dt_hi; ++dt) {
        const int slot = off - dt * kTile + kTile - 1;
        for (int ot = max(0, -dt); ot < min(p.OXT, p.XT - dt); ++ot)
          sum += part[((row + ot) * p.XT + ot + dt) * (2 * kTile - 1) + slot];
      }
    }
    p.dst[((int64_t)g * s.C + c) * s.KH * s.KW + t] = from_float<O>(sum);
  }
}

constexpr size_t kSmemBudget = 100 * 1024;

// LKPATCH_SMALL_IMAGES=8 makes the small forward take 8 images per thread instead of 4 (benchmarking).
int small_forward_images() { return knobs().small_images == 8 ? 8 : 4; }

size_t small_forward_smem(const DwShape& s, int NB, int WP) {
  return sizeof(float) * (round_up(s.H * round_up(s.W, kTile) * pixel_stride(NB), 4) + (size_t)s.KH * WP);
}

int small_forward_wp(const DwShape& s, int* woff) {
  // The window reads taps from 14 before kw = 0 to 14 after the last; WOFF aligns it to 16 bytes.
  *woff = 16 + ((7 - s.pad_l) % 4 + 4) % 4;
  return round_up(*woff + s.KW + 24, 4);
}

}  // namespace

// Whole planes of one image group fit in shared memory (maps up to about 32 x 32), and the batch
// fills the 8 image columns of a thread.
bool dwconv2d_small_forward_fits(const DwShape& s) {
  int woff;
  const int N = (int)(s.planes / s.C);
  return N >= 8 && s.OH * ceil_div(s.OW, kTile) <= 256 && small_forward_smem(s, 4, small_forward_wp(s, &woff)) <= kSmemBudget;
}

namespace {

template <typename T>
cudaError_t small_forward(const T* in, const T* w, const T* bias, T* out, const DwShape& s, bool flip,
                          cudaStream_t stream) {
  SmallFwdParams<T> p{};
  p.set(in, w, bias, out, s, flip);
  p.XW = round_up(s.W, kTile);
  p.OXT = ceil_div(s.OW, kTile);
  p.WP = small_forward_wp(s, &p.WOFF);
  const int img = small_forward_images();
  const int positions = s.OH * p.OXT;
  // Image groups per block: as many as fit, but the last block's idle image columns count, so
  // for 64 images 8 groups (2 blocks of 32) beat 9 (2 blocks of 36).
  p.IG = 1;
  for (int ig = 1, waste = INT_MAX; ig <= std::max(1, std::min({64 / img, 256 / positions, ceil_div(p.N, img)})); ++ig) {
    if (ig > 1 && small_forward_smem(s, img * ig, p.WP) > kSmemBudget) break;
    const int slots = ceil_div(p.N, img * ig) * img * ig - p.N;
    if (slots <= waste) waste = slots, p.IG = ig;
  }
  const int threads = round_up(positions * p.IG, 32);
  const int64_t blocks = (int64_t)s.C * ceil_div(p.N, img * p.IG);
  const size_t smem = small_forward_smem(s, img * p.IG, p.WP);
  if (img == 8) return launch(dw_small_forward<T, 8>, dim3((unsigned)blocks), dim3(threads), smem, stream, p);
  return launch(dw_small_forward<T, 4>, dim3((unsigned)blocks), dim3(threads), smem, stream, p);
}

struct SmallWgradPlan {
  int NB, G, threads;
  size_t smem;
};

SmallWgradPlan plan_small_weight_grad(const DwShape& s) {
  SmallWgradPlan plan{};
  const int N = (int)(s.planes / s.C);
  const int XW = round_up(s.W, kTile), OXW = round_up(s.OW, kTile);
  const size_t pairs = (size_t)s.OH * s.H * (XW / kTile) * (OXW / kTile);
  const size_t fixed = pairs * (2 * kTile - 1), per_image = (size_t)s.H * XW + (size_t)s.OH * OXW;
  // Up to 160 KB (one block per SM) so that a block sums at least 32 images: fewer blocks fold
  // and reduce the diagonals.
  const size_t budget = std::max(kSmemBudget, std::min<size_t>(160 * 1024, sizeof(float) * (fixed + 32 * per_image))) /
                        sizeof(float);
  const int by_smem = budget > fixed ? (int)((budget - fixed) / per_image) : 0;
  plan.NB = std::max(1, std::min({N, 64, by_smem}));
  plan.G = ceil_div(N, plan.NB);
  // As few threads as keep the number of rounds over the pairs: 784 pairs take 4 rounds of 224
  // threads rather than 3 full rounds of 256 and one of 16.
  const int rounds = ceil_div((int)pairs, 256);
  plan.threads = round_up(ceil_div((int)pairs, rounds), 32);
  plan.smem = sizeof(float) * (fixed + per_image * plan.NB);
  return plan;
}

template <typename T, typename O>
cudaError_t small_weight_grad(const SmallWgradPlan& plan, const T* grad, const T* in, O* dst, const DwShape& s,
                              cudaStream_t stream) {
  SmallWgradParams<T, O> p{};
  p.grad = grad; p.in = in; p.dst = dst; p.s = s;
  p.N = (int)(s.planes / s.C);
  p.NB = plan.NB;
  p.XW = round_up(s.W, kTile);
  p.OXW = round_up(s.OW, kTile);
  p.XT = p.XW / kTile;
  p.OXT = p.OXW / kTile;
  return launch(dw_small_weight_grad<T, O>, dim3(s.C, plan.G), dim3(plan.threads), plan.smem, stream, p);
}

}  // namespace

// The pairs' diagonals and the staged images fit: maps up to 16 x 16.
bool dwconv2d_small_weight_grad_fits(const DwShape& s) {
  const int N = (int)(s.planes / s.C);
  return N >= 8 && s.H <= 16 && s.W <= 16 && s.OH <= 16 && s.OW <= 16;
}

cudaError_t dwconv2d_small_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                   const DwShape& s, bool flip_kernel, cudaStream_t stream) {
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    return small_forward<T>(static_cast<const T*>(in), static_cast<const T*>(w), static_cast<const T*>(bias),
                            static_cast<T*>(out), s, flip_kernel, stream);
  });
}

size_t dwconv2d_small_weight_grad_workspace(const DwShape& s) {
  const SmallWgradPlan plan = plan_small_weight_grad(s);
  return plan.G > 1 ? sizeof(float) * plan.G * (size_t)s.C * s.KH * s.KW : 0;
}

cudaError_t dwconv2d_small_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                       const DwShape& s, cudaStream_t stream) {
  const SmallWgradPlan plan = plan_small_weight_grad(s);
  if (plan.G > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t n_w = (int64_t)s.C * s.KH * s.KW;
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad_out);
    const T* x = static_cast<const T*>(in);
    if (plan.G == 1) return small_weight_grad<T, T>(plan, g, x, static_cast<T*>(grad_w), s, stream);
    cudaError_t e = small_weight_grad<T, float>(plan, g, x, workspace, s, stream);
    if (e != cudaSuccess) return e;
    return sum_partials(workspace, static_cast<T*>(grad_w), plan.G, n_w, stream);
  });
}

}  // namespace lkpatch
