// The "rows" tensor-core family: M = 16 output rows of one image, so any batch size fills the
// tensor cores, and channels_last tensors are read and written as they are.
//
// Forward (and input-gradient, with the kernel rotated): for kernel row i, the 16 output rows
// oy .. oy + 15 of one channel read input rows oy + i - pad_t .. + 15, and
//   out[oy + m][ox0 + n] += sum_k in[oy + m + i - pad_t][x0 + k] * T_i[k][n]
// is one mma per 8 output columns and k-step (16 half / 8 TF32 input columns), with the same
// banded (Toeplitz) B operand T_i[k][n] = w[i][k - n + x0 - ox0 + pad_l] as the images family.
// A block stages a tile of the input (rows of one image, CG channels) once; each warp takes one
// (channel, 16-row band, column group) job and, per kernel row, loads the A fragments of its
// columns through ldmatrix: consecutive 8-column tiles and k-steps share them, so a warp reads
// (NT - 1) * 8 + 16 S columns (half types) per kernel row for NT * S mma. channels_last tiles are
// staged one pixel vector (16 bytes of channels) at a time and transposed into channel planes on
// the way; results go back through shared memory, so that global stores are 16-byte vectors in
// either layout.
//
// Weight-gradient: the banded product of dwconv_tc_wgrad.cu (M = 16 kernel columns, N = 8 kernel
// rows, K = output columns, banded_weight_grad_row), over items of one image, a band of output
// rows and a range of output columns, so that a block's staging stays small on any map and with
// any batch; channels_last blocks stage CG channels transposed and give each channel its own warps.
#pragma once

#include <algorithm>
#include <type_traits>

#include "dwconv_core.cuh"
#include "dwconv_mma.cuh"

namespace lkpatch {
namespace rows {

constexpr int kWarps = 8;
// n-tiles (8 output columns each) per forward job: half types 8, TF32 4 (twice the k-steps).
template <typename T> constexpr int kNT = std::is_same_v<T, float> ? 4 : 8;
// Most k-steps per n-tile: ceil((KW + 7 + sh) / KS) with KW <= 63, sh < 16 bytes.
template <typename T> constexpr int kMaxSteps = std::is_same_v<T, float> ? 10 : 5;
// Elements per 16 bytes: a channels_last pixel vector, an ldmatrix row, a staging unit.
template <typename T> constexpr int kVec = 16 / (int)sizeof(T);

// B fragment table: per staged channel and kernel row, kBandPad + KS * S entries; entry
// kBandPad + u holds (half types) the pair of taps u, u + 1 packed as a register, (TF32) tap u
// rounded, zero outside the kernel. A lane's b0 / b1 of k-step st then come from entries
// kBandPad + KS st + k - g - sh with k = 2t, 2t + 8 (half) or t, t + 4 (TF32): one load each.
constexpr int kBandPad = 16;

template <typename T>
struct FwdParams : ConvArgs<T> {
  int CG;           // channels per block (channels_last: a pixel's vector of them, 16 or 8 bytes)
  int MT, NG;       // 16-row bands and NT-tile column groups per block: CG * MT * NG <= kWarps jobs
  int S, sh;        // k-steps per n-tile; staged column 0 = image column ox0 - pad_l - sh
  int rows, cols;   // staged tile: input rows, columns (a multiple of kVec)
  int pitch;        // staged row pitch (elements): an odd number of 16-byte units
  int opitch;       // output tile row pitch (elements)
  int band;         // B table entries per kernel row: kBandPad + KS * S
  int obytes;       // offset (bytes) of the output tile: 0, over the staged input, where a block has one step
  int xbytes;       // offset (bytes) of the B table, after the staged tile and the output tile
  int steps;        // row tiles a block takes one after the other (its staged rows a ring: below)
  int tiles_x;      // column tiles; blockIdx.y = strip of `steps` tile rows * tiles_x + tile column
  int vec;          // NCHW: 16-byte staging copies (16) or shifted loads (0); NHWC: pixel vectors (1/0)
  int ovec;         // 16-byte output stores (NCHW: aligned rows; NHWC: pixel vectors)
};

// One pixel's kVec channels (channels_last), or kVec consecutive elements of a row.
template <typename T>
union Vec16 {
  uint4 u;
  uint2 v8[2];
  T h[kVec<T>];
};

// A pixel's CG channels (CG = kVec or kVec / 2: a 16- or 8-byte vector where `vec`, else
// element loads; zeros past nch).
template <typename T>
__device__ __forceinline__ Vec16<T> load_pixel(const T* from, int CG, int nch, bool valid, bool vec) {
  Vec16<T> v;
  if (valid && vec) {
    if (CG == kVec<T>) v.u = __ldg(reinterpret_cast<const uint4*>(from));
    else v.v8[0] = __ldg(reinterpret_cast<const uint2*>(from));
  } else {
#pragma unroll
    for (int ch = 0; ch < kVec<T>; ++ch) v.h[ch] = valid && ch < nch ? from[ch] : from_float<T>(0.f);
  }
  return v;
}

// Channels c0 .. c0 + CG - 1 (CG = kVec or kVec / 2) of rows [0, nrows) x columns [0, ncols) of a
// channels_last image, starting at image row y0 and column x0, into planes dst[ch][r][pitch]
// (zeros outside the image and past nch; ncols even). A thread keeps one pair of adjacent columns
// and walks rows, so its addresses step by a row and its column checks are made once; each pair
// of pixels becomes one 32-bit store per channel plane. vec: pixels load as 16- or 8-byte vectors.
template <typename T>
__device__ __forceinline__ void stage_nhwc(T* dst, int plane, int pitch, const T* src, int n, int c0, int nch, int CG,
                                           int C, int H, int W, int y0, int x0, int nrows, int ncols, bool vec) {
  constexpr int E = kVec<T>, kBatch = 4;  // rows in flight per thread
  const int pairs = ncols / 2, tpr = min(pairs, (int)blockDim.x), rstep = blockDim.x / tpr;
  const int k = threadIdx.x % tpr, r0 = threadIdx.x / tpr;
  if (r0 >= rstep) return;
  const bool whole = vec && CG == E;  // 16-byte pixel vectors: plain predicated loads
  const int64_t step = (int64_t)rstep * W * C;
  for (int pc = k; pc < pairs; pc += tpr) {
    const int x = 2 * pc, ix = x0 + x;
    const bool in0 = ix >= 0 && ix < W, in1 = ix + 1 >= 0 && ix + 1 < W;
    // pixel (y0 + r0, ix); rows outside the image give addresses that are never read
    const T* at = src + (((int64_t)n * H + y0 + r0) * W + ix) * C + c0;
    for (int r = r0; r < nrows; r += kBatch * rstep, at += kBatch * step) {
      Vec16<T> v[kBatch][2];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int y = y0 + r + b * rstep;
        const bool row_in = r + b * rstep < nrows && y >= 0 && y < H;
        const T* a = at + b * step;
        if (whole) {
          v[b][0].u = row_in && in0 ? __ldg(reinterpret_cast<const uint4*>(a)) : make_uint4(0, 0, 0, 0);
          v[b][1].u = row_in && in1 ? __ldg(reinterpret_cast<const uint4*>(a + C)) : make_uint4(0, 0, 0, 0);
        } else {
          v[b][0] = load_pixel<T>(row_in && in0 ? a : src, CG, nch, row_in && in0, vec);
          v[b][1] = load_pixel<T>(row_in && in1 ? a + C : src, CG, nch, row_in && in1, vec);
        }
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (r + b * rstep >= nrows) break;
        T* to = dst + (r + b * rstep) * pitch + x;
        if (CG == E) {
#pragma unroll
          for (int ch = 0; ch < E; ++ch) store2(to + ch * plane, v[b][0].h[ch], v[b][1].h[ch]);
        } else {
#pragma unroll
          for (int ch = 0; ch < E / 2; ++ch) store2(to + ch * plane, v[b][0].h[ch], v[b][1].h[ch]);
        }
      }
    }
  }
}

// Rows [0, nrows) x columns [0, ncols) of CG channel planes starting at image row y0 and column
// x0 into dst[ch][r][pitch] (zero outside the image and past the channels); plane stride `plane`.
// NCHW: stage_rows16 (kBatch shifted loads in flight a thread where rows are not aligned for
// 16-byte copies). NHWC: pixel vectors.
template <typename T, bool NHWC, int kBatch>
__device__ __forceinline__ void stage_tile(T* dst, int plane, int pitch, const T* src, int n, int c0, int nch, int CG,
                                           int C, int H, int W, int y0, int x0, int nrows, int ncols, int vec) {
  if constexpr (NHWC) {
    stage_nhwc<T>(dst, plane, pitch, src, n, c0, nch, CG, C, H, W, y0, x0, nrows, ncols, vec);
  } else {
    const int64_t plane_elems = (int64_t)H * W;
    stage_rows16<T, kBatch>(dst, plane, pitch, src + ((int64_t)n * C + c0) * plane_elems, plane_elems, CG, nch, H, W,
                            y0, nrows, x0, ncols, vec);
  }
}

// Blocks an SM the forward kernel is compiled for: three for the kernels with their k-steps fixed
// and without the ring (which fit 80 registers), else two. The plan counts with the same.
constexpr int forward_blocks_per_sm(bool fixed_steps, bool ring) { return fixed_steps && !ring ? 3 : 2; }

template <typename T, bool NHWC, int FS, bool RING>
__global__ void __launch_bounds__(32 * kWarps, forward_blocks_per_sm(FS != 0, RING))
    dw_rows_forward(const FwdParams<T> p) {
  constexpr bool kTF32 = std::is_same_v<T, float>;
  constexpr int E = kVec<T>, KS = kStep<T>, UPT = 8 / E;  // units (16-byte columns) per n-tile
  constexpr int NT = kNT<T>;
  constexpr int SMAX = FS ? FS : kMaxSteps<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c0 = blockIdx.x * p.CG, nch = min(p.CG, s.C - c0);
  const int strip = blockIdx.y / p.tiles_x, tx = blockIdx.y - strip * p.tiles_x;
  const int n = blockIdx.z;
  const int TH = 16 * p.MT, TW = 8 * NT * p.NG;
  const int ox0 = tx * TW;
  const int ix0 = ox0 - s.pad_l - p.sh;  // image column of staged column 0
  const int plane = p.rows * p.pitch;
  // The staged rows are a ring: a block takes `steps` tile rows one after the other, and the
  // rows a tile shares with the one before (the kernel's KH - 1 halo) stay where they are; tile
  // row k's staged row r lies in slot (k TH + r) % rows. The rows that follow are staged only.
  T* X = reinterpret_cast<T*>(smem_raw);                // [CG][rows][pitch]
  T* O = reinterpret_cast<T*>(smem_raw + p.obytes);     // [CG][TH][opitch]
  const T zero = from_float<T>(0.f);

  // The B table of every staged channel (the input-gradient reads the kernel rotated): a warp
  // per (channel, kernel row), its lanes along the row; kRowsAtOnce rows' loads in flight before
  // their stores, as a block's table is built before any of its warps computes.
  // One k-step (kernels up to 9 wide, half types): each warp loads its own fragments instead,
  // which costs less than the table's build on such short blocks (kTable false, no table).
  constexpr bool kTable = FS != 1;
  uint32_t* Bt = reinterpret_cast<uint32_t*>(smem_raw + p.xbytes);
  constexpr int kRowsAtOnce = 4;
  for (int row0 = warp; kTable && row0 < p.CG * s.KH; row0 += kRowsAtOnce * kWarps) {
    for (int e = lane; e < p.band; e += 32) {
      const int u = e - kBandPad;
      T lo[kRowsAtOnce], hi[kRowsAtOnce];
#pragma unroll
      for (int k = 0; k < kRowsAtOnce; ++k) {
        const int row = row0 + k * kWarps, ch = row / s.KH, i = row - ch * s.KH;
        const T* wrow = p.w + (int64_t)(c0 + ch) * s.KH * s.KW +
                        (p.flip ? (int64_t)(s.KH - 1 - i) * s.KW + s.KW - 1 : (int64_t)i * s.KW);
        const int step = p.flip ? -1 : 1, kw_end = row < p.CG * s.KH && ch < nch ? s.KW : 0;
        lo[k] = (unsigned)u < (unsigned)kw_end ? __ldg(wrow + step * u) : zero;
        hi[k] = (unsigned)(u + 1) < (unsigned)kw_end ? __ldg(wrow + step * (u + 1)) : zero;
      }
#pragma unroll
      for (int k = 0; k < kRowsAtOnce; ++k) {
        const int row = row0 + k * kWarps;
        if (row >= p.CG * s.KH) break;
        if constexpr (kTF32) Bt[row * p.band + e] = to_tf32(lo[k]);
        else Bt[row * p.band + e] = pack2(lo[k], hi[k]);
      }
    }
  }


  // RING: a loop over the strip's tile rows (it costs registers: the one-row kernels stay apart)
  const int steps = RING ? p.steps : 1;
  for (int step = 0; step < steps; ++step) {
    const int oy0 = (strip * p.steps + step) * TH;
    if (oy0 >= s.OH) break;
    const int iy0 = oy0 - s.pad_t;  // image row of the tile's staged row 0
    const int rot = step * TH % p.rows;  // its slot
    // ---- stage the input rows (zeros outside the image and past the channels): all of them at
    // the first tile row, then the TH that follow the previous tile's, over its first TH (done)
    {
      const int first = step == 0 ? 0 : p.rows - TH, count = step == 0 ? p.rows : TH;
      const int slot = (rot + first) % p.rows, n1 = min(count, p.rows - slot);
      for (int part = 0; part < 2; ++part) {
        const int at = part ? 0 : slot, y = iy0 + first + (part ? n1 : 0), nrows = part ? count - n1 : n1;
        if (nrows <= 0) continue;
        if constexpr (NHWC) {
          stage_nhwc<T>(X + at * p.pitch, plane, p.pitch, p.in, n, c0, nch, p.CG, s.C, s.H, s.W, y, ix0, nrows, p.cols,
                        p.vec);
        } else {  // eight shifted loads in flight: no accumulator is live yet
          stage_tile<T, false, 8>(X + at * p.pitch, plane, p.pitch, p.in, n, c0, nch, p.CG, s.C, s.H, s.W, y, ix0, nrows,
                                  p.cols, p.vec);
        }
      }
      if constexpr (!NHWC) {
        copy_async_commit();
        copy_async_wait_group<0>();
      }
    }
    __syncthreads();

    // ---- one job per warp and tile row: channel ch, rows 16 mt .. of the tile, n-tiles NT ng ..
    const int jobs_per_ch = p.MT * p.NG;
    const int ch = warp / jobs_per_ch, mt = (warp - ch * jobs_per_ch) / p.NG, ng = warp - ch * jobs_per_ch - mt * p.NG;
    const int g = lane >> 2, t = lane & 3;
    const int S = FS ? FS : p.S;
    // live n-tiles: those with an output column inside the map
    const int ntl = max(0, min(NT, ceil_div(s.OW - ox0 - 8 * NT * ng, 8)));
    const int r0 = 16 * mt;
    // ldmatrix.x4: lane l addresses row r0 + i + (l & 15), unit 2q + (l >> 4) of the job's columns.
    const unsigned a_col = (unsigned)__cvta_generic_to_shared(X) +
                           (unsigned)((ch * plane + (8 * NT * ng) + E * (lane >> 4)) * (int)sizeof(T));
    const unsigned row_bytes = (unsigned)(p.pitch * (int)sizeof(T));
    // this lane's B entries of kernel row 0 (b0; b1 is KS / 2 entries on)
    const uint32_t* brow = Bt + ch * s.KH * p.band + kBandPad + (kTF32 ? t : 2 * t) - g - p.sh;
    // Without the table (one k-step): taps k - g - sh, k = 2t, 2t + 1, 2t + 8, 2t + 9, from the
    // weights; which of them lie inside the kernel, and where, is the same on every kernel row, and
    // the next row's taps load while this row's mma run.
    const int kw_lane = (kTF32 ? t : 2 * t) - g - p.sh;
    const T* wrow = p.w + (int64_t)(c0 + ch) * s.KH * s.KW + (p.flip ? (s.KH - 1) * s.KW : 0);
    const int wstep = p.flip ? -s.KW : s.KW;
    int toff[4];
    bool tin[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int kw = kw_lane + (k & 1) + 8 * (k >> 1);
      tin[k] = (unsigned)kw < (unsigned)s.KW;
      toff[k] = tin[k] ? (p.flip ? s.KW - 1 - kw : kw) : 0;
    }
    auto row_taps = [&](int i, uint32_t(&b)[2]) {
      if constexpr (!kTF32) {
        const T* r = wrow + i * wstep;
        T v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {  // every lane loads (toff 0 is a tap of the row): no divergence
          const T x = __ldg(r + toff[k]);
          v[k] = tin[k] ? x : zero;
        }
        b[0] = pack2(v[0], v[1]);
        b[1] = pack2(v[2], v[3]);
      }
    };
    const bool job = warp < p.CG * jobs_per_ch && ch < nch && oy0 + r0 < s.OH && ntl > 0;
    float acc[NT][4];
    if (job) {
      const float bias = p.bias ? load(p.bias + c0 + ch) : 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = bias;
      const int top = iy0 + r0;  // image row of the band's first staged row
      const int i_lo = max(0, -top - 15), i_hi = min(s.KH, s.H - top);  // kernel rows that reach the image
      const int nunits = (ntl - 1) * UPT + 2 * S, nloads = (nunits + 1) / 2;
      // the slot of this lane's row at kernel row i_lo (rot + r0 + 15 + i < 2 rows)
      int lrow = rot + r0 + (lane & 15) + i_lo;
      if (lrow >= p.rows) lrow -= p.rows;
      uint32_t Bnext[2] = {0, 0};
      if constexpr (!kTable && !kTF32) {
        if (i_lo < i_hi) row_taps(i_lo, Bnext);
      }
      // NTL n-tiles: with the k-steps fixed, a job runs all of them, those past the map's edge too
      // (never stored), without a branch per tile; a job at the map's right edge with at most half
      // of its n-tiles live runs the NT / 2 variant, so that a map's last column group costs about
      // what it covers.
      auto kernel_rows = [&](auto n_tiles) {
        constexpr int NTL = decltype(n_tiles)::value;
        constexpr int LMAXL = ((NTL - 1) * UPT + 2 * SMAX + 1) / 2;  // ldmatrix.x4 loads a kernel row (two units each)
        constexpr int kUnrollRows = kTable ? 2 : 1;  // registers: the one-step kernels keep 3 blocks an SM
#pragma unroll kUnrollRows
        for (int i = i_lo; i < i_hi; ++i) {
          uint32_t B[SMAX][2];
#pragma unroll
          for (int st = 0; st < SMAX; ++st) {
            if (!FS && st >= S) break;
            if constexpr (kTable) {
              B[st][0] = brow[i * p.band + KS * st];
              B[st][1] = brow[i * p.band + KS * st + KS / 2];
            } else if constexpr (!kTF32) {
              B[st][0] = Bnext[0];
              B[st][1] = Bnext[1];
            }
          }
          if constexpr (!kTable && !kTF32) {
            if (i + 1 < i_hi) row_taps(i + 1, Bnext);
          }
          uint32_t A[2 * LMAXL][2];
          const unsigned a_row = a_col + (unsigned)lrow * row_bytes;
          lrow = lrow + 1 == p.rows ? 0 : lrow + 1;
#pragma unroll
          for (int q = 0; q < LMAXL; ++q) {
            if (!FS && q >= nloads) break;  // k-steps fixed: every load of the variant's width (inside the staged tile)
            uint32_t r[4];
            ldmatrix_x4(r, a_row + (unsigned)(2 * q * 16));
            if constexpr (kTF32) {
#pragma unroll
              for (int e = 0; e < 4; ++e) r[e] = to_tf32(__uint_as_float(r[e]));
            }
            A[2 * q][0] = r[0]; A[2 * q][1] = r[1];
            A[2 * q + 1][0] = r[2]; A[2 * q + 1][1] = r[3];
          }
#pragma unroll
          for (int st = 0; st < SMAX; ++st) {
            if (!FS && st >= S) break;
#pragma unroll
            for (int j = 0; j < NTL; ++j) {
              if (!FS && j >= ntl) break;
              const int u = j * UPT + 2 * st;
              mma_tile<T>(acc[j], A[u][0], A[u][1], A[u + 1][0], A[u + 1][1], B[st][0], B[st][1]);
            }
          }
        }
      };
      if (FS && ntl <= NT / 2) kernel_rows(std::integral_constant<int, NT / 2>{});
      else kernel_rows(std::integral_constant<int, NT>{});
    }
    if (p.obytes == 0) __syncthreads();  // every warp is done with the staged input: the output tile takes its place

    // ---- results through shared memory: O[ch][row][opitch], C fragment rows g, g + 8, columns 2t, 2t + 1
    const int oplane = TH * p.opitch;
    if (job) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (j >= ntl) break;
        T* at = O + ch * oplane + (r0 + g) * p.opitch + 8 * NT * ng + 8 * j + 2 * t;
        store2(at, from_float<T>(acc[j][0]), from_float<T>(acc[j][1]));
        store2(at + 8 * p.opitch, from_float<T>(acc[j][2]), from_float<T>(acc[j][3]));
      }
    }
    __syncthreads();
    const int rows_out = min(TH, s.OH - oy0), cols_out = min(TW, s.OW - ox0);
    if constexpr (NHWC) {
      // A thread keeps a pair of adjacent columns (one 32-bit load per channel plane) and walks rows.
      const int pairs = ceil_div(cols_out, 2), tpr = min(pairs, (int)blockDim.x), rstep = blockDim.x / tpr;
      const int k = threadIdx.x % tpr, rr = threadIdx.x / tpr;
      for (int pc = k; rr < rstep && pc < pairs; pc += tpr) {
        const int x = 2 * pc;
        const bool second = x + 1 < cols_out;
        T* dst = p.out + (((int64_t)n * s.OH + oy0 + rr) * s.OW + ox0 + x) * s.C + c0;
        for (int r = rr; r < rows_out; r += rstep, dst += (int64_t)rstep * s.OW * s.C) {
          Vec16<T> v[2];
#pragma unroll
          for (int c = 0; c < E; ++c) {
            if (c < p.CG) load2(O + c * oplane + r * p.opitch + x, v[0].h[c], v[1].h[c]);
          }
#pragma unroll
          for (int px = 0; px < 2; ++px) {
            if (px == 1 && !second) break;
            T* to = dst + px * s.C;
            if (p.ovec) {
              if (p.CG == E) __stwb(reinterpret_cast<uint4*>(to), v[px].u);
              else __stwb(reinterpret_cast<uint2*>(to), v[px].v8[0]);
            } else {
#pragma unroll
              for (int c = 0; c < E; ++c)
                if (c < nch) to[c] = v[px].h[c];
            }
          }
        }
      }
    } else {
      if (p.ovec) {  // rows of whole 16-byte vectors (OW a multiple of E, tiles start at multiples of 8)
        const int vpr = ceil_div(cols_out, E), total = nch * rows_out * vpr;
        for (int u = threadIdx.x; u < total; u += blockDim.x) {
          const int pr = u / vpr, k = u - pr * vpr, c = pr / rows_out, r = pr - c * rows_out;
          const uint4 v = *reinterpret_cast<const uint4*>(O + c * oplane + r * p.opitch + k * E);
          T* dst = p.out + (((int64_t)n * s.C + c0 + c) * s.OH + oy0 + r) * s.OW + ox0 + k * E;
          __stwb(reinterpret_cast<uint4*>(dst), v);
        }
      } else {
        const int total = nch * rows_out * cols_out;
        for (int u = threadIdx.x; u < total; u += blockDim.x) {
          const int pr = u / cols_out, x = u - pr * cols_out, c = pr / rows_out, r = pr - c * rows_out;
          p.out[(((int64_t)n * s.C + c0 + c) * s.OH + oy0 + r) * s.OW + ox0 + x] = O[c * oplane + r * p.opitch + x];
        }
      }
    }
    // The next tile row's staging writes slots this one no longer reads and not the output tile
    // (apart from it where there is one step); its first barrier orders the output tile's reuse.
  }
}

// ---- weight-gradient ----------------------------------------------------------------------------
// The input rows [lo, hi) that reach output rows oy0 .. oy0 + nrows - 1 through kernel rows
// i0 .. i0 + kh - 1 (clipped to the image).
struct RowRange {
  int lo, hi;
};
__host__ __device__ inline RowRange weight_grad_input_rows(const DwShape& s, int oy0, int nrows, int i0, int kh) {
  return {max(0, oy0 + i0 - s.pad_t), min(s.H, oy0 + nrows - 1 + i0 + kh - 1 - s.pad_t + 1)};
}

// Shared memory before the weight-gradient's staged tiles: each warp's bias-gradient sum.
constexpr int kWgradHead = kWarps * (int)sizeof(float);  // a multiple of 16 bytes: the tiles stay aligned

template <typename T>
struct WgradParams {
  const T* grad;
  const T* in;
  float* parts;  // [slices][C][KH][KW]: each block's sums for its channels and kernel tile
  float* bias_parts;  // [slices][C]: the output-gradient's sums (the bias gradient), or null
  DwShape s;
  int N;
  int CG;             // channels per block; kWarps / CG warps per channel split its input rows
  int BH, BW;         // an item: output rows oy0 .. oy0 + BH - 1, columns ox0 .. ox0 + BW - 1 (BW % KS == 0)
  int bands, ctiles;  // items per image: bands x column tiles
  int items, per_slice;  // N * bands * ctiles items, per_slice of them per block (blockIdx.x: the slice)
  int gpitch;         // staged output-gradient row pitch (elements), an odd number of 16-byte units
  int xw;             // staged input row length (elements)
  int nq;             // staged input rows at most: BH + 8 IT - 1
  int tiles_j;        // kernel-column tiles of 16 JT; blockIdx.z = tile row * tiles_j + tile column
  int gvec, xvec;     // NCHW: 16-byte staging copies (16) or shifted loads (0); NHWC: pixel vectors (1/0)
};

template <typename T, bool NHWC, int JT, int IT>
__global__ void __launch_bounds__(32 * kWarps, NHWC ? 2 : 3) dw_rows_weight_grad(const WgradParams<T> p) {
  constexpr bool kTF32 = std::is_same_v<T, float>;
  constexpr int NB = (IT + 1) / 2;  // kernel-row tile pairs (B loads)
  constexpr int KS = kStep<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c0 = blockIdx.y * p.CG, nch = min(p.CG, s.C - c0);
  const int tile_i = blockIdx.z / p.tiles_j, tile_j = blockIdx.z - tile_i * p.tiles_j;
  const int i0 = tile_i * 8 * IT, j0 = tile_j * 16 * JT;
  const int kh = min(8 * IT, s.KH - i0);  // this tile's kernel rows inside the kernel
  const int wpc = kWarps / p.CG, ch = warp / wpc, phase = warp - ch * wpc;  // this warp's channel, row phase
  const int item_begin = blockIdx.x * p.per_slice, item_end = min(p.items, item_begin + p.per_slice);

  const int gplane = (p.BH + 1) * p.gpitch, xplane = p.nq * p.xw;  // a zero row after each G plane
  float* bias_acc = reinterpret_cast<float*>(smem_raw);  // [warp]: its share of the bias gradient
  T* G = reinterpret_cast<T*>(smem_raw + kWgradHead);      // [CG][BH + 1][gpitch]
  T* X = G + p.CG * gplane;                                // [CG][nq][xw]
  float* red = reinterpret_cast<float*>(smem_raw + kWgradHead);  // [warp][16 JT][8 IT], over G and X at the end
  if (threadIdx.x < kWarps) bias_acc[threadIdx.x] = 0.f;
  const T zero = from_float<T>(0.f);
  for (int e = threadIdx.x; e < p.CG * p.gpitch; e += blockDim.x) {
    const int c = e / p.gpitch;
    G[c * gplane + p.BH * p.gpitch + e - c * p.gpitch] = zero;
  }

  float acc[JT][IT][4];
  zero_taps(acc);
  // The bias gradient: the first kernel tile's blocks sum the staged output gradient on the way
  // (zeros outside the map), each warp its share of its channel's rows, before any TF32 rounding.
  const bool bias = p.bias_parts != nullptr && blockIdx.z == 0;

  const BandedWgradLane<T> ln(lane);
  const unsigned g_addr = (unsigned)__cvta_generic_to_shared(G + ch * gplane);
  // Input rows are staged from column xs = ox0 + j0 - pad_l - d, aligned for the copies.
  const int align = !NHWC && p.xvec ? p.xvec / (int)sizeof(T) : 1;
  const int d = ((j0 - s.pad_l) % align + align) % align;  // ox0 is a multiple of KS (and of align)
  const int lane_off = ln.lane_off0 + d;
  const bool active = ch < nch;
  // channels_last: the staged input rows are a ring, image row q in slot q % nq, and items run
  // down a column tile's bands, so an item that follows the band above it keeps the rows the two
  // share (the kernel's halo) and stages the rest only. NCHW items run along a band's column
  // tiles (a map's last tile, often narrow, then shares a block with a wide one), its input row
  // q_lo in row 0: there the ring lost more (registers, balance) than its staging saved.
  constexpr bool kRing = NHWC;
  int kept_hi = -1;  // input rows [.., kept_hi) of the previous item are staged, where it continues
  for (int item = item_begin; item < item_end; ++item) {
    const int n = item / (p.bands * p.ctiles), rest = item - n * p.bands * p.ctiles;
    int band, ct;
    if constexpr (kRing) {
      ct = rest / p.bands;
      band = rest - ct * p.bands;
    } else {
      band = rest / p.ctiles;
      ct = rest - band * p.ctiles;
    }
    const int oy0 = band * p.BH, ox0 = ct * p.BW;
    const int nrows_g = min(p.BH, s.OH - oy0);
    // input rows that reach the band through this tile's kernel rows: q + pad_t - i in [oy0, oy0 + BH)
    const RowRange q_rows = weight_grad_input_rows(s, oy0, nrows_g, i0, kh);
    const int q_lo = q_rows.lo, q_hi = q_rows.hi;
    const int nq = max(0, q_hi - q_lo);
    const int xs = ox0 + j0 - s.pad_l - d;
    // The item's columns inside the map (a map's last column tile can be mostly past its edge):
    // only they are staged and multiplied.
    const int width = min(p.BW, round_up(s.OW - ox0, KS));
    __syncthreads();  // the previous item is done with G and X
    // two shifted loads in flight: the accumulators stay live across items
    stage_tile<T, NHWC, 2>(G, gplane, p.gpitch, p.grad, n, c0, nch, p.CG, s.C, s.OH, s.OW, oy0, ox0, p.BH, width,
                        p.gvec);
    // the input rows [from, q_hi) are staged for this item (the ring keeps the others)
    int from = q_lo;
    if constexpr (kRing) {
      // the previous item: the band above, same image and columns
      if (item > item_begin && band > 0) from = max(q_lo, kept_hi);
      kept_hi = q_hi;
      const int slot = from % p.nq, n1 = min(q_hi - from, p.nq - slot);
      if (n1 > 0)
        stage_tile<T, NHWC, 2>(X + slot * p.xw, xplane, p.xw, p.in, n, c0, nch, p.CG, s.C, s.H, s.W, from, xs, n1,
                               p.xw - p.BW + width, p.xvec);
      if (q_hi - from > n1)
        stage_tile<T, NHWC, 2>(X, xplane, p.xw, p.in, n, c0, nch, p.CG, s.C, s.H, s.W, from + n1, xs, q_hi - from - n1,
                               p.xw - p.BW + width, p.xvec);
    } else {
      stage_tile<T, NHWC, 2>(X, xplane, p.xw, p.in, n, c0, nch, p.CG, s.C, s.H, s.W, q_lo, xs, nq,
                             p.xw - p.BW + width, p.xvec);
    }
    if constexpr (!NHWC) {
      copy_async_commit();
      copy_async_wait_group<0>();
    }
    __syncthreads();
    if (bias) {
      if (active) {
        constexpr int E = kVec<T>;
        const int vpr = width / E, total = nrows_g * vpr;  // 16-byte vectors: a row's, the item's
        const T* gc = G + ch * gplane;
        float sum = 0.f;
        for (int u = phase * 32 + lane; u < total; u += wpc * 32) {
          const int r = u / vpr;
          Vec16<T> v;
          v.u = *reinterpret_cast<const uint4*>(gc + r * p.gpitch + (u - r * vpr) * E);
#pragma unroll
          for (int k = 0; k < E; ++k) sum += to_float(v.h[k]);
        }
        sum = warp_sum(sum);  // kept in shared memory: no register stays live across the items
        if (lane == 0) bias_acc[warp] += sum;
      }
      if constexpr (kTF32) __syncthreads();  // summed before the rounding below
    }
    if constexpr (kTF32) {  // the staged values rounded to TF32 once, not in every fragment
      float4* gv = reinterpret_cast<float4*>(G);
      const int ng4 = p.CG * gplane / 4;
      for (int e = threadIdx.x; e < ng4; e += blockDim.x) {
        float4 f = gv[e];
        f = make_float4(round_tf32(f.x), round_tf32(f.y), round_tf32(f.z), round_tf32(f.w));
        gv[e] = f;
      }
      for (int c = 0; c < p.CG; ++c) {  // the whole ring: rounding a rounded value keeps it
        float4* xv = reinterpret_cast<float4*>(X + c * xplane);
        for (int e = threadIdx.x; e < (kRing ? p.nq : nq) * p.xw / 4; e += blockDim.x) {
          float4 f = xv[e];
          f = make_float4(round_tf32(f.x), round_tf32(f.y), round_tf32(f.z), round_tf32(f.w));
          xv[e] = f;
        }
      }
      __syncthreads();
    }
    if (!active) continue;
    int slot = kRing ? (q_lo + phase) % p.nq : 0;  // the ring's slot of input row q_lo + qi
    for (int qi = phase; qi < nq; qi += wpc) {
      const int oy_top = q_lo + qi + s.pad_t - i0 - oy0;  // band row of kernel row i0
      bool live[NB], any = false;
      unsigned baddr[NB];
#pragma unroll
      for (int bp = 0; bp < NB; ++bp) {
        const int rows = min(16, kh - 16 * bp);  // the pair's kernel rows inside the kernel
        live[bp] = rows > 0 && oy_top - 16 * bp >= 0 && oy_top - 16 * bp - (rows - 1) < nrows_g;
        const int oy = oy_top - 16 * bp - ln.b_row;
        baddr[bp] = g_addr + (unsigned)(((oy >= 0 && oy < p.BH ? oy : p.BH) * p.gpitch + ln.b_col) * (int)sizeof(T));
        any |= live[bp];
      }
      if (any)
        banded_weight_grad_row<T, JT, IT>(acc, X + ch * xplane + (kRing ? slot : qi) * p.xw, lane_off, baddr, live,
                                          width);
      if constexpr (kRing) slot = slot + wpc >= p.nq ? (slot + wpc) % p.nq : slot + wpc;
    }
  }

  // Add each channel's warps in a fixed order.
  constexpr int TJ = 16 * JT, TI = 8 * IT;
  __syncthreads();
  store_taps(red + warp * TJ * TI, acc, lane);
  __syncthreads();
  if (bias && (int)threadIdx.x < nch) {
    float sum = 0.f;
    for (int w = 0; w < wpc; ++w) sum += bias_acc[threadIdx.x * wpc + w];
    p.bias_parts[(int64_t)blockIdx.x * s.C + c0 + threadIdx.x] = sum;
  }
  for (int e = threadIdx.x; e < nch * TJ * TI; e += blockDim.x) {
    const int c = e / (TJ * TI), k = e - c * TJ * TI, j = k / TI, i = k - j * TI;
    if (i0 + i >= s.KH || j0 + j >= s.KW) continue;
    float sum = 0.f;
    for (int w = 0; w < wpc; ++w) sum += red[(c * wpc + w) * TJ * TI + k];
    p.parts[((int64_t)blockIdx.x * s.C + c0 + c) * s.KH * s.KW + (i0 + i) * s.KW + j0 + j] = sum;
  }
}

// ---- plans (host) -------------------------------------------------------------------------------
// The k-step counts whose kernels are compiled with it fixed (half types 1-3: kernels up to 41
// wide; TF32 2 and 5: up to 9 and 25-33 wide); the others run it as a parameter.
inline bool fixed_k_steps(int esize, int S) { return esize == 2 ? S >= 1 && S <= 3 : S == 2 || S == 5; }

// Blocks an SM that the forward's grid gets at least, where fewer jobs a block can give it them.
constexpr int kRowsFill = 1;

struct FwdPlan {
  int CG, MT, NG, S, sh, rows, cols, pitch, opitch, tiles_x, tiles_y, band, obytes, xbytes, steps;
  bool table;  // a B table in shared memory (the half types' one-k-step kernels load B themselves)
  size_t smem;
};

// esize: bytes per element (2: half types, 4: TF32). lim: the GPU (sms 0: unknown, one tile row
// a block).
inline FwdPlan plan_forward(const DwShape& s, int esize, const DeviceLimits& lim) {
  FwdPlan q{};
  const int E = 16 / esize, KS = 32 / esize, NT = esize == 2 ? 8 : 4, UPT = 8 / E;
  // NCHW: the staged tile starts at a 16-byte boundary of the image row (vector copies) where that
  // costs no extra k-step.
  const int sh = s.nhwc ? 0 : ((-s.pad_l) % E + E) % E;
  q.sh = ceil_div(s.KW + 7 + sh, KS) == ceil_div(s.KW + 7, KS) ? sh : 0;
  q.S = ceil_div(s.KW + 7 + q.sh, KS);
  const int bands = ceil_div(s.OH, 16), groups = ceil_div(s.OW, 8 * NT);
  // 16-byte units a staged row holds for ng column groups: the jobs' columns and one halo
  const auto units_of = [&](int ng) { return (ng - 1) * NT * UPT + 2 * ceil_div((NT - 1) * UPT + 2 * q.S, 2); };
  if (s.nhwc) {
    // A 16-byte pixel vector of channels, or 8 bytes where the staged tile and B table of 16
    // would leave the SM one block (kernels from about 23 x 23); the remaining warps take more
    // rows or columns.
    const size_t per_channel = (size_t)(16 + s.KH - 1) * (ceil_div(NT * 8 + 2 * KS * q.S, 16) * 16 + 8) * esize +
                               (size_t)s.KH * (kBandPad + KS * q.S) * 4;
    q.CG = per_channel * E > 110 * 1024 ? E / 2 : E;
    const int jobs = kWarps / q.CG;
    q.MT = std::min(jobs, bands);
    q.NG = std::max(1, std::min(jobs / q.MT, groups));
  } else {  // up to kWarps jobs: rows and columns first, then channels
    q.MT = std::min(4, bands);
    // The column groups that stage the fewest columns over the map's width (a last tile's columns
    // past the map are staged too: 128-column tiles on a map 130 wide stage 2 x 160).
    int fewest = 0;
    for (int ng = std::max(1, std::min(kWarps / q.MT, groups)); ng >= 1; --ng) {
      const int total = ceil_div(s.OW, 8 * NT * ng) * units_of(ng);
      if (fewest == 0 || total < fewest) { fewest = total; q.NG = ng; }
    }
    q.CG = 1;
    while (2 * q.CG * q.MT * q.NG <= kWarps && q.CG < s.C) q.CG *= 2;
  }
  // Few images and channels: fewer jobs a block (NCHW channels, then 16-row bands), so that the
  // grid spreads over the SMs; a block's warps without a job stage only. NCHW bands split only
  // while the grid stays within a block an SM: past it, a second block on an SM costs more than
  // the few idle SMs (each split stages the kernel's halo rows once more). channels_last blocks,
  // whose staging costs more a job, keep their pixel vectors (8-byte ones instead of 16 cost more
  // than the wider grid gained) and split only where the grid leaves half the SMs idle. (Half
  // types, where this was measured.)
  const int64_t N = s.planes / s.C;
  const int fill = knobs().rows_fill >= 0 ? knobs().rows_fill : kRowsFill;
  const int64_t want = esize == 2 ? (int64_t)fill * std::max(0, lim.sms) / (s.nhwc ? 2 : 1) : 0;
  q.tiles_x = ceil_div(s.OW, 8 * NT * q.NG);
  const auto blocks = [&] { return (int64_t)ceil_div(s.C, q.CG) * q.tiles_x * ceil_div(s.OH, 16 * q.MT) * N; };
  while (!s.nhwc && blocks() < want && q.CG > 1) q.CG /= 2;
  while (blocks() < want && q.MT > 1) {
    const int mt = q.MT;
    q.MT = ceil_div(mt, 2);
    if (!s.nhwc && blocks() > want) {
      q.MT = mt;
      break;
    }
  }
  const int TH = 16 * q.MT, TW = 8 * NT * q.NG;
  const int units = units_of(q.NG);
  q.rows = TH + s.KH - 1;
  q.cols = units * E;
  q.pitch = q.cols + (units % 2 == 0 ? E : 0);  // an odd number of units: ldmatrix rows hit every bank
  q.opitch = TW + 8;                            // C fragment stores without bank conflicts
  q.band = kBandPad + KS * q.S;
  q.table = !(esize == 2 && q.S == 1);
  const size_t table = q.table ? (size_t)q.CG * s.KH * q.band * 4 : 0;
  const size_t xin = round_up(q.CG * q.rows * q.pitch * esize, 16), xout = round_up(q.CG * TH * q.opitch * esize, 16);
  // Tile rows a block takes one after the other (its staged rows a ring, so each takes its TH
  // new rows only): the count that finishes soonest, as waves of blocks times a block's staged
  // rows, with a block an SM at least. One tile row: the output tile over the staged input.
  // LKPATCH_ROWS_STEPS sets the count (tests reach the ring's wrap with it).
  const int row_tiles = ceil_div(s.OH, TH);
  const auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t others = (int64_t)ceil_div(s.C, q.CG) * q.tiles_x * N;
  q.steps = 1;
  const size_t ring = xin + xout + table;
  // (kernels with fixed k-steps only: the others would spill registers in the loop)
  const bool can_ring = fixed_k_steps(esize, q.S) && row_tiles > 1 && ring <= (size_t)lim.max_smem_optin;
  if (lim.sms > 0 && can_ring) {
    const auto waves = [&](int st, size_t smem) {
      const int per_sm = std::clamp((int)((lim.max_smem_optin + 1024) / (smem + 1024)), 1,
                                    forward_blocks_per_sm(true, st > 1));  // can_ring: k-steps fixed
      return cdiv(others * ceil_div(row_tiles, st), (int64_t)lim.sms * per_sm);
    };
    // A ring is taken where it saves a tenth at least: this counts staging alone, and the
    // multiplies, the same either way, dilute its gain.
    const int64_t one = waves(1, std::max(xin, xout) + table) * (TH + s.KH - 1);
    int64_t best = one * 9 / 10;
    for (int st = 2; st <= std::min(row_tiles, 16); ++st) {
      const int64_t blocks = others * ceil_div(row_tiles, st);
      if (blocks < (int64_t)lim.sms) break;  // fewer blocks than SMs
      const int64_t cost = waves(st, ring) * (st * TH + s.KH - 1);
      if (cost <= best) { best = cost; q.steps = st; }
    }
  }
  if (knobs().rows_steps > 0 && can_ring) q.steps = std::min(knobs().rows_steps, row_tiles);
  q.tiles_y = ceil_div(row_tiles, q.steps);
  q.obytes = q.steps > 1 ? (int)xin : 0;
  q.xbytes = q.steps > 1 ? (int)(xin + xout) : (int)std::max(xin, xout);
  q.smem = (size_t)q.xbytes + table;
  return q;
}

struct WgradPlan {
  int CG, JT, IT, BH, BW, bands, ctiles, items, slices, per_slice, gpitch, xw, nq, tiles_i, tiles_j;
  size_t smem;
};

inline WgradPlan plan_weight_grad(const DwShape& s, int esize, int sms) {
  WgradPlan q{};
  const int E = 16 / esize, KS = 32 / esize;
  q.JT = weight_grad_col_tiles(s.KW);
  q.IT = weight_grad_row_tiles(s.KH);
  q.tiles_j = ceil_div(s.KW, 16 * q.JT);
  q.tiles_i = ceil_div(s.KH, 8 * q.IT);
  q.CG = s.nhwc ? E : 1;
  const int kh = std::min(s.KH, 8 * q.IT);  // kernel rows of a tile
  auto shape_items = [&](int BW, int BH) {
    q.BW = std::min(round_up(s.OW, KS), BW);
    q.BH = std::min(s.OH, BH);
    q.gpitch = q.BW + ((q.BW / E) % 2 == 0 ? E : 0);
    q.xw = q.BW + 16 * q.JT + 16;  // the Toeplitz pairs reach 16 JT + 8 past the item, plus the aligning shift
    q.nq = q.BH + kh - 1;
    return (size_t)q.CG * ((q.BH + 1) * q.gpitch + q.nq * q.xw) * esize;
  };
  const int N = (int)(s.planes / s.C);
  // Blocks times items: the blocks that slices of items can spread over.
  const auto parallel = [&]() {
    return (int64_t)ceil_div(s.C, q.CG) * q.tiles_i * q.tiles_j * N * ceil_div(s.OH, q.BH) * ceil_div(s.OW, q.BW);
  };
  // Items small enough for two blocks an SM: channels_last blocks stage CG channels, 64 output
  // columns where that fits (longer rows share each row's set-up), else 32. Where few images and
  // channels would leave SMs idle (fewer than one an SM), 8-byte channel groups (twice the
  // blocks), then 32 columns.
  size_t stage = s.nhwc ? shape_items(64, 32) : shape_items(128, 64);
  if (s.nhwc && stage > 110 * 1024) stage = shape_items(32, 32);
  if (s.nhwc && parallel() < sms) {
    q.CG = E / 2;
    stage = shape_items(q.BW, 32);
    if (parallel() < sms) stage = shape_items(32, 32);
  }
  q.bands = ceil_div(s.OH, q.BH);
  q.ctiles = ceil_div(s.OW, q.BW);
  q.items = N * q.bands * q.ctiles;
  const int64_t blocks = (int64_t)ceil_div(s.C, q.CG) * q.tiles_i * q.tiles_j;
  q.slices = (int)std::max<int64_t>(1, std::min<int64_t>(q.items, ceil_div(4 * sms, (int)std::min<int64_t>(blocks, 1 << 20))));
  q.per_slice = ceil_div(q.items, q.slices);
  if (knobs().rows_steps > 0 && s.nhwc) q.per_slice = std::min(q.items, knobs().rows_steps);
  q.slices = ceil_div(q.items, q.per_slice);
  q.smem = kWgradHead + std::max(stage, (size_t)kWarps * 16 * q.JT * 8 * q.IT * sizeof(float));
  return q;
}

}  // namespace rows
}  // namespace lkpatch
