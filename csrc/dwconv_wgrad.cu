// Weight-gradient of the fp32 depthwise convolution.
//
// grad_w[c][kh][kw] = sum_{n,oy,ox} grad_out[n,c][oy][ox] * in[n,c][oy - pad_t + kh][ox - pad_l + kw]
//
// This is the forward correlation with roles changed: the kernel taps are the results, the
// output-gradient tile plays the kernel. A block owns one channel and a fixed range of work items
// (output tile, image n); it stages Q items at a time, lane q of a warp on item q. Each thread
// owns RH x RW taps and one slice (split) of its item's rows and column chunks, so the slices
// cover each (tap, output) pair exactly once. Partial sums are combined in a fixed order -- threads of a
// block through shared memory, blocks through a workspace and a second kernel -- so the result
// is deterministic, and no partial sum runs over more than a few thousand terms, which keeps
// fp32 accumulation error far below 1e-5 relative.
#include <algorithm>

#include "dwconv_core.cuh"

namespace lkpatch {
namespace {

template <typename T, typename O>
struct WgradParams {
  const T* grad;  // grad_out, planes x OH x OW
  const T* in;    // planes x H x W
  O* dst;         // G x C x KH x KW fp32 partial sums, or (G == 1) grad_w itself
  DwShape s;
  int N;
  int TOH, TOW;         // output tile
  int tiles_x, tiles;   // tiles per plane
  int items_per_block;  // work items (tile, n) -- tile-major -- per block
  int TGX, TGY;         // tap groups across / down (each RH x RW taps)
  int SR, SC, Q;        // row splits, chunk splits, items staged at once (lane q takes item q)
  int rows_per_split, chunks_per_split;
  int a_rows, a_pitch, b_pitch;  // staged input rows and output-gradient tile (TOH rows)
  int slot_stride;               // floats per staged item
  int vec4;                      // 16-byte copies of the output-gradient tile (fp32, OW % 4 == 0, aligned)
};

template <typename T, typename O, int RH, int RW>
__global__ void __launch_bounds__(256, 3) dw_weight_grad(const WgradParams<T, O> p) {
  constexpr int CH = kChunk;
  extern __shared__ __align__(16) float smem[];
  const DwShape& s = p.s;
  const int c = blockIdx.x, g = blockIdx.y;
  const int ntg = p.TGX * p.TGY, nsplit = p.SR * p.SC;
  const int a_size = round_up(p.a_rows * p.a_pitch, 4);

  // Lane-fastest: consecutive threads take consecutive items (images) with the same taps.
  const int slot = threadIdx.x % p.Q;
  const int rest = threadIdx.x / p.Q;
  const int tg = rest % ntg, split = rest / ntg;
  const int kh0 = (tg / p.TGX) * RH, kw0 = (tg % p.TGX) * RW;
  const int sr = split / p.SC, sc = split - sr * p.SC;
  const bool active = split < nsplit;

  float acc[RH][RW];
#pragma unroll
  for (int r = 0; r < RH; ++r)
#pragma unroll
    for (int j = 0; j < RW; ++j) acc[r][j] = 0.f;

  const int item_begin = g * p.items_per_block;
  const int item_end = min(item_begin + p.items_per_block, p.N * p.tiles);
  for (int base = item_begin; base < item_end; base += p.Q) {
    const int nitems = min(p.Q, item_end - base);
    __syncthreads();  // the previous items are no longer being read
    // Stage each item: input rows (clipped to the image, zero columns around) and the
    // output-gradient tile (zero beyond the image).
    for (int q = 0; q < nitems; ++q) {
      const int item = base + q, tile = item / p.N, n = item - tile * p.N;
      const int oyT = (tile / p.tiles_x) * p.TOH, oxT = (tile % p.tiles_x) * p.TOW;
      const int toh = min(p.TOH, s.OH - oyT);
      const int64_t plane = (int64_t)n * s.C + c;
      float* A = smem + q * p.slot_stride;
      const int ry0 = max(0, oyT - s.pad_t);
      const int nrows = min(s.H, oyT - s.pad_t + p.TGY * RH + p.TOH - 1) - ry0;
      const T* x = p.in + plane * (int64_t)s.H * s.W;
      if (nrows > 0) stage_rows<T>(A, 0, p.a_pitch, 1, nrows, ry0, oxT - s.pad_l, s.W, s.W, [&](int) { return x; });
      const T* dy = p.grad + plane * (int64_t)s.OH * s.OW;
      stage_rows<T>(A + a_size, 0, p.b_pitch, 1, toh, oyT, oxT, s.OW, min(s.OW, oxT + p.TOW), [&](int) { return dy; },
                    p.vec4);
    }
    copy_async_wait();
    __syncthreads();
    if (!active || slot >= nitems) continue;

    const int tile = (base + slot) / p.N;
    const int oyT = (tile / p.tiles_x) * p.TOH, oxT = (tile % p.tiles_x) * p.TOW;
    const int toh = min(p.TOH, s.OH - oyT), tow = min(p.TOW, s.OW - oxT);
    // d indexes input rows from oyT - pad_t + kh0 (output-gradient row d - r for tap row r);
    // k indexes output-gradient columns. This thread takes its split of both.
    const int d_lo = max(max(0, sr * p.rows_per_split), s.pad_t - kh0 - oyT);
    const int d_hi = min(min(toh + RH - 1, (sr + 1) * p.rows_per_split), s.pad_t - kh0 - oyT + s.H);
    const int c_lo = max(sc * p.chunks_per_split, max(0, s.pad_l - kw0 - oxT - RW + 1) / CH);
    const int c_hi = min((sc + 1) * p.chunks_per_split, ceil_div(min(tow, s.pad_l - kw0 - oxT + s.W), CH));
    if (d_hi > d_lo && c_hi > c_lo) {
      const float* A = smem + slot * p.slot_stride;
      const int ry0 = max(0, oyT - s.pad_t);
      correlate<RH, RW, CH>(acc, A + (oyT - s.pad_t + kh0 - ry0) * p.a_pitch + kw0 + c_lo * CH, p.a_pitch,
                            A + a_size + c_lo * CH, p.b_pitch, toh, d_lo, d_hi, c_hi - c_lo);
    }
  }

  // Sum the Q x splits partial results of each tap in a fixed order.
  __syncthreads();
  float* red = smem;
#pragma unroll
  for (int r = 0; r < RH; ++r)
#pragma unroll
    for (int j = 0; j < RW; ++j) red[(r * RW + j) * blockDim.x + threadIdx.x] = acc[r][j];
  __syncthreads();
  const int taps = ntg * RH * RW;
  for (int i = threadIdx.x; i < taps; i += blockDim.x) {
    const int e = i / ntg, tgi = i - e * ntg;
    const int kh = (tgi / p.TGX) * RH + e / RW, kw = (tgi % p.TGX) * RW + e % RW;
    if (kh >= s.KH || kw >= s.KW) continue;
    float sum = 0.f;
    for (int part = 0; part < nsplit; ++part)
      for (int q = 0; q < p.Q; ++q) sum += red[e * blockDim.x + (part * ntg + tgi) * p.Q + q];
    p.dst[((int64_t)g * s.C + c) * s.KH * s.KW + kh * s.KW + kw] = from_float<O>(sum);
  }
}

constexpr int kRH = 4, kRW = 8;
constexpr size_t kSmemBudget = 96 * 1024;
constexpr int kMaxChain = 4096;  // most multiply-adds one thread's partial sum may take

struct WgradPlan {
  WgradParams<float, float> p;  // the shape fields; pointers are set per type
  int G;
  size_t smem;
  int threads;
};

WgradPlan plan_weight_grad(const DwShape& s, const DeviceLimits& lim) {
  WgradPlan plan{};
  auto& p = plan.p;
  p.s = s;
  p.N = (int)(s.planes / s.C);
  p.TOH = std::min(s.OH, 64);
  p.TOW = std::min(s.OW, 64);
  p.tiles_x = ceil_div(s.OW, p.TOW);
  p.tiles = p.tiles_x * ceil_div(s.OH, p.TOH);
  p.TGY = ceil_div(s.KH, kRH);
  p.TGX = ceil_div(s.KW, kRW);
  const int ntg = p.TGX * p.TGY;
  p.a_rows = std::max(1, std::min(s.H, p.TGY * kRH + p.TOH - 1));
  p.b_pitch = round_up(p.TOW, kChunk);
  p.a_pitch = p.TGX * kRW + p.b_pitch;
  p.slot_stride = plane_stride(round_up(p.a_rows * p.a_pitch, 4) + p.TOH * p.b_pitch);
  const int items = p.N * p.tiles;
  // Items in the lanes first (a warp then walks the same taps of different images), as many as
  // the threads and shared memory allow; then split each item's rows, then its column chunks.
  const int budget = (int)(kSmemBudget / sizeof(float));
  p.Q = std::max(1, std::min({256 / ntg, budget / p.slot_stride, items, 32}));
  const int drange = p.TOH + kRH - 1, nchunks = ceil_div(p.TOW, kChunk);
  // Split each item's rows and chunks into as many slices as the block has room for; among
  // equal counts, keep chunks together (a row's window loads then serve all of its chunks).
  const int max_split = std::max(1, 256 / (ntg * p.Q));
  int best = 0;
  for (int cps = nchunks; cps >= 1; --cps) {
    const int sc = ceil_div(nchunks, cps);
    for (int rps = 1; rps <= drange; ++rps) {
      const int sr = ceil_div(drange, rps);
      if (sr * sc <= max_split && sr * sc > best) {
        best = sr * sc;
        p.rows_per_split = rps;
        p.chunks_per_split = cps;
      }
    }
  }
  p.SR = ceil_div(drange, p.rows_per_split);
  p.SC = ceil_div(nchunks, p.chunks_per_split);
  plan.threads = round_up(p.Q * ntg * p.SR * p.SC, 32);
  plan.smem = sizeof(float) * std::max<size_t>((size_t)p.slot_stride * p.Q, (size_t)kRH * kRW * plan.threads);
  // Enough blocks to fill the GPU, and partial sums no longer than kMaxChain multiply-adds.
  const int64_t chain_per_round = (int64_t)p.rows_per_split * p.chunks_per_split * kChunk;
  const int64_t rounds_cap = std::max<int64_t>(1, kMaxChain / chain_per_round);
  int G = std::max(1, ceil_div(4 * lim.sms, s.C));
  G = (int)std::max<int64_t>(G, ceil_div(items, (int)std::min<int64_t>(rounds_cap * p.Q, items)));
  G = std::min(G, items);
  p.items_per_block = ceil_div(items, G);
  plan.G = ceil_div(items, p.items_per_block);
  return plan;
}

template <typename T, typename O>
cudaError_t launch_weight_grad(const WgradPlan& plan, const T* grad_out, const T* in, O* dst, cudaStream_t stream) {
  WgradParams<T, O> p{};
  const auto& q = plan.p;
  p.grad = grad_out; p.in = in; p.dst = dst; p.s = q.s; p.N = q.N; p.TOH = q.TOH; p.TOW = q.TOW;
  p.tiles_x = q.tiles_x; p.tiles = q.tiles; p.items_per_block = q.items_per_block; p.TGX = q.TGX; p.TGY = q.TGY;
  p.SR = q.SR; p.SC = q.SC; p.Q = q.Q; p.rows_per_split = q.rows_per_split; p.chunks_per_split = q.chunks_per_split;
  p.a_rows = q.a_rows; p.a_pitch = q.a_pitch; p.b_pitch = q.b_pitch; p.slot_stride = q.slot_stride;
  p.vec4 = std::is_same_v<T, float> && q.s.OW % 4 == 0 && reinterpret_cast<uintptr_t>(grad_out) % 16 == 0;
  return launch(dw_weight_grad<T, O, kRH, kRW>, dim3(q.s.C, plan.G), dim3(plan.threads), plan.smem, stream, p);
}

}  // namespace

size_t dwconv2d_fma_weight_grad_workspace(const DwShape& s) {
  if (use_small_map(dwconv2d_small_weight_grad_fits(s), s)) return dwconv2d_small_weight_grad_workspace(s);
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess) return 0;
  const WgradPlan plan = plan_weight_grad(s, lim);
  return plan.G > 1 ? sizeof(float) * plan.G * (size_t)s.C * s.KH * s.KW : 0;
}

cudaError_t dwconv2d_fma_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                     const DwShape& s, cudaStream_t stream) {
  if (s.nhwc) return cudaErrorInvalidValue;
  if (use_small_map(dwconv2d_small_weight_grad_fits(s), s)) return dwconv2d_small_weight_grad(t, grad_out, in, grad_w, workspace, s, stream);
  DeviceLimits lim;
  cudaError_t err = device_limits(&lim);
  if (err != cudaSuccess) return err;
  const WgradPlan plan = plan_weight_grad(s, lim);
  if (plan.smem > (size_t)lim.max_smem_optin || plan.G > 65535) return cudaErrorInvalidConfiguration;
  if (plan.G > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t n_w = (int64_t)s.C * s.KH * s.KW;
  return with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad_out);
    const T* x = static_cast<const T*>(in);
    if (plan.G == 1) return launch_weight_grad<T, T>(plan, g, x, static_cast<T*>(grad_w), stream);
    cudaError_t e = launch_weight_grad<T, float>(plan, g, x, workspace, stream);
    if (e != cudaSuccess) return e;
    return sum_partials(workspace, static_cast<T*>(grad_w), plan.G, n_w, stream);
  });
}

}  // namespace lkpatch
