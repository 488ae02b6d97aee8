// Depthwise convolution on CPU, channels last: XLA FFI handlers.
//
// jaxfactor's "native" depthwise lowering (see `jaxfactor/_native/__init__.py`,
// which compiles this file with the machine's C++ compiler the first time it
// is used). Three bilinear maps close under differentiation:
//
//   forward      y[b, o, c]  = sum_k x[b, o*s + k*d - p, c] * w[k, c]
//   input grad   dx[b, i, c] = sum_{k, o: o*s + k*d - p = i} g[b, o, c]
//                                                               * w[k, c]
//   weight grad  dw[k, c]    = sum_{b, o} x[b, o*s + k*d - p, c] * g[b, o, c]
//
// Positions outside the input are zeros (other padding modes are padded into
// the input by the caller). Arrays are rank 5: [batch, 3 spatial axes,
// channels] for x, y, g and dx, [3 spatial axes, channels] for w and dw
// (fewer spatial axes come as size-1 axes). Channels are the innermost,
// contiguous axis: the forward pass and the input gradient sum each output's
// taps in blocks of up to 64 channels held in vector registers; the weight
// gradient's channel loop is vectorized by the compiler. Every output element
// is computed by one thread in a fixed order, and the weight gradient's
// partial sums over fixed slices of the rows are added in a fixed order, so
// results do not depend on scheduling (the slices depend on the thread
// count: the weight gradient's rounding may differ between machines).

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t batch, channels;
  int64_t in[3], out[3], window[3];
  int64_t stride[3], dilation[3], pad[3];
};

// Runs `body(item)` for item in [0, items) on the caller and up to
// `threads - 1` pool threads, and returns when every item is done. Items are
// claimed from a shared counter; a pool task that starts late finds none
// left and returns (the shared state outlives this call), so the caller
// never waits on a task that has not started.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  const int64_t total = items;
  // `body` is only used by a task that claims an item, which happens before
  // `done` reaches `total`, that is before this function returns.
  auto work = [state, total, body_ptr = &body] {
    int64_t finished = 0;
    for (int64_t item; (item = state->next.fetch_add(1)) < total;) {
      (*body_ptr)(item);
      ++finished;
    }
    if (finished && state->done.fetch_add(finished) + finished == total) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->finished.notify_all();
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, items); ++t) {
    pool.Schedule(decltype(work)(work));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == total; });
}

// The input index that output `o` reads through tap `k` on axis `a`, or -1
// outside the input.
inline int64_t InputIndex(const Geometry& g, int a, int64_t o, int64_t k) {
  const int64_t i = o * g.stride[a] + k * g.dilation[a] - g.pad[a];
  return (i >= 0 && i < g.in[a]) ? i : -1;
}

// The output index that input `i` reaches through tap `k`, or -1.
inline int64_t OutputIndex(const Geometry& g, int a, int64_t i, int64_t k) {
  const int64_t t = i + g.pad[a] - k * g.dilation[a];
  if (t < 0 || t % g.stride[a] != 0) return -1;
  const int64_t o = t / g.stride[a];
  return o < g.out[a] ? o : -1;
}

// 64-byte vectors (GCC/Clang vector extensions), unaligned loads and stores.
template <typename T>
struct Vec {
  typedef T V __attribute__((vector_size(64)));
  typedef T U __attribute__((vector_size(64), aligned(sizeof(T)), may_alias));
  static constexpr int64_t kLanes = 64 / sizeof(T);
  static V Load(const T* p) { return *reinterpret_cast<const U*>(p); }
  static void Store(T* p, V v) { *reinterpret_cast<U*>(p) = v; }
};

// out[c] = sum over the n taps of ins[t][c] * ws[t][c], for c < C: channels
// in blocks of 4 vectors (then 1, then scalars) whose sums stay in
// registers across the taps.
template <typename T>
inline void TapSum(int64_t n, const T* const* ins, const T* const* ws,
                   int64_t C, T* out) {
  using Vt = Vec<T>;
  using V = typename Vt::V;
  constexpr int64_t L = Vt::kLanes;
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L) {
    V a0{}, a1{}, a2{}, a3{};
    for (int64_t t = 0; t < n; ++t) {
      const T* x = ins[t] + c;
      const T* w = ws[t] + c;
      a0 += Vt::Load(x) * Vt::Load(w);
      a1 += Vt::Load(x + L) * Vt::Load(w + L);
      a2 += Vt::Load(x + 2 * L) * Vt::Load(w + 2 * L);
      a3 += Vt::Load(x + 3 * L) * Vt::Load(w + 3 * L);
    }
    Vt::Store(out + c, a0);
    Vt::Store(out + c + L, a1);
    Vt::Store(out + c + 2 * L, a2);
    Vt::Store(out + c + 3 * L, a3);
  }
  for (; c + L <= C; c += L) {
    V a{};
    for (int64_t t = 0; t < n; ++t) {
      a += Vt::Load(ins[t] + c) * Vt::Load(ws[t] + c);
    }
    Vt::Store(out + c, a);
  }
  for (; c < C; ++c) {
    T a = 0;
    for (int64_t t = 0; t < n; ++t) a += ins[t][c] * ws[t][c];
    out[c] = a;
  }
}

// Per destination position, the sum over taps of source * weight. The
// forward pass (kInputGrad false) sums over the output positions the input
// positions each tap reads (`InputIndex`); the input gradient (true) sums
// over the input positions the output positions each tap reaches
// (`OutputIndex`): the transposed conv, in gather form, so each thread
// writes only its own rows.
template <typename T, bool kInputGrad>
void SumTaps(ffi::ThreadPool& pool, const Geometry& g, const T* src,
             const T* w, T* dst) {
  const int64_t C = g.channels;
  const int64_t taps = g.window[0] * g.window[1] * g.window[2];
  const int64_t* dst_dims = kInputGrad ? g.in : g.out;
  const int64_t* src_dims = kInputGrad ? g.out : g.in;
  auto index = [&g](int axis, int64_t p, int64_t k) {
    return kInputGrad ? OutputIndex(g, axis, p, k) : InputIndex(g, axis, p, k);
  };
  ParallelFor(pool, g.batch * dst_dims[0], [&](int64_t item) {
    const int64_t b = item / dst_dims[0], p0 = item % dst_dims[0];
    std::vector<const T*> srcs(taps), ws(taps);
    for (int64_t p1 = 0; p1 < dst_dims[1]; ++p1) {
      for (int64_t p2 = 0; p2 < dst_dims[2]; ++p2) {
        int64_t n = 0;
        for (int64_t k0 = 0; k0 < g.window[0]; ++k0) {
          const int64_t q0 = index(0, p0, k0);
          if (q0 < 0) continue;
          for (int64_t k1 = 0; k1 < g.window[1]; ++k1) {
            const int64_t q1 = index(1, p1, k1);
            if (q1 < 0) continue;
            for (int64_t k2 = 0; k2 < g.window[2]; ++k2) {
              const int64_t q2 = index(2, p2, k2);
              if (q2 < 0) continue;
              srcs[n] = src + (((b * src_dims[0] + q0) * src_dims[1] + q1) *
                                   src_dims[2] + q2) * C;
              ws[n++] = w + ((k0 * g.window[1] + k1) * g.window[2] + k2) * C;
            }
          }
        }
        TapSum(n, srcs.data(), ws.data(), C,
               dst + (((b * dst_dims[0] + p0) * dst_dims[1] + p1) *
                          dst_dims[2] + p2) * C);
      }
    }
  });
}

template <typename T>
void Forward(ffi::ThreadPool& pool, const Geometry& g, const T* x, const T* w,
             T* y) {
  SumTaps<T, /*kInputGrad=*/false>(pool, g, x, w, y);
}

template <typename T>
void InputGrad(ffi::ThreadPool& pool, const Geometry& g, const T* dy,
               const T* w, T* dx) {
  SumTaps<T, /*kInputGrad=*/true>(pool, g, dy, w, dx);
}

template <typename T>
void WeightGrad(ffi::ThreadPool& pool, const Geometry& g, const T* x,
                const T* dy, T* dw) {
  const int64_t C = g.channels;
  const int64_t taps = g.window[0] * g.window[1] * g.window[2];
  const int64_t rows = g.batch * g.out[0];
  // Fixed slices of the (batch, first output axis) rows, each summed into
  // its own partial sums, then added in order: deterministic for a given
  // thread count.
  // At most ~64 MiB of partial sums (a 7x7x7 window over 512 channels has
  // 0.7 MB of them per slice).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_slice = std::max<int64_t>(1, taps * C * sizeof(T));
  const int64_t slices = std::max<int64_t>(
      1, std::min({rows, 4 * threads, (int64_t{64} << 20) / per_slice}));
  std::vector<T> partial(slices * taps * C, T(0));
  ParallelFor(pool, slices, [&](int64_t slice) {
    T* __restrict sums = partial.data() + slice * taps * C;
    for (int64_t row = slice * rows / slices;
         row < (slice + 1) * rows / slices; ++row) {
      const int64_t b = row / g.out[0], o0 = row % g.out[0];
      for (int64_t o1 = 0; o1 < g.out[1]; ++o1) {
        for (int64_t o2 = 0; o2 < g.out[2]; ++o2) {
          const T* __restrict gp =
              dy + (((b * g.out[0] + o0) * g.out[1] + o1) * g.out[2] + o2) * C;
          for (int64_t k0 = 0; k0 < g.window[0]; ++k0) {
            const int64_t i0 = InputIndex(g, 0, o0, k0);
            if (i0 < 0) continue;
            for (int64_t k1 = 0; k1 < g.window[1]; ++k1) {
              const int64_t i1 = InputIndex(g, 1, o1, k1);
              if (i1 < 0) continue;
              for (int64_t k2 = 0; k2 < g.window[2]; ++k2) {
                const int64_t i2 = InputIndex(g, 2, o2, k2);
                if (i2 < 0) continue;
                const T* __restrict xp =
                    x +
                    (((b * g.in[0] + i0) * g.in[1] + i1) * g.in[2] + i2) * C;
                T* __restrict s =
                    sums + ((k0 * g.window[1] + k1) * g.window[2] + k2) * C;
                for (int64_t c = 0; c < C; ++c) s[c] += xp[c] * gp[c];
              }
            }
          }
        }
      }
    }
  });
  std::fill(dw, dw + taps * C, T(0));
  for (int64_t slice = 0; slice < slices; ++slice) {
    const T* __restrict sums = partial.data() + slice * taps * C;
    for (int64_t j = 0; j < taps * C; ++j) dw[j] += sums[j];
  }
}

// Checks the rank-5 activations and the rank-4 weights, and fills `g`.
ffi::Error MakeGeometry(ffi::AnyBuffer::Dimensions in,
                        ffi::AnyBuffer::Dimensions out,
                        ffi::AnyBuffer::Dimensions window,
                        ffi::Span<const int64_t> stride,
                        ffi::Span<const int64_t> dilation,
                        ffi::Span<const int64_t> pad, Geometry* g) {
  if (in.size() != 5 || out.size() != 5 || window.size() != 4 ||
      stride.size() != 3 || dilation.size() != 3 || pad.size() != 3) {
    return ffi::Error::InvalidArgument(
        "jaxfactor depthwise: expected rank-5 activations, rank-4 weights and "
        "3 strides, dilations and paddings");
  }
  g->batch = in[0];
  g->channels = in[4];
  if (out[0] != in[0] || out[4] != in[4] || window[3] != in[4]) {
    return ffi::Error::InvalidArgument(
        "jaxfactor depthwise: batch or channel sizes differ");
  }
  for (int a = 0; a < 3; ++a) {
    g->in[a] = in[a + 1];
    g->out[a] = out[a + 1];
    g->window[a] = window[a];
    g->stride[a] = stride[a];
    g->dilation[a] = dilation[a];
    g->pad[a] = pad[a];
    if (stride[a] < 1 || dilation[a] < 1) {
      return ffi::Error::InvalidArgument(
          "jaxfactor depthwise: strides and dilations must be positive");
    }
  }
  return ffi::Error::Success();
}

// Runs `f` on the buffers' element type; errors (an allocation failure) come
// back as an XLA error instead of crossing the C boundary.
template <typename F>
ffi::Error Dispatch(ffi::DataType dtype, F f) {
  try {
    switch (dtype) {
      case ffi::DataType::F32:
        f(float{});
        return ffi::Error::Success();
      case ffi::DataType::F64:
        f(double{});
        return ffi::Error::Success();
      default:
        return ffi::Error::InvalidArgument(
            "jaxfactor depthwise: only float32 and float64 are supported");
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxfactor depthwise: ") +
                                e.what());
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                       ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Span<const int64_t> stride,
                       ffi::Span<const int64_t> dilation,
                       ffi::Span<const int64_t> pad) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), y->dimensions(), w.dimensions(),
                            stride, dilation, pad, &g);
      e.failure()) {
    return e;
  }
  return Dispatch(x.element_type(), [&](auto t) {
    using T = decltype(t);
    Forward<T>(pool, g, x.typed_data<T>(), w.typed_data<T>(),
               y->typed_data<T>());
  });
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy,
                         ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Span<const int64_t> stride,
                         ffi::Span<const int64_t> dilation,
                         ffi::Span<const int64_t> pad) {
  Geometry g;
  if (auto e = MakeGeometry(dx->dimensions(), dy.dimensions(), w.dimensions(),
                            stride, dilation, pad, &g);
      e.failure()) {
    return e;
  }
  return Dispatch(dy.element_type(), [&](auto t) {
    using T = decltype(t);
    InputGrad<T>(pool, g, dy.typed_data<T>(), w.typed_data<T>(),
                 dx->typed_data<T>());
  });
}

ffi::Error WeightGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                          ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                          ffi::Span<const int64_t> stride,
                          ffi::Span<const int64_t> dilation,
                          ffi::Span<const int64_t> pad) {
  Geometry g;
  if (auto e = MakeGeometry(x.dimensions(), dy.dimensions(), dw->dimensions(),
                            stride, dilation, pad, &g);
      e.failure()) {
    return e;
  }
  return Dispatch(x.element_type(), [&](auto t) {
    using T = decltype(t);
    WeightGrad<T>(pool, g, x.typed_data<T>(), dy.typed_data<T>(),
                  dw->typed_data<T>());
  });
}

}  // namespace

#define JAXFACTOR_BIND(NAME, IMPL)                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                          \
      NAME, IMPL,                                         \
      ffi::Ffi::Bind()                                    \
          .Ctx<ffi::ThreadPool>()                         \
          .Arg<ffi::AnyBuffer>()                          \
          .Arg<ffi::AnyBuffer>()                          \
          .Ret<ffi::AnyBuffer>()                          \
          .Attr<ffi::Span<const int64_t>>("stride")       \
          .Attr<ffi::Span<const int64_t>>("dilation")     \
          .Attr<ffi::Span<const int64_t>>("pad"))

JAXFACTOR_BIND(JaxfactorDepthwiseForward, ForwardImpl);
JAXFACTOR_BIND(JaxfactorDepthwiseInputGrad, InputGradImpl);
JAXFACTOR_BIND(JaxfactorDepthwiseWeightGrad, WeightGradImpl);
