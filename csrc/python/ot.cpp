// kernelkit._C bindings of the ot family (csrc/include/kernelkit/ot.h): pointers as ints, the GIL
// released around CPU kernels.  The cost crosses as a tuple of its ten fields in struct order
// (kind, dim, p, matrix, ld, batch_stride, x, x_batch_stride, y, y_batch_stride); the other arguments
// follow the C functions exactly.
#include <pybind11/stl.h>

#include <cstdint>
#include <tuple>

#include "bindings.h"

namespace kkpy {

namespace {
using Cost = std::tuple<int64_t, int64_t, double, uintptr_t, int64_t, int64_t, uintptr_t, int64_t, uintptr_t,
                        int64_t>;

kk_ot_cost to_cost(const Cost& t) {
  // The 32-bit fields: a value that does not fit becomes an invalid one the library rejects.
  auto i32 = [](int64_t x) { return (x < INT32_MIN || x > INT32_MAX) ? int32_t(-1) : int32_t(x); };
  kk_ot_cost c;
  c.kind = i32(std::get<0>(t));
  c.dim = i32(std::get<1>(t));
  c.p = std::get<2>(t);
  c.matrix = cptr(std::get<3>(t));
  c.ld = std::get<4>(t);
  c.batch_stride = std::get<5>(t);
  c.x = cptr(std::get<6>(t));
  c.x_batch_stride = std::get<7>(t);
  c.y = cptr(std::get<8>(t));
  c.y_batch_stride = std::get<9>(t);
  return c;
}

inline int32_t* iptr(uintptr_t p) { return reinterpret_cast<int32_t*>(p); }
inline const int32_t* ciptr(uintptr_t p) { return reinterpret_cast<const int32_t*>(p); }
}  // namespace

void bind_ot(py::module_& m) {
  using I = int64_t;
  using P = uintptr_t;
  auto dt = [](int d) { return static_cast<kk_dtype>(d); };

  // ---- CPU --------------------------------------------------------------------------------------
  m.def("ot_sinkhorn_step_cpu", [=](int dtype, const Cost& cost, I batch, I n, I mm, int32_t axis, double reg,
                                    P w, P other, P pot, P pot_new, P err, int32_t err_norm, int32_t nthreads) {
    kk_ot_cost c = to_cost(cost);
    cpu_call([&] {
      return kk_ot_sinkhorn_step_cpu(dt(dtype), &c, batch, n, mm, axis, reg, cptr(w), cptr(other), cptr(pot),
                                     mptr(pot_new), mptr(err), err_norm, nthreads);
    });
  });
  m.def("ot_marginals_cpu", [=](int dtype, const Cost& cost, I batch, I n, I mm, double reg, P f, P g, P a, P b,
                                P wr, P wc, P r, P c_, P obj, int32_t nthreads) {
    kk_ot_cost c = to_cost(cost);
    cpu_call([&] {
      return kk_ot_marginals_cpu(dt(dtype), &c, batch, n, mm, reg, cptr(f), cptr(g), cptr(a), cptr(b), cptr(wr),
                                 cptr(wc), mptr(r), mptr(c_), mptr(obj), nthreads);
    });
  });
  m.def("ot_plan_cpu", [=](int dtype, const Cost& cost, I batch, I n, I mm, double reg, P f, P g, P plan, I ldp,
                           int32_t nthreads) {
    kk_ot_cost c = to_cost(cost);
    cpu_call([&] {
      return kk_ot_plan_cpu(dt(dtype), &c, batch, n, mm, reg, cptr(f), cptr(g), mptr(plan), ldp, nthreads);
    });
  });
  m.def("ot_sparsify_cpu", [=](int dtype, const Cost& cost, I batch, I n, I mm, I k, double reg, P f, P g,
                               P cols, P vals, int32_t nthreads) {
    kk_ot_cost c = to_cost(cost);
    cpu_call([&] {
      return kk_ot_sparsify_cpu(dt(dtype), &c, batch, n, mm, k, reg, cptr(f), cptr(g), iptr(cols), mptr(vals),
                                nthreads);
    });
  });
  m.def("ot_hvp_cpu", [=](int dtype, I batch, I n, I mm, I k, P cols, P vals, P r, P c, double shift, P vx,
                          P vy, P yx, P yy, int32_t nthreads) {
    cpu_call([&] {
      return kk_ot_hvp_cpu(dt(dtype), batch, n, mm, k, ciptr(cols), cptr(vals), cptr(r), cptr(c), shift,
                           cptr(vx), cptr(vy), mptr(yx), mptr(yy), nthreads);
    });
  });
  m.def("ot_cg_cpu", [=](int dtype, I batch, I n, I mm, I k, P cols, P vals, P r, P c, double shift, P rx,
                         P ry, P zx, P zy, double tol, int32_t max_iter, P iters, P resid, int32_t nthreads) {
    cpu_call([&] {
      return kk_ot_cg_cpu(dt(dtype), batch, n, mm, k, ciptr(cols), cptr(vals), cptr(r), cptr(c), shift,
                          cptr(rx), cptr(ry), mptr(zx), mptr(zy), tol, max_iter, iptr(iters), mptr(resid),
                          nthreads);
    });
  });
  m.def("ot_points_grad_cpu", [=](int dtype, const Cost& cost, I batch, I n, I mm, double reg, P f, P g,
                                  P scale, P u, P v, P dx, P dy, int32_t nthreads) {
    kk_ot_cost c = to_cost(cost);
    cpu_call([&] {
      return kk_ot_points_grad_cpu(dt(dtype), &c, batch, n, mm, reg, cptr(f), cptr(g), cptr(scale), cptr(u),
                                   cptr(v), mptr(dx), mptr(dy), nthreads);
    });
  });

  // ---- CUDA (stream as an int) --------------------------------------------------------------------
  m.def("ot_sinkhorn_step_cuda", [=](int dtype, const Cost& cost, I batch, I n, I mm, int32_t axis, double reg,
                                     P w, P other, P pot, P pot_new, P err, int32_t err_norm, P stream) {
    kk_ot_cost c = to_cost(cost);
    check_cuda(cuda_fn(kk_ot_sinkhorn_step_cuda)(dt(dtype), &c, batch, n, mm, axis, reg, cptr(w), cptr(other),
                                                 cptr(pot), mptr(pot_new), mptr(err), err_norm, mptr(stream)));
  });
  m.def("ot_marginals_cuda", [=](int dtype, const Cost& cost, I batch, I n, I mm, double reg, P f, P g, P a,
                                 P b, P wr, P wc, P r, P c_, P obj, P stream) {
    kk_ot_cost c = to_cost(cost);
    check_cuda(cuda_fn(kk_ot_marginals_cuda)(dt(dtype), &c, batch, n, mm, reg, cptr(f), cptr(g), cptr(a),
                                             cptr(b), cptr(wr), cptr(wc), mptr(r), mptr(c_), mptr(obj),
                                             mptr(stream)));
  });
  m.def("ot_plan_cuda", [=](int dtype, const Cost& cost, I batch, I n, I mm, double reg, P f, P g, P plan, I ldp,
                            P stream) {
    kk_ot_cost c = to_cost(cost);
    check_cuda(cuda_fn(kk_ot_plan_cuda)(dt(dtype), &c, batch, n, mm, reg, cptr(f), cptr(g), mptr(plan), ldp,
                                        mptr(stream)));
  });
  m.def("ot_sparsify_cuda", [=](int dtype, const Cost& cost, I batch, I n, I mm, I k, double reg, P f, P g,
                                P cols, P vals, P stream) {
    kk_ot_cost c = to_cost(cost);
    check_cuda(cuda_fn(kk_ot_sparsify_cuda)(dt(dtype), &c, batch, n, mm, k, reg, cptr(f), cptr(g), iptr(cols),
                                            mptr(vals), mptr(stream)));
  });
  m.def("ot_hvp_cuda", [=](int dtype, I batch, I n, I mm, I k, P cols, P vals, P r, P c, double shift, P vx,
                           P vy, P yx, P yy, P stream) {
    check_cuda(cuda_fn(kk_ot_hvp_cuda)(dt(dtype), batch, n, mm, k, ciptr(cols), cptr(vals), cptr(r), cptr(c),
                                       shift, cptr(vx), cptr(vy), mptr(yx), mptr(yy), mptr(stream)));
  });
  m.def("ot_cg_cuda_workspace_size", [=](int dtype, I batch, I n, I mm) {
    int64_t bytes = 0;
    check_cuda(cuda_fn(kk_ot_cg_cuda_workspace_size)(dt(dtype), batch, n, mm, &bytes));
    return bytes;
  });
  m.def("ot_cg_cuda", [=](int dtype, I batch, I n, I mm, I k, P cols, P vals, P r, P c, double shift, P rx,
                          P ry, P zx, P zy, double tol, int32_t max_iter, P iters, P resid, P ws, I ws_bytes,
                          P stream) {
    kk_status st;
    {
      py::gil_scoped_release nogil;  // it synchronizes the stream
      st = cuda_fn(kk_ot_cg_cuda)(dt(dtype), batch, n, mm, k, ciptr(cols), cptr(vals), cptr(r), cptr(c), shift,
                                  cptr(rx), cptr(ry), mptr(zx), mptr(zy), tol, max_iter, iptr(iters),
                                  mptr(resid), mptr(ws), ws_bytes, mptr(stream));
    }
    check_cuda(st);
  });
  m.def("ot_points_grad_cuda", [=](int dtype, const Cost& cost, I batch, I n, I mm, double reg, P f, P g,
                                   P scale, P u, P v, P dx, P dy, P stream) {
    kk_ot_cost c = to_cost(cost);
    check_cuda(cuda_fn(kk_ot_points_grad_cuda)(dt(dtype), &c, batch, n, mm, reg, cptr(f), cptr(g), cptr(scale),
                                               cptr(u), cptr(v), mptr(dx), mptr(dy), mptr(stream)));
  });
}

}  // namespace kkpy
