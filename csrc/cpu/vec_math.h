// SIMD helpers on GCC vector extensions for the CPU kernels.
//
// No include guard on purpose: a kernel file includes this once per ISA, inside a
// namespace and a `#pragma GCC target` region, after defining `kVecBytes` (the ISA's
// vector width in bytes) and including <cmath>, <cstring>, <cstdint>, <type_traits>,
// <utility>, <immintrin.h> (x86) and c10's Half/BFloat16. Every ISA thus gets its own copy of these inline
// templates compiled for its own instructions (runtime dispatch, no -march=native).
//
// Vec<A, L> is L lanes of A (float or double); L = 1 serves channel tails. Elementwise
// formulas follow csrc/common/math.h (the shared truth); only exp is approximated.

template <typename T, int L>
struct VecOf {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
};
template <typename T, int L>
using Vec = typename VecOf<T, L>::type;

// Lanes of T in one full vector register of this ISA.
template <typename T>
inline constexpr int kLanes = kVecBytes / int(sizeof(T));

template <class V>
using ElemOf = std::remove_cvref_t<decltype(std::declval<V>()[0])>;
template <class V>
inline constexpr int kCount = int(sizeof(V) / sizeof(ElemOf<V>));

template <class V>
inline V vload(const ElemOf<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <class V>
inline void vstore(ElemOf<V>* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Stores v to p (aligned to sizeof(V)) past the caches where the ISA has a streaming store
// for V; vstream_fence() orders them before later stores (call it before the data is read
// by another thread).
template <class V>
inline void vstream(ElemOf<V>* p, V v) {
#ifdef EFFNET_CPU_X86
  if constexpr (std::is_same_v<ElemOf<V>, float> && sizeof(V) == 64 && kVecBytes == 64) {
    _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
    return;
  } else if constexpr (std::is_same_v<ElemOf<V>, float> && sizeof(V) == 32 && kVecBytes >= 32) {
    _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
    return;
  }
#endif
  vstore(p, v);
}

inline void vstream_fence() {
#ifdef EFFNET_CPU_X86
  _mm_sfence();
#endif
}

// s in every lane. s - 0 is s for every s, so the compiler emits a plain broadcast (a
// broadcast load in the GEMM micro kernel); V{} + s (0 + s is +0 for s = -0) cost a
// scalar add and a register broadcast per use.
template <class V>
inline V vsplat(ElemOf<V> s) {
  return s - V{};
}

// Makes the compiler have every v[i] in a register here (an empty asm that reads and
// rewrites them; volatile, so it is neither moved into a branch nor dropped). A block's
// accumulators pass through it before their conditional stores: otherwise GCC sinks each
// accumulator's whole FMA chain into its store's branch, one serial chain per pixel (25
// FMAs, 100 cycles of latency, for a 5x5 dx gather) instead of kBlock interleaved ones.
template <class V, int N>
inline void materialize(V (&v)[N]) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (sizeof(V) >= 16 && sizeof(V) <= kVecBytes) {  // whole SIMD registers
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) __asm__ volatile("" : "+v"(v[i]));
  }
#endif
}

// Calls f(c, Vec<A, L>{}) over channels c < C: full vectors, one half vector, then single
// lanes (a channel count 8 past a multiple of 16, as B0's 24 and 40, takes no scalar step
// on AVX-512).
template <typename A, class F>
inline void for_channel_vectors(int64_t C, F&& f) {
  constexpr int L = kLanes<A>;
  int64_t c = 0;
  for (; c + L <= C; c += L) f(c, Vec<A, L>{});
  if constexpr (L >= 4) {
    if (c + L / 2 <= C) f(c, Vec<A, L / 2>{}), c += L / 2;
  }
  for (; c < C; ++c) f(c, Vec<A, 1>{});
}

// Load kCount<V> values stored as X (float, double, BFloat16, Half) into lanes of V.
template <class V, typename X>
inline V load_as(const X* p) {
  constexpr int L = kCount<V>;
  if constexpr (std::is_same_v<X, ElemOf<V>>) {
    return vload<V>(p);
  } else if constexpr (std::is_same_v<X, c10::BFloat16>) {
    Vec<uint16_t, L> h;
    std::memcpy(&h, p, sizeof(h));
    return (V)(__builtin_convertvector(h, Vec<uint32_t, L>) << 16);
  } else {
    static_assert(std::is_same_v<X, c10::Half>, "unsupported storage type");
    Vec<_Float16, L> h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_convertvector(h, V);
  }
}

// Store lanes of V as X, rounding to nearest even (bfloat16 NaN -> 0x7FC0 like c10).
template <class V, typename X>
inline void store_as(X* p, V v) {
  constexpr int L = kCount<V>;
  if constexpr (std::is_same_v<X, ElemOf<V>>) {
    vstore(p, v);
  } else if constexpr (std::is_same_v<X, c10::BFloat16>) {
    using U = Vec<uint32_t, L>;
    const U u = (U)v;
    U r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = (v != v) ? U{} + 0x7FC0u : r;
    const auto h = __builtin_convertvector(r, Vec<uint16_t, L>);
    std::memcpy(p, &h, sizeof(h));
  } else {
    static_assert(std::is_same_v<X, c10::Half>, "unsupported storage type");
    const auto h = __builtin_convertvector(v, Vec<_Float16, L>);
    std::memcpy(p, &h, sizeof(h));
  }
}

// 1 / k! for k = 0..D, computed at compile time (each k! is exact in float).
template <int D>
struct InvFactorials {
  float v[D + 1] = {};
  constexpr InvFactorials() {
    float factorial = 1.0f;
    for (int k = 0; k <= D; ++k) {
      if (k > 0) factorial *= float(k);
      v[k] = 1.0f / factorial;
    }
  }
};

// Cody-Waite reduction r = x - n ln2 (ln2 split in a high part exact in float and a low
// part), then sum_{k <= D} r^k / k! by Horner; |r| <= ln2 / 2.
template <int D, class V>
inline V exp_reduced_taylor(V x, V n) {
  static constexpr InvFactorials<D> c{};
  V r = x - n * 0.693145751953125f;
  r = r - n * 1.42860682030941723e-6f;
  V p = vsplat<V>(c.v[D]);
#pragma GCC unroll 8
  for (int k = D - 1; k >= 0; --k) p = p * r + c.v[k];
  return p;
}

// exp(x). float: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a Taylor
// polynomial in r and a scale by 2^n. The input is clamped to [-87, 88] (NaN passes
// through). With AVX-512, n comes from vrndscaleps and 2^n from vscalefps, and a
// degree-6 polynomial (truncation < 1.3e-7 relative) keeps the sigmoid chain short;
// elsewhere a degree-7 polynomial and 2^n built in the exponent bits; 1-3 ulp either
// way. double: libm per lane (the float64 path is for gradcheck, not speed).
template <class V>
inline V vexp(V x) {
  if constexpr (std::is_same_v<ElemOf<V>, double>) {
    for (int i = 0; i < kCount<V>; ++i) x[i] = std::exp(x[i]);
    return x;
  }
#if defined(__x86_64__) || defined(__i386__)
  else if constexpr (kVecBytes == 64 && kCount<V> == 16) {
    // max/min return their second operand when either is NaN: NaN passes through.
    const V hi = (V)_mm512_min_ps((__m512)vsplat<V>(88.0f), (__m512)x);
    const V xv = (V)_mm512_max_ps((__m512)vsplat<V>(-87.0f), (__m512)hi);
    const V n = (V)_mm512_roundscale_ps((__m512)(xv * 1.44269504088896341f),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V p = exp_reduced_taylor<6>(xv, n);
    return (V)_mm512_scalef_ps((__m512)p, (__m512)n);
  }
#endif
  else {
    using I = Vec<int32_t, kCount<V>>;
    x = x < -87.0f ? vsplat<V>(-87.0f) : x;
    x = x > 88.0f ? vsplat<V>(88.0f) : x;
    constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to integer
    const V t = x * 1.44269504088896341f + kMagic;
    const V n = t - kMagic;
    const V p = exp_reduced_taylor<7>(x, n);
    const I e = ((I)t - 0x4B400000 + 127) << 23;
    return p * (V)e;
  }
}

// 1 / d. With AVX-512 float lanes: rcp14 (relative error < 2^-14) and one Newton step,
// about 1 ulp and several times cheaper than vdivps; plain division elsewhere.
template <class V>
inline V vrecip(V d) {
  if constexpr (kVecBytes == 64 && std::is_same_v<ElemOf<V>, float> && kCount<V> == 16) {
    const V r = (V)_mm512_rcp14_ps((__m512)d);
    return r * (2.0f - d * r);
  } else if constexpr (kVecBytes == 64 && std::is_same_v<ElemOf<V>, float> && kCount<V> == 8) {
    const V r = (V)_mm256_rcp14_ps((__m256)d);
    return r * (2.0f - d * r);
  } else {
    return 1.0f / d;
  }
}

template <class V>
inline V vsigmoid(V z) {
  return vrecip(1.0f + vexp(-z));
}

// Runs f.template operator()<ACT>() with the runtime Act code as a constant (codes other
// than 1-3 run the identity; check_act refuses them before any kernel runs), so the
// loops inside f evaluate act_forward / act_backward with no per-element branch.
template <class F>
inline void with_act_code(int64_t act, F&& f) {
  switch (act) {
    case 1: return f.template operator()<1>();
    case 2: return f.template operator()<2>();
    case 3: return f.template operator()<3>();
    default: return f.template operator()<0>();
  }
}

// act(z) for the Act codes of common/math.h (0 identity, 1 relu, 2 silu, 3 relu6); the
// comparisons are written so that NaN passes through relu and relu6 (common/math.h).
template <class V>
inline V act_forward(V z, int64_t act) {
  if (act == 1) return z < 0 ? V{} : z;
  if (act == 2) return z * vsigmoid(z);
  if (act == 3) {
    const V six = vsplat<V>(6), low = z < 0 ? V{} : z;
    return low > six ? six : low;
  }
  return z;
}

// act'(z): relu' = 0 where z <= 0, else 1; silu' = s * (1 + z * (1 - s)), s = sigmoid(z);
// relu6' = 0 where z <= 0 or z >= 6, else 1 (1 at NaN, as in common/math.h).
template <class V>
inline V act_backward(V z, int64_t act) {
  if (act == 1) return z <= 0 ? V{} : vsplat<V>(1);
  if (act == 2) {
    const V s = vsigmoid(z);
    return s * (1.0f + z * (1.0f - s));
  }
  if (act == 3) {
    const V above = z <= 0 ? V{} : vsplat<V>(1);
    return z >= vsplat<V>(6) ? V{} : above;
  }
  return vsplat<V>(1);
}
