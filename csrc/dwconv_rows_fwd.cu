// Launchers of the rows family's forward / input-gradient (dwconv_rows.cuh): fp16, bf16, TF32.
#include "dwconv_rows.cuh"

namespace lkpatch {
namespace {

using rows::FwdParams;
using rows::FwdPlan;

template <typename T, bool NHWC, int FS>
cudaError_t launch_forward(const FwdParams<T>& p, const FwdPlan& q, cudaStream_t stream) {
  const dim3 grid(ceil_div(p.s.C, q.CG), q.tiles_x * q.tiles_y, p.N);
  if constexpr (FS != 0) {
    if (q.steps > 1)
      return launch(rows::dw_rows_forward<T, NHWC, FS, true>, grid, dim3(32 * rows::kWarps), q.smem, stream, p);
  }
  return launch(rows::dw_rows_forward<T, NHWC, FS, false>, grid, dim3(32 * rows::kWarps), q.smem, stream, p);
}

// The k-step counts of rows::fixed_k_steps fixed at compile time, the others up to kMaxSteps at
// run time.
template <typename T, bool NHWC>
cudaError_t forward_steps(const FwdParams<T>& p, const FwdPlan& q, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    if (q.S == 2) return launch_forward<T, NHWC, 2>(p, q, stream);
    if (q.S == 5) return launch_forward<T, NHWC, 5>(p, q, stream);
  } else {
    if (q.S == 1) return launch_forward<T, NHWC, 1>(p, q, stream);
    if (q.S == 2) return launch_forward<T, NHWC, 2>(p, q, stream);
    if (q.S == 3) return launch_forward<T, NHWC, 3>(p, q, stream);
  }
  return launch_forward<T, NHWC, 0>(p, q, stream);
}

}  // namespace

bool dwconv2d_rows_forward_fits(DType t, const DwShape& s) {
  if (t == DType::f32 || !tensor_cores_enabled()) return false;
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess || lim.cc_major < 8) return false;
  const FwdPlan q = rows::plan_forward(s, (int)elem_bytes(t), lim);
  const int64_t N = s.planes / s.C;
  return N <= 65535 && (int64_t)q.tiles_x * q.tiles_y <= 65535 && q.smem <= (size_t)lim.max_smem_optin;
}

double dwconv2d_rows_forward_staged(DType t, const DwShape& s) {
  const FwdPlan q = rows::plan_forward(s, (int)elem_bytes(t), limits_or_none());
  const double others = (double)ceil_div(s.C, q.CG) * q.tiles_x * (double)(s.planes / s.C);
  // each strip's first tile row stages its halo too, the others their TH rows
  const int th = 16 * q.MT, row_tiles = ceil_div(s.OH, th);
  const double rows = (double)q.tiles_y * q.rows + (double)(row_tiles - q.tiles_y) * th;
  return others * q.CG * (rows * q.cols + q.tiles_y * (q.table ? (double)s.KH * q.band : 0.0));
}

cudaError_t dwconv2d_rows_forward(DType t, const void* in, const void* w, const void* bias, void* out,
                                  const DwShape& s, bool flip_kernel, cudaStream_t stream) {
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (t == DType::f32) return cudaErrorInvalidValue;  // exact fp32 runs on CUDA cores
    constexpr int E = rows::kVec<T>;
    const FwdPlan q = rows::plan_forward(s, sizeof(T), limits_or_none());
    FwdParams<T> p{};
    p.set(static_cast<const T*>(in), static_cast<const T*>(w), static_cast<const T*>(bias), static_cast<T*>(out), s,
          flip_kernel);
    p.CG = q.CG; p.MT = q.MT; p.NG = q.NG; p.S = q.S; p.sh = q.sh;
    p.rows = q.rows; p.cols = q.cols; p.pitch = q.pitch; p.opitch = q.opitch; p.tiles_x = q.tiles_x;
    p.band = q.band; p.obytes = q.obytes; p.xbytes = q.xbytes; p.steps = q.steps;
    const uintptr_t ia = reinterpret_cast<uintptr_t>(in), oa = reinterpret_cast<uintptr_t>(out);
    if (s.nhwc) {  // pixel vectors of CG channels
      const int vb = q.CG * (int)sizeof(T);
      p.vec = s.C % q.CG == 0 && ia % vb == 0;
      p.ovec = s.C % q.CG == 0 && oa % vb == 0;
      return forward_steps<T, true>(p, q, stream);
    }
    // Copies start at image column ox0 - pad_l - sh (ox0 a multiple of 8): aligned where the row
    // length, that offset and the base all are.
    const int64_t lead = 16 - ((int64_t)(s.pad_l + q.sh) * (int64_t)sizeof(T)) % 16;
    p.vec = copy_bytes((int64_t)s.W * sizeof(T), ia, lead);
    p.ovec = s.OW % E == 0 && oa % 16 == 0;
    return forward_steps<T, false>(p, q, stream);
  });
}

}  // namespace lkpatch
