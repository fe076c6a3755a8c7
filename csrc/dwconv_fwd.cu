// Forward and input-gradient of the fp32 depthwise convolution.
//
// A block computes a TH x TW output tile of PL planes -- usually PL images of one channel, which
// then share the staged kernel, with lane q of every warp on image q so that a warp walks the
// same taps. It stages, per plane, the input rows the tile reads (clipped to the image) with zero
// columns around them. Each thread owns RH x RW outputs and walks only the kernel rows and column
// chunks whose taps land inside the image: taps in the padding cost nothing, which matters when
// the kernel is large next to the feature map (27x27 on 14x14).
#include <algorithm>

#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

template <typename T>
struct FwdParams : ConvArgs<T> {
  int GX, GY;           // thread positions across / down the tile, RH x RW outputs each
  int PL;               // planes per block, interleaved in the lanes: lane q takes plane q
  int shared_kernel;    // 1: the PL planes are images n0.. of one channel and share one kernel
                        // 0: they are consecutive planes n*C + c, each with its own kernel
  int tiles_x;
  int shift;     // staged input starts `shift` columns left of oxT - pad_l, at a multiple of 4
  int vec4;      // 16-byte staging copies (fp32, W a multiple of 4, aligned tensor)
  int a_rows, a_pitch, a_stride;  // staged input rows per plane
  int b_pitch, b_stride;          // staged kernel: KH rows per plane (b_stride = 0 if shared)
};

template <typename T, int RH, int RW>
__global__ void __launch_bounds__(256, 3) dw_forward(const FwdParams<T> p) {
  constexpr int CH = kChunk;
  extern __shared__ __align__(16) float smem[];
  const DwShape& s = p.s;
  const int TW = p.GX * RW, TH = p.GY * RH;
  const int tile_y = blockIdx.y / p.tiles_x, tile_x = blockIdx.y - tile_y * p.tiles_x;
  const int oyT = tile_y * TH, oxT = tile_x * TW;

  // This block's planes: plane(q) for q < nplanes.
  int64_t first;  // plane of q == 0
  int64_t step;   // plane(q) = first + q * step
  int nplanes;
  if (p.shared_kernel) {
    const int groups = ceil_div(p.N, p.PL);
    const int c = blockIdx.x / groups, n0 = (blockIdx.x - c * groups) * p.PL;
    first = (int64_t)n0 * s.C + c;
    step = s.C;
    nplanes = min(p.PL, p.N - n0);
  } else {
    first = (int64_t)blockIdx.x * p.PL;
    step = 1;
    nplanes = (int)(s.planes - first < p.PL ? s.planes - first : p.PL);
  }

  // Stage the kernel(s) and the input rows the tile reads (clipped to the image), zero columns
  // around them.
  const int ry0 = max(0, oyT - s.pad_t);
  const int nrows = min(s.H, oyT - s.pad_t + TH + s.KH - 1) - ry0;
  float* B = smem;
  float* A = smem + (p.shared_kernel ? round_up(s.KH * p.b_pitch, 32) : p.PL * p.b_stride);
  const int nkernels = p.shared_kernel ? 1 : nplanes;
  for (int i = threadIdx.x; i < nkernels * s.KH * p.b_pitch; i += blockDim.x) {
    const int q = i / (s.KH * p.b_pitch), e = i - q * s.KH * p.b_pitch;
    const int kh = e / p.b_pitch, kw = e - kh * p.b_pitch;
    const T* wsrc = p.w + ((first + q * step) % s.C) * s.KH * s.KW;
    const int tap = kw - 4 - p.shift;  // 4 + shift zero columns on the left (chunks may start early)
    const bool valid = tap >= 0 && tap < s.KW;
    const int src = p.flip ? (s.KH - 1 - kh) * s.KW + (s.KW - 1 - tap) : kh * s.KW + tap;
    if constexpr (std::is_same_v<T, float>)
      copy_async(B + q * p.b_stride + e, wsrc + (valid ? src : 0), valid);
    else
      B[q * p.b_stride + e] = valid ? load(wsrc + src) : 0.f;
  }
  const int64_t plane_elems = (int64_t)s.H * s.W;
  if (nrows > 0)
    stage_rows<T>(A, p.a_stride, p.a_pitch, nplanes, nrows, ry0, oxT - s.pad_l - p.shift, s.W, s.W,
                  [&](int q) { return p.in + (first + q * step) * plane_elems; }, p.vec4);
  copy_async_wait();
  __syncthreads();

  const int q = threadIdx.x % p.PL, pos = threadIdx.x / p.PL;
  if (q >= nplanes || pos >= p.GX * p.GY) return;
  const int64_t plane = first + q * step;
  const int oy0 = oyT + (pos / p.GX) * RH, ox0 = oxT + (pos % p.GX) * RW;
  if (oy0 >= s.OH || ox0 >= s.OW) return;

  const float bias = p.bias ? load(p.bias + plane % s.C) : 0.f;
  float acc[RH][RW];
#pragma unroll
  for (int r = 0; r < RH; ++r)
#pragma unroll
    for (int j = 0; j < RW; ++j) acc[r][j] = bias;

  // d indexes input rows from oy0 - pad_t (kernel row d - r for output row r); k indexes kernel
  // columns. Walk only the rows inside the image and the column chunks that reach it.
  // Chunks start where k + shift is a multiple of 4, so that both operands load 16 bytes at a time.
  const int d_lo = max(0, s.pad_t - oy0);
  const int d_hi = min(s.KH + RH - 1, s.pad_t - oy0 + s.H);
  const int k_lo = (max(0, s.pad_l - ox0 - RW + 1) + p.shift) / 4 * 4 - p.shift;
  const int k_hi = min(s.KW, s.pad_l - ox0 + s.W);
  if (d_hi > d_lo && k_hi > k_lo) {
    const float* a = A + q * p.a_stride + (oy0 - s.pad_t - ry0) * p.a_pitch + (ox0 - oxT) + p.shift + k_lo;
    const float* b = B + q * p.b_stride + 4 + p.shift + k_lo;
    correlate<RH, RW, CH>(acc, a, p.a_pitch, b, p.b_pitch, s.KH, d_lo, d_hi, ceil_div(k_hi - k_lo, CH));
  }

  T* dst = p.out + plane * (int64_t)s.OH * s.OW;
  const bool aligned = s.OW % (16 / sizeof(T)) == 0;  // ox0 is a multiple of RW
#pragma unroll
  for (int r = 0; r < RH; ++r) {
    if (oy0 + r >= s.OH) break;
    store_row<T, RW>(dst + (int64_t)(oy0 + r) * s.OW + ox0, acc[r], s.OW - ox0, aligned);
  }
}

constexpr int kRH = 4, kRW = 8;
constexpr size_t kSmemBudget = 96 * 1024;  // per block: two blocks per SM

}  // namespace

DwShape dwconv2d_input_grad_shape(const DwShape& f) {
  DwShape g = f;
  g.H = f.OH; g.W = f.OW;
  g.OH = f.H; g.OW = f.W;
  g.pad_t = f.KH - 1 - f.pad_t;
  g.pad_l = f.KW - 1 - f.pad_l;
  return g;
}

namespace {

template <typename T>
cudaError_t forward(const T* in, const T* w, const T* bias, T* out, const DwShape& s, bool flip_kernel,
                    cudaStream_t stream) {
  DeviceLimits lim;
  cudaError_t err = device_limits(&lim);
  if (err != cudaSuccess) return err;

  FwdParams<T> p{};
  p.set(in, w, bias, out, s, flip_kernel);
  // Tiles of up to 8 thread positions across (64 columns) and 128 in all, as many across as that
  // takes, evened out over the map: 76 columns take two tiles of 40, not 64 + 12, whose idle
  // lanes would hold their SM's slots.
  const int cols = ceil_div(s.OW, kRW);
  p.GX = ceil_div(cols, ceil_div(cols, 8));
  p.GY = std::max(1, std::min(ceil_div(s.OH, kRH), 128 / std::min(cols, 8)));
  const int TW = p.GX * kRW, TH = p.GY * kRH;
  p.tiles_x = ceil_div(s.OW, TW);
  const int tiles = p.tiles_x * ceil_div(s.OH, TH);
  // The staged input starts at a multiple of 4 columns (16-byte copies); chunks may then start up
  // to 3 columns before tap 0 and run 7 past the last tap: zero columns cover both.
  p.shift = ((-s.pad_l) % 4 + 4) % 4;
  p.vec4 = std::is_same_v<T, float> && s.W % 4 == 0 && reinterpret_cast<uintptr_t>(in) % 16 == 0;
  p.b_pitch = round_up(s.KW + 14, kChunk);
  p.a_rows = std::max(1, std::min(s.H, TH + s.KH - 1));
  p.a_pitch = TW + p.b_pitch;
  p.a_stride = plane_stride(p.a_rows * p.a_pitch);
  // Planes per block: enough lanes for a full block, within the shared-memory budget. Images of
  // one channel share the kernel (and a warp then walks the same taps); with few images,
  // consecutive channels each bring their own.
  const int positions = p.GX * p.GY;
  const int want = std::max(1, 256 / positions);
  p.shared_kernel = p.N >= std::min(want, 8) ? 1 : 0;
  const size_t kernel_floats = (size_t)s.KH * p.b_pitch;
  const size_t per_plane = p.a_stride + (p.shared_kernel ? 0 : plane_stride((int)kernel_floats));
  const size_t fixed = p.shared_kernel ? round_up((int)kernel_floats, 32) : 0;
  const size_t budget = kSmemBudget / sizeof(float);
  if (fixed + per_plane > (size_t)lim.max_smem_optin / sizeof(float)) return cudaErrorInvalidConfiguration;
  p.PL = (int)std::max<size_t>(1, std::min<size_t>(want, budget > fixed ? (budget - fixed) / per_plane : 1));
  p.PL = (int)std::min<int64_t>(p.PL, p.shared_kernel ? p.N : s.planes);
  p.b_stride = p.shared_kernel ? 0 : plane_stride((int)kernel_floats);
  const size_t smem = sizeof(float) * (fixed + per_plane * p.PL);
  const int threads = round_up(p.PL * positions, 32);
  const int64_t blocks = p.shared_kernel ? (int64_t)s.C * ceil_div(p.N, p.PL) : (s.planes + p.PL - 1) / p.PL;
  if (tiles > 65535 || blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch(dw_forward<T, kRH, kRW>, dim3((unsigned)blocks, tiles), dim3(threads), smem, stream, p);
}

}  // namespace

cudaError_t dwconv2d_fma_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                 const DwShape& s, bool flip_kernel, cudaStream_t stream) {
  if (s.nhwc) return cudaErrorInvalidValue;
  if (use_small_map(dwconv2d_small_forward_fits(s), s)) return dwconv2d_small_forward(t, in, w, bias, out, s, flip_kernel, stream);
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    return forward<T>(static_cast<const T*>(in), static_cast<const T*>(w), static_cast<const T*>(bias),
                      static_cast<T*>(out), s, flip_kernel, stream);
  });
}

}  // namespace lkpatch
