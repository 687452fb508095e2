// oneDNN 3D convolutions for XLA:CPU through the XLA FFI (cgc_jax.onednn builds and loads this).
//
// Three handlers, float32, channels-last, stride 1, 'SAME' padding for odd kernels:
//   cgc_onednn_conv_fwd(x f32[N, X, Y, Z, Ci], w f32[KX, KY, KZ, Ci, Co]) -> y f32[N, X, Y, Z, Co]
//   cgc_onednn_conv_bwd_data(dy f32[N, X, Y, Z, Co], w) -> dx f32[N, X, Y, Z, Ci]
//   cgc_onednn_conv_bwd_weights(x, dy) -> dw f32[KX, KY, KZ, Ci, Co]
// The arithmetic is lax.conv_general_dilated's (NDHWC, DHWIO, 'SAME'); oneDNN chooses its own
// kernel (a JIT direct convolution on AVX2 / AVX-512 CPUs). Primitives are cached per shape.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Shape {
  int64_t n, x, y, z, ci, co, kx, ky, kz;
  bool operator<(const Shape& o) const {
    return std::tie(n, x, y, z, ci, co, kx, ky, kz) <
           std::tie(o.n, o.x, o.y, o.z, o.ci, o.co, o.kx, o.ky, o.kz);
  }
};

struct Prims {
  memory::desc src, wei, dst;  // the caller's layouts
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::primitive fwd, bwd_data, bwd_weights;
};

// The engine and the primitive cache live until the process ends and are never destroyed (static
// storage without destructors, so nothing depends on the order of teardown at exit).
dnnl::engine& Engine() {
  static auto* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

std::mutex mu;
auto* cache = new std::map<Shape, std::shared_ptr<Prims>>();

std::shared_ptr<Prims> Get(const Shape& s) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(s);
  if (it != cache->end()) return it->second;
  auto p = std::make_shared<Prims>();
  auto& eng = Engine();
  p->src = memory::desc({s.n, s.ci, s.x, s.y, s.z}, dt::f32, tag::ndhwc);
  p->dst = memory::desc({s.n, s.co, s.x, s.y, s.z}, dt::f32, tag::ndhwc);
  p->wei = memory::desc({s.co, s.ci, s.kx, s.ky, s.kz}, dt::f32, tag::dhwio);
  memory::desc wany({s.co, s.ci, s.kx, s.ky, s.kz}, dt::f32, tag::any);
  memory::dims strides = {1, 1, 1};
  memory::dims pad = {(s.kx - 1) / 2, (s.ky - 1) / 2, (s.kz - 1) / 2};
  // Each call brings its own scratch memory: XLA runs independent calls (a convolution's two
  // gradients) at the same time on its threads, and the library's shared scratchpad is not safe
  // for that.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, p->src, wany,
      p->dst, strides, pad, pad, attr);
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->src, wany, p->dst, strides, pad, pad,
      p->fwd_pd, attr);
  p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->src, wany, p->dst, strides, pad, pad,
      p->fwd_pd, attr);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
  cache->emplace(s, p);
  return p;
}

// The caller's weights in the layout primitive `want` asks for: the user memory itself, or a
// reordered copy kept alive by `holder` (filled now for an input; for an output, is_output, the
// caller reorders it back after the primitive ran).
memory Weights(const Prims& p, const memory::desc& want, float* data, dnnl::stream& st,
               bool is_output, std::unique_ptr<uint8_t[]>* holder) {
  auto& eng = Engine();
  memory user(p.wei, eng, data);
  if (want == p.wei) return user;
  holder->reset(new uint8_t[want.get_size() + 64]);
  memory m(want, eng, holder->get());
  if (!is_output) dnnl::reorder(user, m).execute(st, user, m);  // inputs: copied in now
  return m;
}

// Scratch memory for one execution of a primitive described by `pd`, kept alive by `holder`.
using Buf = std::unique_ptr<uint8_t[]>;  // uninitialised: oneDNN writes before it reads

memory Scratch(const dnnl::primitive_desc_base& pd, Buf* holder) {
  memory::desc d = pd.scratchpad_desc();
  holder->reset(new uint8_t[d.get_size() + 64]);
  return memory(d, Engine(), holder->get());
}

// Runs `prim` (described by `pd`) on `args` with scratch memory of its own, to the end.
void Execute(const dnnl::primitive& prim, const dnnl::primitive_desc_base& pd,
             std::unordered_map<int, memory> args, dnnl::stream& st) {
  Buf scratch;
  args.insert({DNNL_ARG_SCRATCHPAD, Scratch(pd, &scratch)});
  prim.execute(st, args);
  st.wait();
}

template <typename B>
Shape ShapeOf(const B& act, int64_t ci, int64_t co, const ffi::Span<const int64_t>& kd) {
  auto d = act.dimensions();
  return Shape{d[0], d[1], d[2], d[3], ci, co, kd[0], kd[1], kd[2]};
}

// Whether `act` [N, X, Y, Z, C] and the kernel dims `wd` [KX, KY, KZ, Ci, Co] (odd sizes) fit, with
// C the kernel's Ci (`channel` 3: an input or its gradient) or Co (4: an output's gradient), and
// `other` [N, X, Y, Z, C'] (when given) the same N, X, Y, Z with C' the kernel's other channel count.
template <typename B, typename D>
bool Fits(const B& act, const D& wd, int channel, const ffi::Span<const int64_t>* other) {
  auto d = act.dimensions();
  if (d.size() != 5 || wd.size() != 5 || wd[0] % 2 == 0 || wd[1] % 2 == 0 || wd[2] % 2 == 0 ||
      d[4] != wd[channel])
    return false;
  if (other == nullptr) return true;
  if (other->size() != 5 || (*other)[4] != wd[channel == 3 ? 4 : 3]) return false;
  for (int i = 0; i < 4; ++i)
    if ((*other)[i] != d[i]) return false;
  return true;
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (!Fits(x, wd, 3, &yd))
    return ffi::Error::InvalidArgument(
        "cgc_onednn_conv_fwd: x [N, X, Y, Z, Ci], an odd kernel [KX, KY, KZ, Ci, Co] and y "
        "[N, X, Y, Z, Co] expected");
  Shape s = ShapeOf(x, wd[3], wd[4], wd);
  auto p = Get(s);
  dnnl::stream st(Engine());
  Buf hold;
  memory wm = Weights(*p, p->fwd_pd.weights_desc(), w.typed_data(), st, false, &hold);
  memory xm(p->src, Engine(), x.typed_data()), ym(p->dst, Engine(), y->typed_data());
  Execute(p->fwd, p->fwd_pd, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}}, st);
  return ffi::Error::Success();
}

ffi::Error BwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> dx) {
  auto wd = w.dimensions();
  auto dxd = dx->dimensions();
  if (!Fits(dy, wd, 4, &dxd))
    return ffi::Error::InvalidArgument(
        "cgc_onednn_conv_bwd_data: dy [N, X, Y, Z, Co], an odd kernel [KX, KY, KZ, Ci, Co] and dx "
        "[N, X, Y, Z, Ci] expected");
  Shape s = ShapeOf(dy, wd[3], wd[4], wd);
  auto p = Get(s);
  dnnl::stream st(Engine());
  Buf hold;
  memory wm = Weights(*p, p->bwd_data_pd.weights_desc(), w.typed_data(), st, false, &hold);
  memory dym(p->dst, Engine(), dy.typed_data()), dxm(p->src, Engine(), dx->typed_data());
  Execute(p->bwd_data, p->bwd_data_pd,
          {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm}}, st);
  return ffi::Error::Success();
}

ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw) {
  auto wd = dw->dimensions();
  auto dyd = dy.dimensions();
  if (!Fits(x, wd, 3, &dyd))
    return ffi::Error::InvalidArgument(
        "cgc_onednn_conv_bwd_weights: x [N, X, Y, Z, Ci], dy [N, X, Y, Z, Co] and an odd kernel "
        "gradient [KX, KY, KZ, Ci, Co] expected");
  Shape s = ShapeOf(x, wd[3], wd[4], wd);
  auto p = Get(s);
  dnnl::stream st(Engine());
  Buf hold;
  memory user(p->wei, Engine(), dw->typed_data());
  memory wm = Weights(*p, p->bwd_weights_pd.diff_weights_desc(), dw->typed_data(), st, true,
                      &hold);
  memory xm(p->src, Engine(), x.typed_data()), dym(p->dst, Engine(), dy.typed_data());
  Execute(p->bwd_weights, p->bwd_weights_pd,
          {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, wm}}, st);
  if (wm.get_data_handle() != user.get_data_handle()) {
    dnnl::reorder(wm, user).execute(st, wm, user);
    st.wait();
  }
  return ffi::Error::Success();
}

// oneDNN reports failures as exceptions, which must not cross into XLA: an error result instead.
template <typename F>
ffi::Error Guard(const char* what, F f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(what) + ": " + e.what());
  }
}

ffi::Error FwdSafe(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y) {
  return Guard("cgc_onednn_conv_fwd", [&] { return Fwd(x, w, y); });
}
ffi::Error BwdDataSafe(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> dx) {
  return Guard("cgc_onednn_conv_bwd_data", [&] { return BwdData(dy, w, dx); });
}
ffi::Error BwdWeightsSafe(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw) {
  return Guard("cgc_onednn_conv_bwd_weights", [&] { return BwdWeights(x, dy, dw); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(cgc_onednn_conv_fwd, FwdSafe,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cgc_onednn_conv_bwd_data, BwdDataSafe,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(cgc_onednn_conv_bwd_weights, BwdWeightsSafe,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
