// Forward and input-gradient of the fp32 depthwise convolution.
//
// A block computes a TH x TW output tile of P planes. It stages, per plane, the input rows the
// tile reads (clipped to the image) with zero columns around them, and the plane's kernel with
// RH - 1 zero rows above and below. Each thread then owns RH x RW outputs and walks only the
// kernel rows and column chunks whose taps land inside the image: taps in the padding cost
// nothing, which matters when the kernel is large next to the feature map (27x27 on 14x14).
#include <algorithm>

#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

struct FwdParams {
  const float* in;
  const float* w;
  const float* bias;
  float* out;
  DwShape s;
  int flip;
  int GX, GY, P;  // threads per plane across / down; planes per block
  int tiles_x;
  int a_rows, a_pitch;  // staged input per plane
  int b_rows, b_pitch;  // staged kernel per plane
};

template <int RH, int RW>
__global__ void __launch_bounds__(256, 2) dw_forward_f32(const FwdParams p) {
  constexpr int CH = kChunk;
  extern __shared__ __align__(16) float smem[];
  const DwShape& s = p.s;
  const int TW = p.GX * RW, TH = p.GY * RH;
  const int tile_y = blockIdx.y / p.tiles_x, tile_x = blockIdx.y - tile_y * p.tiles_x;
  const int oyT = tile_y * TH, oxT = tile_x * TW;
  const int64_t plane0 = (int64_t)blockIdx.x * p.P;
  const int ry0 = max(0, oyT - s.pad_t);                       // first staged input row
  const int nrows = min(s.H, oyT - s.pad_t + TH + s.KH - 1) - ry0;
  const int cx0 = oxT - s.pad_l;                               // input column of staged column 0
  const int a_size = p.a_rows * p.a_pitch, b_size = p.b_rows * p.b_pitch;

  for (int q = 0; q < p.P; ++q) {
    const int64_t plane = plane0 + q;
    if (plane >= s.planes) break;
    float* A = smem + q * (a_size + b_size);
    float* B = A + a_size;
    const float* src = p.in + plane * (int64_t)s.H * s.W + (int64_t)ry0 * s.W;
    for (int i = threadIdx.x; i < nrows * p.a_pitch; i += blockDim.x) {
      const int r = i / p.a_pitch, c = i - r * p.a_pitch, x = cx0 + c;
      A[i] = (x >= 0 && x < s.W) ? __ldg(src + r * s.W + x) : 0.f;
    }
    const float* wsrc = p.w + (int64_t)(plane % s.C) * s.KH * s.KW;
    for (int i = threadIdx.x; i < b_size; i += blockDim.x) {
      const int r = i / p.b_pitch, kw = i - r * p.b_pitch, kh = r - (RH - 1);
      float v = 0.f;
      if (kh >= 0 && kh < s.KH && kw < s.KW)
        v = p.flip ? __ldg(wsrc + (s.KH - 1 - kh) * s.KW + (s.KW - 1 - kw)) : __ldg(wsrc + kh * s.KW + kw);
      B[i] = v;
    }
  }
  __syncthreads();

  const int per_plane = p.GX * p.GY;
  const int q = threadIdx.x / per_plane, t = threadIdx.x - q * per_plane;
  const int64_t plane = plane0 + q;
  if (q >= p.P || plane >= s.planes) return;
  const int oy0 = oyT + (t / p.GX) * RH, ox0 = oxT + (t % p.GX) * RW;
  if (oy0 >= s.OH || ox0 >= s.OW) return;

  const float bias = p.bias ? __ldg(p.bias + plane % s.C) : 0.f;
  float acc[RH][RW];
#pragma unroll
  for (int r = 0; r < RH; ++r)
#pragma unroll
    for (int j = 0; j < RW; ++j) acc[r][j] = bias;

  // d indexes input rows from oy0 - pad_t (kernel row d - r for output row r); k indexes kernel
  // columns. Keep the rows inside the image and the column chunks that reach it.
  const int d_lo = max(0, s.pad_t - oy0);
  const int d_hi = min(s.KH + RH - 1, s.pad_t - oy0 + s.H);
  const int k_lo = max(0, s.pad_l - ox0 - RW + 1) / CH * CH;
  const int k_hi = min(s.KW, s.pad_l - ox0 + s.W);
  if (d_hi > d_lo && k_hi > k_lo) {
    const float* A = smem + q * (a_size + b_size);
    const float* B = A + a_size + (RH - 1) * p.b_pitch;
    correlate<RH, RW, CH>(acc, A + (ox0 - oxT), oy0 - s.pad_t - ry0, p.a_pitch, B, p.b_pitch, d_lo, d_hi, k_lo,
                          ceil_div(k_hi - k_lo, CH));
  }

  float* dst = p.out + plane * (int64_t)s.OH * s.OW;
  const bool vec = (s.OW % 4 == 0) && (ox0 + RW <= s.OW);
#pragma unroll
  for (int r = 0; r < RH; ++r) {
    const int oy = oy0 + r;
    if (oy >= s.OH) break;
    float* row = dst + (int64_t)oy * s.OW + ox0;
    if (vec) {
#pragma unroll
      for (int j = 0; j < RW; j += 4)
        *reinterpret_cast<float4*>(row + j) = make_float4(acc[r][j], acc[r][j + 1], acc[r][j + 2], acc[r][j + 3]);
    } else {
#pragma unroll
      for (int j = 0; j < RW; ++j)
        if (ox0 + j < s.OW) row[j] = acc[r][j];
    }
  }
}

constexpr int kRH = 4, kRW = 8;
constexpr size_t kSmemBudget = 96 * 1024;  // per block: leaves room for two blocks per SM

}  // namespace

DwShape dwconv2d_input_grad_shape(const DwShape& f) {
  DwShape g = f;
  g.H = f.OH; g.W = f.OW;
  g.OH = f.H; g.OW = f.W;
  g.pad_t = f.KH - 1 - f.pad_t;
  g.pad_l = f.KW - 1 - f.pad_l;
  return g;
}

cudaError_t dwconv2d_forward_f32(const float* in, const float* w, const float* bias, float* out, const DwShape& s,
                                 bool flip_kernel, cudaStream_t stream) {
  if (s.planes == 0 || s.OH <= 0 || s.OW <= 0) return cudaSuccess;
  DeviceLimits lim;
  cudaError_t err = device_limits(&lim);
  if (err != cudaSuccess) return err;

  FwdParams p{};
  p.in = in; p.w = w; p.bias = bias; p.out = out; p.s = s; p.flip = flip_kernel ? 1 : 0;
  p.GX = std::min(ceil_div(s.OW, kRW), 8);
  p.GY = std::max(1, std::min(ceil_div(s.OH, kRH), 128 / p.GX));
  const int TW = p.GX * kRW, TH = p.GY * kRH;
  p.tiles_x = ceil_div(s.OW, TW);
  const int tiles = p.tiles_x * ceil_div(s.OH, TH);
  const int KWc = round_up(s.KW, kChunk);
  p.a_rows = std::max(1, std::min(s.H, TH + s.KH - 1));
  p.a_pitch = TW + KWc;
  p.b_rows = s.KH + 2 * (kRH - 1);
  p.b_pitch = KWc;
  const size_t plane_bytes = sizeof(float) * ((size_t)p.a_rows * p.a_pitch + (size_t)p.b_rows * p.b_pitch);
  // Small maps: several planes per block so that a block has enough threads.
  const int per_plane = p.GX * p.GY;
  p.P = std::max(1, std::min<int>(256 / per_plane, (int)(kSmemBudget / plane_bytes)));
  p.P = (int)std::min<int64_t>(p.P, s.planes);
  const size_t smem = plane_bytes * p.P;
  if (smem > (size_t)lim.max_smem_optin) return cudaErrorInvalidConfiguration;
  const int threads = round_up(p.P * per_plane, 32);
  const int64_t blocks = (s.planes + p.P - 1) / p.P;
  if (tiles > 65535 || blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  return launch(dw_forward_f32<kRH, kRW>, dim3((unsigned)blocks, tiles), dim3(threads), smem, stream, p);
}

}  // namespace lkpatch
