// ot: the log-domain Sinkhorn half-step, the plan's marginals / dual objective and the point-cloud
// gradient (kk_ot_{sinkhorn_step,marginals,points_grad}_{cpu,cuda}).  Each op has two targets: "_m"
// takes a dense cost matrix (Bc, n, m), "_p" two point clouds x (Bc, n, D), y (Bc, m, D) with the
// cost computed on the fly; Bc is 1 (one cost shared by the batch: batch stride 0) or B.
//   kernelkit_ot_step_{m,p}:        cost, w (B, L), other (B, L'), pot (B, L) -> pot_new (B, L), err (B)
//                                   attrs kind, p, axis, reg, err_norm, has_pot (0: pot is a dummy, err
//                                   is left unwritten)
//   kernelkit_ot_marginals_{m,p}:   cost, f (B, n), g (B, m), a, b, wr (B, n), wc (B, m)
//                                   -> r (B, n), c (B, m), obj (B); attrs kind, p, reg, flags
//                                   (1: obj from a and b, 2: wr given, 4: wc given; else dummies)
//   kernelkit_ot_points_grad:       x, y, f, g, scale (B), u (B, n), v (B, m) -> dx (B, n, D), dy (B, m, D)
//                                   attrs kind, p, reg, flags (1 scale, 2 u, 4 v given)
#include "common.h"

namespace kkjax {
namespace {

constexpr int64_t kSerialWork = int64_t{1} << 15;  // as kernelkit.ot.ops: small problems on one thread

// The cost operands: a matrix, or x and y.  Checks the core dims against (n, m) and B and fills the
// parts of kk_ot_cost that do not depend on the batch element.
struct CostIn {
  const ffi::AnyBuffer* mat = nullptr;
  const ffi::AnyBuffer* x = nullptr;
  const ffi::AnyBuffer* y = nullptr;
  int64_t bc = 1, dim = 0;
  size_t first = 0;  // the index of the first cost operand in Lead
};

ffi::Error check_cost(CostIn& c, int32_t kind, int64_t B, int64_t n, int64_t m) {
  if (c.mat != nullptr) {
    if (kind != KK_OT_COST_MATRIX) return ffi::Error::InvalidArgument("kernelkit: ot: a matrix target needs kind 0");
    auto d = c.mat->dimensions();
    if (d.size() < 3) return ffi::Error::InvalidArgument("kernelkit: ot: the cost matrix must be (B, n, m)");
    const size_t k = d.size();
    c.bc = d[k - 3];
    if (d[k - 2] != n || d[k - 1] != m || (c.bc != 1 && c.bc != B))
      return ffi::Error::InvalidArgument("kernelkit: ot: the cost matrix's shape does not match the weights");
    return ffi::Error::Success();
  }
  if (kind == KK_OT_COST_MATRIX) return ffi::Error::InvalidArgument("kernelkit: ot: a point-cloud target needs kind 1..3");
  auto xd = c.x->dimensions(), yd = c.y->dimensions();
  if (xd.size() < 3 || yd.size() < 3) return ffi::Error::InvalidArgument("kernelkit: ot: x and y must be (B, n, D)");
  const size_t kx = xd.size(), ky = yd.size();
  c.bc = xd[kx - 3];
  c.dim = xd[kx - 1];
  if (yd[ky - 3] != c.bc || xd[kx - 2] != n || yd[ky - 2] != m || yd[ky - 1] != c.dim || (c.bc != 1 && c.bc != B))
    return ffi::Error::InvalidArgument("kernelkit: ot: x and y's shapes do not match the weights");
  return ffi::Error::Success();
}

bool add_cost(Lead& lead, CostIn& c) {
  c.first = 0;
  if (c.mat != nullptr) return lead.add(*c.mat, 3, "cost matrix");
  return lead.add(*c.x, 3, "x") && lead.add(*c.y, 3, "y");
}

int ncost(const CostIn& c) { return c.mat != nullptr ? 1 : 2; }

kk_ot_cost cost_at(const CostIn& c, const Lead& lead, int64_t b, int32_t kind, double p, int64_t n, int64_t m) {
  kk_ot_cost k{};
  k.kind = kind;
  k.p = p;
  if (c.mat != nullptr) {
    k.matrix = lead.ptr(0, b);
    k.ld = m > 0 ? m : 1;
    k.batch_stride = c.bc == 1 ? 0 : n * m;
  } else {
    k.dim = static_cast<int32_t>(c.dim);
    k.x = lead.ptr(0, b);
    k.x_batch_stride = c.bc == 1 ? 0 : n * c.dim;
    k.y = lead.ptr(1, b);
    k.y_batch_stride = c.bc == 1 ? 0 : m * c.dim;
  }
  return k;
}

// w / other / pot and friends: (B, L) core.
bool vec_dims(const ffi::AnyBuffer& v, int64_t* B, int64_t* L) {
  auto d = v.dimensions();
  if (d.size() < 2) return false;
  *B = d[d.size() - 2];
  *L = d[d.size() - 1];
  return true;
}

ffi::Error step_impl(CostIn c, const ffi::AnyBuffer& w, const ffi::AnyBuffer& other, const ffi::AnyBuffer& pot,
                     ffi::Result<ffi::AnyBuffer>& pot_new, ffi::Result<ffi::AnyBuffer>& err, int32_t kind, double p,
                     int32_t axis, double reg, int32_t err_norm, int32_t has_pot, void* stream) {
  (void)stream;
  kk_dtype dt;
  if (!to_kk(w.element_type(), &dt)) return dtype_error("ot_sinkhorn_step w");
  int64_t B, lw, Bo, lo;
  if (!vec_dims(w, &B, &lw) || !vec_dims(other, &Bo, &lo) || Bo != B)
    return ffi::Error::InvalidArgument("kernelkit: ot_sinkhorn_step: w and other must be (B, len)");
  if (axis != 0 && axis != 1) return ffi::Error::InvalidArgument("kernelkit: ot_sinkhorn_step: axis must be 0 or 1");
  const int64_t n = axis == 0 ? lw : lo, m = axis == 0 ? lo : lw;
  if (auto e = check_cost(c, kind, B, n, m); e.failure()) return e;
  Lead lead;
  if (!add_cost(lead, c) || !lead.add(w, 2, "w") || !lead.add(other, 2, "other") || !lead.add(pot, 2, "pot") ||
      !lead.add(pot_new, 2, "pot_new") || !lead.add(err, 1, "err"))
    return lead.as_error();
  const size_t i0 = static_cast<size_t>(ncost(c));
  for (int64_t b = 0; b < lead.count(); ++b) {
    kk_ot_cost k = cost_at(c, lead, b, kind, p, n, m);
    const void* pp = has_pot ? lead.ptr(i0 + 2, b) : nullptr;
    void* ep = has_pot ? lead.ptr(i0 + 4, b) : nullptr;
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_ot_sinkhorn_step_cuda(dt, &k, B, n, m, axis, reg, lead.ptr(i0, b), lead.ptr(i0 + 1, b), pp,
                                          lead.ptr(i0 + 3, b), ep, err_norm, stream),
                 "ot_sinkhorn_step");
#else
    KK_JAX_CHECK(kk_ot_sinkhorn_step_cpu(dt, &k, B, n, m, axis, reg, lead.ptr(i0, b), lead.ptr(i0 + 1, b), pp,
                                         lead.ptr(i0 + 3, b), ep, err_norm, threads_for(B * n * m, kSerialWork)),
                 "ot_sinkhorn_step");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error marg_impl(CostIn c, const ffi::AnyBuffer& f, const ffi::AnyBuffer& g, const ffi::AnyBuffer& a,
                     const ffi::AnyBuffer& bw, const ffi::AnyBuffer& wr, const ffi::AnyBuffer& wc,
                     ffi::Result<ffi::AnyBuffer>& r, ffi::Result<ffi::AnyBuffer>& col, ffi::Result<ffi::AnyBuffer>& obj,
                     int32_t kind, double p, double reg, int32_t flags, void* stream) {
  (void)stream;
  kk_dtype dt;
  if (!to_kk(f.element_type(), &dt)) return dtype_error("ot_marginals f");
  int64_t B, n, Bg, m;
  if (!vec_dims(f, &B, &n) || !vec_dims(g, &Bg, &m) || Bg != B)
    return ffi::Error::InvalidArgument("kernelkit: ot_marginals: f and g must be (B, n) and (B, m)");
  if (auto e = check_cost(c, kind, B, n, m); e.failure()) return e;
  Lead lead;
  if (!add_cost(lead, c) || !lead.add(f, 2, "f") || !lead.add(g, 2, "g") || !lead.add(a, 2, "a") ||
      !lead.add(bw, 2, "b") || !lead.add(wr, 2, "wr") || !lead.add(wc, 2, "wc") || !lead.add(r, 2, "r") ||
      !lead.add(col, 2, "c") || !lead.add(obj, 1, "obj"))
    return lead.as_error();
  const size_t i0 = static_cast<size_t>(ncost(c));
  const bool want_obj = flags & 1, has_wr = flags & 2, has_wc = flags & 4;
  for (int64_t b = 0; b < lead.count(); ++b) {
    kk_ot_cost k = cost_at(c, lead, b, kind, p, n, m);
    const void* ap = want_obj ? lead.ptr(i0 + 2, b) : nullptr;
    const void* bp = want_obj ? lead.ptr(i0 + 3, b) : nullptr;
    const void* wrp = has_wr ? lead.ptr(i0 + 4, b) : nullptr;
    const void* wcp = has_wc ? lead.ptr(i0 + 5, b) : nullptr;
    void* op = want_obj ? lead.ptr(i0 + 8, b) : nullptr;
#if KK_JAX_CUDA
    KK_JAX_CHECK(kk_ot_marginals_cuda(dt, &k, B, n, m, reg, lead.ptr(i0, b), lead.ptr(i0 + 1, b), ap, bp, wrp, wcp,
                                      lead.ptr(i0 + 6, b), lead.ptr(i0 + 7, b), op, stream),
                 "ot_marginals");
#else
    KK_JAX_CHECK(kk_ot_marginals_cpu(dt, &k, B, n, m, reg, lead.ptr(i0, b), lead.ptr(i0 + 1, b), ap, bp, wrp, wcp,
                                     lead.ptr(i0 + 6, b), lead.ptr(i0 + 7, b), op, threads_for(B * n * m, kSerialWork)),
                 "ot_marginals");
#endif
  }
  return ffi::Error::Success();
}

ffi::Error StepM(ffi::AnyBuffer mat, ffi::AnyBuffer w, ffi::AnyBuffer other, ffi::AnyBuffer pot,
                 ffi::Result<ffi::AnyBuffer> pot_new, ffi::Result<ffi::AnyBuffer> err, int32_t kind, double p,
                 int32_t axis, double reg, int32_t err_norm, int32_t has_pot KK_JAX_DEVICE_PARAMS) {
  CostIn c;
  c.mat = &mat;
  void* st = nullptr;
#if KK_JAX_CUDA
  st = stream;
  (void)scratch;
#endif
  return step_impl(c, w, other, pot, pot_new, err, kind, p, axis, reg, err_norm, has_pot, st);
}

ffi::Error StepP(ffi::AnyBuffer x, ffi::AnyBuffer y, ffi::AnyBuffer w, ffi::AnyBuffer other, ffi::AnyBuffer pot,
                 ffi::Result<ffi::AnyBuffer> pot_new, ffi::Result<ffi::AnyBuffer> err, int32_t kind, double p,
                 int32_t axis, double reg, int32_t err_norm, int32_t has_pot KK_JAX_DEVICE_PARAMS) {
  CostIn c;
  c.x = &x;
  c.y = &y;
  void* st = nullptr;
#if KK_JAX_CUDA
  st = stream;
  (void)scratch;
#endif
  return step_impl(c, w, other, pot, pot_new, err, kind, p, axis, reg, err_norm, has_pot, st);
}

ffi::Error MargM(ffi::AnyBuffer mat, ffi::AnyBuffer f, ffi::AnyBuffer g, ffi::AnyBuffer a, ffi::AnyBuffer b,
                 ffi::AnyBuffer wr, ffi::AnyBuffer wc, ffi::Result<ffi::AnyBuffer> r, ffi::Result<ffi::AnyBuffer> col,
                 ffi::Result<ffi::AnyBuffer> obj, int32_t kind, double p, double reg,
                 int32_t flags KK_JAX_DEVICE_PARAMS) {
  CostIn c;
  c.mat = &mat;
  void* st = nullptr;
#if KK_JAX_CUDA
  st = stream;
  (void)scratch;
#endif
  return marg_impl(c, f, g, a, b, wr, wc, r, col, obj, kind, p, reg, flags, st);
}

ffi::Error MargP(ffi::AnyBuffer x, ffi::AnyBuffer y, ffi::AnyBuffer f, ffi::AnyBuffer g, ffi::AnyBuffer a,
                 ffi::AnyBuffer b, ffi::AnyBuffer wr, ffi::AnyBuffer wc, ffi::Result<ffi::AnyBuffer> r,
                 ffi::Result<ffi::AnyBuffer> col, ffi::Result<ffi::AnyBuffer> obj, int32_t kind, double p, double reg,
                 int32_t flags KK_JAX_DEVICE_PARAMS) {
  CostIn c;
  c.x = &x;
  c.y = &y;
  void* st = nullptr;
#if KK_JAX_CUDA
  st = stream;
  (void)scratch;
#endif
  return marg_impl(c, f, g, a, b, wr, wc, r, col, obj, kind, p, reg, flags, st);
}

ffi::Error PointsGrad(ffi::AnyBuffer x, ffi::AnyBuffer y, ffi::AnyBuffer f, ffi::AnyBuffer g, ffi::AnyBuffer scale,
                      ffi::AnyBuffer u, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> dx,
                      ffi::Result<ffi::AnyBuffer> dy, int32_t kind, double p, double reg,
                      int32_t flags KK_JAX_DEVICE_PARAMS) {
  kk_dtype dt;
  if (!to_kk(x.element_type(), &dt)) return dtype_error("ot_points_grad x");
  int64_t B, n, Bg, m;
  if (!vec_dims(f, &B, &n) || !vec_dims(g, &Bg, &m) || Bg != B)
    return ffi::Error::InvalidArgument("kernelkit: ot_points_grad: f and g must be (B, n) and (B, m)");
  CostIn c;
  c.x = &x;
  c.y = &y;
  if (auto e = check_cost(c, kind, B, n, m); e.failure()) return e;
  Lead lead;
  if (!lead.add(x, 3, "x") || !lead.add(y, 3, "y") || !lead.add(f, 2, "f") || !lead.add(g, 2, "g") ||
      !lead.add(scale, 1, "scale") || !lead.add(u, 2, "u") || !lead.add(v, 2, "v") || !lead.add(dx, 3, "dx") ||
      !lead.add(dy, 3, "dy"))
    return lead.as_error();
  for (int64_t b = 0; b < lead.count(); ++b) {
    kk_ot_cost k = cost_at(c, lead, b, kind, p, n, m);
    const void* sp = (flags & 1) ? lead.ptr(4, b) : nullptr;
    const void* up = (flags & 2) ? lead.ptr(5, b) : nullptr;
    const void* vp = (flags & 4) ? lead.ptr(6, b) : nullptr;
#if KK_JAX_CUDA
    (void)scratch;
    KK_JAX_CHECK(kk_ot_points_grad_cuda(dt, &k, B, n, m, reg, lead.ptr(2, b), lead.ptr(3, b), sp, up, vp,
                                        lead.ptr(7, b), lead.ptr(8, b), stream),
                 "ot_points_grad");
#else
    KK_JAX_CHECK(kk_ot_points_grad_cpu(dt, &k, B, n, m, reg, lead.ptr(2, b), lead.ptr(3, b), sp, up, vp,
                                       lead.ptr(7, b), lead.ptr(8, b), threads_for(B * n * m * c.dim, kSerialWork)),
                 "ot_points_grad");
#endif
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kkjax

namespace ffi = xla::ffi;  // KK_JAX_DEVICE_CTX names ffi:: unqualified

#define KK_OT_STEP_ATTRS                                                                              \
  .Attr<int32_t>("kind").Attr<double>("p").Attr<int32_t>("axis").Attr<double>("reg").Attr<int32_t>( \
      "err_norm").Attr<int32_t>("has_pot")
#define KK_OT_MARG_ATTRS .Attr<int32_t>("kind").Attr<double>("p").Attr<double>("reg").Attr<int32_t>("flags")
#define KK_ARG .Arg<ffi::AnyBuffer>()
#define KK_RET .Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxOtStepM, kkjax::StepM,
                              ffi::Ffi::Bind() KK_ARG KK_ARG KK_ARG KK_ARG KK_RET KK_RET KK_OT_STEP_ATTRS
                                  KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxOtStepP, kkjax::StepP,
                              ffi::Ffi::Bind() KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_RET KK_RET KK_OT_STEP_ATTRS
                                  KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxOtMargM, kkjax::MargM,
                              ffi::Ffi::Bind() KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_RET KK_RET
                                  KK_RET KK_OT_MARG_ATTRS KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxOtMargP, kkjax::MargP,
                              ffi::Ffi::Bind() KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_RET
                                  KK_RET KK_RET KK_OT_MARG_ATTRS KK_JAX_DEVICE_CTX);
XLA_FFI_DEFINE_HANDLER_SYMBOL(KkJaxOtPointsGrad, kkjax::PointsGrad,
                              ffi::Ffi::Bind() KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_ARG KK_RET KK_RET
                                  KK_OT_MARG_ATTRS KK_JAX_DEVICE_CTX);
KK_JAX_TARGET("kernelkit_ot_step_m", KkJaxOtStepM);
KK_JAX_TARGET("kernelkit_ot_step_p", KkJaxOtStepP);
KK_JAX_TARGET("kernelkit_ot_marginals_m", KkJaxOtMargM);
KK_JAX_TARGET("kernelkit_ot_marginals_p", KkJaxOtMargP);
KK_JAX_TARGET("kernelkit_ot_points_grad", KkJaxOtPointsGrad);

#undef KK_ARG
#undef KK_RET
