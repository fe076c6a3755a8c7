// Launchers of the rows family's weight-gradient (dwconv_rows.cuh): fp16, bf16, TF32.
#include "dwconv_rows.cuh"

namespace lkpatch {
namespace {

using rows::WgradParams;
using rows::WgradPlan;

template <typename T, bool NHWC, int JT, int IT>
cudaError_t launch_weight_grad(const WgradParams<T>& p, const WgradPlan& q, cudaStream_t stream) {
  const dim3 grid(q.slices, ceil_div(p.s.C, q.CG), q.tiles_i * q.tiles_j);
  return launch(rows::dw_rows_weight_grad<T, NHWC, JT, IT>, grid, dim3(32 * rows::kWarps), q.smem, stream, p);
}

template <typename T, bool NHWC>
cudaError_t weight_grad_tiles(const WgradParams<T>& p, const WgradPlan& q, cudaStream_t stream) {
  return with_weight_grad_tiles(q.JT, q.IT, [&](auto jt, auto it) {
    return launch_weight_grad<T, NHWC, decltype(jt)::value, decltype(it)::value>(p, q, stream);
  });
}

}  // namespace

bool dwconv2d_rows_weight_grad_fits(DType t, const DwShape& s) {
  if (t == DType::f32 || !tensor_cores_enabled()) return false;
  DeviceLimits lim;
  if (device_limits(&lim) != cudaSuccess || lim.cc_major < 8) return false;
  const WgradPlan q = rows::plan_weight_grad(s, (int)elem_bytes(t), lim.sms);
  return ceil_div(s.C, q.CG) <= 65535 && q.tiles_i * q.tiles_j <= 65535 && q.smem <= (size_t)lim.max_smem_optin &&
         (int64_t)q.items < (1ll << 31);
}

double dwconv2d_rows_weight_grad_staged(DType t, const DwShape& s) {
  const WgradPlan q = rows::plan_weight_grad(s, (int)elem_bytes(t), sms_or_zero());
  // Input rows an item stages, over a column tile's bands and the kernel-row tiles: nq (its rows
  // at most), or, channels_last below the first band, the rows past the band above's (the ring),
  // except in the items that start a block's slice (one in per_slice).
  double x_rows = 0;
  for (int ti = 0; ti < q.tiles_i; ++ti) {
    const int i0 = ti * 8 * q.IT, kh = std::min(8 * q.IT, s.KH - i0);
    int kept_hi = -1;
    for (int band = 0; band < q.bands; ++band) {
      const int oy0 = band * q.BH, nrows = std::min(q.BH, s.OH - oy0);
      const rows::RowRange r = rows::weight_grad_input_rows(s, oy0, nrows, i0, kh);
      const int fresh = std::max(0, r.hi - std::max(r.lo, kept_hi));
      x_rows += s.nhwc && band > 0 ? fresh + (double)(q.nq - fresh) / q.per_slice : q.nq;
      kept_hi = r.hi;
    }
  }
  const double columns = (double)(q.items / q.bands) * ceil_div(s.C, q.CG) * q.tiles_j * q.CG;  // images x column tiles
  return columns * (q.tiles_i * (double)q.bands * q.BH * q.gpitch + x_rows * q.xw);
}

size_t dwconv2d_rows_weight_grad_workspace(DType t, const DwShape& s, bool with_bias) {
  const WgradPlan q = rows::plan_weight_grad(s, (int)elem_bytes(t), sms_or_zero());
  return slices_workspace_bytes(q.slices, s, with_bias);
}

cudaError_t dwconv2d_rows_weight_grad(DType t, const void* grad_out, const void* in, void* grad_w, float* workspace,
                                      const DwShape& s, cudaStream_t stream, void* grad_b) {
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const int sms = sms_or_zero();
  return with_dtype(t, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    if (t == DType::f32) return cudaErrorInvalidValue;  // exact fp32 runs on CUDA cores
    const WgradPlan q = rows::plan_weight_grad(s, sizeof(T), sms);
    WgradParams<T> p{};
    p.grad = static_cast<const T*>(grad_out);
    p.in = static_cast<const T*>(in);
    p.parts = workspace;
    p.bias_parts = grad_b ? slices_bias_parts(workspace, q.slices, s) : nullptr;
    p.s = s;
    p.N = (int)(s.planes / s.C);
    p.CG = q.CG; p.BH = q.BH; p.BW = q.BW; p.bands = q.bands; p.ctiles = q.ctiles; p.items = q.items;
    p.per_slice = q.per_slice; p.gpitch = q.gpitch; p.xw = q.xw; p.nq = q.nq; p.tiles_j = q.tiles_j;
    const uintptr_t ga = reinterpret_cast<uintptr_t>(grad_out), xa = reinterpret_cast<uintptr_t>(in);
    cudaError_t e;
    if (s.nhwc) {  // pixel vectors of CG channels
      const int vb = q.CG * (int)sizeof(T);
      p.gvec = s.C % q.CG == 0 && ga % vb == 0;
      p.xvec = s.C % q.CG == 0 && xa % vb == 0;
      e = weight_grad_tiles<T, true>(p, q, stream);
    } else {
      p.gvec = copy_bytes((int64_t)s.OW * sizeof(T), ga);
      p.xvec = copy_bytes((int64_t)s.W * sizeof(T), xa);
      e = weight_grad_tiles<T, false>(p, q, stream);
    }
    if (e != cudaSuccess) return e;
    return sum_slices(workspace, static_cast<T*>(grad_w), static_cast<T*>(grad_b), q.slices, s, stream);
  });
}

}  // namespace lkpatch
