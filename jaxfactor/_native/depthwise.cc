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
// (fewer spatial axes come as size-1 axes in front). Channels are the
// innermost, contiguous axis, and work is split by rows of the last spatial
// axis. The forward pass and the input gradient sum each output's taps in
// vector registers: wide layers one position at a time in blocks of up to 4
// vectors of channels (`TapSum`), narrow ones in tiles of several positions
// (`SumRun`, and `FlatRun`, which treats a row as one flat array with the
// weights repeated to a whole number of vectors); positions near the edges,
// where some taps fall outside, one at a time. The weight gradient sums each
// tap's products along a row in registers (`RowDot`, `FlatDot`). Every
// output element is computed by one thread in a fixed order, and the weight
// gradient's partial sums over fixed slices of the rows are added in a fixed
// order, so results do not depend on scheduling (the slices depend on the
// thread count: the weight gradient's rounding may differ between machines).

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// GCC notes that passing 64-byte vectors by value changes the ABI where
// AVX-512 is off (-Wpsabi). Every such function here has internal linkage and
// is inlined: no call crosses an ABI boundary, so the note does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

struct Geometry {
  int64_t batch, channels;
  int64_t in[3], out[3], window[3];
  int64_t stride[3], dilation[3], pad[3];
};

#ifdef JAXFACTOR_NATIVE_FAULTS
// Test builds only (tests/test_native_sanitized.py compiles this file with
// -DJAXFACTOR_NATIVE_FAULTS): with $JAXFACTOR_NATIVE_FAULT set to "pool" or
// "caller", every item that side of `ParallelFor` claims throws, and the
// other side's items are slowed down so that the failing side claims some
// while they are still running.
const char* FaultSide() { return std::getenv("JAXFACTOR_NATIVE_FAULT"); }

void MaybeFault(const char* side, bool on_caller) {
  if (side == nullptr) return;
  if (std::strcmp(side, on_caller ? "caller" : "pool") == 0) {
    throw std::runtime_error(std::string("injected fault on the ") + side);
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

// Waits (up to 10 s) until a pool task has claimed an item, so that pool
// tasks are running when the caller starts on its items.
void AwaitPool(const char* side, const std::atomic<int64_t>& next) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (side != nullptr && next.load() == 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::yield();
  }
}
#else
constexpr const char* FaultSide() { return nullptr; }
inline void MaybeFault(const char*, bool) {}
inline void AwaitPool(const char*, const std::atomic<int64_t>&) {}
#endif

// Runs `body(item)` for item in [0, items) on the caller and up to
// `threads - 1` pool threads, and returns when every item is done. Items are
// claimed from a shared counter; a pool task that starts late finds none
// left and returns (the shared state outlives this call), so the caller
// never waits on a task that has not started.
//
// An exception must neither leave a pool task (XLA's pool would call
// std::terminate) nor unwind the caller while tasks still use `body`, which
// lives on the caller's stack. So each item's exception is caught where it is
// thrown; after the first, the remaining items are claimed but skipped, and
// once every item is done the first exception is rethrown on the caller (the
// handler returns it to XLA as an error).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<bool> failed{false};
    std::mutex mutex;
    std::condition_variable finished;
    std::exception_ptr error;  // The first exception, under `mutex`.
  };
  auto state = std::make_shared<State>();
  const int64_t total = items;
  const char* fault = FaultSide();
  // `body` is only used by a task that claims an item, which happens before
  // `done` reaches `total`, that is before this function returns. noexcept:
  // should locking a mutex ever throw, terminating beats unwinding past
  // tasks that still use `body`.
  auto work = [state, total, fault, body_ptr = &body](bool on_caller) noexcept {
    int64_t finished = 0;
    for (int64_t item; (item = state->next.fetch_add(1)) < total; ++finished) {
      if (state->failed.load(std::memory_order_relaxed)) continue;
      try {
        MaybeFault(fault, on_caller);
        (*body_ptr)(item);
      } catch (...) {
        std::lock_guard<std::mutex> lock(state->mutex);
        if (!state->error) state->error = std::current_exception();
        state->failed.store(true, std::memory_order_relaxed);
      }
    }
    if (finished && state->done.fetch_add(finished) + finished == total) {
      std::lock_guard<std::mutex> lock(state->mutex);
      state->finished.notify_all();
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  try {
    for (int64_t t = 1; t < std::min(threads, items); ++t) {
      pool.Schedule([work] { work(/*on_caller=*/false); });
    }
  } catch (...) {
    // Scheduling allocates. Without more tasks the caller claims the rest.
  }
  if (threads > 1 && items > 1) AwaitPool(fault, state->next);
  work(/*on_caller=*/true);
  [&]() noexcept {  // As in `work`: never unwind before every item is done.
    std::unique_lock<std::mutex> lock(state->mutex);
    state->finished.wait(lock, [&] { return state->done.load() == total; });
  }();
  std::lock_guard<std::mutex> lock(state->mutex);
  if (state->error) std::rethrow_exception(state->error);
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

// The destinations p in [lo, hi), within [0, dst), whose source
// `p * step + offset` lies in [0, src); lo <= hi <= dst.
struct Span {
  int64_t lo, hi;
};

inline Span Inside(int64_t offset, int64_t step, int64_t src, int64_t dst) {
  const int64_t lo =
      std::min(dst, offset < 0 ? (-offset + step - 1) / step : int64_t{0});
  const int64_t last = src - 1 - offset;
  const int64_t hi = last < 0 ? 0 : std::min(dst, last / step + 1);
  return {lo, std::max(lo, hi)};
}

// On the last spatial axis, tap `k` maps outputs `o` in [lo, hi) to inputs
// `o * stride + offset`, all inside the input.
struct LastAxis {
  int64_t lo, hi, offset;
};

inline LastAxis LastAxisSpan(const Geometry& g, int64_t k) {
  const int64_t offset = k * g.dilation[2] - g.pad[2];
  const Span span = Inside(offset, g.stride[2], g.in[2], g.out[2]);
  return {span.lo, span.hi, offset};
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

// out[p * C + c + l] = sum over the n taps of srcs[t][p * step + c + l] *
// ws[t][c + l], for p in [q, q + P) and one vector of lanes l: a tile of P
// positions whose sums stay in registers across the taps.
template <typename T, int P>
inline void Tile(int64_t n, const T* const* srcs, const T* const* ws,
                 int64_t step, int64_t q, int64_t c, int64_t C, T* out) {
  using Vt = Vec<T>;
  typename Vt::V acc[P] = {};
  for (int64_t t = 0; t < n; ++t) {
    const T* s = srcs[t] + q * step + c;
    const typename Vt::V w = Vt::Load(ws[t] + c);
    for (int p = 0; p < P; ++p) acc[p] += Vt::Load(s + p * step) * w;
  }
  for (int p = 0; p < P; ++p) Vt::Store(out + (q + p) * C + c, acc[p]);
}

// Narrow layers at unit step: a run of positions is one flat array, and the
// weights, repeated to M = NV vectors (a multiple of C), line up with every
// block of M elements. out[j] = sum_t srcs[t][j] * periodic[t][j % M] for
// j < length; P blocks of NV vectors per tile keep >= 4 independent sums.
template <typename T, int NV>
void FlatRun(int64_t n, const T* const* srcs, const T* const* periodic,
             int64_t length, T* out) {
  using Vt = Vec<T>;
  constexpr int64_t L = Vt::kLanes, M = NV * L;
  constexpr int P = (4 + NV - 1) / NV;
  auto tile = [&](auto blocks, int64_t j) {
    constexpr int B = decltype(blocks)::value;
    typename Vt::V acc[B][NV] = {};
    for (int64_t t = 0; t < n; ++t) {
      typename Vt::V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Vt::Load(periodic[t] + v * L);
      for (int b = 0; b < B; ++b) {
        for (int v = 0; v < NV; ++v) {
          acc[b][v] += Vt::Load(srcs[t] + j + b * M + v * L) * wv[v];
        }
      }
    }
    for (int b = 0; b < B; ++b) {
      for (int v = 0; v < NV; ++v) {
        Vt::Store(out + j + b * M + v * L, acc[b][v]);
      }
    }
  };
  int64_t j = 0;
  for (; j + P * M <= length; j += P * M) {
    tile(std::integral_constant<int, P>{}, j);
  }
  for (; j + M <= length; j += M) tile(std::integral_constant<int, 1>{}, j);
  // Then single vectors (`j` is a multiple of M: vector v of the period).
  for (int64_t v = 0; j + L <= length; j += L, ++v) {
    typename Vt::V a{};
    for (int64_t t = 0; t < n; ++t) {
      a += Vt::Load(srcs[t] + j) * Vt::Load(periodic[t] + v * L);
    }
    Vt::Store(out + j, a);
  }
  for (; j < length; ++j) {
    T a = 0;
    for (int64_t t = 0; t < n; ++t) a += srcs[t][j] * periodic[t][j % M];
    out[j] = a;
  }
}

// The number of vectors in the smallest multiple of both C and a vector, or
// 0 if it is over 7 vectors (or C is a multiple of a vector: the tiles of
// `SumRun` take those). A vector's lanes are a power of two, so the number
// is C's odd part: 1, 3, 5 or 7.
template <typename T>
int64_t PeriodVectors(int64_t C) {
  constexpr int64_t L = Vec<T>::kLanes;
  if (C % L == 0) return 0;
  int64_t a = C, b = L;
  while (b) a = std::exchange(b, a % b);
  const int64_t vectors = C / a;  // lcm(C, L) / L
  return vectors <= 7 ? vectors : 0;
}

// Runs `f(std::integral_constant<int, NV>{})` for NV = `vectors` (1, 3, 5
// or 7: `PeriodVectors`).
template <typename F>
void WithPeriod(int64_t vectors, F f) {
  switch (vectors) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 7>{});
  }
}

// A run of `count` destination positions on the last axis, every tap inside
// the source: out[q * C + c] = sum_t srcs[t][q * step + c] * ws[t][c]. Wide
// layers (>= 4 vectors of channels), one position at a time (`TapSum`);
// narrower ones in tiles of 4 positions by 1 vector, leftover channels
// scalar.
template <typename T>
void SumRun(int64_t n, const T* const* srcs, const T* const* ws, int64_t step,
            int64_t count, int64_t C, T* out) {
  constexpr int64_t L = Vec<T>::kLanes;
  if (C >= 4 * L) {
    thread_local std::vector<const T*> at;
    at.resize(n);
    for (int64_t q = 0; q < count; ++q) {
      for (int64_t t = 0; t < n; ++t) at[t] = srcs[t] + q * step;
      TapSum(n, at.data(), ws, C, out + q * C);
    }
    return;
  }
  auto group = [&](auto positions, int64_t q) {
    constexpr int Q = decltype(positions)::value;
    int64_t c = 0;
    for (; c + L <= C; c += L) Tile<T, Q>(n, srcs, ws, step, q, c, C, out);
    for (; c < C; ++c) {
      for (int64_t p = q; p < q + Q; ++p) {
        T a = 0;
        for (int64_t t = 0; t < n; ++t) a += srcs[t][p * step + c] * ws[t][c];
        out[p * C + c] = a;
      }
    }
  };
  int64_t q = 0;
  for (; q + 4 <= count; q += 4) group(std::integral_constant<int, 4>{}, q);
  for (; q < count; ++q) group(std::integral_constant<int, 1>{}, q);
}

// Per destination position, the sum over taps of source * weight, taps in
// (axis 0, axis 1, axis 2) order. The forward pass (kInputGrad false) sums
// over the input positions each tap reads (`InputIndex`); the input gradient
// (true) over the output positions each tap reaches (`OutputIndex`): the
// transposed conv in gather form, so each thread writes only its own rows.
// Work is split by rows of the last axis. On that axis, destination p reads
// source p * step + offset[k] (the forward pass; the input gradient at stride
// 1), so the positions where every tap is inside the source run as register
// tiles (`SumRun`); the rest, one position at a time (`TapSum`).
template <typename T, bool kInputGrad>
void SumTaps(ffi::ThreadPool& pool, const Geometry& g, const T* src,
             const T* w, T* dst) {
  const int64_t C = g.channels, K = g.window[2];
  const int64_t* dst_dims = kInputGrad ? g.in : g.out;
  const int64_t* src_dims = kInputGrad ? g.out : g.in;
  auto index = [&g](int axis, int64_t p, int64_t k) {
    return kInputGrad ? OutputIndex(g, axis, p, k) : InputIndex(g, axis, p, k);
  };
  // The interior [lo, hi) of the last axis, where every tap is inside the
  // source: the intersection of the taps' spans; empty if it is not affine.
  const bool affine = !kInputGrad || g.stride[2] == 1;
  const int64_t step = kInputGrad ? 1 : g.stride[2];
  std::vector<int64_t> offset(K);
  int64_t lo = 0, hi = affine ? dst_dims[2] : 0;
  for (int64_t k = 0; k < K; ++k) {
    offset[k] = kInputGrad ? g.pad[2] - k * g.dilation[2]
                           : k * g.dilation[2] - g.pad[2];
    const Span span = Inside(offset[k], step, src_dims[2], dst_dims[2]);
    lo = std::max(lo, span.lo);
    hi = std::min(hi, span.hi);
  }
  hi = std::max(lo, hi);
  // Narrow layers at unit step: the weights repeated to a whole number of
  // vectors (`FlatRun`), `period` elements per tap.
  constexpr int64_t L = Vec<T>::kLanes;
  const int64_t period = step == 1 ? PeriodVectors<T>(C) * L : 0;
  std::vector<T> periodic(period * g.window[0] * g.window[1] * K);
  for (int64_t j = 0; j < static_cast<int64_t>(periodic.size()); ++j) {
    periodic[j] = w[j / period * C + j % period % C];
  }
  ParallelFor(pool, g.batch * dst_dims[0] * dst_dims[1], [&](int64_t row) {
    const int64_t p1 = row % dst_dims[1], p0 = row / dst_dims[1] % dst_dims[0],
                  b = row / dst_dims[1] / dst_dims[0];
    // The source rows of the (axis 0, axis 1) taps inside the source.
    // Per-thread scratch, reused across rows and calls.
    thread_local std::vector<const T*> src_rows, srcs, ws;
    thread_local std::vector<int64_t> tap_rows;
    src_rows.clear();
    tap_rows.clear();
    for (int64_t k0 = 0; k0 < g.window[0]; ++k0) {
      const int64_t q0 = index(0, p0, k0);
      if (q0 < 0) continue;
      for (int64_t k1 = 0; k1 < g.window[1]; ++k1) {
        const int64_t q1 = index(1, p1, k1);
        if (q1 < 0) continue;
        src_rows.push_back(src + ((b * src_dims[0] + q0) * src_dims[1] + q1) *
                                     src_dims[2] * C);
        tap_rows.push_back((k0 * g.window[1] + k1) * K);
      }
    }
    T* out = dst + row * dst_dims[2] * C;
    const int64_t rows = static_cast<int64_t>(src_rows.size());
    srcs.resize(rows * K);
    ws.resize(rows * K);
    auto position = [&](int64_t p2) {
      int64_t n = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k2 = 0; k2 < K; ++k2) {
          const int64_t q2 = index(2, p2, k2);
          if (q2 < 0) continue;
          srcs[n] = src_rows[r] + q2 * C;
          ws[n++] = w + (tap_rows[r] + k2) * C;
        }
      }
      TapSum(n, srcs.data(), ws.data(), C, out + p2 * C);
    };
    for (int64_t p2 = 0; p2 < lo; ++p2) position(p2);
    for (int64_t p2 = hi; p2 < dst_dims[2]; ++p2) position(p2);
    if (lo < hi) {
      int64_t n = 0;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t k2 = 0; k2 < K; ++k2) {
          srcs[n] = src_rows[r] + (lo * step + offset[k2]) * C;
          ws[n++] = period ? periodic.data() + (tap_rows[r] + k2) * period
                           : w + (tap_rows[r] + k2) * C;
        }
      }
      if (period) {
        WithPeriod(period / L, [&](auto nv) {
          FlatRun<T, decltype(nv)::value>(n, srcs.data(), ws.data(),
                                          (hi - lo) * C, out + lo * C);
        });
      } else {
        SumRun(n, srcs.data(), ws.data(), step * C, hi - lo, C, out + lo * C);
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

// sums[c] += sum_{q < count} xs[q * step + c] * gs[q * C + c] for c in
// [c, end): one tap's products along a row of the last axis, summed in
// registers (4 independent sums: 4 vectors of channels, or 4 interleaved
// positions for one vector).
template <typename T>
inline void RowDot(int64_t count, const T* __restrict xs, int64_t step,
                   const T* __restrict gs, int64_t C, T* __restrict sums,
                   int64_t c, int64_t end) {
  using Vt = Vec<T>;
  using V = typename Vt::V;
  constexpr int64_t L = Vt::kLanes;
  for (; c + 4 * L <= end; c += 4 * L) {
    V a[4] = {};
    for (int64_t q = 0; q < count; ++q) {
      for (int v = 0; v < 4; ++v) {
        a[v] += Vt::Load(xs + q * step + c + v * L) *
                Vt::Load(gs + q * C + c + v * L);
      }
    }
    for (int v = 0; v < 4; ++v) {
      Vt::Store(sums + c + v * L, Vt::Load(sums + c + v * L) + a[v]);
    }
  }
  for (; c + L <= end; c += L) {
    V a[4] = {};
    int64_t q = 0;
    for (; q + 4 <= count; q += 4) {
      for (int u = 0; u < 4; ++u) {
        a[u] += Vt::Load(xs + (q + u) * step + c) *
                Vt::Load(gs + (q + u) * C + c);
      }
    }
    for (; q < count; ++q) {
      a[0] += Vt::Load(xs + q * step + c) * Vt::Load(gs + q * C + c);
    }
    Vt::Store(sums + c, Vt::Load(sums + c) + ((a[0] + a[1]) + (a[2] + a[3])));
  }
  for (; c < end; ++c) {
    T a = 0;
    for (int64_t q = 0; q < count; ++q) a += xs[q * step + c] * gs[q * C + c];
    sums[c] += a;
  }
}

// RowDot at unit step for narrow layers (see `FlatRun`): the row as one flat
// array in blocks of M = NV vectors (a multiple of C), folded into the C
// sums at the end.
template <typename T, int NV>
void FlatDot(int64_t length, const T* __restrict xs, const T* __restrict gs,
             int64_t C, T* __restrict sums) {
  using Vt = Vec<T>;
  constexpr int64_t L = Vt::kLanes, M = NV * L;
  constexpr int P = (4 + NV - 1) / NV;
  typename Vt::V acc[P][NV] = {};
  int64_t j = 0;
  for (; j + P * M <= length; j += P * M) {
    for (int b = 0; b < P; ++b) {
      for (int v = 0; v < NV; ++v) {
        const int64_t at = j + b * M + v * L;
        acc[b][v] += Vt::Load(xs + at) * Vt::Load(gs + at);
      }
    }
  }
  for (; j + M <= length; j += M) {
    for (int v = 0; v < NV; ++v) {
      acc[0][v] += Vt::Load(xs + j + v * L) * Vt::Load(gs + j + v * L);
    }
  }
  for (int v = 0; j + L <= length; j += L, ++v) {
    acc[0][v] += Vt::Load(xs + j) * Vt::Load(gs + j);
  }
  T folded[M];
  for (int v = 0; v < NV; ++v) {
    typename Vt::V a = acc[0][v];
    for (int b = 1; b < P; ++b) a += acc[b][v];
    Vt::Store(folded + v * L, a);
  }
  for (; j < length; ++j) folded[j % M] += xs[j] * gs[j];
  for (int64_t m = 0; m < M; ++m) sums[m % C] += folded[m];
}

template <typename T>
void WeightGrad(ffi::ThreadPool& pool, const Geometry& g, const T* x,
                const T* dy, T* dw) {
  const int64_t C = g.channels, K = g.window[2], s = g.stride[2];
  const int64_t taps = g.window[0] * g.window[1] * K;
  const int64_t rows = g.batch * g.out[0] * g.out[1];
  std::vector<LastAxis> spans(K);
  for (int64_t k = 0; k < K; ++k) spans[k] = LastAxisSpan(g, k);
  // In vectors (`FlatDot`), 0 for `RowDot`.
  const int64_t period = s == 1 ? PeriodVectors<T>(C) : 0;
  // Fixed slices of the rows of the last output axis, each summed into its
  // own partial sums, then added in order: deterministic for a given thread
  // count. At most ~64 MiB of partial sums (a 7x7x7 window over 512
  // channels has 0.7 MB of them per slice).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t per_slice = std::max<int64_t>(1, taps * C * sizeof(T));
  const int64_t slices = std::max<int64_t>(
      1, std::min({rows, 4 * threads, (int64_t{64} << 20) / per_slice}));
  std::vector<T> partial(slices * taps * C, T(0));
  ParallelFor(pool, slices, [&](int64_t slice) {
    T* sums = partial.data() + slice * taps * C;
    for (int64_t row = slice * rows / slices;
         row < (slice + 1) * rows / slices; ++row) {
      const int64_t o1 = row % g.out[1], o0 = row / g.out[1] % g.out[0],
                    b = row / g.out[1] / g.out[0];
      const T* gr = dy + row * g.out[2] * C;
      // Blocks of 4 vectors of channels, every tap per block: the block's
      // slices of the rows stay in the L1 cache across the taps.
      const int64_t block = period ? C : 4 * Vec<T>::kLanes;
      for (int64_t c = 0; c < C; c += block) {
        const int64_t end = std::min(C, c + block);
        for (int64_t k0 = 0; k0 < g.window[0]; ++k0) {
          const int64_t i0 = InputIndex(g, 0, o0, k0);
          if (i0 < 0) continue;
          for (int64_t k1 = 0; k1 < g.window[1]; ++k1) {
            const int64_t i1 = InputIndex(g, 1, o1, k1);
            if (i1 < 0) continue;
            const T* xr =
                x + ((b * g.in[0] + i0) * g.in[1] + i1) * g.in[2] * C;
            for (int64_t k2 = 0; k2 < K; ++k2) {
              const LastAxis& span = spans[k2];
              if (span.lo >= span.hi) continue;
              const T* xs = xr + (span.lo * s + span.offset) * C;
              const T* gs = gr + span.lo * C;
              T* tap_sums = sums + ((k0 * g.window[1] + k1) * K + k2) * C;
              if (period) {
                WithPeriod(period, [&](auto nv) {
                  FlatDot<T, decltype(nv)::value>((span.hi - span.lo) * C, xs,
                                                  gs, C, tap_sums);
                });
              } else {
                RowDot(span.hi - span.lo, xs, s * C, gs, C, tap_sums, c, end);
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

const char* DTypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::PRED: return "bool";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::S16: return "int16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::U16: return "uint16";
    case ffi::DataType::U32: return "uint32";
    case ffi::DataType::U64: return "uint64";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::C64: return "complex64";
    case ffi::DataType::C128: return "complex128";
    default: return "an unsupported element type";
  }
}

std::string Shape(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return s + "]";
}

// One buffer of a call, named as in the handler's math.
struct Operand {
  const char* name;
  ffi::DataType dtype;
  ffi::AnyBuffer::Dimensions dims;
};

Operand Describe(const char* name, const ffi::AnyBuffer& buffer) {
  return {name, buffer.element_type(), buffer.dimensions()};
}

// Paddings, strides and dilations are bounded so that no index computation
// can overflow: every index stays within the input plus both paddings.
constexpr int64_t kMaxAttribute = int64_t{1} << 40;

// Checks a call at the FFI boundary and fills `g`: the kernels index memory
// on the strength of these checks alone. `in` is the operand with the input's
// geometry (x or dx), `out` the one with the output's (y or dy), `window` the
// weights (w or dw). XLA hands over shapes and dtypes unchecked, so a wrong
// call must come back as an error, not read or write past a buffer.
ffi::Error CheckCall(const char* handler, const Operand& in,
                     const Operand& out, const Operand& window,
                     ffi::Span<const int64_t> stride,
                     ffi::Span<const int64_t> dilation,
                     ffi::Span<const int64_t> pad, Geometry* g) {
  const std::string where = std::string("jaxfactor depthwise ") + handler;
  auto invalid = [&](const std::string& message) {
    return ffi::Error::InvalidArgument(where + ": " + message);
  };
  for (const Operand* o : {&in, &out, &window}) {
    if (o->dtype != ffi::DataType::F32 && o->dtype != ffi::DataType::F64) {
      return invalid(std::string(o->name) + " is " + DTypeName(o->dtype) +
                     "; only float32 and float64 are supported");
    }
    if (o->dtype != in.dtype) {
      return invalid(std::string(o->name) + " is " + DTypeName(o->dtype) +
                     " but " + in.name + " is " + DTypeName(in.dtype));
    }
  }
  for (const Operand* o : {&in, &out, &window}) {
    const size_t rank = o == &window ? 4 : 5;
    if (o->dims.size() != rank) {
      return invalid(std::string(o->name) + " has shape " + Shape(o->dims) +
                     "; expected rank " + std::to_string(rank) +
                     (rank == 5 ? " [batch, 3 spatial axes, channels]"
                                : " [3 spatial axes, channels]"));
    }
    for (const int64_t d : o->dims) {
      if (d < 0) {
        return invalid(std::string(o->name) + " has shape " + Shape(o->dims) +
                       " with a negative size");
      }
    }
  }
  if (stride.size() != 3 || dilation.size() != 3 || pad.size() != 3) {
    return invalid("expected 3 strides, dilations and paddings, got " +
                   std::to_string(stride.size()) + ", " +
                   std::to_string(dilation.size()) + " and " +
                   std::to_string(pad.size()));
  }
  if (out.dims[0] != in.dims[0]) {
    return invalid(std::string(in.name) + " " + Shape(in.dims) + " and " +
                   out.name + " " + Shape(out.dims) + " differ in batch size");
  }
  if (out.dims[4] != in.dims[4] || window.dims[3] != in.dims[4]) {
    return invalid(std::string(in.name) + " " + Shape(in.dims) + ", " +
                   out.name + " " + Shape(out.dims) + " and " + window.name +
                   " " + Shape(window.dims) + " differ in channels");
  }
  g->batch = in.dims[0];
  g->channels = in.dims[4];
  for (int a = 0; a < 3; ++a) {
    g->in[a] = in.dims[a + 1];
    g->out[a] = out.dims[a + 1];
    g->window[a] = window.dims[a];
    g->stride[a] = stride[a];
    g->dilation[a] = dilation[a];
    g->pad[a] = pad[a];
    const std::string axis = "spatial axis " + std::to_string(a) + ": ";
    if (stride[a] < 1 || dilation[a] < 1 || stride[a] > kMaxAttribute ||
        dilation[a] > kMaxAttribute) {
      return invalid(axis + "stride " + std::to_string(stride[a]) +
                     " and dilation " + std::to_string(dilation[a]) +
                     " must be in [1, 2^40]");
    }
    if (pad[a] < -kMaxAttribute || pad[a] > kMaxAttribute) {
      return invalid(axis + "padding " + std::to_string(pad[a]) +
                     " is outside [-2^40, 2^40]");
    }
    // Only the low padding is passed: any output length is that of some high
    // padding, the one that makes the last output's last tap the padded
    // input's last position. It is bounded like the low one (and its
    // computation must not overflow) for the same reason.
    if (g->out[a] == 0 || g->window[a] == 0) continue;  // nothing is read
    int64_t reach, taps, high;
    if (__builtin_mul_overflow(g->out[a] - 1, stride[a], &reach) ||
        __builtin_mul_overflow(g->window[a] - 1, dilation[a], &taps) ||
        __builtin_add_overflow(reach, taps + 1, &reach) ||
        __builtin_sub_overflow(reach, g->in[a], &high) ||
        __builtin_sub_overflow(high, pad[a], &high) ||
        high < -kMaxAttribute || high > kMaxAttribute) {
      return invalid(axis + "an output of size " + std::to_string(g->out[a]) +
                     " from an input of size " + std::to_string(g->in[a]) +
                     " (window " + std::to_string(g->window[a]) + ", stride " +
                     std::to_string(stride[a]) + ", dilation " +
                     std::to_string(dilation[a]) + ", low padding " +
                     std::to_string(pad[a]) +
                     ") needs a high padding outside [-2^40, 2^40]");
    }
  }
  return ffi::Error::Success();
}

bool Empty(const Operand& o) {
  return std::find(o.dims.begin(), o.dims.end(), 0) != o.dims.end();
}

// Checks the call, then runs `f(T{}, g)` on the buffers' element type
// (checked to be float or double). An operand with no elements makes the
// result all zeros (every sum is empty) without running the kernels, which
// may then assume every size is positive. Exceptions (an allocation failure,
// whichever thread it happens on) come back as an XLA error instead of
// crossing the C boundary.
template <typename F>
ffi::Error Run(const char* handler, const Operand& in, const Operand& out,
               const Operand& window, ffi::Span<const int64_t> stride,
               ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pad,
               ffi::AnyBuffer result, F f) {
  Geometry g;
  if (ffi::Error e =
          CheckCall(handler, in, out, window, stride, dilation, pad, &g);
      e.failure()) {
    return e;
  }
  if (Empty(in) || Empty(out) || Empty(window)) {
    if (result.size_bytes() > 0) {
      std::memset(result.untyped_data(), 0, result.size_bytes());
    }
    return ffi::Error::Success();
  }
  try {
    if (in.dtype == ffi::DataType::F32) {
      f(float{}, g);
    } else {
      f(double{}, g);
    }
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxfactor depthwise ") + handler +
                                ": " + e.what());
  } catch (...) {
    return ffi::Error::Internal(std::string("jaxfactor depthwise ") + handler +
                                ": unknown C++ exception");
  }
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                       ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Span<const int64_t> stride,
                       ffi::Span<const int64_t> dilation,
                       ffi::Span<const int64_t> pad) {
  return Run("forward", Describe("x", x), Describe("y", *y), Describe("w", w),
             stride, dilation, pad, *y, [&](auto t, const Geometry& g) {
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
  return Run("input_grad", Describe("dx", *dx), Describe("dy", dy),
             Describe("w", w), stride, dilation, pad, *dx,
             [&](auto t, const Geometry& g) {
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
  return Run("weight_grad", Describe("x", x), Describe("dy", dy),
             Describe("dw", *dw), stride, dilation, pad, *dw,
             [&](auto t, const Geometry& g) {
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
