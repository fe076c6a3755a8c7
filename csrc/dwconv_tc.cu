// Forward and input-gradient of the depthwise convolution on tensor cores (sm_80+): fp16 / bf16,
// and fp32 inputs as TF32 where PyTorch allows it.
//
// Per channel, kernel row i applied to one input row is a banded (Toeplitz) matrix product:
//   out[n][oy][ox0 + col] += sum_u in[n][oy + i - pad_t][x0 + u] * T_i[u][col],
//   T_i[u][col] = w[i][u - col + x0 - ox0 + pad_l]  (zero off the band).
// One mma.sync takes M = 16 images of the channel, N = 8 output columns and K = KS input columns
// (a k-step: 16 half values, m16n8k16, or 8 TF32 values, m16n8k8), accumulating in fp32. T_i does not depend on where the 8 columns start, so its
// fragments are built once per block in shared memory and serve every column tile. An input
// row's A fragments serve every output row that reads the row (up to kRH per warp): a block
// streams the input rows it needs through a small ring of shared-memory slots, one row of 16
// images per slot, and each warp applies the row to its output rows with the matching kernel
// rows. The zero band costs KS * S / KW extra tensor-core work (S k-steps per output tile), far
// less than the tensor cores' advantage over fp32 FMA.
#include <algorithm>

#include "dwconv_core.cuh"
#include "dwconv_mma.cuh"

namespace lkpatch {
namespace {

constexpr int kRH = 4;        // output rows per warp
// Most k-steps per output tile: ceil((KW + 7 + sh) / KS) with KW <= 63, sh <= 7.
template <typename T> constexpr int kMaxS = (63 + 14 + kStep<T> - 1) / kStep<T>;
constexpr int kMaxWarps = 4;  // warps per block, stacked down the tile
constexpr int kRows = 2;      // staged input rows per barrier
// The ring: rows being applied, rows a slower warp may still apply, rows in flight, rows fetched.
constexpr int kSlots = 4 * kRows;

template <typename T>
struct TcParams : ConvArgs<T> {
  int S;          // k-steps (kStep<T> columns each) per 8-column output tile
  int sh;         // staged column 0 is image column ox_tile - pad_l - sh, a multiple of 8
  int WA, pitch;  // staged columns per row, and the row pitch (elements) of one image
  int tiles_x;
  int vec;        // bytes per asynchronous staging copy (copy_bytes), 0: shifted 16-byte loads
  int per_block;  // 16-image groups per block (they share the block's B fragments)
  int whole;      // stage every input row of the tile at once (else a ring of kSlots rows)
  int splits;     // blocks per channel and tile
};

// FS: the k-step count where fixed at compile time (0: p.S), so that the unrolled k-step loop
// has no per-step checks.
template <typename T, int NT, int FS>
__global__ void __launch_bounds__(32 * kMaxWarps, 4) dw_tc_forward(const TcParams<T> p) {
  constexpr int KS = kStep<T>, SH = KS / 8;  // columns per k-step; column tiles it moves
  constexpr bool kTF32 = std::is_same_v<T, float>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = blockIdx.y / p.splits, part = blockIdx.y - c * p.splits;  // images: a run of 16-image groups
  const int n_begin = part * p.per_block * 16, n_stop = min(p.N, n_begin + p.per_block * 16);
  const int tile_y = blockIdx.x / p.tiles_x, tile_x = blockIdx.x - tile_y * p.tiles_x;
  const int TH = (blockDim.x >> 5) * kRH;
  const int oyT = tile_y * TH, oxT = tile_x * 8 * NT;
  const int col0 = oxT - s.pad_l - p.sh;  // image column of staged column 0

  uint2* Bf = reinterpret_cast<uint2*>(smem_raw);  // [KH][S][lane]: T_i's B fragments
  T* ring = reinterpret_cast<T*>(smem_raw + (size_t)s.KH * p.S * sizeof(uint2) * 32);
  const int slot_elems = 16 * p.pitch;  // [image][pitch]

  // B fragment of k-step st, lane (g, t), column n = g: rows k = 2t, 2t + 1, 2t + 8, 2t + 9
  // (half), or k = t, t + 4 (TF32).
  const T* wsrc = p.w + (int64_t)c * s.KH * s.KW;
  const int nwarps = blockDim.x >> 5;
  for (int is = warp, i = warp / p.S, st = warp % p.S; is < s.KH * p.S; is += nwarps) {
    const int g = lane >> 2, t = lane & 3;
    auto tap_value = [&](int k) {
      const int tap = KS * st + k - g - p.sh;
      return tap >= 0 && tap < s.KW ? load(wsrc + (p.flip ? (s.KH - 1 - i) * s.KW + (s.KW - 1 - tap) : i * s.KW + tap))
                                    : 0.f;
    };
    if constexpr (kTF32) {
      Bf[is * 32 + lane] = make_uint2(to_tf32(tap_value(t)), to_tf32(tap_value(t + 4)));
    } else {
      Bf[is * 32 + lane] =
          make_uint2(pack2(from_float<T>(tap_value(2 * t)), from_float<T>(tap_value(2 * t + 1))),
                     pack2(from_float<T>(tap_value(2 * t + 8)), from_float<T>(tap_value(2 * t + 9))));
    }
    for (st += nwarps; st >= p.S; st -= p.S) ++i;
  }

  // Input row r of images n0 .. n0 + 15 into a slot; zeros outside the image and past the batch.
  // Copies move p.vec bytes (`per` elements) each. Where a row's copies fit kCopies per thread,
  // copy e = thread + k * blockDim takes image e / chunks at staged column (e % chunks) * per,
  // planned once per image group; otherwise a warp takes an image row and its lanes go along it.
  const int64_t plane_elems = (int64_t)s.H * s.W;
  constexpr int kCopies = 3;
  const int per = p.vec / (int)sizeof(T), chunks = per ? p.WA / per : 0;
  const bool planned = per && 16 * chunks <= kCopies * (int)blockDim.x;
  const T* csrc[kCopies];  // source of row 0, or null for a zero fill
  int cdst[kCopies];       // offset in a slot, or -1: no copy
  int n0 = n_begin;
  auto plan_copies = [&]() {
#pragma unroll
    for (int k = 0; k < kCopies; ++k) {
      const int e = threadIdx.x + k * blockDim.x;
      const bool ok = planned && e < 16 * chunks;
      const int m = ok ? e / chunks : 0, ch = e - m * chunks, x = col0 + ch * per;
      const bool valid = ok && n0 + m < p.N && x >= 0 && x < s.W;
      csrc[k] = valid ? p.in + ((int64_t)(n0 + m) * s.C + c) * plane_elems + x : nullptr;
      cdst[k] = ok ? m * p.pitch + ch * per : -1;
    }
  };
  auto copy = [&](T* dst, const T* src, bool valid) {
    const T* from = valid ? src : p.in;
    if (p.vec == 16) copy_async<16>(dst, from, valid);
    else if (p.vec == 8) copy_async<8>(dst, from, valid);
    else copy_async<4>(dst, from, valid);
  };
  auto stage = [&](int r, int slot) {
    T* dst = ring + slot * slot_elems;
    if (planned) {
#pragma unroll
      for (int k = 0; k < kCopies; ++k)
        if (cdst[k] >= 0) copy(dst + cdst[k], csrc[k] ? csrc[k] + (int64_t)r * s.W : nullptr, csrc[k] != nullptr);
      return;
    }
    for (int m = warp; m < 16; m += nwarps) {
      const bool img = n0 + m < p.N;
      const T* src = p.in + ((int64_t)(img ? n0 + m : 0) * s.C + c) * plane_elems + (int64_t)r * s.W;
      T* row = dst + m * p.pitch;
      for (int u = per * lane; u < p.WA; u += 32 * per) {
        const int x = col0 + u;
        const bool valid = img && x >= 0 && x < s.W;
        copy(row + u, src + x, valid);
      }
    }
  };
  // Rows not aligned for copies (vec 0): input rows r .. r + nrows - 1 of the 16 images into
  // consecutive slots from `slot`, by 16-byte loads shifted into place, four in flight a thread.
  auto stage_shifted = [&](int r, int nrows, int slot) {
    stage_rows16<T, 4>(ring + slot * slot_elems, p.pitch, slot_elems, p.in + ((int64_t)n0 * s.C + c) * plane_elems,
                       (int64_t)s.C * plane_elems, 16, p.N - n0, s.H, s.W, r, nrows, col0, p.WA, 0);
  };

  const int oy_end = min(s.OH, oyT + TH);
  const int r_begin = max(0, oyT - s.pad_t);
  const int r_end = min(s.H, oy_end + s.KH - 1 - s.pad_t);
  const float bias = p.bias ? load(p.bias + c) : 0.f;
  const int oyw = oyT + warp * kRH;
  // ldmatrix: lane l addresses row (l & 7) + 8 * ((l >> 3) & 1) (an image), 16 bytes into the
  // k-step's columns if l >= 16 (the A fragment's right half; 32-bit values come out as TF32's).
  const int a_lane = ((lane & 7) + 8 * ((lane >> 3) & 1)) * p.pitch + (16 / (int)sizeof(T)) * (lane >> 4);
  const unsigned ring_addr = (unsigned)__cvta_generic_to_shared(ring);
  // Windows (k-step st, column tile j) that lie wholly in the zero columns are skipped; in
  // interior tiles none does, and the check is left out.
  const int live_lo = -col0 - (KS - 1), live_hi = s.W - col0;  // staged start columns that reach the image
  // Only narrow maps (NT < 4) check; elsewhere few windows are dead and the check costs more.
  constexpr bool kCheck = NT < 4;

  float acc[kRH][NT][4];
  const int S = FS ? FS : p.S;
  // Input row r (staged at `at`) applied to this warp's output rows.
  auto apply_row = [&](int r, int at) {
    int brow[kRH];  // index of the row's first B fragment for each output row (lane's own if none)
    bool use[kRH], any = false;
#pragma unroll
    for (int rr = 0; rr < kRH; ++rr) {
      const int i = r + s.pad_t - (oyw + rr);
      use[rr] = i >= 0 && i < s.KH && oyw + rr < s.OH;
      brow[rr] = use[rr] ? i * S * 32 + lane : lane;
      any |= use[rr];
    }
    if (!any) return;
    const unsigned a_addr = ring_addr + (unsigned)((at * slot_elems + a_lane) * sizeof(T));
    // Unrolled and software-pipelined: k-step st + 1's fragments load while st's mma run; the A
    // fragments shared by consecutive k-steps stay in registers, and B's addresses are constant
    // offsets. Windows start at staged column KS * st + 8 * j; consecutive k-steps share NT - SH.
    uint32_t A[NT][4];
    uint2 B[kRH];
    auto load_a = [&](uint32_t(&a)[4], int col) {
      ldmatrix_x4(a, a_addr + (unsigned)(col * sizeof(T)));
      if constexpr (kTF32) {
#pragma unroll
        for (int q = 0; q < 4; ++q) a[q] = to_tf32(__uint_as_float(a[q]));
      }
    };
#pragma unroll
    for (int j = 0; j < NT; ++j) load_a(A[j], 8 * j);
#pragma unroll
    for (int rr = 0; rr < kRH; ++rr) B[rr] = Bf[brow[rr]];
#pragma unroll
    for (int st = 0; st < (FS ? FS : kMaxS<T>); ++st) {
      if (st >= S) break;
      // The next k-step's fragments. After the last k-step the loads repeat this step's addresses
      // (unused, and never memory another warp is writing): a condition on the loads themselves
      // costs the compiler a select or a spill per register.
      const int nx = st + 1 < S ? st + 1 : st;
      uint32_t An[NT][4];
      uint2 Bn[kRH];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (NT > SH && j < NT - SH) {
#pragma unroll
          for (int q = 0; q < 4; ++q) An[j][q] = A[j + SH][q];
        } else {
          load_a(An[j], KS * nx + 8 * j);
        }
      }
#pragma unroll
      for (int rr = 0; rr < kRH; ++rr) Bn[rr] = Bf[brow[rr] + nx * 32];
      bool live[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) live[j] = !kCheck || (KS * st + 8 * j >= live_lo && KS * st + 8 * j < live_hi);
#pragma unroll
      for (int rr = 0; rr < kRH; ++rr) {
        if (!use[rr]) continue;
#pragma unroll
        for (int j = 0; j < NT; ++j)
          if (live[j]) mma_tile<T>(acc[rr][j], A[j][0], A[j][1], A[j][2], A[j][3], B[rr].x, B[rr].y);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) A[j][q] = An[j][q];
#pragma unroll
      for (int rr = 0; rr < kRH; ++rr) B[rr] = Bn[rr];
    }
  };

  // The block's images, 16 at a time: the B fragments are built once for all of them.
  for (; n0 < n_stop; n0 += 16) {
#pragma unroll
    for (int rr = 0; rr < kRH; ++rr)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[rr][j][q] = bias;

    if (n0 > n_begin) __syncthreads();  // the previous group is done with the staged rows
    plan_copies();
    if (p.whole) {  // every row the tile reads fits: stage them all, one barrier
      if (per) {
        for (int r = r_begin; r < r_end; ++r) stage(r, r - r_begin);
      } else {
        stage_shifted(r_begin, r_end - r_begin, 0);
      }
      copy_async_commit();
      copy_async_wait_group<0>();
      __syncthreads();
    } else {
      // A ring of kSlots rows, kRows per stage: rows r + 2 kRows .. are fetched while rows
      // r .. r + kRows - 1 are applied, into the slots of rows r - 2 kRows .., which every warp
      // finished before the previous barrier.
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int r = r_begin + q * kRows;
        if (!per) stage_shifted(r, min(kRows, r_end - r), q * kRows);
        for (int k = 0; per && k < kRows; ++k)
          if (r + k < r_end) stage(r + k, q * kRows + k);
        copy_async_commit();
      }
    }
    int slot = 0;
    for (int r = r_begin; r < r_end; r += kRows) {
      if (!p.whole) {
        const int ahead = r + 2 * kRows, to = (slot + 2 * kRows) % kSlots;  // kRows consecutive slots
        if (!per) stage_shifted(ahead, min(kRows, r_end - ahead), to);
        for (int k = 0; per && k < kRows; ++k)
          if (ahead + k < r_end) stage(ahead + k, to + k);
        copy_async_commit();
        copy_async_wait_group<2>();
        __syncthreads();
      }
#pragma unroll 1
      for (int k = 0; k < kRows && r + k < r_end; ++k)
        apply_row(r + k, p.whole ? r + k - r_begin : slot + k);
      slot = (slot + kRows) % kSlots;
    }

    // C fragment: (image g, columns 2t, 2t + 1) and (image g + 8, the same columns).
    const int g = lane >> 2, t = lane & 3;
    const bool pairs = s.OW % 2 == 0;
#pragma unroll
    for (int rr = 0; rr < kRH; ++rr) {
      const int oy = oyw + rr;
      if (oy >= s.OH) break;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int ox = oxT + 8 * j + 2 * t;
        if (ox >= s.OW) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = n0 + g + 8 * h;
          if (n >= p.N) continue;
          T* dst = p.out + ((int64_t)n * s.C + c) * s.OH * s.OW + (int64_t)oy * s.OW + ox;
          const T v0 = from_float<T>(acc[rr][j][2 * h]), v1 = from_float<T>(acc[rr][j][2 * h + 1]);
          if (pairs) {
            if constexpr (kTF32) *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
            else *reinterpret_cast<uint32_t*>(dst) = pack2(v0, v1);
          } else {
            dst[0] = v0;
            if (ox + 1 < s.OW) dst[1] = v1;
          }
        }
      }
    }
  }
}

// ---- maps up to 16 x 16 -----------------------------------------------------------------------
// A row of such a map is one 16-column k-step (two in TF32), so output row oy of 16 images is
//   sum over kernel rows i of  in_row(oy + i - pad_t) [16 images x 16 columns]  x  T_i [16 x 16]:
// two mma per (oy, i), four in TF32. A block takes up to 32 images of one channel, stages their
// planes as stored (rows padded to 16 columns with zeros; TF32: rounded once here), builds every
// T_i's fragments once, and its warps take (output row, 16 images) jobs, each walking only the
// kernel rows that reach the map.
constexpr int kSmallWarps = 8;
// Most images a block takes: more blocks for the GPU at a little more fragment building, which
// measured faster than 64 images on every small map and dtype timed (16 was slower on 7 x 7).
constexpr int kSmallImages = 32;

template <typename T>
struct TcSmallParams : ConvArgs<T> {
  int per_slice;  // images per block: a multiple of 16, at most kSmallImages
  int xplane;     // staged plane pitch (elements): H * 16 + 16 bytes, an odd number of 16-byte units
  bool pairs;     // NCHW: rows copy in pairs of elements (even width, aligned base)
  bool vec;       // NHWC: a pixel's channels of the block load and store as one vector
};

// Every T_i's B fragments (kernel rows i_lo .. i_hi - 1) of the channel whose weights start at
// wsrc, into Bf[((i - i_lo) * kRowSteps + h) * kBandEntries + band_entry(lane)] (the whole block
// builds them). A map row is kRowSteps k-steps h of input columns; an entry holds both 8-column
// output tiles j of one k-step: T_i[ix][ox] = w[i][ix - ox + pad_l] at ox = 8 j + g, zero off
// the band, for
//   half types (one k-step): ix = 2t, 2t + 1 (b0), 2t + 8, 2t + 9 (b1), so lanes with the same
//     2t - g hold the same fragment, and tile 1's b1 is tile 0's b0: six taps from
//     kw0 = 2t - g + pad_l;
//   TF32 (two k-steps): ix = 8h + t (b0), 8h + t + 4 (b1): lanes with the same t - g hold the
//     same fragments, taps kw0 + 8 (h - j) and + 4 from kw0 = t - g + pad_l.
template <typename T> constexpr int kRowSteps = 16 / kStep<T>;
constexpr int kBandEntriesHalf = 14, kBandEntriesTf32 = 11;  // 2t - g in [-7, 6]; t - g in [-7, 3]
template <typename T> constexpr int kBandEntries = std::is_same_v<T, float> ? kBandEntriesTf32 : kBandEntriesHalf;
// uint4 entries of one kernel row's fragments, by element bytes (the host plans with it).
__host__ __device__ constexpr int band_row_entries(int esize) {
  return esize == 4 ? 2 * kBandEntriesTf32 : kBandEntriesHalf;
}
template <typename T> __device__ __forceinline__ int band_entry(int lane) {
  return (std::is_same_v<T, float> ? 1 : 2) * (lane & 3) - (lane >> 2) + 7;
}

template <typename T>
__device__ __forceinline__ void build_band_fragments(uint4* Bf, const T* wsrc, const DwShape& s, int flip, int i_lo,
                                                     int i_hi) {
  constexpr int E = kBandEntries<T>;
  const T zero = from_float<T>(0.f);
  const int step = flip ? -1 : 1;  // the input-gradient reads the kernel rotated by 180 degrees
  for (int e = threadIdx.x; e < E * (i_hi - i_lo); e += blockDim.x) {
    const int r = e / E, i = i_lo + r;
    const T* row = flip ? wsrc + (s.KH - 1 - i) * s.KW + s.KW - 1 : wsrc + i * s.KW;
    auto tap = [&](int kw) { return (unsigned)kw < (unsigned)s.KW ? __ldg(row + step * kw) : zero; };
    const int kw0 = e - r * E - 7 + s.pad_l;
    if constexpr (std::is_same_v<T, float>) {
      auto tf = [&](int kw) { return to_tf32(tap(kw)); };
      uint4* at = Bf + r * 2 * E + e - r * E;
      at[0] = make_uint4(tf(kw0), tf(kw0 + 4), tf(kw0 - 8), tf(kw0 - 4));  // k-step 0: tiles 0, 1
      at[E] = make_uint4(tf(kw0 + 8), tf(kw0 + 12), tf(kw0), tf(kw0 + 4));  // k-step 1
    } else {
      const uint32_t mid = pack2(tap(kw0), tap(kw0 + 1));  // tile 0 b0, tile 1 b1
      const uint32_t hi = pack2(tap(kw0 + 8), tap(kw0 + 9));  // tile 0 b1
      const uint32_t lo = pack2(tap(kw0 - 8), tap(kw0 - 7));  // tile 1 b0
      Bf[e] = make_uint4(mid, hi, lo, mid);
    }
  }
}

// ldmatrix lane address of a staged plane stack X[image][iy][16] (pitch xplane): lane l addresses
// image (l & 7) + 8 * ((l >> 3) & 1), 16 bytes in if l >= 16 (the right half of a k-step).
template <typename T>
__device__ __forceinline__ unsigned small_lane_address(const T* X, int xplane, int lane) {
  return (unsigned)__cvta_generic_to_shared(X) +
         (unsigned)((((lane & 7) + 8 * ((lane >> 3) & 1)) * xplane + (16 / (int)sizeof(T)) * (lane >> 4)) * sizeof(T));
}

// acc[u] += output row oy of the 16 images at a_base + u * group_bytes (a_base: small_lane_address
// of the first group's first image), for NG groups that share each B fragment load (the kernel
// is bound by shared-memory traffic, and B is half of it with one group). C fragment images g,
// g + 8; columns 8 j + 2 t, + 1.
template <typename T, int NG>
__device__ __forceinline__ void small_output_row(float (&acc)[NG][2][4], unsigned a_base, unsigned group_bytes,
                                                 const uint4* Bf, const DwShape& s, int oy, int i_lo, int i_hi,
                                                 int lane) {
  constexpr int E = kBandEntries<T>, HS = kRowSteps<T>;
  const int i_a = max(i_lo, s.pad_t - oy), i_b = min(i_hi, s.H + s.pad_t - oy);
  const bool two_tiles = s.OW > 8;  // output columns 8-15 exist
  const bool two_steps = HS > 1 && s.W > 8;  // TF32: input columns 8-15 exist
  a_base += (unsigned)((oy - s.pad_t) * 16 * (int)sizeof(T));
  Bf += band_entry<T>(lane);
  // TF32: the second k-step sums into its own accumulators, so that the chains of dependent mma
  // are no longer than in half precision. (Prefetching the next kernel row's fragments during
  // this row's mma measured slower: the registers cost more than the latency hidden.)
  float acc1[NG][2][4] = {};
  for (int i = i_a; i < i_b; ++i) {
#pragma unroll
    for (int h = 0; h < HS; ++h) {
      if (h > 0 && !two_steps) break;
      float(&d)[NG][2][4] = h == 0 ? acc : acc1;
      const uint4 b = Bf[((i - i_lo) * HS + h) * E];
#pragma unroll
      for (int u = 0; u < NG; ++u) {
        uint32_t A[4];
        ldmatrix_x4(A, a_base + u * group_bytes + (unsigned)((i * 16 + h * kStep<T>) * sizeof(T)));
        mma_tile<T>(d[u][0], A[0], A[1], A[2], A[3], b.x, b.y);
        if (two_tiles) mma_tile<T>(d[u][1], A[0], A[1], A[2], A[3], b.z, b.w);
      }
    }
  }
  if constexpr (HS > 1)
#pragma unroll
    for (int u = 0; u < NG; ++u)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[u][j][q] += acc1[u][j][q];
}

// NG = 2: a warp's job is an output row of both 16-image groups of the block, which share each B
// fragment load (the kernel is bound by shared-memory traffic, and B is half of it with one
// group); its registers allow 4 blocks an SM. It pays where the 8 warps have jobs enough: the
// host takes it for maps of more than kSmallWarps output rows (on 7 x 7 maps a warp would idle).
template <int NG> constexpr int kSmallForwardBlocks = NG == 2 ? 4 : 0;  // blocks an SM (0: no minimum)
template <typename T, int NG>
__global__ void __launch_bounds__(32 * kSmallWarps, kSmallForwardBlocks<NG>) dw_tc_small_forward(const TcSmallParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slice = blockIdx.x, c = blockIdx.y;
  const int n_begin = slice * p.per_slice, nimg = min(p.N - n_begin, p.per_slice);
  const int groups = ceil_div(nimg, 16);
  const KernelRows reach = reaching_kernel_rows(s);
  const int i_lo = reach.lo, i_hi = reach.hi;
  uint4* Bf = reinterpret_cast<uint4*>(smem_raw);  // [i - i_lo][k-step][entry]: T_i's fragments, both column tiles
  T* X = reinterpret_cast<T*>(Bf + band_row_entries(sizeof(T)) * max(0, i_hi - i_lo));  // [image][iy][16]

  const T zero = from_float<T>(0.f);
  stage_planes<16>(X, p.in, s.C, c, n_begin, nimg, groups, s.H, s.W, p.xplane, p.pairs, zero);
  copy_async_commit();
  build_band_fragments(Bf, p.w + (int64_t)c * s.KH * s.KW, s, p.flip, i_lo, i_hi);
  copy_async_wait_group<0>();
  if constexpr (std::is_same_v<T, float>) round_staged_planes<16>(X, groups, s.H, p.xplane);
  __syncthreads();

  const unsigned x_lane = small_lane_address(X, p.xplane, lane);
  const float bias = p.bias ? load(p.bias + c) : 0.f;
  const int g = lane >> 2, t = lane & 3;
  auto run = [&](auto groups_a_job) {
    constexpr int J = decltype(groups_a_job)::value;
    const int per_row = groups / J;
    for (int job = warp; job < s.OH * per_row; job += kSmallWarps) {
      const int oy = job / per_row, grp0 = (job - oy * per_row) * J;
      float acc[J][2][4];
#pragma unroll
      for (int u = 0; u < J; ++u)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[u][j][q] = bias;
      const unsigned group_bytes = (unsigned)(16 * p.xplane * sizeof(T));
      small_output_row<T, J>(acc, x_lane + grp0 * group_bytes, group_bytes, Bf, s, oy, i_lo, i_hi, lane);
      // C fragment: images g, g + 8 of each group; columns 8 j + 2 t, + 1.
#pragma unroll
      for (int u = 0; u < J; ++u)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = 16 * (grp0 + u) + g + 8 * h;
          if (m >= nimg) continue;
          T* row = p.out + ((int64_t)(n_begin + m) * s.C + c) * s.OH * s.OW + (int64_t)oy * s.OW;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int ox = 8 * j + 2 * t;
            const T v0 = from_float<T>(acc[u][j][2 * h]), v1 = from_float<T>(acc[u][j][2 * h + 1]);
            if (s.OW % 2 == 0 && ox + 1 < s.OW) {
              store2(row + ox, v0, v1);
            } else {
              if (ox < s.OW) row[ox] = v0;
              if (ox + 1 < s.OW) row[ox + 1] = v1;
            }
          }
        }
    }
  };
  static_assert(kSmallImages == 32, "blocks of one or two 16-image groups");
  if constexpr (NG == 2) {
    if (groups == 2) {
      run(std::integral_constant<int, 2>{});
      return;
    }
  }
  run(std::integral_constant<int, 1>{});
}

// channels_last (NHWC): a block takes kNhwcChannels consecutive channels of 16 images. A pixel's
// channels are one 16-byte vector in memory, so the block stages all of them at once, transposing into per-channel
// planes as the NCHW kernel stages them. Then it walks the channels: the warps compute one
// channel's output rows while they build the next channel's T_i fragments (two buffers: one
// barrier per channel), and after the barrier a channel's results replace its input plane (no
// longer read). At the end each thread gathers a pixel's CG channels from the planes and stores
// them as one vector.
// (8 channels, a 16-byte vector: 4 measured slower on 7 x 7 and 14 x 14 maps.)
constexpr int kNhwcJobs = 2;      // output rows per warp: up to 16 rows over kSmallWarps warps
constexpr int kNhwcChannels = 8;  // a 16-byte vector of half values

template <typename T>
__global__ void __launch_bounds__(32 * kSmallWarps) dw_tc_small_forward_nhwc(const TcSmallParams<T> p) {
  constexpr int CG = kNhwcChannels;
  using Vec = uint4;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const DwShape& s = p.s;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c0 = blockIdx.x * CG, n_begin = blockIdx.y * 16;
  const int nimg = min(p.N - n_begin, 16), nch = min(s.C - c0, CG);
  const KernelRows reach = reaching_kernel_rows(s);
  const int i_lo = reach.lo, i_hi = reach.hi, rows = max(0, i_hi - i_lo);
  const int band = band_row_entries(sizeof(T)) * rows;  // a channel's fragments
  uint4* Bf = reinterpret_cast<uint4*>(smem_raw);     // two buffers of [i - i_lo][entry]
  T* X = reinterpret_cast<T*>(Bf + 2 * band);         // [channel][image][row][16]: input, then output
  const int cpitch = 16 * p.xplane;

  stage_planes_nhwc<CG, 16>(X, p.in, s.C, c0, n_begin, nimg, s.H, s.W, p.xplane, cpitch, p.vec);
  const T* w0 = p.w + (int64_t)c0 * s.KH * s.KW;
  build_band_fragments(Bf, w0, s, p.flip, i_lo, i_hi);
  __syncthreads();

  const unsigned x_lane = small_lane_address(X, p.xplane, lane);
  const int g = lane >> 2, t = lane & 3;
  for (int ch = 0; ch < nch; ++ch) {
    if (ch + 1 < nch)
      build_band_fragments(Bf + ((ch + 1) & 1) * band, w0 + (int64_t)(ch + 1) * s.KH * s.KW, s, p.flip, i_lo, i_hi);
    const uint4* B = Bf + (ch & 1) * band;
    const float bias = p.bias ? load(p.bias + c0 + ch) : 0.f;
    float acc[kNhwcJobs][1][2][4];
#pragma unroll
    for (int k = 0; k < kNhwcJobs; ++k) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[k][0][j][q] = bias;
      const int oy = warp + kSmallWarps * k;
      if (oy < s.OH)
        small_output_row<T, 1>(acc[k], x_lane + (unsigned)(ch * cpitch * sizeof(T)), 0, B, s, oy, i_lo, i_hi, lane);
    }
    __syncthreads();  // this channel's input plane and the other fragment buffer are free now
    // C fragment: images g, g + 8; columns 8 j + 2 t, + 1 (past OW: inside the 16-column row)
    T* Y = X + ch * cpitch;
#pragma unroll
    for (int k = 0; k < kNhwcJobs; ++k) {
      const int oy = warp + kSmallWarps * k;
      if (oy >= s.OH) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          store2(Y + (g + 8 * h) * p.xplane + oy * 16 + 8 * j + 2 * t, from_float<T>(acc[k][0][j][2 * h]),
                 from_float<T>(acc[k][0][j][2 * h + 1]));
    }
  }
  __syncthreads();
  const int pixels = s.OH * s.OW;
  for (int u = threadIdx.x; u < nimg * pixels; u += blockDim.x) {
    const int m = u / pixels, pix = u - m * pixels, oy = pix / s.OW, ox = pix - oy * s.OW;
    union {
      Vec v;
      T h[CG];
    } o;
#pragma unroll
    for (int ch = 0; ch < CG; ++ch) o.h[ch] = X[ch * cpitch + m * p.xplane + oy * 16 + ox];
    T* dst = p.out + ((int64_t)(n_begin + m) * pixels + pix) * s.C + c0;
    if (p.vec) {
      *reinterpret_cast<Vec*>(dst) = o.v;
    } else {
#pragma unroll
      for (int ch = 0; ch < CG; ++ch)
        if (ch < nch) dst[ch] = o.h[ch];
    }
  }
}

struct TcSmallPlan {
  int slices, per_slice, xplane;
  size_t smem;
};

bool small_map(const DwShape& s) { return small_map_tiles(s) == 1; }

// esize: bytes per element (2: half types, 4: TF32, NCHW only). NHWC: blocks of kNhwcChannels
// channels of 16 images (two fragment buffers; a plane also holds the output): at most 99 KB,
// within every sm_80+ GPU's limit. 32 images (half the fragment builds) measured slower: half
// the blocks.
TcSmallPlan plan_small(const DwShape& s, int sms, int esize) {
  TcSmallPlan q{};
  q.xplane = (s.nhwc ? std::max(s.H, s.OH) : s.H) * 16 + 16 / esize;
  const int N = (int)(s.planes / s.C);
  const ImageSlices slices = s.nhwc ? ImageSlices{16, ceil_div(N, 16)} : image_slices(N, s.C, sms, kSmallImages);
  q.per_slice = slices.per_slice;
  q.slices = slices.slices;
  const KernelRows reach = reaching_kernel_rows(s);
  const int rows = std::max(0, reach.hi - reach.lo);
  const int stacks = s.nhwc ? kNhwcChannels : 1, buffers = s.nhwc ? 2 : 1;
  q.smem = (size_t)buffers * rows * band_row_entries(esize) * 16 + (size_t)stacks * q.per_slice * q.xplane * esize;
  return q;
}

// The channels_last small-map forward's grid: channel groups by 16-image slices.
dim3 nhwc_grid(const DwShape& s, const TcSmallPlan& q) { return dim3(ceil_div(s.C, kNhwcChannels), q.slices); }

struct TcPlan {
  int NT, S, sh, WA, pitch, warps, tiles_x, tiles, whole;
  int rows;  // input rows a tile reads
  size_t smem;
};

// esize: bytes per element (2: half types, 4: TF32).
TcPlan plan(const DwShape& s, int esize) {
  TcPlan q{};
  const int ks = 32 / esize, unit = 16 / esize;  // elements per k-step, per 16 bytes
  q.NT = s.OW <= 8 ? 1 : s.OW <= 16 ? 2 : 4;
  q.sh = ((-s.pad_l) % 8 + 8) % 8;
  q.S = ceil_div(s.KW + 7 + q.sh, ks);
  q.WA = 8 * (q.NT - 1) + ks * q.S;
  q.pitch = q.WA + ((q.WA / unit) % 2 == 0 ? unit : 0);  // an odd number of 16-byte units: no bank conflicts
  q.warps = std::min(kMaxWarps, ceil_div(s.OH, kRH));
  q.tiles_x = ceil_div(s.OW, 8 * q.NT);
  q.tiles = q.tiles_x * ceil_div(s.OH, q.warps * kRH);
  // Small maps: all the input rows a tile reads fit in shared memory, and are staged at once.
  const size_t b_bytes = (size_t)s.KH * q.S * 256, row_bytes = (size_t)16 * q.pitch * esize;
  q.rows = std::min(s.H, q.warps * kRH + s.KH - 1);
  q.whole = b_bytes + q.rows * row_bytes <= 64 * 1024 && q.rows > kSlots;
  q.smem = b_bytes + (q.whole ? q.rows : kSlots) * row_bytes;
  return q;
}

template <typename T, int NT, int FS = 0>
cudaError_t launch_tc(const TcParams<T>& p, const TcPlan& q, int64_t blocks_y, cudaStream_t stream) {
  return launch(dw_tc_forward<T, NT, FS>, dim3(q.tiles, (unsigned)blocks_y), dim3(32 * q.warps), q.smem, stream, p);
}

// The general kernel on any map size.
template <typename T>
cudaError_t launch_general(const ConvArgs<T>& args, const DeviceLimits& lim, cudaStream_t stream) {
  const DwShape& s = args.s;
  const TcPlan q = plan(s, sizeof(T));
  TcParams<T> p{};
  static_cast<ConvArgs<T>&>(p) = args;
  p.S = q.S; p.sh = q.sh; p.WA = q.WA; p.pitch = q.pitch; p.tiles_x = q.tiles_x; p.whole = q.whole;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(args.in);
  const int64_t row_bytes = (int64_t)s.W * sizeof(T);
  p.vec = copy_bytes(row_bytes, addr, 0, true);  // its ring stages ahead asynchronously: narrow copies too
  // Blocks take several 16-image groups of one channel (its B fragments are built once), but
  // leave enough blocks to fill the GPU.
  const int groups = ceil_div(p.N, 16);
  const int64_t base = (int64_t)q.tiles * s.C;
  const int cap = knobs().tc_groups ? knobs().tc_groups : groups;
  p.per_block = (int)std::max<int64_t>(1, std::min<int64_t>(std::min(groups, cap), base * groups / (2 * lim.sms)));
  p.splits = ceil_div(groups, p.per_block);
  const int64_t blocks_y = (int64_t)s.C * p.splits;
  switch (q.NT) {
    case 1: return launch_tc<T, 1>(p, q, blocks_y, stream);
    case 2: return launch_tc<T, 2>(p, q, blocks_y, stream);
    default:
      // Wide maps: the k-step counts of the common kernel widths fixed at compile time (half
      // types 2 and 3: 5-31 wide; TF32 5: 27-31 wide), which drops the unrolled loop's per-step
      // checks.
      if constexpr (std::is_same_v<T, float>) {
        if (q.S == 5) return launch_tc<T, 4, 5>(p, q, blocks_y, stream);
      } else {
        if (q.S == 2) return launch_tc<T, 4, 2>(p, q, blocks_y, stream);
        if (q.S == 3) return launch_tc<T, 4, 3>(p, q, blocks_y, stream);
      }
      return launch_tc<T, 4>(p, q, blocks_y, stream);
  }
}

}  // namespace

bool dwconv2d_tc_forward_fits(DType t, const DwShape& s) {
  if (t == DType::f32 || !tensor_cores_enabled()) return false;
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess || lim.cc_major < 8) return false;
  const int64_t N = s.planes / s.C;
  if (N < 8) return false;  // M = 16 images: fewer than 8 would waste most of the tensor core
  const bool tf32 = t == DType::tf32;
  if (s.nhwc)  // channels_last: the small-map kernel, half types only
    return !tf32 && small_map(s) && (N + 15) / 16 <= 65535 &&
           plan_small(s, lim.sms, 2).smem <= (size_t)lim.max_smem_optin;
  if (small_map(s)) return s.C <= 65535 && plan_small(s, lim.sms, tf32 ? 4 : 2).smem <= (size_t)lim.max_smem_optin;
  // The general kernel in TF32 beats the exact CUDA-core kernels only from 28 x 28 maps and 9
  // taps a row (measured): below that, the exact kernels are as fast.
  if (tf32 && ((int64_t)s.OH * s.OW < 28 * 28 || s.KW < 9)) return false;
  const TcPlan q = plan(s, tf32 ? 4 : 2);
  return q.S <= (tf32 ? kMaxS<float> : kMaxS<__half>) && (int64_t)s.C * ceil_div((int)N, 16) <= 65535 &&
         q.tiles <= 0x7fffffff && q.smem <= (size_t)lim.max_smem_optin;
}

int64_t dwconv2d_tc_nhwc_forward_blocks(const DwShape& s) {
  const dim3 grid = nhwc_grid(s, plan_small(s, sms_or_zero(), 2));
  return (int64_t)grid.x * grid.y;
}

int dwconv2d_tc_forward_copy_bytes(DType t, const DwShape& s) {
  return copy_bytes((int64_t)s.W * elem_bytes(t), 0, 0, true);
}

double dwconv2d_tc_forward_staged(DType t, const DwShape& s) {
  const int esize = (int)elem_bytes(t), N = (int)(s.planes / s.C);
  if (small_map(s)) {  // each slice's images, whole
    const TcSmallPlan q = plan_small(s, sms_or_zero(), esize);
    return (double)s.C * q.slices * q.per_slice * q.xplane;
  }
  // each tile's input rows of every 16-image group, and its B fragments (256 bytes per k-step and row)
  const TcPlan q = plan(s, esize);
  return (double)s.C * q.tiles * ((double)round_up(N, 16) * q.rows * q.WA + (double)s.KH * q.S * 256 / esize);
}

cudaError_t dwconv2d_tc_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                const DwShape& s, bool flip_kernel, cudaStream_t stream) {
  DeviceLimits lim;
  const cudaError_t err = device_limits(&lim);
  if (err != cudaSuccess) return err;
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (t == DType::f32) return cudaErrorInvalidValue;  // exact fp32 runs on CUDA cores
    ConvArgs<T> args{};
    args.set(static_cast<const T*>(in), static_cast<const T*>(w), static_cast<const T*>(bias), static_cast<T*>(out), s,
             flip_kernel);
    const bool small = small_map(s);
    TcSmallParams<T> p{};
    static_cast<ConvArgs<T>&>(p) = args;
    const TcSmallPlan q = small ? plan_small(s, lim.sms, sizeof(T)) : TcSmallPlan{};
    p.per_slice = q.per_slice;
    p.xplane = q.xplane;
    if (s.nhwc) {  // channels_last: small maps, half types
      if constexpr (!std::is_same_v<T, float>) {
        if (small) {
          p.vec = s.C % kNhwcChannels == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(out) % 16 == 0;  // one vector per pixel
          return launch(dw_tc_small_forward_nhwc<T>, nhwc_grid(s, q),
                        dim3(32 * kSmallWarps), q.smem, stream, p);
        }
      }
      return cudaErrorInvalidValue;
    }
    if (small) {
      p.pairs = s.W % 2 == 0 && reinterpret_cast<uintptr_t>(in) % (2 * sizeof(T)) == 0;
      const dim3 grid(q.slices, s.C), block(32 * kSmallWarps);
      return q.per_slice == 32 && s.OH > kSmallWarps ? launch(dw_tc_small_forward<T, 2>, grid, block, q.smem, stream, p)
                                                     : launch(dw_tc_small_forward<T, 1>, grid, block, q.smem, stream, p);
    }
    return launch_general(args, lim, stream);
  });
}

}  // namespace lkpatch
