// The CUDA-core forward / input-gradient that reads and writes channels_last tensors as they are,
// for small kernels (odd widths up to 15, up to 15 rows), in every dtype with exact fp32
// arithmetic. A small kernel does few multiply-adds per value it moves, so a tensor-core tile,
// most of it a zero band, gains little over plain FMAs, while reading channels_last directly
// saves both the transposition into planes and the layout copies.
//
// A block takes kCh channels (one 32-, 64- or 128-byte run of each pixel) of a TH x kTW output
// tile. It stages the input tile, converted to fp32 once, as [row][column][channel] (zeros outside
// the image and past the channels), and the kernel's taps as [tap][channel] (rotated for the
// input-gradient). A thread owns two adjacent channels and a block of RH rows x kRW columns:
// per kernel row it keeps the row's taps in registers and slides them along a register window
// of the input row, so each staged value it loads feeds KW multiply-adds per channel.
#include "dwconv_core.cuh"

namespace lkpatch {
namespace nhwc {

constexpr int kThreads = 256;
constexpr int kCh = 32;                 // channels per block: 16 threads of channel pairs
constexpr int kRW = 8, kStrips = 4;     // output columns per thread, column strips: kTW = 32
constexpr int kTW = kRW * kStrips;
constexpr int kRH = 2, kRowGroups = kThreads / (kCh / 2) / kStrips;  // 4 groups of kRH rows
constexpr int kTH = kRH * kRowGroups;   // 8 output rows
constexpr int kMaxK = 15;

struct Tile {
  int rows, cols;  // staged input tile
  size_t smem;     // bytes: the tile and the taps, fp32
};

inline Tile tile(const DwShape& s) {
  Tile t;
  t.rows = kTH + s.KH - 1;
  t.cols = kTW + s.KW - 1;
  t.smem = ((size_t)t.rows * t.cols + (size_t)s.KH * s.KW) * kCh * sizeof(float);
  return t;
}

template <typename T>
struct Params : ConvArgs<T> {
  int rows, cols;   // staged tile
  int tiles_x;      // blockIdx.y = tile row * tiles_x + tile column
  int vec;          // 16-byte loads of a pixel's channels (C a multiple of 16 / sizeof(T), aligned)
};

template <typename T, int KW>
__global__ void __launch_bounds__(kThreads) dw_nhwc_forward(const Params<T> p) {
  extern __shared__ __align__(16) float smem_f[];
  const DwShape& s = p.s;
  const int c0 = blockIdx.x * kCh, nch = min(kCh, s.C - c0);
  const int ty = blockIdx.y / p.tiles_x, tx = blockIdx.y - ty * p.tiles_x;
  const int n = blockIdx.z;
  const int oy0 = ty * kTH, ox0 = tx * kTW;
  const int iy0 = oy0 - s.pad_t, ix0 = ox0 - s.pad_l;
  float* X = smem_f;                        // [rows][cols][kCh]
  float* Wt = smem_f + p.rows * p.cols * kCh;  // [KH * KW][kCh]

  // ---- taps, rotated for the input-gradient
  for (int e = threadIdx.x; e < s.KH * KW * kCh; e += kThreads) {
    const int tap = e / kCh, c = e - tap * kCh;
    const int src = p.flip ? s.KH * KW - 1 - tap : tap;
    Wt[e] = c < nch ? load(p.w + (int64_t)(c0 + c) * s.KH * KW + src) : 0.f;
  }
  // ---- the input tile: 16-byte pieces of each pixel's kCh channels
  constexpr int E = 16 / (int)sizeof(T), PIECES = kCh / E;
  const int total = p.rows * p.cols * PIECES;
  for (int u = threadIdx.x; u < total; u += kThreads) {
    const int px = u / PIECES, piece = u - px * PIECES;
    const int r = px / p.cols, x = px - r * p.cols;
    const int iy = iy0 + r, ix = ix0 + x, c = piece * E;
    const bool inside = iy >= 0 && iy < s.H && ix >= 0 && ix < s.W;
    const T* src = p.in + (((int64_t)n * s.H + (inside ? iy : 0)) * s.W + (inside ? ix : 0)) * s.C + c0 + c;
    float v[E];
    if (inside && p.vec && c < nch) {
      union {
        uint4 u;
        T h[E];
      } in;
      in.u = __ldg(reinterpret_cast<const uint4*>(src));
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = to_float(in.h[k]);
    } else {
#pragma unroll
      for (int k = 0; k < E; ++k) v[k] = inside && c + k < nch ? load(src + k) : 0.f;
    }
    float4* to = reinterpret_cast<float4*>(X + (size_t)px * kCh + c);
#pragma unroll
    for (int k = 0; k < E / 4; ++k) to[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
  }
  __syncthreads();

  // ---- a thread: channels 2 cp, 2 cp + 1; rows kRH rg ..; columns kRW strip ..
  const int cp = threadIdx.x % (kCh / 2), strip = (threadIdx.x / (kCh / 2)) % kStrips;
  const int rg = threadIdx.x / (kCh / 2 * kStrips);
  const float2* X2 = reinterpret_cast<const float2*>(X);
  const float2* W2 = reinterpret_cast<const float2*>(Wt);
  float2 acc[kRH][kRW];
  {
    float2 b = make_float2(0.f, 0.f);
    if (p.bias != nullptr && 2 * cp < nch) b.x = load(p.bias + c0 + 2 * cp);
    if (p.bias != nullptr && 2 * cp + 1 < nch) b.y = load(p.bias + c0 + 2 * cp + 1);
#pragma unroll
    for (int r = 0; r < kRH; ++r)
#pragma unroll
      for (int x = 0; x < kRW; ++x) acc[r][x] = b;
  }
  for (int i = 0; i < s.KH; ++i) {
    float2 w[KW];
#pragma unroll
    for (int j = 0; j < KW; ++j) w[j] = W2[(i * KW + j) * (kCh / 2) + cp];
#pragma unroll
    for (int r = 0; r < kRH; ++r) {
      const float2* row = X2 + ((size_t)(kRH * rg + r + i) * p.cols + kRW * strip) * (kCh / 2) + cp;
      float2 win[kRW + KW - 1];
#pragma unroll
      for (int k = 0; k < kRW + KW - 1; ++k) win[k] = row[k * (kCh / 2)];
#pragma unroll
      for (int x = 0; x < kRW; ++x)
#pragma unroll
        for (int j = 0; j < KW; ++j) {
          acc[r][x].x = fmaf(win[x + j].x, w[j].x, acc[r][x].x);
          acc[r][x].y = fmaf(win[x + j].y, w[j].y, acc[r][x].y);
        }
    }
  }

  // ---- results: a channel pair per pixel
  const int c = c0 + 2 * cp;
  if (2 * cp >= nch) return;
#pragma unroll
  for (int r = 0; r < kRH; ++r) {
    const int oy = oy0 + kRH * rg + r;
    if (oy >= s.OH) break;
#pragma unroll
    for (int x = 0; x < kRW; ++x) {
      const int ox = ox0 + kRW * strip + x;
      if (ox >= s.OW) break;
      T* to = p.out + (((int64_t)n * s.OH + oy) * s.OW + ox) * s.C + c;
      if (2 * cp + 1 < nch && s.C % 2 == 0) {
        if constexpr (std::is_same_v<T, float>) {
          *reinterpret_cast<float2*>(to) = acc[r][x];
        } else {
          union {
            uint32_t u;
            T h[2];
          } o;
          o.h[0] = from_float<T>(acc[r][x].x);
          o.h[1] = from_float<T>(acc[r][x].y);
          *reinterpret_cast<uint32_t*>(to) = o.u;
        }
      } else {
        to[0] = from_float<T>(acc[r][x].x);
        if (2 * cp + 1 < nch) to[1] = from_float<T>(acc[r][x].y);
      }
    }
  }
}

template <typename T, int KW>
cudaError_t launch_width(const Params<T>& p, dim3 grid, size_t smem, cudaStream_t stream) {
  return launch(dw_nhwc_forward<T, KW>, grid, dim3(kThreads), smem, stream, p);
}

}  // namespace nhwc

bool dwconv2d_nhwc_forward_fits(DType t, const DwShape& s) {
  (void)t;
  if (!s.nhwc || s.KW % 2 == 0 || s.KW > nhwc::kMaxK || s.KH > nhwc::kMaxK) return false;
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess) return false;
  const int64_t N = s.planes / s.C;
  const int tiles = ceil_div(s.OH, nhwc::kTH) * ceil_div(s.OW, nhwc::kTW);
  return N <= 65535 && tiles <= 65535 && ceil_div(s.C, nhwc::kCh) <= (1 << 20) &&
         nhwc::tile(s).smem <= (size_t)lim.max_smem_optin;
}

cudaError_t dwconv2d_nhwc_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                  const DwShape& s, bool flip_kernel, cudaStream_t stream) {
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const nhwc::Tile q = nhwc::tile(s);
    nhwc::Params<T> p{};
    p.set(static_cast<const T*>(in), static_cast<const T*>(w), static_cast<const T*>(bias), static_cast<T*>(out), s,
          flip_kernel);
    p.rows = q.rows;
    p.cols = q.cols;
    p.tiles_x = ceil_div(s.OW, nhwc::kTW);
    p.vec = s.C % (16 / (int)sizeof(T)) == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0;
    const dim3 grid(ceil_div(s.C, nhwc::kCh), p.tiles_x * ceil_div(s.OH, nhwc::kTH), p.N);
    switch (s.KW) {
      case 1: return nhwc::launch_width<T, 1>(p, grid, q.smem, stream);
      case 3: return nhwc::launch_width<T, 3>(p, grid, q.smem, stream);
      case 5: return nhwc::launch_width<T, 5>(p, grid, q.smem, stream);
      case 7: return nhwc::launch_width<T, 7>(p, grid, q.smem, stream);
      case 9: return nhwc::launch_width<T, 9>(p, grid, q.smem, stream);
      case 11: return nhwc::launch_width<T, 11>(p, grid, q.smem, stream);
      case 13: return nhwc::launch_width<T, 13>(p, grid, q.smem, stream);
      case 15: return nhwc::launch_width<T, 15>(p, grid, q.smem, stream);
    }
    return cudaErrorInvalidValue;
  });
}

}  // namespace lkpatch
