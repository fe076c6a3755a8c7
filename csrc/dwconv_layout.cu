// Memory-format changes for channels_last tensors: out[b][c][r] = in[b][r][c] for each of `batch`
// rows x cols matrices. NHWC -> NCHW is rows = H * W, cols = C; NCHW -> NHWC the reverse.
//
// PyTorch's strided copy moves these at a fraction of the memory bandwidth; a tile of 64 x 64
// elements goes through shared memory here, read and written in 16-byte vectors along the
// contiguous dimension of each side, so both sides are coalesced.
#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

constexpr int kTile = 64;
constexpr int kThreads = 256;

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
      *reinterpret_cast<uint4*>(dst + (int64_t)(c0 + c) * rows + r0 + r) = v;
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
    const bool vec = rows % V == 0 && cols % V == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out) % 16 == 0;
    transpose_tiles<T><<<dim3((unsigned)tiles, (unsigned)std::min<int64_t>(batch, 65535)), kThreads, 0, stream>>>(
        static_cast<const T*>(in), static_cast<T*>(out), batch, (int)rows, (int)cols, (int)tiles_c, vec);
    return cudaGetLastError();
  });
}

}  // namespace lkpatch
