// Memory-format changes for channels_last tensors: out[b][c][r] = in[b][r][c] for each of `batch`
// rows x cols matrices. NHWC -> NCHW is rows = H * W, cols = C; NCHW -> NHWC the reverse.
//
// PyTorch's strided copy moves these at a fraction of the memory bandwidth. Here tiles go through
// shared memory and both sides move in 16-byte vectors:
// * where a side is short (up to kFlatMax: the pixels of small maps, or the channels), a tile
//   spans all of it and a run of the other, so one side of the tile is a single contiguous block
//   of memory, copied flat;
// * otherwise (and where both sides are multiples of 64) 64 x 64 tiles, read and written along
//   the contiguous dimension of each side.
// Shapes or addresses that do not allow vectors take the element-wise 64 x 64 path.
#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

constexpr int kTile = 64;
constexpr int kThreads = 256;
// Vectors built in registers are stored with __stwb (an ordinary write-back store): nvcc 13 splits
// a plain uint4 assignment of them into four 4-byte stores for 2-byte types, four times the requests.

// One kTile x kTile tile of one matrix (r0, c0 its first row and column).
template <typename T>
__device__ __forceinline__ void transpose_tile(const T* __restrict__ src, T* __restrict__ dst, T (*tile)[kTile + 2],
                                               int rows, int cols, int r0, int c0, bool vec) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte vector
  if (vec && r0 + kTile <= rows && c0 + kTile <= cols) {
    // An interior tile, with sizes and addresses aligned to vectors.
    for (int e = threadIdx.x; e < kTile * kTile / V; e += kThreads) {
      const int r = e / (kTile / V), c = (e % (kTile / V)) * V;
      const uint4 v = *reinterpret_cast<const uint4*>(src + (int64_t)(r0 + r) * cols + c0 + c);
      const T* vals = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int k = 0; k < V; ++k) tile[r][c + k] = vals[k];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile / V; e += kThreads) {
      const int c = e / (kTile / V), r = (e % (kTile / V)) * V;
      uint4 v;
      T* vals = reinterpret_cast<T*>(&v);
#pragma unroll
      for (int k = 0; k < V; ++k) vals[k] = tile[r + k][c];
      __stwb(reinterpret_cast<uint4*>(dst + (int64_t)(c0 + c) * rows + r0 + r), v);
    }
  } else {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      if (r0 + r < rows && c0 + c < cols) tile[r][c] = src[(int64_t)(r0 + r) * cols + c0 + c];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int c = e / kTile, r = e % kTile;
      if (r0 + r < rows && c0 + c < cols) dst[(int64_t)(c0 + c) * rows + r0 + r] = tile[r][c];
    }
  }
}

// Flat tiles. kFlatOut: the tile is all `rows` by `span` columns from c0; its columns are one
// contiguous block of `out` (span * rows elements). Otherwise it is `span` rows from r0 by all
// `cols`, one contiguous block of `in`. `buf` holds the contiguous side's layout, so that side is
// a straight vector copy and the other side gathers or scatters elements in shared memory.
// Needs the strided side's length (cols if kFlatOut, else rows) and `span` to be multiples of
// the vector, and 16-byte aligned tensors.
constexpr int kFlatMax = 1024;          // longest flat side
constexpr int kLoads = 4;               // 16-byte loads in flight a thread (flat output side)
// Shared memory a flat tile aims at: the size measured fastest for maps of 7-56 with 96-1024
// channels in both directions (docs/benchmarks.md). Spans of at least 2 vectors can take up to
// 32 KB (kFlatMax elements a line).
constexpr int kFlatBytes = 16 * 1024;
template <typename T, bool kFlatOut>
__global__ void __launch_bounds__(kThreads) transpose_flat(const T* __restrict__ in, T* __restrict__ out, int64_t batch,
                                                           int rows, int cols, int span) {
  constexpr int V = 16 / sizeof(T);
  extern __shared__ uint4 smem_vec[];
  T* buf = reinterpret_cast<T*>(smem_vec);
  const int flat = kFlatOut ? rows : cols;                   // the tile's full side
  const int side = kFlatOut ? cols : rows;                   // the side split into spans
  const int t0 = blockIdx.x * span, n = min(span, side - t0);  // this tile's run of it, a multiple of V
  const int nvec = n / V * flat;                              // vectors of the tile either way
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (b > blockIdx.y) __syncthreads();  // the previous matrix's tile has been written out
    const T* src = in + b * rows * cols;
    T* dst = out + b * rows * cols;
    if constexpr (kFlatOut) {
      // kLoads loads a thread in flight, issued before their values are scattered: the flat side's
      // copies wait on memory latency. The other side's plain loop stays: batched, it ran slower.
      // in: row r holds the tile's n columns from t0; buf[c][r] is out's block, row-major.
      for (int e0 = threadIdx.x; e0 < nvec; e0 += kLoads * kThreads) {
        uint4 v[kLoads];
#pragma unroll
        for (int q = 0; q < kLoads; ++q) {
          const int e = e0 + q * kThreads, r = e / (n / V), c = (e - r * (n / V)) * V;
          if (e < nvec) v[q] = *reinterpret_cast<const uint4*>(src + (int64_t)r * cols + t0 + c);
        }
#pragma unroll
        for (int q = 0; q < kLoads; ++q) {
          const int e = e0 + q * kThreads, r = e / (n / V), c = (e - r * (n / V)) * V;
          const T* vals = reinterpret_cast<const T*>(&v[q]);
          if (e < nvec)
#pragma unroll
            for (int k = 0; k < V; ++k) buf[(c + k) * rows + r] = vals[k];
        }
      }
      __syncthreads();
      uint4* o = reinterpret_cast<uint4*>(dst + (int64_t)t0 * rows);
      for (int e = threadIdx.x; e < nvec; e += kThreads) o[e] = smem_vec[e];
    } else {
      // in's block (rows t0 .. t0 + n, all columns) as it is; out: column c takes n rows from t0.
      const uint4* i4 = reinterpret_cast<const uint4*>(src + (int64_t)t0 * cols);
      for (int e = threadIdx.x; e < nvec; e += kThreads) smem_vec[e] = i4[e];
      __syncthreads();
      for (int e = threadIdx.x; e < nvec; e += kThreads) {
        const int c = e / (n / V), r = (e - c * (n / V)) * V;
        uint4 v;
        T* vals = reinterpret_cast<T*>(&v);
#pragma unroll
        for (int k = 0; k < V; ++k) vals[k] = buf[(r + k) * cols + c];
        __stwb(reinterpret_cast<uint4*>(dst + (int64_t)c * rows + t0 + r), v);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) transpose_tiles(const T* __restrict__ in, T* __restrict__ out,
                                                            int64_t batch, int rows, int cols, int tiles_c, bool vec) {
  __shared__ T tile[kTile][kTile + 2];  // the pitch spreads column reads over the banks
  const int r0 = (int)(blockIdx.x / tiles_c) * kTile, c0 = (int)(blockIdx.x % tiles_c) * kTile;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    if (b > blockIdx.y) __syncthreads();  // the previous matrix's tile has been read
    transpose_tile(in + b * rows * cols, out + b * rows * cols, tile, rows, cols, r0, c0, vec);
  }
}

}  // namespace

cudaError_t transpose_batched(DType t, const void* in, void* out, int64_t batch, int64_t rows, int64_t cols,
                              cudaStream_t stream) {
  if (batch == 0 || rows == 0 || cols == 0) return cudaSuccess;
  // Offsets are 64-bit; a side's tile start plus the tile must fit an int.
  if (rows > INT32_MAX - kTile || cols > INT32_MAX - kTile) return cudaErrorInvalidValue;
  const int64_t tiles_c = (cols + kTile - 1) / kTile, tiles = (rows + kTile - 1) / kTile * tiles_c;
  if (tiles > INT32_MAX) return cudaErrorInvalidValue;
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const unsigned grid_y = (unsigned)std::min<int64_t>(batch, 65535);
    const bool aligned = reinterpret_cast<uintptr_t>(in) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
    // Flat tiles where one side is short; the other must be a multiple of the vector.
    // Where both sides are multiples of the tile, the 64 x 64 tiles are all whole, and read
    // 128-byte runs on both sides.
    const bool whole = rows % kTile == 0 && cols % kTile == 0;
    const bool may_flat_out = rows <= kFlatMax && cols % V == 0, may_flat_in = cols <= kFlatMax && rows % V == 0;
    if (aligned && !whole && (may_flat_out || may_flat_in)) {
      // Where either side may be flat, the shorter one is: the spans of the other are longer, and
      // so are the strided side's runs.
      const bool flat_out = may_flat_out && (!may_flat_in || rows <= cols);
      const int64_t flat = flat_out ? rows : cols, side = flat_out ? cols : rows;
      // Spans of whole 32-byte sectors (2 vectors), 64 elements at most: a span that ends inside a
      // sector makes the strided side touch more sectors than it moves.
      const int span = (int)std::min<int64_t>(
          {64, side, std::max<int64_t>(2 * V, kFlatBytes / sizeof(T) / flat / (2 * V) * (2 * V))});
      const int64_t spans = (side + span - 1) / span;
      if (spans > INT32_MAX) return cudaErrorInvalidValue;
      const size_t smem = (size_t)span * flat * sizeof(T);
      const dim3 grid((unsigned)spans, grid_y);
      if (flat_out)
        transpose_flat<T, true><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(in), static_cast<T*>(out), batch,
                                                                 (int)rows, (int)cols, span);
      else
        transpose_flat<T, false><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(in), static_cast<T*>(out), batch,
                                                                  (int)rows, (int)cols, span);
      return cudaGetLastError();
    }
    const bool vec = aligned && rows % V == 0 && cols % V == 0;
    transpose_tiles<T><<<dim3((unsigned)tiles, grid_y), kThreads, 0, stream>>>(
        static_cast<const T*>(in), static_cast<T*>(out), batch, (int)rows, (int)cols, (int)tiles_c, vec);
    return cudaGetLastError();
  });
}

}  // namespace lkpatch
