// The CUDA-core passes for small kernels (odd widths up to 15, up to 15 rows) that stage 32
// channels innermost, in every dtype with exact fp32 arithmetic: on channels_last tensors (read
// and written as they are) every pass, on NCHW ones the weight-gradient (their rows staged into
// that layout). A small kernel does few multiply-adds per value it moves, so a tensor-core tile,
// most of it a zero band, gains little over plain FMAs; reading channels_last directly saves both
// the transposition into planes and the layout copies.
//
// A block takes kCh channels (channels_last: one 32-, 64- or 128-byte run of each pixel; NCHW: each
// lane of a staging warp loads a run of one channel's row) of an output tile (8 x 32; 16 x 16 for
// k x 1 kernels). It stages the input tile, converted to fp32 once, as [row][column][channel]
// (zeros outside the image and past the channels). A thread owns two
// adjacent channels and a block of kRH rows x kRW columns; per kernel row it loads a register
// window of the input row, so each staged value it loads feeds KW multiply-adds per channel (k x 1
// kernels: each staged row is loaded once for both output rows).
// Forward / input-gradient: the kernel's taps staged as [tap][channel] (rotated for the
// input-gradient); a thread keeps a kernel row's taps in registers and slides them along the window.
// Weight-gradient (kernels of up to 49 taps, or one column of up to 15): a block walks a slice of
// the tiles of its channels, staging the output gradient's tile beside the input's; a thread
// keeps every tap of its channels (a pair up to 25 taps, else one) in registers, and the block
// adds its threads' sums in a fixed order into its slice's partial sums (added in order by
// sum_slices: deterministic). Each staged output-gradient value is loaded by one thread, which
// also sums it for the bias gradient: no pass of its own reads the output gradient again.
#include "dwconv_core.cuh"

namespace lkpatch {
namespace channel_tile {

constexpr int kThreads = 256;
constexpr int kCh = 32;         // channels per block: 16 threads of channel pairs
constexpr int kRW = 8, kRH = 2;  // output columns and rows of a thread (channel pairs)
constexpr int kMaxK = 15;
constexpr int kBatch = 4;       // 16-byte loads a thread keeps in flight while staging

// Output tiles of 8 rows x 32 columns (4 strips of kRW columns, 4 groups of kRH rows); a one-column
// kernel (k x 1) pays k - 1 halo rows per tile and no halo columns, so it takes 16 x 16.
__host__ __device__ constexpr int strips(int kw) { return kw == 1 ? 2 : 4; }
__host__ __device__ constexpr int tile_w(int kw) { return kRW * strips(kw); }
__host__ __device__ constexpr int tile_h(int kw) { return kRH * (kThreads / (kCh / 2) / strips(kw)); }

struct Tile {
  int rows, cols;          // staged input tile
  int tiles_x, tiles_y;    // output tiles of an image: columns, rows
  int sh;                  // NCHW: staged column 0 lies sh columns left of the tile's first input column
  size_t smem;             // bytes: the tile and the taps, fp32
};

// NCHW rows move as runs of `vec` elements: the widest (up to 16 bytes) that the row length and
// the tensor's alignment allow; the staged tile then starts at a multiple of it.
inline int row_vector(int esize, int W, uintptr_t address) {
  for (int v = 16 / esize; v > 1; v /= 2)
    if (W % v == 0 && address % (v * esize) == 0) return v;
  return 1;
}

// vec: NCHW's row run (0: channels_last).
inline Tile tile(const DwShape& s, int vec = 0) {
  Tile t;
  t.sh = vec > 1 ? ((-s.pad_l) % vec + vec) % vec : 0;  // the staged tile starts at a multiple of vec
  t.rows = tile_h(s.KW) + s.KH - 1;
  t.cols = vec > 1 ? round_up(tile_w(s.KW) + s.KW - 1 + t.sh, vec) : tile_w(s.KW) + s.KW - 1;
  t.tiles_x = ceil_div(s.OW, tile_w(s.KW));
  t.tiles_y = ceil_div(s.OH, tile_h(s.KW));
  t.smem = ((size_t)t.rows * t.cols + (size_t)s.KH * s.KW) * kCh * sizeof(float);
  return t;
}

// f(KW) with the kernel width (odd, up to kMaxK) as a compile-time constant
// (std::integral_constant): the launchers instantiate their kernels for each width here.
template <typename F>
cudaError_t with_width(int kw, F&& f) {
  switch (kw) {
    case 1: return f(std::integral_constant<int, 1>());
    case 3: return f(std::integral_constant<int, 3>());
    case 5: return f(std::integral_constant<int, 5>());
    case 7: return f(std::integral_constant<int, 7>());
    case 9: return f(std::integral_constant<int, 9>());
    case 11: return f(std::integral_constant<int, 11>());
    case 13: return f(std::integral_constant<int, 13>());
    case 15: return f(std::integral_constant<int, 15>());
  }
  return cudaErrorInvalidValue;
}

// rows x cols pixels of kCh channels (c0 ..) of a channels_last N x H x W x C tensor, from image
// row y0 and column x0, into fp32 dst[row][col][channel]: zeros outside the image and past nch.
// vec: 16-byte loads (C a multiple of 16 / sizeof(T) and the tensor aligned), kBatch of them in
// flight per thread: one at a time, the staging waits out a memory latency per load.
template <typename T>
__device__ __forceinline__ void stage_tile(float* dst, const T* src, int n, int c0, int nch, int C, int H, int W,
                                           int y0, int x0, int rows, int cols, bool vec) {
  constexpr int E = 16 / (int)sizeof(T), PIECES = kCh / E;
  const int total = rows * cols * PIECES;
  const T* image = src + (int64_t)n * H * W * C + c0;
  if (vec) {
    // nch is a multiple of E here: a piece is all inside the channels or all past them
    for (int u0 = threadIdx.x; u0 < total; u0 += kBatch * kThreads) {
      union {
        uint4 u;
        T h[E];
      } in[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int u = u0 + b * kThreads, px = u / PIECES, c = (u - px * PIECES) * E;
        const int r = px / cols, iy = y0 + r, ix = x0 + px - r * cols;
        in[b].u = make_uint4(0, 0, 0, 0);  // bits of +0 in every dtype
        if (u < total && iy >= 0 && iy < H && ix >= 0 && ix < W && c < nch)
          in[b].u = __ldg(reinterpret_cast<const uint4*>(image + ((int64_t)iy * W + ix) * C + c));
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int u = u0 + b * kThreads;
        if (u >= total) break;
        float4* to = reinterpret_cast<float4*>(dst + (size_t)u * E);
#pragma unroll
        for (int k = 0; k < E / 4; ++k)
          to[k] = make_float4(to_float(in[b].h[4 * k]), to_float(in[b].h[4 * k + 1]), to_float(in[b].h[4 * k + 2]),
                              to_float(in[b].h[4 * k + 3]));
      }
    }
    return;
  }
  for (int u = threadIdx.x; u < total; u += kThreads) {
    const int px = u / PIECES, c = (u - px * PIECES) * E;
    const int r = px / cols, iy = y0 + r, ix = x0 + px - r * cols;
    const bool inside = iy >= 0 && iy < H && ix >= 0 && ix < W;
    const T* from = image + ((int64_t)(inside ? iy : 0) * W + (inside ? ix : 0)) * C + c;
    float v[E];
#pragma unroll
    for (int k = 0; k < E; ++k) v[k] = inside && c + k < nch ? load(from + k) : 0.f;
    float4* to = reinterpret_cast<float4*>(dst + (size_t)u * E);
#pragma unroll
    for (int k = 0; k < E / 4; ++k) to[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
  }
}

// NCHW: rows x cols pixels of channels c0 .. c0 + kCh - 1 of image n, from image row y0 and column
// x0 (a multiple of V, as W is), into fp32 dst[row][col][channel]: zeros outside the image and past
// nch. Lane k of a warp loads channel k's run of V elements, so the stores into the tile's channel
// vector hit 32 banks; a run lies all inside the image's columns or all outside. kBatch loads in
// flight per thread.
template <typename T, int V>
__device__ __forceinline__ void stage_rows_v(float* dst, const T* src, int n, int c0, int nch, int C, int H, int W,
                                             int y0, int x0, int rows, int cols) {
  using Run = std::conditional_t<V * sizeof(T) == 16, uint4,
              std::conditional_t<V * sizeof(T) == 8, uint2,
              std::conditional_t<V * sizeof(T) == 4, unsigned, unsigned short>>>;
  union Vals {
    Run r;
    T h[V];
  };
  const int runs = cols / V, total = rows * runs * kCh;
  const T* planes = src + ((int64_t)n * C + c0) * H * W;
  for (int u0 = threadIdx.x; u0 < total; u0 += kBatch * kThreads) {
    Vals in[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int u = u0 + b * kThreads, k = u % kCh, rr = u / kCh, r = rr / runs, x = x0 + (rr - r * runs) * V;
      const int iy = y0 + r;
      in[b].r = Run{};  // bits of +0 in every dtype
      if (u < total && k < nch && iy >= 0 && iy < H && x >= 0 && x < W)
        in[b].r = __ldg(reinterpret_cast<const Run*>(planes + ((int64_t)k * H + iy) * W + x));
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int u = u0 + b * kThreads;
      if (u >= total) break;
      const int k = u % kCh, rr = u / kCh, r = rr / runs, col = (rr - r * runs) * V;
      float* to = dst + ((size_t)r * cols + col) * kCh + k;
#pragma unroll
      for (int v = 0; v < V; ++v) to[v * kCh] = to_float(in[b].h[v]);
    }
  }
}

// A tile of either layout (NCHW: runs of `vec` elements, x0 a multiple of it).
template <typename T, bool NCHW>
__device__ __forceinline__ void stage_any(float* dst, const T* src, int n, int c0, int nch, int C, int H, int W,
                                          int y0, int x0, int rows, int cols, int vec) {
  if constexpr (NCHW) {
    switch (vec * (int)sizeof(T)) {
      case 16: return stage_rows_v<T, 16 / sizeof(T)>(dst, src, n, c0, nch, C, H, W, y0, x0, rows, cols);
      case 8: return stage_rows_v<T, 8 / sizeof(T)>(dst, src, n, c0, nch, C, H, W, y0, x0, rows, cols);
      case 4:
        if constexpr (sizeof(T) == 2) return stage_rows_v<T, 2>(dst, src, n, c0, nch, C, H, W, y0, x0, rows, cols);
        [[fallthrough]];
      default: return stage_rows_v<T, 1>(dst, src, n, c0, nch, C, H, W, y0, x0, rows, cols);
    }
  } else {
    stage_tile<T>(dst, src, n, c0, nch, C, H, W, y0, x0, rows, cols, vec);
  }
}

template <typename T>
struct Params : ConvArgs<T> {
  int rows, cols;   // staged tile
  int tiles_x;      // blockIdx.y = tile row * tiles_x + tile column
  int vec;          // 16-byte loads of a pixel's channels (C a multiple of 16 / sizeof(T), aligned)
};

// A thread's channel pair at N consecutive staged positions (a window of a row's columns, or a
// kernel row's taps), and a window's multiply-adds into kRW outputs.
template <int N>
__device__ __forceinline__ void load_pairs(float2 (&dst)[N], const float2* src) {
#pragma unroll
  for (int k = 0; k < N; ++k) dst[k] = src[k * (kCh / 2)];
}

template <int WW, int KW>
__device__ __forceinline__ void fma_row(float2 (&out)[kRW], const float2 (&win)[WW], const float2 (&w)[KW]) {
#pragma unroll
  for (int x = 0; x < kRW; ++x)
#pragma unroll
    for (int j = 0; j < KW; ++j) {
      out[x].x = fmaf(win[x + j].x, w[j].x, out[x].x);
      out[x].y = fmaf(win[x + j].y, w[j].y, out[x].y);
    }
}

// ROW: a one-row kernel (1 x k, k >= 9), whose staged tile is small enough for four blocks an SM:
// held to the registers that allow them. 0 leaves the others to the compiler (1 raised their count).
template <typename T, int KW, bool ROW>
__global__ void __launch_bounds__(kThreads, ROW ? 4 : 0) dw_channel_tile_forward(const Params<T> p) {
  extern __shared__ __align__(16) float smem_f[];
  const DwShape& s = p.s;
  const int c0 = blockIdx.x * kCh, nch = min(kCh, s.C - c0);
  const int ty = blockIdx.y / p.tiles_x, tx = blockIdx.y - ty * p.tiles_x;
  const int n = blockIdx.z;
  constexpr int S = strips(KW);
  const int oy0 = ty * tile_h(KW), ox0 = tx * tile_w(KW);
  const int iy0 = oy0 - s.pad_t, ix0 = ox0 - s.pad_l;
  float* X = smem_f;                        // [rows][cols][kCh]
  float* Wt = smem_f + p.rows * p.cols * kCh;  // [KH * KW][kCh]

  // ---- taps, rotated for the input-gradient
  for (int e = threadIdx.x; e < s.KH * KW * kCh; e += kThreads) {
    const int tap = e / kCh, c = e - tap * kCh;
    const int src = p.flip ? s.KH * KW - 1 - tap : tap;
    Wt[e] = c < nch ? load(p.w + (int64_t)(c0 + c) * s.KH * KW + src) : 0.f;
  }
  // ---- the input tile
  stage_tile<T>(X, p.in, n, c0, nch, s.C, s.H, s.W, iy0, ix0, p.rows, p.cols, p.vec);
  __syncthreads();

  // ---- a thread: channels 2 cp, 2 cp + 1; rows kRH rg ..; columns kRW strip ..
  const int cp = threadIdx.x % (kCh / 2), strip = (threadIdx.x / (kCh / 2)) % S;
  const int rg = threadIdx.x / (kCh / 2 * S);
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
  const size_t pitch = (size_t)p.cols * (kCh / 2);
  const float2* rows = X2 + ((size_t)(kRH * rg) * p.cols + kRW * strip) * (kCh / 2) + cp;
  const float2* taps = W2 + cp;
  float2 w[KW];
  if constexpr (KW == 1) {
    // k x 1: output rows 0 and 1 of kernel row i read staged rows i and i + 1, and a row's window
    // outweighs its one tap, so two windows take the staged rows in turn and each is loaded once.
    // Wider kernels keep one window: a second one's registers cost more than the loads it saves.
    static_assert(kRH == 2, "the windows alternate between two output rows");
    float2 a[kRW], b[kRW];
    load_pairs(a, rows);
    for (int i = 0; i < s.KH; i += 2) {
      load_pairs(b, rows + (i + 1) * pitch);
      load_pairs(w, taps + i * (kCh / 2));
      fma_row(acc[0], a, w);
      fma_row(acc[1], b, w);
      if (i + 1 == s.KH) break;
      load_pairs(a, rows + (i + 2) * pitch);
      load_pairs(w, taps + (i + 1) * (kCh / 2));
      fma_row(acc[0], b, w);
      fma_row(acc[1], a, w);
    }
  } else {
    for (int i = 0; i < s.KH; ++i) {
      load_pairs(w, taps + i * KW * (kCh / 2));
#pragma unroll
      for (int r = 0; r < kRH; ++r) {
        float2 win[kRW + KW - 1];
        load_pairs(win, rows + (r + i) * pitch);
        fma_row(acc[r], win, w);
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


// ---- weight-gradient ----------------------------------------------------------------------------
// A thread keeps every tap of CPT channels in registers: two channels up to 25 taps (or one column
// of kMaxK), one channel up to 49.
__host__ __device__ constexpr int wgrad_taps(int cpt) { return cpt == 2 ? 25 : 49; }
__host__ __device__ constexpr int wgrad_max_rows(int kw, int cpt) {
  return kw == 1 ? kMaxK : (wgrad_taps(cpt) / kw < kMaxK ? wgrad_taps(cpt) / kw : kMaxK);
}
inline int wgrad_channels_per_thread(const DwShape& s) {
  return s.KW == 1 || s.KH * s.KW <= wgrad_taps(2) ? 2 : 1;
}

template <typename T>
struct WgradParams {
  const T* grad;
  const T* in;
  float* parts;    // [slices][C][KH * KW]: each block's sums for its channels
  float* bias_parts;  // [slices][C]: the output gradient's sums (the bias gradient), or null
  DwShape s;
  int rows, cols;  // staged input tile
  int tiles_x;     // column tiles
  int tiles;       // tiles of all images: (n * tile rows + tile row) * tiles_x + tile column
  int per_slice;   // tiles per block; blockIdx.y is the slice
  int vec;         // channels_last: 16-byte loads of both tensors; NCHW: elements an input row run moves
  int gvec;        // NCHW: elements an output-gradient row run moves
  int sh;          // NCHW: staged input column 0 lies sh columns left of the tile's first input column
};

struct WgradPlan {
  Tile tile;
  int cpt;  // channels per thread
  int tiles, slices, per_slice;  // tiles of all images
  size_t smem;  // the two staged tiles; the threads' sums reuse them
};

inline WgradPlan plan_weight_grad(const DwShape& s, int sms, int vec = 0) {
  WgradPlan q{};
  q.tile = tile(s, vec);
  q.cpt = wgrad_channels_per_thread(s);
  q.tiles = (int)(s.planes / s.C) * q.tile.tiles_y * q.tile.tiles_x;
  // about four blocks an SM, each walking a slice of the tiles
  const int groups = ceil_div(s.C, kCh);
  q.slices = std::max(1, std::min(q.tiles, ceil_div(4 * std::max(sms, 1), groups)));
  q.per_slice = ceil_div(q.tiles, q.slices);
  q.slices = ceil_div(q.tiles, q.per_slice);
  const size_t staged = ((size_t)q.tile.rows * q.tile.cols + (size_t)tile_h(s.KW) * tile_w(s.KW)) * kCh * sizeof(float);
  // the threads' sums: every tap's, then the bias gradient's
  q.smem = std::max(staged, (size_t)(s.KH * s.KW + 1) * kThreads * q.cpt * sizeof(float));
  return q;
}

template <int CPT>
__device__ __forceinline__ void load_channels(const float* from, float (&v)[CPT]) {
  if constexpr (CPT == 2) {
    const float2 f = *reinterpret_cast<const float2*>(from);
    v[0] = f.x;
    v[1] = f.y;
  } else {
    v[0] = *from;
  }
}

// A thread: channels CPT cl ..; of the tile's rows RH rg .. and columns kRW strip ..
template <typename T, int KW, int CPT, bool NCHW>
__global__ void __launch_bounds__(kThreads) dw_channel_tile_weight_grad(const WgradParams<T> p) {
  constexpr int KHM = wgrad_max_rows(KW, CPT);
  constexpr int TH = tile_h(KW), TW = tile_w(KW), S = strips(KW);
  constexpr int LP = kCh / CPT, GROUPS = kThreads / LP, RH = TH * S / GROUPS;
  extern __shared__ __align__(16) float smem_f[];
  const DwShape& s = p.s;
  const int c0 = blockIdx.x * kCh, nch = min(kCh, s.C - c0);
  float* X = smem_f;                          // [rows][cols][kCh]
  float* G = smem_f + p.rows * p.cols * kCh;  // [TH][TW][kCh]
  const int cl = threadIdx.x % LP, group = threadIdx.x / LP, strip = group % S, rg = group / S;
  float acc[KHM][KW][CPT];
#pragma unroll
  for (int i = 0; i < KHM; ++i)
#pragma unroll
    for (int j = 0; j < KW; ++j)
#pragma unroll
      for (int k = 0; k < CPT; ++k) acc[i][j][k] = 0.f;
  float bsum[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) bsum[k] = 0.f;
  const bool bias = p.bias_parts != nullptr;

  const int tiles_y = ceil_div(s.OH, TH);
  const int t_begin = blockIdx.y * p.per_slice, t_end = min(p.tiles, t_begin + p.per_slice);
  for (int t = t_begin; t < t_end; ++t) {
    const int tx = t % p.tiles_x, rest = t / p.tiles_x, ty = rest % tiles_y, n = rest / tiles_y;
    const int oy0 = ty * TH, ox0 = tx * TW;
    __syncthreads();  // the previous tile is read
    stage_any<T, NCHW>(X, p.in, n, c0, nch, s.C, s.H, s.W, oy0 - s.pad_t, ox0 - s.pad_l - p.sh, p.rows, p.cols, p.vec);
    stage_any<T, NCHW>(G, p.grad, n, c0, nch, s.C, s.OH, s.OW, oy0, ox0, TH, TW, NCHW ? p.gvec : p.vec);
    __syncthreads();
    // Each staged input row q once: it meets output row r through kernel row q - r.
    float g[RH][kRW][CPT];
#pragma unroll
    for (int r = 0; r < RH; ++r)
#pragma unroll
      for (int x = 0; x < kRW; ++x)
        load_channels<CPT>(G + ((RH * rg + r) * TW + kRW * strip + x) * kCh + CPT * cl, g[r][x]);
    if (bias) {  // zeros outside the map
#pragma unroll
      for (int r = 0; r < RH; ++r)
#pragma unroll
        for (int x = 0; x < kRW; ++x)
#pragma unroll
          for (int k = 0; k < CPT; ++k) bsum[k] += g[r][x][k];
    }
#pragma unroll
    for (int q = 0; q < RH + KHM - 1; ++q) {
      if (q >= RH - 1 + s.KH) break;
      const float* row = X + ((size_t)(RH * rg + q) * p.cols + kRW * strip + p.sh) * kCh + CPT * cl;
      float win[kRW + KW - 1][CPT];
#pragma unroll
      for (int k = 0; k < kRW + KW - 1; ++k) load_channels<CPT>(row + k * kCh, win[k]);
#pragma unroll
      for (int r = 0; r < RH; ++r) {
        const int i = q - r;
        if (i < 0 || i >= KHM || i >= s.KH) continue;
#pragma unroll
        for (int j = 0; j < KW; ++j)
#pragma unroll
          for (int x = 0; x < kRW; ++x)
#pragma unroll
            for (int k = 0; k < CPT; ++k) acc[i][j][k] = fmaf(g[r][x][k], win[x + j][k], acc[i][j][k]);
      }
    }
  }

  // ---- the block's sums: red[tap][group][channel], added over the groups in order
  __syncthreads();
  float* red = smem_f;
#pragma unroll
  for (int i = 0; i < KHM; ++i) {
    if (i >= s.KH) break;
#pragma unroll
    for (int j = 0; j < KW; ++j)
#pragma unroll
      for (int k = 0; k < CPT; ++k) red[((i * KW + j) * GROUPS + group) * kCh + CPT * cl + k] = acc[i][j][k];
  }
  const int taps = s.KH * KW;
  if (bias) {
#pragma unroll
    for (int k = 0; k < CPT; ++k) red[(taps * GROUPS + group) * kCh + CPT * cl + k] = bsum[k];
  }
  __syncthreads();
  if (bias && (int)threadIdx.x < nch) {
    float sum = 0.f;
    for (int gr = 0; gr < GROUPS; ++gr) sum += red[(taps * GROUPS + gr) * kCh + threadIdx.x];
    p.bias_parts[(int64_t)blockIdx.y * s.C + c0 + threadIdx.x] = sum;
  }
  for (int e = threadIdx.x; e < taps * kCh; e += kThreads) {
    const int tap = e / kCh, c = e - tap * kCh;
    if (c >= nch) continue;
    float sum = 0.f;
    for (int gr = 0; gr < GROUPS; ++gr) sum += red[(tap * GROUPS + gr) * kCh + c];
    p.parts[((int64_t)blockIdx.y * s.C + c0 + c) * taps + tap] = sum;
  }
}

}  // namespace channel_tile
namespace ct = channel_tile;

bool dwconv2d_channel_tile_forward_fits(DType t, const DwShape& s) {
  (void)t;
  if (!s.nhwc || s.KW % 2 == 0 || s.KW > ct::kMaxK || s.KH > ct::kMaxK) return false;
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess) return false;
  const int64_t N = s.planes / s.C;
  const ct::Tile q = ct::tile(s);
  return N <= 65535 && q.tiles_x * q.tiles_y <= 65535 && ceil_div(s.C, ct::kCh) <= (1 << 20) &&
         q.smem <= (size_t)lim.max_smem_optin;
}

cudaError_t dwconv2d_channel_tile_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                          const DwShape& s, bool flip_kernel, cudaStream_t stream) {
  if (!s.nhwc) return cudaErrorInvalidValue;  // NCHW: the weight-gradient only
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const ct::Tile q = ct::tile(s);
    ct::Params<T> p{};
    p.set(static_cast<const T*>(in), static_cast<const T*>(w), static_cast<const T*>(bias), static_cast<T*>(out), s,
          flip_kernel);
    p.rows = q.rows;
    p.cols = q.cols;
    p.tiles_x = q.tiles_x;
    p.vec = s.C % (16 / (int)sizeof(T)) == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0;
    const dim3 grid(ceil_div(s.C, ct::kCh), q.tiles_x * q.tiles_y, p.N);
    return ct::with_width(s.KW, [&](auto kw) {
      constexpr int KW = decltype(kw)::value;
      if constexpr (KW >= 9) {
        if (s.KH == 1)
          return launch(ct::dw_channel_tile_forward<T, KW, true>, grid, dim3(ct::kThreads), q.smem, stream, p);
      }
      return launch(ct::dw_channel_tile_forward<T, KW, false>, grid, dim3(ct::kThreads), q.smem, stream, p);
    });
  });
}

double dwconv2d_channel_tile_macs(const DwShape& s) {
  const ct::Tile q = ct::tile(s);
  const int64_t tiles = (s.planes / s.C) * ceil_div(s.C, ct::kCh) * q.tiles_y * q.tiles_x;
  return (double)tiles * ct::kCh * ct::tile_h(s.KW) * ct::tile_w(s.KW) * s.KH * s.KW;
}

bool dwconv2d_channel_tile_weight_grad_fits(DType t, const DwShape& s) {
  if (!s.nhwc && t != DType::f16 && t != DType::bf16) return false;  // NCHW: built for half types only
  if (s.KW % 2 == 0 || s.KW > ct::kMaxK) return false;
  if (s.KH > ct::wgrad_max_rows(s.KW, ct::wgrad_channels_per_thread(s))) return false;
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess) return false;
  const ct::WgradPlan q = ct::plan_weight_grad(s, lim.sms, s.nhwc ? 0 : 8);  // NCHW: the widest shift
  return q.slices <= 65535 && ceil_div(s.C, ct::kCh) <= (1 << 20) && q.smem <= (size_t)lim.max_smem_optin;
}

size_t dwconv2d_channel_tile_weight_grad_workspace(const DwShape& s, bool with_bias) {
  const ct::WgradPlan q = ct::plan_weight_grad(s, sms_or_zero());
  return slices_workspace_bytes(q.slices, s, with_bias);
}

cudaError_t dwconv2d_channel_tile_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w,
                                              float* workspace, const DwShape& s, cudaStream_t stream, void* grad_b) {
  if (workspace == nullptr) return cudaErrorInvalidValue;
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const uintptr_t ia = reinterpret_cast<uintptr_t>(in), ga = reinterpret_cast<uintptr_t>(grad_out);
    const int vec = s.nhwc ? 0 : ct::row_vector(sizeof(T), s.W, ia);
    const ct::WgradPlan q = ct::plan_weight_grad(s, sms_or_zero(), vec);
    ct::WgradParams<T> p{};
    p.grad = static_cast<const T*>(grad_out);
    p.in = static_cast<const T*>(in);
    p.parts = workspace;
    p.bias_parts = grad_b ? slices_bias_parts(workspace, q.slices, s) : nullptr;
    p.s = s;
    p.rows = q.tile.rows;
    p.cols = q.tile.cols;
    p.tiles_x = q.tile.tiles_x;
    p.tiles = q.tiles;
    p.per_slice = q.per_slice;
    p.vec = s.nhwc ? s.C % (16 / (int)sizeof(T)) == 0 && ia % 16 == 0 && ga % 16 == 0 : vec;
    p.gvec = s.nhwc ? 0 : ct::row_vector(sizeof(T), s.OW, ga);
    p.sh = q.tile.sh;
    const dim3 grid(ceil_div(s.C, ct::kCh), q.slices);
    const cudaError_t e = ct::with_width(s.KW, [&](auto kw) -> cudaError_t {
      constexpr int KW = decltype(kw)::value;
      auto run = [&](auto cpt) -> cudaError_t {
        constexpr int CPT = decltype(cpt)::value;
        const dim3 block(ct::kThreads);
        if (s.nhwc) return launch(ct::dw_channel_tile_weight_grad<T, KW, CPT, false>, grid, block, q.smem, stream, p);
        if constexpr (sizeof(T) == 2) {  // NCHW: fp16 / bf16 (the plan's; fewer kernels to build)
          return launch(ct::dw_channel_tile_weight_grad<T, KW, CPT, true>, grid, block, q.smem, stream, p);
        } else {
          return cudaErrorInvalidValue;
        }
      };
      if (q.cpt == 2) return run(std::integral_constant<int, 2>());
      if constexpr (KW > 1) {
        return run(std::integral_constant<int, 1>());
      } else {
        return cudaErrorInvalidValue;  // one column: always a pair of channels a thread
      }
    });
    if (e != cudaSuccess) return e;
    return sum_slices(workspace, static_cast<T*>(grad_w), static_cast<T*>(grad_b), q.slices, s, stream);
  });
}

}  // namespace lkpatch
