// Weight-gradient of the depthwise convolution on tensor cores (sm_80+): fp16 / bf16, and fp32
// as TF32 (maps up to 16 x 16 or from 20 x 20 in area) where PyTorch allows it.
//
//   grad_w[i][j] = sum_{n, q, ox} x[n][q][ox - pad_l + j] * g[n][q + pad_t - i][ox]
//
// For one input row q of one image this is a matrix product over the output columns ox:
// C[j][i] += sum_k A[j][k] B[k][i] with A[j][k] = x[q][ox0 + k - pad_l + j] (a Toeplitz matrix:
// it depends on j + k only) and B[k][i] = g[q + pad_t - i][ox0 + k] (kernel row i reads output
// row q + pad_t - i). A warp holds a 16*JT x 8*IT tile of taps in mma.sync accumulators and walks
// input rows in chunks of K = kStep<T> output columns; B comes from the image's staged
// output-gradient plane through ldmatrix (rows outside the plane point at a zero row), and A
// straight from the staged input row: because A is Toeplitz, each lane needs only the pairs
// x[o], x[o + 1] at o = lane offset + 8m (half types), or the values x[o] at o = lane offset + 4m
// (TF32), and consecutive chunks share all but two of them. Block partial sums go to a workspace that
// is added up in a fixed order: deterministic.
//
// Maps up to 32 x 32 take a second kernel (dw_tc_small_weight_grad): there the output columns are
// too few for a K dimension, so the images are: for kernel row i,
//   D_i[ox][ix] = sum_{n, oy} g[n][oy][ox] * x[n][oy + i - pad_t][ix]
// is one 16 x 16 (or 32 x 32) product per output row with K = 16 images per mma, and
// grad_w[i][j] is the sum of D_i's diagonal ix - ox = j - pad_l. Both planes are staged as they lie in memory (image,
// row, 16 columns); ldmatrix.trans turns them into A (ox x images) and B (images x ix) fragments.
// In TF32 (maps up to 16) the staging puts the images innermost instead, so that plain ldmatrix
// gives those fragments.
// channels_last tensors on maps up to 16 x 16 take a third (dw_tc_small_weight_grad_nhwc), which
// stages blocks of channels transposed into the same planes.
#include <algorithm>

#include "dwconv_core.cuh"
#include "dwconv_mma.cuh"

namespace lkpatch {
namespace {

constexpr int kWarps = 4;

template <typename T>
struct TcWgradParams {
  const T* grad;
  const T* in;
  float* parts;       // [slices][C][KH][KW]
  float* bias_parts;  // TF32: [slices][C], the bias gradient's part of each block of the first
                      // kernel tile (the sum of the planes it stages), or null
  DwShape s;
  int N;
  int per_slice;  // images per block
  int OWp;        // output columns rounded up to 16
  int gpitch;     // staged output-gradient row pitch (elements), an odd number of 16-byte units
  int xw;         // staged input row length (elements), even
  int tiles_j;    // kernel-column tiles of 16 * JT
  int IB;         // images staged at once
  int gvec, xvec; // output-gradient / input rows: 16-byte staging copies (16) or shifted loads (0)
};

// Rows of `rows_per_image` rows for each of `images` images, into dst[row][pitch] (rows of all
// images one after another): dst[row][e] = src[image][r][x0 + e] for e < n, zero where x0 + e is
// outside [0, len). The block's threads take the (row, copy) pairs in turn, stepping without a
// division per copy. vec 16: asynchronous 16-byte copies (x0, len and the row starts aligned to
// them); 0: 16-byte loads shifted into place (n and pitch multiples of 16 bytes).
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, int pitch, const T* src, int64_t image_stride, int row_stride,
                                           int rows_per_image, int images, int x0, int len, int n, int vec) {
  if (rows_per_image <= 0 || images <= 0) return;  // nothing to stage (no division by zero below)
  const int per = 16 / (int)sizeof(T), cpr = n / per;  // elements a copy, copies a row
  const int rows = rows_per_image * images, step = blockDim.x;
  const int drow = step / cpr, dk = step - drow * cpr;
  int row = threadIdx.x / cpr, k = threadIdx.x - row * cpr;
  int img = row / rows_per_image, r = row - img * rows_per_image;
  while (row < rows) {
    const int e = k * per, x = x0 + e;
    const bool valid = x >= 0 && x < len;
    const T* from = src + img * image_stride + (int64_t)r * row_stride;
    T* to = dst + row * pitch + e;
    if (vec) copy_async<16>(to, valid ? from + x : src, valid);
    else *reinterpret_cast<uint4*>(to) = load_shifted16<T>(from, x, len, true);
    k += dk;
    int adv = drow;
    if (k >= cpr) { k -= cpr; ++adv; }
    row += adv;
    for (r += adv; r >= rows_per_image; r -= rows_per_image) ++img;
  }
}

template <typename T, int JT, int IT>
__global__ void __launch_bounds__(32 * kWarps) dw_tc_weight_grad(const TcWgradParams<T> p) {
  constexpr bool kTF32 = std::is_same_v<T, float>;
  constexpr int NB = (IT + 1) / 2;  // kernel-row tile pairs (B loads)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slice = blockIdx.x, c = blockIdx.y;
  const int tile_i = blockIdx.z / p.tiles_j, tile_j = blockIdx.z - tile_i * p.tiles_j;
  const int i0 = tile_i * 8 * IT, j0 = tile_j * 16 * JT;
  const int n_begin = slice * p.per_slice, n_end = min(p.N, n_begin + p.per_slice);

  T* G = reinterpret_cast<T*>(smem_raw);  // [IB][OH][gpitch], then one zero row
  T* X = G + (p.IB * s.OH + 1) * p.gpitch;  // [IB][input rows q_lo ..][xw]
  const int zero_row = p.IB * s.OH;
  float* red = reinterpret_cast<float*>(smem_raw);  // [warp][16 JT][8 IT], over G and X at the end
  const T zero = from_float<T>(0.f);
  for (int e = threadIdx.x; e < p.gpitch; e += blockDim.x) G[zero_row * p.gpitch + e] = zero;

  float acc[JT][IT][4];
  zero_taps(acc);

  // Input rows that reach this tile's kernel rows (those of the kernel): output row q + pad_t - i in [0, OH).
  const int kh = min(8 * IT, s.KH - i0);
  const int q_lo = max(0, i0 - s.pad_t), q_hi = min(s.H, i0 + kh - 1 - s.pad_t + s.OH);
  const BandedWgradLane<T> ln(lane);
  const unsigned g_addr = (unsigned)__cvta_generic_to_shared(G);

  const int nq = max(0, q_hi - q_lo);
  // Input rows are staged from column xs = j0 - pad_l - d, aligned for the copies; A value m of
  // chunk 0 then starts at d + lane offset + (8 or 4) m.
  const int align = p.xvec ? p.xvec / (int)sizeof(T) : 1;
  const int d = ((j0 - s.pad_l) % align + align) % align, xs = j0 - s.pad_l - d;
  const int lane_off = ln.lane_off0 + d;
  // TF32, where asked: the bias gradient's part, from the first kernel tile's blocks (every tile
  // stages the same planes). Each thread sums the elements it reads, in a fixed order.
  const bool sums_bias = kTF32 && p.bias_parts != nullptr && blockIdx.z == 0;
  float bias_sum = 0.f;
  for (int nb = n_begin; nb < n_end; nb += p.IB) {
    const int nimg = min(p.IB, n_end - nb);
    __syncthreads();  // the previous images are done with G
    // Stage the output-gradient planes of images nb .. nb + nimg - 1 and the input rows that
    // reach this tile's kernel rows, x[q][xs + e] for e < xw.
    const int64_t gstride = (int64_t)s.C * s.OH * s.OW, xstride = (int64_t)s.C * s.H * s.W;
    stage_rows<T>(G, p.gpitch, p.grad + ((int64_t)nb * s.C + c) * s.OH * s.OW, gstride, s.OW, s.OH, nimg, 0, s.OW,
                  p.OWp, p.gvec);
    stage_rows<T>(X, p.xw, p.in + (((int64_t)nb * s.C + c) * s.H + q_lo) * s.W, xstride, s.W, nq, nimg, xs, s.W, p.xw,
                  p.xvec);
    copy_async_commit();
    copy_async_wait_group<0>();
    __syncthreads();
    if constexpr (kTF32) {
      if (sums_bias) {  // the exact values, before they are rounded (the pitch's last columns are never staged)
        const int per_row = p.OWp / 4, n4 = nimg * s.OH * per_row;
        for (int e = threadIdx.x; e < n4; e += blockDim.x) {
          const int row = e / per_row;
          const float4 f = reinterpret_cast<const float4*>(G + row * p.gpitch)[e - row * per_row];
          bias_sum += (f.x + f.y) + (f.z + f.w);
        }
        __syncthreads();
      }
      // The staged values rounded to TF32 once, not in every fragment.
      const int ng = nimg * s.OH * p.gpitch / 4, nx = nimg * nq * p.xw / 4;  // float4s
      float4* v = reinterpret_cast<float4*>(G);
      for (int e = threadIdx.x; e < ng + nx; e += blockDim.x) {
        float4* at = e < ng ? v + e : reinterpret_cast<float4*>(X) + (e - ng);
        float4 f = *at;
        f.x = __uint_as_float(to_tf32(f.x)); f.y = __uint_as_float(to_tf32(f.y));
        f.z = __uint_as_float(to_tf32(f.z)); f.w = __uint_as_float(to_tf32(f.w));
        *at = f;
      }
      __syncthreads();
    }
    // A warp takes input rows q and, for each, every staged image: which kernel-row tiles the row
    // reaches, and where each lane's B row lies, is worked out once per row.
    for (int qi = warp; qi < nq; qi += kWarps) {
      const int oy_top = q_lo + qi + s.pad_t - i0;  // output row of kernel row i0
      bool live[NB], any = false;  // kernel-row tile pairs with an output row inside the plane
      int brow[NB];                // this lane's B row in an image's plane, or -1: the zero row
#pragma unroll
      for (int bp = 0; bp < NB; ++bp) {
        const int rows = min(16, kh - 16 * bp);  // the pair's kernel rows inside the kernel
        live[bp] = rows > 0 && oy_top - 16 * bp >= 0 && oy_top - 16 * bp - (rows - 1) < s.OH;
        const int oy = oy_top - 16 * bp - ln.b_row;
        brow[bp] = oy >= 0 && oy < s.OH ? oy : -1;
        any |= live[bp];
      }
      if (!any) continue;
      for (int img = 0; img < nimg; ++img) {
        unsigned baddr[NB];
#pragma unroll
        for (int bp = 0; bp < NB; ++bp)
          baddr[bp] = g_addr + (unsigned)(((brow[bp] >= 0 ? img * s.OH + brow[bp] : zero_row) * p.gpitch + ln.b_col) *
                                          sizeof(T));
        banded_weight_grad_row<T, JT, IT>(acc, X + (img * nq + qi) * p.xw, lane_off, baddr, live, p.OWp);
      }
    }
  }

  // Add the warps' tiles in a fixed order.
  constexpr int TJ = 16 * JT, TI = 8 * IT;
  __syncthreads();  // every warp is done with G and X
  store_taps(red + warp * TJ * TI, acc, lane);
  if (sums_bias) {  // warp sums after the tiles' scratch, added in warp order below
    bias_sum = warp_sum(bias_sum);
    if (lane == 0) red[kWarps * TJ * TI + warp] = bias_sum;
  }
  __syncthreads();
  if (sums_bias && threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red[kWarps * TJ * TI + w];
    p.bias_parts[(int64_t)slice * s.C + c] = total;
  }
  float* out = p.parts + ((int64_t)slice * s.C + c) * s.KH * s.KW;
  for (int e = threadIdx.x; e < TJ * TI; e += blockDim.x) {
    const int j = e / TI, i = e - j * TI;
    if (i0 + i >= s.KH || j0 + j >= s.KW) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w * TJ * TI + e];
    out[(i0 + i) * s.KW + j0 + j] = sum;
  }
}

// ---- small maps --------------------------------------------------------------------------------
constexpr int kSmallWarps = 8;
constexpr int kSmallImages = 64;          // most images a block stages (and sums)
constexpr size_t kSmallSmem = 100 * 1024;  // shared memory a block may take

template <typename T>
struct TcSmallWgradParams {
  const T* grad;
  const T* in;
  float* parts;       // [slices][C][KH][KW]
  T* grad_w;          // with one slice the block's sums are final: written here instead of parts
  // The bias gradient too (the sum of the staged output-gradient planes), where either is set:
  // grad_b with one slice (final sums; channels_last: always), else bias_parts ([slices][C]).
  T* grad_b;
  float* bias_parts;
  DwShape s;
  int N, per_slice;     // images, images per block (a multiple of 16, at most kSmallImages)
  int gplane, xplane;   // staged plane pitches (elements) per image: half types rows * 16 TW + 8, an odd
                        // number of 16-byte units; TF32 rows * kImagePitch (16 images share 16 planes)
  bool gpairs, xpairs;  // NCHW: rows copy as 4-byte pairs (even width, aligned base); NHWC: a pixel's
                        // channels load as one vector (C a multiple of the group, aligned base)
};

// TF32 stages images innermost, so that ldmatrix reads the mma fragments of 32-bit values
// without a transpose (its .trans moves 16-bit halves): a pixel's 16 images, then 4 unused
// (80 bytes: an odd number of 16-byte units, so a fragment's 8 rows hit distinct banks).
constexpr int kImagePitch = 20;
static_assert(kSmallWarps * 32 == 256, "stage_planes_images_inner: one thread per element of a staged row");

// Planes of images n_begin .. n_begin + 16 * groups - 1 of channel c (rows x cols each, NCHW) into
// dst[group][row][16][kImagePitch]; zeros past the nimg real images and past each row's end. A
// staged row (16 columns of 16 images) is 256 elements, one for each of the block's 256 threads:
// thread t copies column (t & 7) + 8 ((t >> 5) & 1) of image 4 ((t >> 6) & 3) + ((t >> 3) & 3) of
// every row, asynchronously, 4 bytes a copy (the caller commits and waits, then rounds with
// round_planes_images_inner). A warp's 32 elements are 8 columns of 4 images: 32-byte global
// segments, and 32 distinct banks. (Loads through registers, 4 in flight a thread, measured
// slower than these asynchronous copies.)
struct ImagesInner {
  int x, mm;  // this thread's column and image in a staged row
  __device__ ImagesInner() : x((threadIdx.x & 7) + 8 * ((threadIdx.x >> 5) & 1)),
                             mm(4 * ((threadIdx.x >> 6) & 3) + ((threadIdx.x >> 3) & 3)) {}
  __device__ int offset(int row) const { return (row * 16 + x) * kImagePitch + mm; }
};

__device__ __forceinline__ void stage_planes_images_inner(float* dst, const float* src, int C, int c, int n_begin,
                                                          int nimg, int groups, int rows, int cols) {
  const ImagesInner me;
  int y = 0, grp = 0;  // image row and group of staged row r
  for (int r = 0; r < groups * rows; ++r) {
    const int m = 16 * grp + me.mm;
    const bool valid = m < nimg && me.x < cols;
    const float* from = valid ? src + ((int64_t)(n_begin + m) * C + c) * rows * cols + y * cols + me.x : src;
    copy_async<4>(dst + me.offset(r), from, valid);
    if (++y == rows) {
      y = 0;
      ++grp;
    }
  }
}

// The sum of the elements this thread staged (its copies landed), as they are.
__device__ __forceinline__ float sum_planes_images_inner(const float* dst, int staged_rows) {
  const ImagesInner me;
  float sum = 0.f;
  for (int r = 0; r < staged_rows; ++r) sum += dst[me.offset(r)];
  return sum;
}

// Rounds to TF32, in place, the elements this thread staged (its copies landed).
__device__ __forceinline__ void round_planes_images_inner(float* dst, int staged_rows) {
  const ImagesInner me;
  for (int r = 0; r < staged_rows; ++r) dst[me.offset(r)] = round_tf32(dst[me.offset(r)]);
}

// Half types: ldmatrix.x4.trans lane addresses of the staged planes G and X (their first image).
// Lane l addresses image (l & 7) + 8 * (matrix bit) at column 8 * (other bit): A = (ox 0-7 |
// 8-15) x (images 0-7 | 8-15) in a0..a3 order; B = images x (ix 0-7, then 8-15).
struct PlaneLanes {
  unsigned g, x;
};
template <typename T>
__device__ __forceinline__ PlaneLanes half_plane_lanes(const T* G, const T* X, int gplane, int xplane) {
  const int lane = threadIdx.x & 31, mtx = lane >> 3, row = lane & 7;
  return {(unsigned)__cvta_generic_to_shared(G) + (unsigned)(((row + 8 * (mtx >> 1)) * gplane + 8 * (mtx & 1)) * sizeof(T)),
          (unsigned)__cvta_generic_to_shared(X) + (unsigned)(((row + 8 * (mtx & 1)) * xplane + 8 * (mtx >> 1)) * sizeof(T))};
}

// acc += one (output row, k-step) pair's product: A (ox x images) by B (images x ix) fragments,
// over the 16-column tiles of ox (m_tiles) and 8-column tiles of ix (n_tiles) that hold map columns.
template <typename T, int TW>
__device__ __forceinline__ void small_weight_grad_mma(float (&acc)[TW][2 * TW][4], const uint32_t (&a)[TW][4],
                                                      const uint32_t (&b)[TW][4], int m_tiles, int n_tiles) {
#pragma unroll
  for (int mt = 0; mt < TW; ++mt) {
    if (mt >= m_tiles) continue;
#pragma unroll
    for (int n = 0; n < 2 * TW; ++n)
      if (n < n_tiles)
        mma_tile<T>(acc[mt][n], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b[n / 2][2 * (n & 1)], b[n / 2][2 * (n & 1) + 1]);
  }
}

// acc += kernel row i's D_i over one channel's staged planes G [image][oy][COLS] (pitch gplane)
// and X [image][iy][COLS] (pitch xplane) of 16 * ksteps images. acc is the mma C fragment of D_i:
// D[ox = 16 mt + g (+8)][ix = 8 n + 2 t (+1)].
template <typename T, int TW>
__device__ __forceinline__ void small_weight_grad_accumulate(float (&acc)[TW][2 * TW][4], const T* G, const T* X,
                                                             int gplane, int xplane, int ksteps, const DwShape& s,
                                                             int i) {
  constexpr int COLS = 16 * TW;
  const int lane = threadIdx.x & 31;
  if constexpr (std::is_same_v<T, float>) {  // TF32, maps up to 16: planes [group][row][16][kImagePitch]
    static_assert(TW == 1, "TF32: maps up to 16 x 16");
    constexpr int P = kImagePitch;
    // ldmatrix lane l addresses row (l & 7) + 8 * (one matrix bit) of a fragment, 4 images (16
    // bytes) on if the other bit: A = (ox 0-7 | 8-15) x (images 0-3 | 4-7) in a0..a3 order; B =
    // images 0-3, 4-7 x ix 0-7, then ix 8-15.
    const int mtx = lane >> 3, row = lane & 7;
    const unsigned g_lane = (unsigned)__cvta_generic_to_shared(G) + (unsigned)(((row + 8 * (mtx & 1)) * P + 4 * (mtx >> 1)) * 4);
    const unsigned x_lane = (unsigned)__cvta_generic_to_shared(X) + (unsigned)(((row + 8 * (mtx >> 1)) * P + 4 * (mtx & 1)) * 4);
    const bool two_tiles = s.W > 8;
    const int oy_lo = max(0, s.pad_t - i), oy_hi = min(s.OH, s.H + s.pad_t - i);
    float acc1[2][4] = {};  // images 8-15 of each group: shorter chains of dependent mma
    // (A software-pipelined loop, the next pair's fragments loading during this pair's mma,
    // measured no faster: it costs registers.)
    for (int y = oy_lo; y < oy_hi; ++y)
      for (int k = 0; k < ksteps; ++k) {
        uint32_t a[2][4], b[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // images 8 h .. 8 h + 7 of the group
          ldmatrix_x4(a[h], g_lane + (unsigned)((16 * k * gplane + y * 16 * P + 8 * h) * 4));
          ldmatrix_x4(b[h], x_lane + (unsigned)((16 * k * xplane + (y + i - s.pad_t) * 16 * P + 8 * h) * 4));
        }
        mma_tile<T>(acc[0][0], a[0][0], a[0][1], a[0][2], a[0][3], b[0][0], b[0][1]);
        mma_tile<T>(acc1[0], a[1][0], a[1][1], a[1][2], a[1][3], b[1][0], b[1][1]);
        if (two_tiles) {
          mma_tile<T>(acc[0][1], a[0][0], a[0][1], a[0][2], a[0][3], b[0][2], b[0][3]);
          mma_tile<T>(acc1[1], a[1][0], a[1][1], a[1][2], a[1][3], b[1][2], b[1][3]);
        }
      }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[0][n][q] += acc1[n][q];
    return;
  }
  const PlaneLanes lanes = half_plane_lanes(G, X, gplane, xplane);
  const unsigned g_lane = lanes.g, x_lane = lanes.x;
  const int m_tiles = ceil_div(s.OW, 16), n_tiles = ceil_div(s.W, 8);
  const int oy_lo = max(0, s.pad_t - i), oy_hi = min(s.OH, s.H + s.pad_t - i);
  // The (oy, k-step) pairs in one loop, software-pipelined on maps over 16: the next pair's
  // fragments load during this pair's mma (past the last pair the loads repeat it: nothing
  // beyond the planes is read).
  auto load = [&](int oy, int k, uint32_t(&a)[TW][4], uint32_t(&b)[TW][4]) {
    const unsigned ga = g_lane + (unsigned)((oy * COLS + 16 * k * gplane) * sizeof(T));
    const unsigned xa = x_lane + (unsigned)(((oy + i - s.pad_t) * COLS + 16 * k * xplane) * sizeof(T));
#pragma unroll
    for (int mt = 0; mt < TW; ++mt)
      if (mt < m_tiles) ldmatrix_x4<true>(a[mt], ga + (unsigned)(16 * mt * sizeof(T)));
#pragma unroll
    for (int nt = 0; nt < TW; ++nt)
      if (2 * nt < n_tiles) ldmatrix_x4<true>(b[nt], xa + (unsigned)(16 * nt * sizeof(T)));
  };
  const int pairs = max(0, oy_hi - oy_lo) * ksteps;
  // Two register sets in turn (no copies between them); pair u is (oy_lo + u / ksteps, u % ksteps).
  uint32_t A0[TW][4], B0[TW][4], A1[TW][4], B1[TW][4];
  int oy = oy_lo, k = 0;  // the pair the next load fetches
  auto fetch = [&](uint32_t(&a)[TW][4], uint32_t(&b)[TW][4], bool more) {
    load(oy, k, a, b);
    if (more && ++k == ksteps) {
      k = 0;
      ++oy;
    }
  };
  auto apply = [&](const uint32_t(&a)[TW][4], const uint32_t(&b)[TW][4]) {
    small_weight_grad_mma<T, TW>(acc, a, b, m_tiles, n_tiles);
  };
  if constexpr (TW == 1) {  // maps up to 16: the plain loop measured faster
    for (int y = oy_lo; y < oy_hi; ++y)
      for (int kk = 0; kk < ksteps; ++kk) {
        load(y, kk, A0, B0);
        apply(A0, B0);
      }
  } else {
    if (pairs > 0) fetch(A0, B0, pairs > 1);
    for (int u = 0; u < pairs; u += 2) {
      fetch(A1, B1, u + 2 < pairs);  // pair u + 1 (or u again, past the end)
      apply(A0, B0);
      if (u + 1 == pairs) break;
      fetch(A0, B0, u + 3 < pairs);  // pair u + 2
      apply(A1, B1);
    }
  }
}

// Half types: kernel rows i and i + 1 together. Input row r feeds output row oy = r - i + pad_t
// through D_i and output row oy - 1 through D_{i+1}, so walking oy, each output-gradient fragment
// (A) serves both rows and each input fragment (B) serves row i + 1 now and row i at the next oy:
// half the shared-memory loads per mma of one row at a time (the kernel is bound by them).
// acc1 may belong to a kernel row past the map's (the caller drops it).
template <typename T, int TW>
__device__ __forceinline__ void small_weight_grad_accumulate_pair(float (&acc0)[TW][2 * TW][4],
                                                                  float (&acc1)[TW][2 * TW][4], const T* G,
                                                                  const T* X, int gplane, int xplane, int ksteps,
                                                                  const DwShape& s, int i) {
  constexpr int COLS = 16 * TW;
  const PlaneLanes lanes = half_plane_lanes(G, X, gplane, xplane);
  const unsigned g_lane = lanes.g, x_lane = lanes.x;
  const int m_tiles = ceil_div(s.OW, 16), n_tiles = ceil_div(s.W, 8);
  // Output rows where row i + 1 reads the map (its input row r + 1 >= 0) through those where row i does (r < H).
  const int oy_lo = max(0, s.pad_t - i - 1), oy_hi = min(s.OH, s.H + s.pad_t - i);
  auto load_b = [&](uint32_t(&b)[TW][4], int r, int k) {
#pragma unroll
    for (int nt = 0; nt < TW; ++nt) {
      if (r >= 0 && r < s.H && 2 * nt < n_tiles) {
        ldmatrix_x4<true>(b[nt], x_lane + (unsigned)((r * COLS + 16 * k * xplane + 16 * nt) * sizeof(T)));
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) b[nt][q] = 0u;
      }
    }
  };
  for (int k = 0; k < ksteps; ++k) {
    uint32_t B0[TW][4], B1[TW][4];
    load_b(B0, oy_lo + i - s.pad_t, k);  // row i's input row at the first output row
    for (int oy = oy_lo; oy < oy_hi; ++oy) {
      uint32_t A[TW][4];
      const unsigned ga = g_lane + (unsigned)((oy * COLS + 16 * k * gplane) * sizeof(T));
#pragma unroll
      for (int mt = 0; mt < TW; ++mt)
        if (mt < m_tiles) ldmatrix_x4<true>(A[mt], ga + (unsigned)(16 * mt * sizeof(T)));
      load_b(B1, oy + i + 1 - s.pad_t, k);
      small_weight_grad_mma<T, TW>(acc0, A, B0, m_tiles, n_tiles);
      small_weight_grad_mma<T, TW>(acc1, A, B1, m_tiles, n_tiles);
#pragma unroll
      for (int nt = 0; nt < TW; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) B0[nt][q] = B1[nt][q];
    }
  }
}

// A warp's D_i scratch: COLS rows of scratch_pitch(COLS, pad) floats. Padded, the 8 floats past
// COLS put the 8 rows g of a C fragment 8 banks apart, so the fragment's 8-byte stores fill
// distinct banks. (Rows COLS floats apart hit the same banks, 8-way at COLS 32.)
// Unpadded only where the padded block would not fit the GPU (32-column maps on 99 KB GPUs).
__host__ __device__ constexpr int scratch_pitch(int cols, bool pad = true) { return pad ? cols + 8 : cols; }
__host__ __device__ constexpr int scratch_floats(int cols, bool pad = true) { return cols * scratch_pitch(cols, pad); }

// Kernel row i's taps from its D_i (acc, as small_weight_grad_accumulate leaves it), through the
// warp's scratch D: put(i * KW + j, tap) for every j < KW.
template <typename T, int TW, bool PAD, typename Put>
__device__ __forceinline__ void small_weight_grad_taps(const float (&acc)[TW][2 * TW][4], float* D, const DwShape& s,
                                                       int i, Put&& put) {
  constexpr int COLS = 16 * TW, P = scratch_pitch(COLS, PAD), DIAGS = 2 * COLS - 1, REPS = (DIAGS + 31) / 32;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // C fragment: D[ox = 16 mt + g (+8)][ix = 8 n + 2 t (+1)]; lane l sums diagonal ix - ox = l - COLS + 1
  // (and l + 31 - COLS + 1 when COLS is 32).
#pragma unroll
  for (int mt = 0; mt < TW; ++mt)
#pragma unroll
    for (int n = 0; n < 2 * TW; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<float2*>(D + (16 * mt + g + 8 * h) * P + 8 * n + 2 * t) =
            make_float2(acc[mt][n][2 * h], acc[mt][n][2 * h + 1]);
  __syncwarp();
  float diag[REPS];
#pragma unroll
  for (int r = 0; r < REPS; ++r) {
    const int d = lane + 32 * r - (COLS - 1);
    diag[r] = 0.f;
#pragma unroll 4
    for (int ox = max(0, -d); ox < min(COLS, COLS - d); ++ox) diag[r] += D[ox * (P + 1) + d];
  }
  __syncwarp();  // D is reused by the next kernel row
  for (int j0 = 0; j0 < s.KW; j0 += 32) {
    const int j = j0 + lane, idx = j - s.pad_l + COLS - 1;  // diagonal index in [0, DIAGS) if reachable
    const int src = min(max(idx, 0), DIAGS - 1);
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < REPS; ++r) {
      const float w = __shfl_sync(0xffffffffu, diag[r], src & 31);
      if (src >> 5 == r) v = w;
    }
    if (j < s.KW) put(i * s.KW + j, idx >= 0 && idx < DIAGS ? v : 0.f);
  }
}

// The sum of v over the block's threads (all of them call it), in a fixed order: deterministic.
// scratch: kSmallWarps floats of shared memory, free until the call returns.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kSmallWarps; ++w) total += scratch[w];
  __syncthreads();  // every thread has read the scratch
  return total;
}

// TW: 16-column tiles per row (maps up to 16 TW columns): D_i is (16 TW) x (16 TW). PAD: the
// D_i scratch's rows padded (scratch_pitch).
template <typename T, int TW, bool PAD = true>
__global__ void __launch_bounds__(32 * kSmallWarps) dw_tc_small_weight_grad(const TcSmallWgradParams<T> p) {
  constexpr int COLS = 16 * TW;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5;
  const int slice = blockIdx.x, c = blockIdx.y;
  const int n_begin = slice * p.per_slice, nimg = min(p.N - n_begin, p.per_slice);
  const int ksteps = ceil_div(nimg, 16);
  T* G = reinterpret_cast<T*>(smem_raw);  // [image][oy][COLS] (TF32: [group][oy][16][kImagePitch])
  T* X = G + p.per_slice * p.gplane;      // [image][iy][COLS] (TF32: [group][iy][16][kImagePitch])
  float* D = reinterpret_cast<float*>(X + p.per_slice * p.xplane) + warp * scratch_floats(COLS, PAD);  // this warp's D_i

  // Stage 16 * ksteps images (zeros past the batch and past the row ends), two columns per item.
  if constexpr (std::is_same_v<T, float>) {  // rounded below
    stage_planes_images_inner(G, p.grad, s.C, c, n_begin, nimg, ksteps, s.OH, s.OW);
    stage_planes_images_inner(X, p.in, s.C, c, n_begin, nimg, ksteps, s.H, s.W);
  } else {
    const T zero = from_float<T>(0.f);
    stage_planes<COLS>(G, p.grad, s.C, c, n_begin, nimg, ksteps, s.OH, s.OW, p.gplane, p.gpairs, zero);
    stage_planes<COLS>(X, p.in, s.C, c, n_begin, nimg, ksteps, s.H, s.W, p.xplane, p.xpairs, zero);
  }
  copy_async_commit();
  copy_async_wait_group<0>();
  // The bias gradient: the sum of the output-gradient planes, written by one thread.
  const bool bias = p.grad_b != nullptr || p.bias_parts != nullptr;
  auto put_bias = [&](float total) {
    if (p.grad_b) p.grad_b[c] = from_float<T>(total);
    else p.bias_parts[(int64_t)slice * s.C + c] = total;
  };
  if constexpr (std::is_same_v<T, float>) {
    // TF32: each thread sums the elements it staged, exact, before they are rounded.
    const float own = bias ? sum_planes_images_inner(G, ksteps * s.OH) : 0.f;
    round_planes_images_inner(G, ksteps * s.OH);
    round_planes_images_inner(X, ksteps * s.H);
    __syncthreads();
    if (bias) {
      const float total = block_sum(own, D - warp * scratch_floats(COLS, PAD));  // warp 0's D_i scratch, not yet in use
      if (threadIdx.x == 0) put_bias(total);
    }
  } else {
    __syncthreads();
  }

  const int64_t out_at = ((int64_t)slice * s.C + c) * s.KH * s.KW;
  auto put = [&](int e, float v) {
    if (p.grad_w) p.grad_w[out_at + e] = from_float<T>(v);
    else p.parts[out_at + e] = v;
  };
  const KernelRows reach = reaching_kernel_rows(s);
  const int i_lo = reach.lo, i_hi = reach.hi;
  auto row_by_row = [&]() {
    for (int i = i_lo + warp; i < i_hi; i += kSmallWarps) {
      float acc[TW][2 * TW][4] = {};
      small_weight_grad_accumulate<T, TW>(acc, G, X, p.gplane, p.xplane, ksteps, s, i);
      small_weight_grad_taps<T, TW, PAD>(acc, D, s, i, put);
    }
  };
  if constexpr (!std::is_same_v<T, float>) {
    // Half types: warps take pairs of kernel rows where a warp would take three rows or more one
    // at a time (each fragment then serves two rows); with fewer rows pairs would leave warps idle.
    if (i_hi - i_lo > 2 * kSmallWarps) {
      for (int i = i_lo + 2 * warp; i < i_hi; i += 2 * kSmallWarps) {
        float acc0[TW][2 * TW][4] = {}, acc1[TW][2 * TW][4] = {};
        small_weight_grad_accumulate_pair<T, TW>(acc0, acc1, G, X, p.gplane, p.xplane, ksteps, s, i);
        small_weight_grad_taps<T, TW, PAD>(acc0, D, s, i, put);
        if (i + 1 < i_hi) small_weight_grad_taps<T, TW, PAD>(acc1, D, s, i + 1, put);
      }
    } else {
      row_by_row();
    }
  } else {
    row_by_row();
  }
  if constexpr (!std::is_same_v<T, float>) {
    // Half types: the last warp, which takes the fewest kernel rows, sums every staged element
    // (zeros past the map and the batch), 16 bytes a load (a plane starts 16-byte aligned:
    // gplane is an odd number of 16-byte units). (At the start, before the rows, every warp
    // waited for it.)
    if (bias && warp == kSmallWarps - 1) {
      const int lane = threadIdx.x & 31, per_plane = s.OH * COLS / 8;
      float part[8] = {};
      for (int v = lane; v < per_plane; v += 32)  // lane: 16-byte chunk v of every plane
#pragma unroll 4
        for (int m = 0; m < 16 * ksteps; ++m) {
          const uint4 q = *reinterpret_cast<const uint4*>(G + m * p.gplane + 8 * v);
          const T* h = reinterpret_cast<const T*>(&q);
#pragma unroll
          for (int k = 0; k < 8; ++k) part[k] += to_float(h[k]);
        }
      float total = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) total += part[k];
      total = warp_sum(total);
      if (lane == 0) put_bias(total);
    }
  }
  for (int e = threadIdx.x; e < s.KH * s.KW; e += blockDim.x) {  // kernel rows that never reach the map
    const int i = e / s.KW;
    if (i < i_lo || i >= i_hi) put(e, 0.f);
  }
}

// channels_last (NHWC), maps up to 16 x 16. Block (channel group, kernel-row group) walks all the
// images in 16-image chunks, staging both planes of its kNhwcChannels channels per chunk (one
// vector a pixel, transposed into per-channel planes as the NCHW kernel stages them). Warp w owns
// the block's (channel, kernel row) pairs w, w + 8, ... and keeps their D_i accumulators in
// registers over the chunks, so the diagonal sums are taken once per pair, as in the NCHW kernel,
// and the taps are final: no partial sums. With p.grad_b, the first kernel-row group's blocks also
// give their channels' bias gradients: each thread sums the output-gradient pixels it stages.
constexpr int kNhwcChannels = 4;                                     // 8-byte vectors of half values
constexpr int kNhwcPairs = 8;                                        // (channel, kernel row) pairs a warp
constexpr int kNhwcRows = kSmallWarps * kNhwcPairs / kNhwcChannels;  // kernel rows a block

template <typename T>
__global__ void __launch_bounds__(32 * kSmallWarps, 2) dw_tc_small_weight_grad_nhwc(const TcSmallWgradParams<T> p) {
  constexpr int CG = kNhwcChannels;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c0 = blockIdx.x * CG, nch = min(s.C - c0, CG), taps = s.KH * s.KW;
  const KernelRows reach = reaching_kernel_rows(s);
  const int i0 = reach.lo + blockIdx.y * kNhwcRows, rows = max(1, min(kNhwcRows, reach.hi - i0));
  const int gc = 16 * p.gplane, xc = 16 * p.xplane;                  // per channel
  T* G = reinterpret_cast<T*>(smem_raw);                             // [channel][image][oy][16]
  T* X = G + CG * gc;                                                // [channel][image][iy][16]
  float* D = reinterpret_cast<float*>(X + CG * xc) + warp * scratch_floats(16);  // this warp's D_i
  const bool any = reach.hi > reach.lo, bias = p.grad_b != nullptr && blockIdx.y == 0;

  // Bias: each thread's running sums in its warp's D_i scratch (free until the taps), [channel][lane]:
  // registers are what the accumulation is short of. Every block sums (branching on `bias` around
  // the staging made ptxas spill inside the mma loop); only the first row group's add up.
  float* bsum = D + lane;
#pragma unroll
  for (int ch = 0; ch < CG; ++ch) bsum[32 * ch] = 0.f;
  float acc[kNhwcPairs][1][2][4] = {};
  for (int n0 = 0; (any || bias) && n0 < p.N; n0 += 16) {
    const int m = min(16, p.N - n0);
    if (n0 > 0) __syncthreads();  // the last chunk's planes are read
    stage_planes_nhwc<CG, 16, 4, 32>(G, p.grad, s.C, c0, n0, m, s.OH, s.OW, p.gplane, gc, p.gpairs, bsum);
    stage_planes_nhwc<CG, 16, 4>(X, p.in, s.C, c0, n0, m, s.H, s.W, p.xplane, xc, p.xpairs);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kNhwcPairs; ++k) {
      const int u = warp + kSmallWarps * k, ch = u / rows;
      if (any && ch < nch)
        small_weight_grad_accumulate<T, 1>(acc[k], G + ch * gc, X + ch * xc, p.gplane, p.xplane, 1, s,
                                           i0 + u - ch * rows);
    }
  }
  if (bias) {  // lanes' sums, then warps' in warp order; the taps reuse the scratch after
    static_assert(32 * CG <= scratch_floats(16), "a warp's running sums fit its D_i scratch");
    float* part = D - warp * scratch_floats(16) + kSmallWarps * scratch_floats(16);  // [warp][channel]
#pragma unroll
    for (int ch = 0; ch < CG; ++ch) {
      const float v = warp_sum(bsum[32 * ch]);
      if (lane == 0) part[warp * CG + ch] = v;
    }
    __syncthreads();
    if (threadIdx.x < nch) {
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < kSmallWarps; ++w) total += part[w * CG + threadIdx.x];
      p.grad_b[c0 + threadIdx.x] = from_float<T>(total);
    }
  }
#pragma unroll
  for (int k = 0; k < kNhwcPairs; ++k) {
    const int u = warp + kSmallWarps * k, ch = u / rows;
    if (!any || ch >= nch) continue;
    T* out = p.grad_w + (int64_t)(c0 + ch) * taps;
    small_weight_grad_taps<T, 1, true>(acc[k], D, s, i0 + u - ch * rows, [&](int e, float v) { out[e] = from_float<T>(v); });
  }
  if (blockIdx.y == 0) {  // kernel rows that never reach the map
    for (int e = threadIdx.x; e < nch * taps; e += blockDim.x) {
      const int i = (e % taps) / s.KW;
      if (i < reach.lo || i >= reach.hi) p.grad_w[(int64_t)c0 * taps + e] = from_float<T>(0.f);
    }
  }
}

struct TcSmallWgradPlan {
  int TW, slices, per_slice, gplane, xplane;
  bool pad;  // the D_i scratch padded (scratch_pitch)
  size_t smem;
};

// NHWC (maps up to 16): blocks of kNhwcChannels channels by kNhwcRows kernel rows over all images
// (slices: the kernel-row groups), 16 images staged at a time.
// esize: bytes per element (2: half types, 4: TF32, NCHW maps up to 16 only).
TcSmallWgradPlan plan_small(const DwShape& s, int sms, int esize, bool pad) {
  TcSmallWgradPlan q{};
  q.pad = pad;
  const int N = (int)(s.planes / s.C);
  q.TW = std::max(1, small_map_tiles(s));
  const int cols = 16 * q.TW;
  q.gplane = esize == 4 ? s.OH * kImagePitch : s.OH * cols + 8;
  q.xplane = esize == 4 ? s.H * kImagePitch : s.H * cols + 8;
  const size_t scratch = (size_t)kSmallWarps * scratch_floats(cols, pad) * sizeof(float);
  const size_t per_image = (size_t)(q.gplane + q.xplane) * esize;
  if (s.nhwc) {
    const KernelRows reach = reaching_kernel_rows(s);
    q.per_slice = 16;
    q.slices = std::max(1, ceil_div(reach.hi - reach.lo, kNhwcRows));
    // and the bias gradient's warp sums: at most 80 KB, any sm_80+ GPU
    q.smem = scratch + (size_t)kNhwcChannels * 16 * per_image + kSmallWarps * kNhwcChannels * sizeof(float);
    return q;
  }
  // Images per block: also within the shared-memory budget.
  const int fit = (int)std::max<size_t>(16, (kSmallSmem - std::min(kSmallSmem, scratch)) / per_image / 16 * 16);
  const ImageSlices slices = image_slices(N, s.C, sms, std::min(kSmallImages, fit));
  q.per_slice = slices.per_slice;
  q.slices = slices.slices;
  q.smem = (size_t)q.per_slice * per_image + scratch;
  return q;
}

// The padded scratch where the block fits the GPU (every map up to 16, and 17-32 on GPUs with
// more than 99 KB a block), else the unpadded one.
TcSmallWgradPlan plan_small(const DwShape& s, const DeviceLimits& lim, int esize) {
  const TcSmallWgradPlan q = plan_small(s, lim.sms, esize, true);
  return q.smem <= (size_t)lim.max_smem_optin ? q : plan_small(s, lim.sms, esize, false);
}

// The channels_last small-map weight-gradient's grid: channel groups by kernel-row groups.
dim3 nhwc_grid(const DwShape& s, const TcSmallWgradPlan& q) { return dim3(ceil_div(s.C, kNhwcChannels), q.slices); }

struct WgradPlan {
  int JT, IT, OWp, gpitch, xw, tiles_j, tiles_i, slices, per_slice, IB;
  int nq;  // input rows staged per image
  size_t smem;
};

// esize: bytes per element (2: half types, 4: TF32).
WgradPlan plan(const DwShape& s, int sms, int esize) {
  WgradPlan q{};
  const int unit = 16 / esize;  // elements per 16 bytes
  q.JT = weight_grad_col_tiles(s.KW);
  q.IT = weight_grad_row_tiles(s.KH);
  q.OWp = round_up(s.OW, 16);
  q.gpitch = q.OWp + ((q.OWp / unit) % 2 == 0 ? unit : 0);
  q.xw = q.OWp + 16 * q.JT + 16;  // 8 more than the pairs reach: the staged start may move left by up to 7
  q.tiles_j = ceil_div(s.KW, 16 * q.JT);
  q.tiles_i = ceil_div(s.KH, 8 * q.IT);
  const int N = (int)(s.planes / s.C);
  const int64_t base = (int64_t)s.C * q.tiles_i * q.tiles_j;
  q.slices = (int)std::max<int64_t>(1, std::min<int64_t>(N, ceil_div(8 * sms, (int)std::min<int64_t>(base, 1 << 20))));
  q.per_slice = ceil_div(N, q.slices);
  q.slices = ceil_div(N, q.per_slice);
  // Images staged at once (output-gradient plane and input rows): fewer block-wide
  // synchronizations per image on small maps.
  q.nq = std::min(s.H, std::min(s.KH, 8 * q.IT) - 1 + s.OH);
  const size_t image_bytes = ((size_t)s.OH * q.gpitch + (size_t)q.nq * q.xw) * esize;
  q.IB = (int)std::max<size_t>(1, std::min<size_t>(std::min(q.per_slice, 16), (48 * 1024) / image_bytes));
  q.smem = std::max(((size_t)(q.IB * s.OH + 1) * q.gpitch + (size_t)q.IB * q.nq * q.xw) * esize,
                    (size_t)kWarps * (16 * q.JT * 8 * q.IT + 1) * sizeof(float));  // the end's scratch
  return q;
}

template <typename T, int JT, int IT>
cudaError_t launch_wgrad(const TcWgradParams<T>& p, const WgradPlan& q, int C, cudaStream_t stream) {
  return launch(dw_tc_weight_grad<T, JT, IT>, dim3(q.slices, C, q.tiles_i * q.tiles_j), dim3(32 * kWarps), q.smem,
                stream, p);
}

// Whether the small-map kernels take this map: maps up to 32 x 32 in half types, up to 16 x 16
// in TF32 (which goes on to the banded kernel from 20 x 20 in area).
bool small_kernel(DType t, const DwShape& s) {
  const int tiles = small_map_tiles(s);
  return tiles == 1 || (tiles == 2 && t != DType::tf32);
}

}  // namespace

bool dwconv2d_tc_weight_grad_banded(DType t, const DwShape& s) { return !small_kernel(t, s); }

bool dwconv2d_tc_weight_grad_fits(DType t, const DwShape& s) {
  if (t == DType::f32 || !tensor_cores_enabled()) return false;  // exact fp32: CUDA cores
  const int64_t N = s.planes / s.C;
  if (N < 8) return false;  // M or K = 16 images / columns: too few images waste them
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess || lim.cc_major < 8) return false;
  const bool tf32 = t == DType::tf32;
  if (s.nhwc)  // channels_last: maps up to 16, half types only
    return !tf32 && small_map_tiles(s) == 1 && plan_small(s, lim, 2).smem <= (size_t)lim.max_smem_optin;
  if (small_kernel(t, s)) return s.C <= 65535 && plan_small(s, lim, (int)elem_bytes(t)).smem <= (size_t)lim.max_smem_optin;
  // Narrow maps (a side above 32 (16 in TF32), under 20 x 20 in area) stay on the CUDA-core kernel.
  if ((int64_t)s.OH * s.OW < 400) return false;
  const WgradPlan q = plan(s, lim.sms, tf32 ? 4 : 2);
  // An image's output-gradient plane and input rows are staged whole: maps up to about 100 x 100.
  return s.C <= 65535 && q.tiles_i * q.tiles_j <= 64 && q.smem <= std::min<size_t>(lim.max_smem_optin, 100 * 1024);
}

// Where the kernel walks the staged output-gradient planes anyway: the small-map kernels (NCHW
// and channels_last), and the TF32 rounding pass of the banded one.
bool dwconv2d_tc_weight_grad_takes_bias(DType t, const DwShape& s) {
  return small_kernel(t, s) || t == DType::tf32;
}

double dwconv2d_tc_weight_grad_staged(DType t, const DwShape& s) {
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess) return 0;
  const int esize = (int)elem_bytes(t), N = (int)(s.planes / s.C);
  if (small_kernel(t, s)) {  // every image's output-gradient and input planes, once (NHWC: per kernel-row group)
    const TcSmallWgradPlan q = plan_small(s, lim, esize);
    return (double)s.C * (s.nhwc ? q.slices * round_up(N, 16) : q.slices * q.per_slice) * (q.gplane + q.xplane);
  }
  // every image's output-gradient plane and input rows, in each block of kernel taps
  const WgradPlan q = plan(s, lim.sms, esize);
  return (double)s.C * q.tiles_i * q.tiles_j * N * ((double)s.OH * q.gpitch + (double)q.nq * q.xw);
}

int64_t dwconv2d_tc_nhwc_weight_grad_blocks(const DwShape& s) {
  const dim3 grid = nhwc_grid(s, plan_small(s, limits_or_none(), 2));
  return (int64_t)grid.x * grid.y;
}

size_t dwconv2d_tc_weight_grad_workspace(DType t, const DwShape& s, bool with_bias) {
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess) return 0;
  if (s.nhwc) return 0;  // its taps are final
  const int esize = (int)elem_bytes(t);
  const int slices = small_kernel(t, s) ? plan_small(s, lim, esize).slices : plan(s, lim.sms, esize).slices;
  return slices_workspace_bytes(slices, s, with_bias);
}

cudaError_t dwconv2d_tc_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                    const DwShape& s, cudaStream_t stream, void* grad_b) {
  DeviceLimits lim;
  cudaError_t err = device_limits(&lim);
  if (err != cudaSuccess) return err;
  if (t == DType::f32) return cudaErrorInvalidValue;  // exact fp32 runs on CUDA cores
  // grad_b (only where dwconv2d_tc_weight_grad_takes_bias: the caller checks): the workspace holds
  // the slices' taps, then their bias parts (slices_workspace_bytes); add_slices sums both.
  // (channels_last has no workspace: its sums are final)
  auto bias_parts = [&](int slices) { return grad_b && workspace ? slices_bias_parts(workspace, slices, s) : nullptr; };
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    auto add_slices = [&](int slices) {
      return sum_slices(workspace, static_cast<T*>(grad_w), static_cast<T*>(grad_b), slices, s, stream);
    };
    if (small_kernel(t, s)) {
      const TcSmallWgradPlan sq = plan_small(s, lim, sizeof(T));
      TcSmallWgradParams<T> p{};
      p.grad = static_cast<const T*>(grad_out);
      p.in = static_cast<const T*>(in);
      p.parts = workspace;
      p.grad_w = sq.slices == 1 ? static_cast<T*>(grad_w) : nullptr;  // no second pass to add slices
      p.grad_b = sq.slices == 1 ? static_cast<T*>(grad_b) : nullptr;
      p.bias_parts = sq.slices == 1 ? nullptr : bias_parts(sq.slices);
      p.s = s;
      p.N = (int)(s.planes / s.C);
      p.per_slice = sq.per_slice;
      p.gplane = sq.gplane;
      p.xplane = sq.xplane;
      const dim3 block(32 * kSmallWarps);
      cudaError_t e = cudaErrorInvalidValue;
      if constexpr (std::is_same_v<T, float>) {  // TF32: NCHW maps up to 16
        if (s.nhwc || sq.TW != 1) return cudaErrorInvalidValue;
        e = launch(dw_tc_small_weight_grad<T, 1>, dim3(sq.slices, s.C), block, sq.smem, stream, p);
      } else if (s.nhwc) {
        const int bytes = kNhwcChannels * (int)sizeof(T);  // one vector per pixel
        p.gpairs = s.C % kNhwcChannels == 0 && reinterpret_cast<uintptr_t>(grad_out) % bytes == 0;
        p.xpairs = s.C % kNhwcChannels == 0 && reinterpret_cast<uintptr_t>(in) % bytes == 0;
        p.grad_w = static_cast<T*>(grad_w);  // final taps and bias gradients: no slices to add
        p.grad_b = static_cast<T*>(grad_b);
        return launch(dw_tc_small_weight_grad_nhwc<T>, nhwc_grid(s, sq), block,
                      sq.smem, stream, p);
      } else {
        p.gpairs = s.OW % 2 == 0 && reinterpret_cast<uintptr_t>(grad_out) % 4 == 0;
        p.xpairs = s.W % 2 == 0 && reinterpret_cast<uintptr_t>(in) % 4 == 0;
        const dim3 grid(sq.slices, s.C);
        e = sq.TW == 1 ? launch(dw_tc_small_weight_grad<T, 1>, grid, block, sq.smem, stream, p)
            : sq.pad   ? launch(dw_tc_small_weight_grad<T, 2>, grid, block, sq.smem, stream, p)
                       : launch(dw_tc_small_weight_grad<T, 2, false>, grid, block, sq.smem, stream, p);
      }
      if (e != cudaSuccess || sq.slices == 1) return e;
      return add_slices(sq.slices);
    }
    if (s.nhwc) return cudaErrorInvalidValue;  // channels_last: small maps only
    {  // the banded kernel
      const WgradPlan q = plan(s, lim.sms, sizeof(T));
      TcWgradParams<T> p{};
      p.grad = static_cast<const T*>(grad_out);
      p.in = static_cast<const T*>(in);
      p.parts = workspace;
      p.bias_parts = bias_parts(q.slices);
      p.s = s;
      p.N = (int)(s.planes / s.C);
      p.per_slice = q.per_slice;
      p.OWp = q.OWp; p.gpitch = q.gpitch; p.xw = q.xw; p.tiles_j = q.tiles_j; p.IB = q.IB;
      const uintptr_t ga = reinterpret_cast<uintptr_t>(grad_out), xa = reinterpret_cast<uintptr_t>(in);
      p.gvec = copy_bytes((int64_t)s.OW * sizeof(T), ga);
      p.xvec = copy_bytes((int64_t)s.W * sizeof(T), xa);
      const cudaError_t e = with_weight_grad_tiles(q.JT, q.IT, [&](auto jt, auto it) {
        return launch_wgrad<T, decltype(jt)::value, decltype(it)::value>(p, q, s.C, stream);
      });
      if (e != cudaSuccess) return e;
      return add_slices(q.slices);
    }
  });
}

}  // namespace lkpatch
