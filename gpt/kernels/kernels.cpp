// int8 x int8-activation and int4 x int8-activation matrix-vector (and small-M) kernels for the CPU,
// and an fp32 small-M one (the server's decode rows).
//
// Batch-1 decoding reads every weight once per token, so these kernels are about streaming the
// weights at memory speed: the weights are repacked once (the *_pack ops) into one sequential
// stream, and the activation rows are quantised to int8 inside the op so that the inner loop is
// an integer dot product (4x less work per byte than dequantising to float).
//
// Activation quantisation: one fp32 scale per block of 32 input channels, d = max|x| / 127,
// xq = round(x / d). One scale per row would let a single outlier channel crush the other
// channels' resolution (~5% error instead of ~1%).
//
// Packed layouts (derived buffers, never stored in a checkpoint):
//   int8: [row group of 4 rows][block of 32 input channels][row 0..3][32 bytes]; K is zero-padded
//         to a multiple of 32 and N to a multiple of 4 (padded rows are zero and never written out).
//         Weights are clamped to [-127, 127] so the AVX2 sign trick cannot overflow.
//   int4: [row group][pair of blocks (64 input channels)][row 0..3][32 bytes]; byte i of a row holds
//         channel i of the pair in its low nibble and channel 32 + i in its high nibble, so one
//         32-byte load unpacks (and / shift+and) into two whole 32-channel blocks. K is padded to 64.
//         Scales: [row group][weight group][scale of rows 0..3, zero of rows 0..3] fp16, the stored
//         torch-style W = (q - 8) * scale + zero. fp16, not fp32: at group 32 fp32 scales are a third
//         of the bytes streamed (0.75 B/weight instead of 0.625), and fp16's 11-bit mantissa is ~40x
//         finer than the int4 grid it scales (bf16 would be only ~5x).
//
// Code paths, chosen at run time from the CPU's features (never compiled with -march=native):
//   0 scalar       portable C++ (the reference the others must agree with)
//   1 avx2         AVX2 + FMA: maddubs/madd dot products
//   2 avx512_vnni  AVX-512 (F, BW, VL, DQ) + VNNI: vpdpbusd on 64-byte loads, two rows per register
// The env var GPT_KERNELS_PATH (scalar | avx2 | avx512_vnni) lowers the default path; an op's
// `path` argument forces one for a call (tests use it to check every path on one machine).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define GPT_X86 1
#include <immintrin.h>
#define TGT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TGT_512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif

namespace {

constexpr int64_t QK = 32;    // input channels per activation block
constexpr int64_t ROWS = 4;   // output rows per packed row group
constexpr int64_t PAIR = 64;  // input channels per int4 packed unit (two blocks)

enum Path : int64_t { SCALAR = 0, AVX2 = 1, AVX512_VNNI = 2 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t detect_best_path() {
#ifdef GPT_X86
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the ymm / zmm state (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return AVX512_VNNI;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return AVX2;
#endif
  return SCALAR;
}

int64_t best_path() {
  static const int64_t best = detect_best_path();
  return best;
}

int64_t default_path() {
  static const int64_t p = [] {
    int64_t best = best_path();
    const char* env = std::getenv("GPT_KERNELS_PATH");
    if (env == nullptr || *env == '\0') return best;
    std::string s(env);
    int64_t want = s == "scalar" ? SCALAR : s == "avx2" ? AVX2 : s == "avx512_vnni" ? AVX512_VNNI : best;
    // a request above what the CPU supports would crash with SIGILL: keep the best supported one
    return std::min(want, best);
  }();
  return p;
}

int64_t resolve_path(int64_t path) {
  if (path < 0) return default_path();
  TORCH_CHECK(path <= AVX512_VNNI, "gpt_kernels: unknown code path ", path);
  TORCH_CHECK(path <= best_path(), "gpt_kernels: code path ", path, " is not supported by this CPU (best is ",
              best_path(), ")");
  return path;
}

// -- activation quantisation ------------------------------------------------------------------
// One routine for every path, compiled for the baseline ISA, so that all paths see bit-identical
// int8 activations (the tests compare them exactly against a torch reference).

struct Act {
  int64_t M = 0, K = 0, KB = 0, NGRP = 0;
  std::vector<int8_t> q;   // (M, KB * 32), zero-padded past K
  std::vector<float> d;    // (M, KB) block scales
  std::vector<int32_t> c;  // (M, KB, 8) -128 * sum(q) per 4 channels: the AVX-512 int8 offset correction
  std::vector<float> xs;   // (M, NGRP) float sums of x per weight group: the int4 zero-point term
  std::vector<float> qs;   // (M, NGRP) sums of the dequantised int8 x per weight group: the int4 "- 8" term
};

// Round half to even without libm: adding 1.5 * 2^23 leaves no fraction bits, so the FPU rounds
// (in its default round-to-nearest-even mode). Exact for |v| < 2^22; here |v| <= 127.
inline float round_even(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

template <typename T>
void quantize_act(const T* x, int64_t M, int64_t K, int64_t KB, int64_t group, int64_t NGRP, Act& a) {
  a.M = M, a.K = K, a.KB = KB, a.NGRP = NGRP;
  a.q.assign(M * KB * QK, 0);
  a.d.resize(M * KB);
  a.c.assign(M * KB * 8, 0);
  a.xs.assign(group > 0 ? M * NGRP : 0, 0.0f);
  a.qs.assign(group > 0 ? M * NGRP : 0, 0.0f);
  float buf[QK];
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * K;
    for (int64_t b = 0; b < KB; ++b) {
      const int64_t k0 = b * QK;
      float amax = 0.0f;
      for (int64_t i = 0; i < QK; ++i) {
        buf[i] = k0 + i < K ? static_cast<float>(xr[k0 + i]) : 0.0f;
        amax = std::max(amax, std::fabs(buf[i]));
      }
      const float d = amax / 127.0f;
      const float id = d > 0.0f ? 1.0f / d : 0.0f;
      int8_t* qb = a.q.data() + (m * KB + b) * QK;
      int32_t sum = 0;
      for (int64_t i = 0; i < QK; ++i) {
        float v = std::min(127.0f, std::max(-127.0f, round_even(buf[i] * id)));
        qb[i] = static_cast<int8_t>(v);
        sum += qb[i];
        a.c[(m * KB + b) * 8 + i / 4] -= 128 * qb[i];
      }
      a.d[m * KB + b] = d;
      if (group > 0) a.qs[m * NGRP + b * QK / group] += d * float(sum);
    }
    if (group > 0) {
      float* xs = a.xs.data() + m * NGRP;
      for (int64_t k = 0; k < K; ++k) xs[k / group] += static_cast<float>(xr[k]);
    }
  }
}

// -- int8 kernels -------------------------------------------------------------------------------
// Each computes rows [4 * g0, min(N, 4 * g1)) of y (M, N) fp32 for all M activation rows. The
// row-group loop is outside the M loop so a group's 4 * K weight bytes come from DRAM once and
// from L1 for the other rows.

using Int8Kernel = void (*)(const int8_t*, int64_t, int64_t, const Act&, const float*, int64_t, float*);
using Int4Kernel = void (*)(const uint8_t*, const c10::Half*, int64_t, int64_t, const Act&, int64_t, int64_t, float*);

void store4(const float* acc, int64_t g, int64_t m, int64_t N, const float* scales, float* y) {
  for (int64_t r = 0; r < ROWS; ++r) {
    const int64_t n = g * ROWS + r;
    if (n < N) y[m * N + n] = scales ? acc[r] * scales[n] : acc[r];
  }
}

void int8_scalar(const int8_t* W, int64_t g0, int64_t g1, const Act& a, const float* scales, int64_t N, float* y) {
  const int64_t KB = a.KB;
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* wg = W + g * KB * ROWS * QK;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* xr = a.q.data() + m * KB * QK;
      const float* dr = a.d.data() + m * KB;
      float acc[ROWS] = {0, 0, 0, 0};
      for (int64_t b = 0; b < KB; ++b) {
        for (int64_t r = 0; r < ROWS; ++r) {
          const int8_t* w = wg + (b * ROWS + r) * QK;
          int32_t s = 0;
          for (int64_t i = 0; i < QK; ++i) s += int32_t(w[i]) * int32_t(xr[b * QK + i]);
          acc[r] += dr[b] * float(s);
        }
      }
      store4(acc, g, m, N, scales, y);
    }
  }
}

#ifdef GPT_X86
constexpr int PREFETCH = 2048;  // bytes ahead of the weight stream (8 block-iterations of int8)

TGT_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// maddubs wants unsigned x signed bytes: |w| x (x * sign(w)) has the same products. With |w|, |x|
// <= 127 a pair sums to at most 2 * 127 * 127 < 32767, so the int16 step never saturates.
#define ALWAYS_INLINE inline __attribute__((always_inline))

// The tiles below take MT activation rows at once: the weight registers (and their unpacking) are
// shared by the MT rows, and there are enough independent accumulators to hide the fp32 add
// latency. (One accumulator chain per row, or per row pair on AVX-512, was latency-bound: ~16
// multiply-adds per cycle where the integer units sustain several times that.) With one row, two
// blocks are in flight instead (U = 2).

// one block of MT rows: acc[t][r] += d * sum(w_r * x_t)
template <int MT>
TGT_AVX2 ALWAYS_INLINE void int8_avx2_block(const int8_t* wb, const int8_t* xq, const float* d, int64_t KB, int64_t b,
                                            __m256 (&acc)[MT][ROWS], __m256i ones) {
  __m256i xv[MT];
  __m256 vd[MT];
  for (int t = 0; t < MT; ++t) {
    xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (t * KB + b) * QK));
    vd[t] = _mm256_broadcast_ss(d + t * KB + b);
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * QK));
    const __m256i aw = _mm256_sign_epi8(wv, wv);
    for (int t = 0; t < MT; ++t) {
      const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[t], wv));
      acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), vd[t], acc[t][r]);
    }
  }
}

template <int MT>
TGT_AVX2 ALWAYS_INLINE void int8_avx2_tile(const int8_t* wg, const Act& a, int64_t m0, int64_t g, int64_t N,
                                           const float* scales, float* y) {
  constexpr int U = MT == 1 ? 2 : 1;
  const int64_t KB = a.KB;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = a.q.data() + m0 * KB * QK;
  const float* d = a.d.data() + m0 * KB;
  __m256 acc[U][MT][ROWS];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < MT; ++t)
      for (int r = 0; r < ROWS; ++r) acc[u][t][r] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + U <= KB; b += U) {
    for (int u = 0; u < U; ++u) {
      const int8_t* wb = wg + (b + u) * ROWS * QK;
      _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH + 64), _MM_HINT_T0);
      int8_avx2_block<MT>(wb, xq, d, KB, b + u, acc[u], ones);
    }
  }
  for (; b < KB; ++b) int8_avx2_block<MT>(wg + b * ROWS * QK, xq, d, KB, b, acc[0], ones);
  for (int t = 0; t < MT; ++t) {
    float out[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      __m256 v = acc[0][t][r];
      for (int u = 1; u < U; ++u) v = _mm256_add_ps(v, acc[u][t][r]);
      out[r] = hsum256(v);
    }
    store4(out, g, m0 + t, N, scales, y);
  }
}

TGT_AVX2 void int8_avx2(const int8_t* W, int64_t g0, int64_t g1, const Act& a, const float* scales, int64_t N,
                        float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* wg = W + g * a.KB * ROWS * QK;
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) int8_avx2_tile<2>(wg, a, m, g, N, scales, y);
    if (m < a.M) int8_avx2_tile<1>(wg, a, m, g, N, scales, y);
  }
}

TGT_512 inline void hsum512_halves(__m512 v, float* lo, float* hi) {
  *lo = hsum256(_mm512_castps512_ps256(v));
  *hi = hsum256(_mm512_extractf32x8_ps(v, 1));
}

// vpdpbusd is unsigned x signed too, but sums straight into int32 (no saturation), so the weights
// are offset to unsigned (w ^ 0x80 = w + 128) and each int32 lane starts at -128 * (the sum of its
// own 4 activation bytes): every lane is then exactly its sum(w * x). (One correction per block in
// a single lane would be exact in int32 too, but the lanes would hold large values of opposite
// sign that cancel only after the fp32 conversion: measured 2e-5 relative error, vs 1e-7.)
// One 64-byte register holds a block of two rows, so acc[t][0] is rows 0|1 and acc[t][1] rows 2|3.
template <int MT>
TGT_512 ALWAYS_INLINE void int8_avx512_block(const int8_t* wb, const Act& a, int64_t m0, int64_t b,
                                             __m512 (&acc)[MT][2], __m512i off) {
  const int64_t KB = a.KB;
  const __m512i w01 = _mm512_xor_si512(_mm512_loadu_si512(wb), off);
  const __m512i w23 = _mm512_xor_si512(_mm512_loadu_si512(wb + 2 * QK), off);
  for (int t = 0; t < MT; ++t) {
    const int64_t o = (m0 + t) * KB + b;
    const __m512i xx =
        _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + o * QK)));
    const __m512i c = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.c.data() + o * 8)));
    const __m512 vd = _mm512_set1_ps(a.d[o]);
    acc[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, w01, xx)), vd, acc[t][0]);
    acc[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(c, w23, xx)), vd, acc[t][1]);
  }
}

template <int MT>
TGT_512 ALWAYS_INLINE void int8_avx512_tile(const int8_t* wg, const Act& a, int64_t m0, int64_t g, int64_t N,
                                            const float* scales, float* y) {
  constexpr int U = MT == 1 ? 2 : 1;
  const int64_t KB = a.KB;
  const __m512i off = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[U][MT][2];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < MT; ++t) acc[u][t][0] = acc[u][t][1] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + U <= KB; b += U) {
    for (int u = 0; u < U; ++u) {
      const int8_t* wb = wg + (b + u) * ROWS * QK;
      _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wb + PREFETCH + 64), _MM_HINT_T0);
      int8_avx512_block<MT>(wb, a, m0, b + u, acc[u], off);
    }
  }
  for (; b < KB; ++b) int8_avx512_block<MT>(wg + b * ROWS * QK, a, m0, b, acc[0], off);
  for (int t = 0; t < MT; ++t) {
    __m512 v01 = acc[0][t][0], v23 = acc[0][t][1];
    for (int u = 1; u < U; ++u) v01 = _mm512_add_ps(v01, acc[u][t][0]), v23 = _mm512_add_ps(v23, acc[u][t][1]);
    float out[ROWS];
    hsum512_halves(v01, &out[0], &out[1]);
    hsum512_halves(v23, &out[2], &out[3]);
    store4(out, g, m0 + t, N, scales, y);
  }
}

TGT_512 void int8_avx512(const int8_t* W, int64_t g0, int64_t g1, const Act& a, const float* scales, int64_t N,
                         float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    const int8_t* wg = W + g * a.KB * ROWS * QK;
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) int8_avx512_tile<4>(wg, a, m, g, N, scales, y);
    if (a.M - m >= 2) int8_avx512_tile<2>(wg, a, m, g, N, scales, y), m += 2;
    if (m < a.M) int8_avx512_tile<1>(wg, a, m, g, N, scales, y);
  }
}
#endif

// -- int4 kernels -------------------------------------------------------------------------------
// y[n] = sum_g scale[g,n] * sum_{k in g} (q[n,k] - 8) * x[k] + zero[g,n] * sum_{k in g} x[k].
// The inner loop multiplies the unsigned nibbles q by the int8 activation xq; the "- 8" comes out
// per group as -8 * scale * sum(xq * d) and the zero-point term uses the exact float sums of x.
// Centering on 8 matters: the activation's rounding error then meets the zero-mean (q - 8) * scale
// instead of q * scale, whose large mean part multiplied the error 2-3x (measured 3-4% vs ~1%).

void int4_scalar(const uint8_t* W, const c10::Half* S, int64_t g0, int64_t g1, const Act& a, int64_t group, int64_t N,
                 float* y) {
  const int64_t KB = a.KB, NP = KB / 2, NGRP = a.NGRP, bpg = group / QK;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = W + g * NP * ROWS * QK;
    const c10::Half* sg = S + g * NGRP * 2 * ROWS;
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* xr = a.q.data() + m * KB * QK;
      const float* dr = a.d.data() + m * KB;
      const float* xs = a.xs.data() + m * NGRP;
      float acc[ROWS] = {0, 0, 0, 0};
      for (int64_t p = 0; p < NP; ++p) {
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t b = 2 * p + h;
          const c10::Half* s = sg + (b / bpg) * 2 * ROWS;
          for (int64_t r = 0; r < ROWS; ++r) {
            const uint8_t* w = wg + (p * ROWS + r) * QK;
            int32_t dot = 0;
            for (int64_t i = 0; i < QK; ++i) {
              const int32_t qv = h ? (w[i] >> 4) : (w[i] & 0x0F);
              dot += qv * int32_t(xr[b * QK + i]);
            }
            acc[r] += dr[b] * static_cast<float>(s[r]) * float(dot);
          }
        }
      }
      const float* qs = a.qs.data() + m * NGRP;
      for (int64_t grp = 0; grp < NGRP; ++grp)
        for (int64_t r = 0; r < ROWS; ++r)
          acc[r] += static_cast<float>(sg[grp * 2 * ROWS + ROWS + r]) * xs[grp] -
                    8.0f * static_cast<float>(sg[grp * 2 * ROWS + r]) * qs[grp];
      store4(acc, g, m, N, nullptr, y);
    }
  }
}

#ifdef GPT_X86
// The per-group terms for 4 rows: zero * sum(x) - 8 * scale * sum(dequantised xq).
TGT_AVX2 ALWAYS_INLINE __m128 load4h(const c10::Half* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

TGT_AVX2 __m128 int4_group_terms(const c10::Half* sg, const float* xs, const float* qs, int64_t NGRP) {
  __m128 macc = _mm_setzero_ps();
  for (int64_t grp = 0; grp < NGRP; ++grp) {
    macc = _mm_fmadd_ps(load4h(sg + grp * 2 * ROWS + ROWS), _mm_set1_ps(xs[grp]), macc);
    macc = _mm_fmadd_ps(load4h(sg + grp * 2 * ROWS), _mm_set1_ps(-8.0f * qs[grp]), macc);
  }
  return macc;
}

// The nibbles are unsigned (0..15), so they go into maddubs as they are: 2 * 15 * 127 fits int16.
// acc[t][r][h]: with one activation row the low and high nibble blocks get their own chains (S = 2).
template <int MT, int S>
TGT_AVX2 ALWAYS_INLINE void int4_avx2_pair(const uint8_t* wp, const c10::Half* s0h, const c10::Half* s1h, const Act& a,
                                           int64_t m0, int64_t b0, __m256 (&acc)[MT][ROWS][S], __m256i ones,
                                           __m256i mask) {
  const int64_t KB = a.KB;
  __m256i x0[MT], x1[MT];
  __m256 vd0[MT], vd1[MT];
  for (int t = 0; t < MT; ++t) {
    const int64_t o = (m0 + t) * KB + b0;
    x0[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + o * QK));
    x1[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + o * QK + QK));
    vd0[t] = _mm256_broadcast_ss(a.d.data() + o);
    vd1[t] = _mm256_broadcast_ss(a.d.data() + o + 1);
  }
  float s0[ROWS], s1[ROWS];
  _mm_storeu_ps(s0, load4h(s0h));
  _mm_storeu_ps(s1, load4h(s1h));
  for (int r = 0; r < ROWS; ++r) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + r * QK));
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256 sr0 = _mm256_broadcast_ss(s0 + r), sr1 = _mm256_broadcast_ss(s1 + r);
    for (int t = 0; t < MT; ++t) {
      const __m256i i0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0[t]), ones);
      const __m256i i1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1[t]), ones);
      acc[t][r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_mul_ps(vd0[t], sr0), acc[t][r][0]);
      acc[t][r][S - 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_mul_ps(vd1[t], sr1), acc[t][r][S - 1]);
    }
  }
}

template <int MT>
TGT_AVX2 ALWAYS_INLINE void int4_avx2_tile(const uint8_t* wg, const c10::Half* sg, const Act& a, int64_t m0, int64_t sh,
                                           int64_t g, int64_t N, float* y) {
  constexpr int S = MT == 1 ? 2 : 1;
  const int64_t NP = a.KB / 2, NGRP = a.NGRP;
  const __m256i ones = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
  __m256 acc[MT][ROWS][S];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < ROWS; ++r)
      for (int h = 0; h < S; ++h) acc[t][r][h] = _mm256_setzero_ps();
  for (int64_t p = 0; p < NP; ++p) {
    const uint8_t* wp = wg + p * ROWS * QK;
    _mm_prefetch(reinterpret_cast<const char*>(wp + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wp + PREFETCH + 64), _MM_HINT_T0);
    const int64_t b0 = 2 * p;
    int4_avx2_pair<MT, S>(wp, sg + (b0 >> sh) * 2 * ROWS, sg + ((b0 + 1) >> sh) * 2 * ROWS, a, m0, b0, acc, ones,
                          mask);
  }
  for (int t = 0; t < MT; ++t) {
    float out[ROWS], terms[ROWS];
    _mm_storeu_ps(terms, int4_group_terms(sg, a.xs.data() + (m0 + t) * NGRP, a.qs.data() + (m0 + t) * NGRP, NGRP));
    for (int r = 0; r < ROWS; ++r) {
      __m256 v = acc[t][r][0];
      if (S == 2) v = _mm256_add_ps(v, acc[t][r][S - 1]);
      out[r] = hsum256(v) + terms[r];
    }
    store4(out, g, m0 + t, N, nullptr, y);
  }
}

TGT_AVX2 void int4_avx2(const uint8_t* W, const c10::Half* S, int64_t g0, int64_t g1, const Act& a, int64_t group,
                        int64_t N, float* y) {
  // blocks per group is a power of two: a shift, not a 64-bit division per pair (that cost ~3x at M > 1)
  const int64_t NP = a.KB / 2, sh = __builtin_ctzll(static_cast<uint64_t>(group / QK));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = W + g * NP * ROWS * QK;
    const c10::Half* sg = S + g * a.NGRP * 2 * ROWS;
    int64_t m = 0;
    for (; m + 2 <= a.M; m += 2) int4_avx2_tile<2>(wg, sg, a, m, sh, g, N, y);
    if (m < a.M) int4_avx2_tile<1>(wg, sg, a, m, sh, g, N, y);
  }
}

// One 64-byte load holds rows r and r + 1 of a block pair; after unpacking, the low nibbles are
// block b0 of both rows and the high nibbles block b0 + 1, so the activation block is broadcast to
// both 256-bit halves and each half's scale is its own row's. acc[t][rows 0|1 or 2|3][h]: with up
// to two activation rows the low and high nibble blocks get their own chains (S = 2).
template <int MT, int S>
TGT_512 ALWAYS_INLINE void int4_avx512_pair(const uint8_t* wp, const c10::Half* s0p, const c10::Half* s1p, const Act& a,
                                            int64_t m0, int64_t b0, __m512 (&acc)[MT][2][S]) {
  const int64_t KB = a.KB;
  const __m512i mask = _mm512_set1_epi8(0x0F);
  const __m512i idx01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i idx23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i zero = _mm512_setzero_si512();
  const __m512 s0 = _mm512_castps128_ps512(load4h(s0p)), s1 = _mm512_castps128_ps512(load4h(s1p));
  const __m512 sc[2][2] = {{_mm512_permutexvar_ps(idx01, s0), _mm512_permutexvar_ps(idx01, s1)},
                           {_mm512_permutexvar_ps(idx23, s0), _mm512_permutexvar_ps(idx23, s1)}};
  const __m512i v01 = _mm512_loadu_si512(wp), v23 = _mm512_loadu_si512(wp + 2 * QK);
  const __m512i nib[2][2] = {
      {_mm512_and_si512(v01, mask), _mm512_and_si512(_mm512_srli_epi16(v01, 4), mask)},
      {_mm512_and_si512(v23, mask), _mm512_and_si512(_mm512_srli_epi16(v23, 4), mask)}};
  for (int t = 0; t < MT; ++t) {
    const int64_t o = (m0 + t) * KB + b0;
    const int8_t* xq = a.q.data() + o * QK;
    const __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
    const __m512i x1 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + QK)));
    const __m512 vd0 = _mm512_set1_ps(a.d[o]), vd1 = _mm512_set1_ps(a.d[o + 1]);
    for (int h = 0; h < 2; ++h) {
      acc[t][h][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, nib[h][0], x0)),
                                     _mm512_mul_ps(vd0, sc[h][0]), acc[t][h][0]);
      acc[t][h][S - 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, nib[h][1], x1)),
                                         _mm512_mul_ps(vd1, sc[h][1]), acc[t][h][S - 1]);
    }
  }
}

template <int MT>
TGT_512 ALWAYS_INLINE void int4_avx512_tile(const uint8_t* wg, const c10::Half* sg, const Act& a, int64_t m0, int64_t sh,
                                            int64_t g, int64_t N, float* y) {
  constexpr int S = MT <= 2 ? 2 : 1;
  const int64_t NP = a.KB / 2, NGRP = a.NGRP;
  __m512 acc[MT][2][S];
  for (int t = 0; t < MT; ++t)
    for (int h = 0; h < 2; ++h)
      for (int s = 0; s < S; ++s) acc[t][h][s] = _mm512_setzero_ps();
  for (int64_t p = 0; p < NP; ++p) {
    const uint8_t* wp = wg + p * ROWS * QK;
    _mm_prefetch(reinterpret_cast<const char*>(wp + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wp + PREFETCH + 64), _MM_HINT_T0);
    const int64_t b0 = 2 * p;
    int4_avx512_pair<MT, S>(wp, sg + (b0 >> sh) * 2 * ROWS, sg + ((b0 + 1) >> sh) * 2 * ROWS, a, m0, b0, acc);
  }
  for (int t = 0; t < MT; ++t) {
    float out[ROWS], terms[ROWS];
    _mm_storeu_ps(terms, int4_group_terms(sg, a.xs.data() + (m0 + t) * NGRP, a.qs.data() + (m0 + t) * NGRP, NGRP));
    __m512 v01 = acc[t][0][0], v23 = acc[t][1][0];
    if (S == 2) v01 = _mm512_add_ps(v01, acc[t][0][S - 1]), v23 = _mm512_add_ps(v23, acc[t][1][S - 1]);
    hsum512_halves(v01, &out[0], &out[1]);
    hsum512_halves(v23, &out[2], &out[3]);
    for (int r = 0; r < ROWS; ++r) out[r] += terms[r];
    store4(out, g, m0 + t, N, nullptr, y);
  }
}

TGT_512 void int4_avx512(const uint8_t* W, const c10::Half* S, int64_t g0, int64_t g1, const Act& a, int64_t group,
                         int64_t N, float* y) {
  // blocks per group is a power of two: a shift, not a 64-bit division per pair (that cost ~3x at M > 1)
  const int64_t NP = a.KB / 2, sh = __builtin_ctzll(static_cast<uint64_t>(group / QK));
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* wg = W + g * NP * ROWS * QK;
    const c10::Half* sg = S + g * a.NGRP * 2 * ROWS;
    int64_t m = 0;
    for (; m + 4 <= a.M; m += 4) int4_avx512_tile<4>(wg, sg, a, m, sh, g, N, y);
    if (a.M - m >= 2) int4_avx512_tile<2>(wg, sg, a, m, sh, g, N, y), m += 2;
    if (m < a.M) int4_avx512_tile<1>(wg, sg, a, m, sh, g, N, y);
  }
}
#endif

// -- fp32 small-M kernels ------------------------------------------------------------------------
// y (M, N) = x (M, K) @ W (N, K)^T with fp32 weights in their own row-major layout (no packed copy):
// the server's decode step multiplies a few rows (its slots) by every weight matrix, and torch's
// BLAS runs 4-8 rows at a third to a half of its one-row speed here (docs/bench_kernels.md). As in
// the int8 kernels, a group of 4 weight rows streams from DRAM once and is reused from L1 for every
// activation row. Rows past N (the last group) read row N-1 again and are not stored.

using F32Kernel = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);

inline void f32_rows(const float* W, int64_t g, int64_t K, int64_t N, const float* (&w)[ROWS]) {
  for (int64_t r = 0; r < ROWS; ++r) w[r] = W + std::min(g * ROWS + r, N - 1) * K;
}

void f32_scalar(const float* W, const float* x, int64_t g0, int64_t g1, int64_t M, int64_t K, int64_t N, float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    const float* w[ROWS];
    f32_rows(W, g, K, N, w);
    for (int64_t m = 0; m < M; ++m) {
      float acc[ROWS] = {0, 0, 0, 0};
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < ROWS; ++r) acc[r] += w[r][k] * x[m * K + k];
      store4(acc, g, m, N, nullptr, y);
    }
  }
}

#ifdef GPT_X86
// the four sums of 4 registers at once (one tree of adds and hadds instead of four)
TGT_AVX2 ALWAYS_INLINE void hsum4_256(const __m256 (&v)[ROWS], float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

// AVX2: MT (1..3) activation rows x 4 weight rows. The MT x-vectors stay in registers and each
// weight vector is loaded once for MT FMAs: with MT = 3 that is 12 accumulators + 3 x + 1 w, all 16
// ymm registers, and 7 loads per 12 FMAs (the old "4 w, then 2 x" order took 6 per 8). One row takes
// two k-steps in flight (U = 2) to cover the FMA latency with its 4 accumulators.
//
// A group's 4 rows are contiguous (4K floats), so the whole matrix is one sequential stream. The
// group's first tile prefetches the *next* group, 2U cache lines per k-step, so the DRAM reads
// overlap a whole group of arithmetic. Prefetching only a little ahead within the group (the earlier
// version) left the next group's first lines waiting on DRAM: in a stories15M-shaped step (43 matrices,
// the 37 MB head evicting the layers from L3) the 8-row time fell 1.3-1.4x with this change.
template <int MT>
TGT_AVX2 ALWAYS_INLINE void f32_avx2_tile(const float* (&w)[ROWS], const float* x, int64_t m0, int64_t g, int64_t K,
                                          int64_t N, float* y, const float* next) {
  constexpr int U = MT == 1 ? 2 : 1;
  __m256 acc[U][MT][ROWS];
  for (int u = 0; u < U; ++u)
    for (int t = 0; t < MT; ++t)
      for (int r = 0; r < ROWS; ++r) acc[u][t][r] = _mm256_setzero_ps();
  const float* xr = x + m0 * K;
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    if (next)  // this k-step covers 8U floats of each of 4 rows: 2U lines of the next group
      for (int j = 0; j < 2 * U; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + ROWS * k + 16 * j), _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      __m256 xv[MT];
      for (int t = 0; t < MT; ++t) xv[t] = _mm256_loadu_ps(xr + t * K + k + 8 * u);
      for (int r = 0; r < ROWS; ++r) {
        const __m256 wv = _mm256_loadu_ps(w[r] + k + 8 * u);
        for (int t = 0; t < MT; ++t) acc[u][t][r] = _mm256_fmadd_ps(wv, xv[t], acc[u][t][r]);
      }
    }
  }
  for (; k < K; k += 8) {  // the tail: a masked load reads zeros past K
    const int64_t left = std::min<int64_t>(8, K - k);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 xv[MT];
    for (int t = 0; t < MT; ++t) xv[t] = _mm256_maskload_ps(xr + t * K + k, mask);
    for (int r = 0; r < ROWS; ++r) {
      const __m256 wv = _mm256_maskload_ps(w[r] + k, mask);
      for (int t = 0; t < MT; ++t) acc[0][t][r] = _mm256_fmadd_ps(wv, xv[t], acc[0][t][r]);
    }
  }
  for (int t = 0; t < MT; ++t) {
    __m256 v[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      v[r] = acc[0][t][r];
      for (int u = 1; u < U; ++u) v[r] = _mm256_add_ps(v[r], acc[u][t][r]);
    }
    float out[ROWS];
    hsum4_256(v, out);
    store4(out, g, m0 + t, N, nullptr, y);
  }
}

TGT_AVX2 void f32_avx2(const float* W, const float* x, int64_t g0, int64_t g1, int64_t M, int64_t K, int64_t N,
                       float* y) {
  for (int64_t g = g0; g < g1; ++g) {
    const float* w[ROWS];
    f32_rows(W, g, K, N, w);
    const float* next = (g + 1) * ROWS < N ? W + (g + 1) * ROWS * K : nullptr;
    for (int64_t m = 0; m < M;) {
      const int64_t left = M - m;  // tiles of 3, but 4 left go as 2 + 2 (a 1-row tile is the slowest)
      const float* pf = m == 0 ? next : nullptr;
      if (left >= 3 && left != 4) f32_avx2_tile<3>(w, x, m, g, K, N, y, pf), m += 3;
      else if (left >= 2) f32_avx2_tile<2>(w, x, m, g, K, N, y, pf), m += 2;
      else f32_avx2_tile<1>(w, x, m, g, K, N, y, pf), m += 1;
    }
  }
}

#endif

F32Kernel f32_kernel(int64_t path) {
#ifdef GPT_X86
  // fp32 has no VNNI to gain: the AVX-512 path runs the AVX2 tile. A 512-bit tile (4 activation
  // x 4 weight rows, prefetch within the group) was measured slower on AMD Zen 4 in the server's
  // decode step, the op's user: stories15M, one thread, TPOT at 2 / 4 / 8 slots 6.61 / 7.57 /
  // 9.11 ms with it, 3.65 / 4.26 / 6.54 with the AVX2 tile (PERF-NOTES.md).
  if (path == AVX512_VNNI || path == AVX2) return f32_avx2;
#endif
  return f32_scalar;
}

Int8Kernel int8_kernel(int64_t path) {
#ifdef GPT_X86
  if (path == AVX512_VNNI) return int8_avx512;
  if (path == AVX2) return int8_avx2;
#endif
  return int8_scalar;
}

Int4Kernel int4_kernel(int64_t path) {
#ifdef GPT_X86
  if (path == AVX512_VNNI) return int4_avx512;
  if (path == AVX2) return int4_avx2;
#endif
  return int4_scalar;
}

// Row groups per task: at least ~64 KiB of weights, so a small matrix does not pay for waking
// threads it cannot keep busy.
int64_t grain(int64_t bytes_per_group) { return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, bytes_per_group)); }

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2, "gpt_kernels: x must be 2-D (M, K), got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), "gpt_kernels: x must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "gpt_kernels: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) == k, "gpt_kernels: x has ", x.size(1), " columns, the weights ", k);
}

void quantize_x(const at::Tensor& xc, int64_t KB, int64_t group, int64_t NGRP, Act& a) {
  const int64_t M = xc.size(0), K = xc.size(1);
  if (xc.scalar_type() == at::kFloat)
    quantize_act(xc.data_ptr<float>(), M, K, KB, group, NGRP, a);
  else
    quantize_act(xc.data_ptr<c10::BFloat16>(), M, K, KB, group, NGRP, a);
}

// -- ops ------------------------------------------------------------------------------------------

at::Tensor int8_pack(const at::Tensor& qweight) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "gpt_kernels.int8_pack: want int8 (N, K)");
  const at::Tensor w = qweight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), NG = ceil_div(N, ROWS), KB = ceil_div(K, QK);
  at::Tensor out = at::zeros({NG * KB * ROWS * QK}, w.options());
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t g = n / ROWS, r = n % ROWS;
      for (int64_t k = 0; k < K; ++k) {
        const int8_t v = std::max<int8_t>(-127, src[n * K + k]);
        dst[((g * KB + k / QK) * ROWS + r) * QK + k % QK] = v;
      }
    }
  });
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n, int64_t k,
                       int64_t path) {
  check_x(x, k);
  const int64_t NG = ceil_div(n, ROWS), KB = ceil_div(k, QK);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.numel() == NG * KB * ROWS * QK,
              "gpt_kernels.int8_linear: packed is not int8_pack's output for (", n, ", ", k, ")");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == n,
              "gpt_kernels.int8_linear: scales must be contiguous float32 (", n, ",)");
  const Int8Kernel kern = int8_kernel(resolve_path(path));
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, n}, x.options().dtype(at::kFloat));
  if (M == 0 || n == 0) return y.to(x.scalar_type());
  Act a;
  quantize_x(xc, KB, 0, 0, a);
  const int8_t* W = packed.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, NG, grain(KB * QK * ROWS), [&](int64_t g0, int64_t g1) { kern(W, g0, g1, a, s, n, yp); });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Several int8 matrices that multiply the same x (a layer's q, k and v projections; w1 and w3):
// one call, one activation quantisation and one parallel loop over all their row groups, so the
// threads stream from one matrix into the next without a fork / join and a cold start between.
// Returns fp32 (M, sum of n): the products side by side (the caller splits and casts them, which
// the compiled graph fuses into their consumers).
at::Tensor int8_linear_cat(const at::Tensor& x, at::TensorList packed, at::TensorList scales, at::IntArrayRef ns,
                           int64_t k, int64_t path) {
  check_x(x, k);
  const int64_t J = static_cast<int64_t>(packed.size()), KB = ceil_div(k, QK);
  TORCH_CHECK(J > 0 && static_cast<int64_t>(scales.size()) == J && static_cast<int64_t>(ns.size()) == J,
              "gpt_kernels.int8_linear_cat: want as many packed weights, scales and sizes, at least one");
  std::vector<int64_t> start(J + 1, 0), col(J + 1, 0);
  for (int64_t j = 0; j < J; ++j) {
    const int64_t n = ns[j], NG = ceil_div(n, ROWS);
    TORCH_CHECK(packed[j].scalar_type() == at::kChar && packed[j].is_contiguous() &&
                    packed[j].numel() == NG * KB * ROWS * QK,
                "gpt_kernels.int8_linear_cat: packed[", j, "] is not int8_pack's output for (", n, ", ", k, ")");
    TORCH_CHECK(scales[j].scalar_type() == at::kFloat && scales[j].is_contiguous() && scales[j].numel() == n,
                "gpt_kernels.int8_linear_cat: scales[", j, "] must be contiguous float32 (", n, ",)");
    start[j + 1] = start[j] + NG;
    col[j + 1] = col[j] + n;
  }
  const Int8Kernel kern = int8_kernel(resolve_path(path));
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor out = at::empty({M, col[J]}, x.options().dtype(at::kFloat));
  if (M == 0 || col[J] == 0) return out;
  Act a;
  quantize_x(xc, KB, 0, 0, a);
  std::vector<float> part(static_cast<size_t>(M * col[J]));  // matrix j's (M, n_j) block at M * col[j]
  at::parallel_for(0, start[J], grain(KB * QK * ROWS), [&](int64_t g0, int64_t g1) {
    for (int64_t j = 0; j < J; ++j) {
      const int64_t lo = std::max(g0, start[j]), hi = std::min(g1, start[j + 1]);
      if (lo < hi)
        kern(packed[j].data_ptr<int8_t>(), lo - start[j], hi - start[j], a, scales[j].data_ptr<float>(), ns[j],
             part.data() + M * col[j]);
    }
  });
  float* o = out.data_ptr<float>();
  for (int64_t j = 0; j < J; ++j)
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(o + m * col[J] + col[j], part.data() + M * col[j] + m * ns[j], sizeof(float) * ns[j]);
  return out;
}

std::tuple<at::Tensor, at::Tensor> int4_pack(const at::Tensor& qweight, const at::Tensor& scales_and_zeros,
                                             int64_t group) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte, "gpt_kernels.int4_pack: want uint8 (N, Kp/2)");
  TORCH_CHECK(group >= QK && group % QK == 0 && ((group / QK) & (group / QK - 1)) == 0,
              "gpt_kernels.int4_pack: group size must be 32 times a power of two");
  const at::Tensor w = qweight.contiguous();
  const at::Tensor sz = scales_and_zeros.to(at::kFloat).contiguous();
  const int64_t N = w.size(0), Kp = w.size(1) * 2;
  TORCH_CHECK(Kp % group == 0 && sz.dim() == 3 && sz.size(0) == Kp / group && sz.size(1) == N && sz.size(2) == 2,
              "gpt_kernels.int4_pack: scales_and_zeros must be (Kp/group, N, 2)");
  const int64_t NG = ceil_div(N, ROWS), NP = ceil_div(Kp, PAIR), NGRP = ceil_div(NP * PAIR, group);
  at::Tensor out = at::zeros({NG * NP * ROWS * QK}, w.options());
  at::Tensor sc = at::zeros({NG * NGRP * 2 * ROWS}, sz.options().dtype(at::kHalf));
  const uint8_t* src = w.data_ptr<uint8_t>();
  const float* szp = sz.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  c10::Half* scp = sc.data_ptr<c10::Half>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t g = n / ROWS, r = n % ROWS;
      for (int64_t k = 0; k < Kp; ++k) {
        const uint8_t byte = src[n * (Kp / 2) + k / 2];
        const uint8_t q = (k % 2) ? (byte >> 4) : (byte & 0x0F);
        const int64_t p = k / PAIR, i = k % PAIR;
        dst[((g * NP + p) * ROWS + r) * QK + i % QK] |= (i < QK) ? q : uint8_t(q << 4);
      }
      for (int64_t grp = 0; grp < Kp / group; ++grp) {
        const float scale = szp[(grp * N + n) * 2], zero = szp[(grp * N + n) * 2 + 1];
        scp[(g * NGRP + grp) * 2 * ROWS + r] = c10::Half(scale);
        scp[(g * NGRP + grp) * 2 * ROWS + ROWS + r] = c10::Half(zero);
      }
    }
  });
  return {out, sc};
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t n, int64_t k,
                       int64_t group, int64_t path) {
  check_x(x, k);
  TORCH_CHECK(group >= QK && group % QK == 0 && ((group / QK) & (group / QK - 1)) == 0,
              "gpt_kernels.int4_linear: group size must be 32 times a power of two");
  const int64_t Kp = ceil_div(k, group) * group;
  const int64_t NG = ceil_div(n, ROWS), NP = ceil_div(Kp, PAIR), NGRP = ceil_div(NP * PAIR, group);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == NG * NP * ROWS * QK,
              "gpt_kernels.int4_linear: packed is not int4_pack's output for (", n, ", ", k, ")");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == NG * NGRP * 2 * ROWS,
              "gpt_kernels.int4_linear: scales are not int4_pack's output for (", n, ", ", k, ")");
  const Int4Kernel kern = int4_kernel(resolve_path(path));
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, n}, x.options().dtype(at::kFloat));
  if (M == 0 || n == 0) return y.to(x.scalar_type());
  Act a;
  quantize_x(xc, NP * 2, group, NGRP, a);
  const uint8_t* W = packed.data_ptr<uint8_t>();
  const c10::Half* S = scales.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, NG, grain(NP * PAIR / 2 * ROWS),
                   [&](int64_t g0, int64_t g1) { kern(W, S, g0, g1, a, group, n, yp); });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "gpt_kernels.f32_linear: x must be float32 (M, K) on the CPU");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(1) == x.size(1),
              "gpt_kernels.f32_linear: weight must be float32 (N, K) with K = ", x.size(1));
  const F32Kernel kern = f32_kernel(resolve_path(path));
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const float* W = w.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, ceil_div(N, ROWS), grain(K * ROWS * 4),
                   [&](int64_t g0, int64_t g1) { kern(W, xp, g0, g1, M, K, N, yp); });
  return y;
}

// The activation quantisation on its own, for the tests: (q int8 (M, KB*32), d fp32 (M, KB)).
std::tuple<at::Tensor, at::Tensor> quantize_activation(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "gpt_kernels.quantize_activation: x must be 2-D");
  check_x(x, x.size(1));
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), KB = ceil_div(xc.size(1), QK);
  Act a;
  quantize_x(xc, KB, 0, 0, a);
  at::Tensor q = at::empty({M, KB * QK}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, KB}, x.options().dtype(at::kFloat));
  std::memcpy(q.data_ptr<int8_t>(), a.q.data(), a.q.size());
  std::memcpy(d.data_ptr<float>(), a.d.data(), a.d.size() * sizeof(float));
  return {q, d};
}

int64_t cpu_path_op() { return default_path(); }
int64_t best_path_op() { return best_path(); }

}  // namespace

TORCH_LIBRARY(gpt_kernels, m) {
  m.def("int8_pack(Tensor qweight) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scales, int n, int k, int path=-1) -> Tensor");
  m.def("int4_pack(Tensor qweight, Tensor scales_and_zeros, int group_size) -> (Tensor, Tensor)");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, int n, int k, int group_size, int path=-1) -> Tensor");
  m.def("quantize_activation(Tensor x) -> (Tensor, Tensor)");
  m.def("f32_linear(Tensor x, Tensor weight, int path=-1) -> Tensor");
  m.def("int8_linear_cat(Tensor x, Tensor[] packed, Tensor[] scales, int[] n, int k, int path=-1) -> Tensor");
  m.def("cpu_path() -> int", &cpu_path_op);
  m.def("best_path() -> int", &best_path_op);
}

TORCH_LIBRARY_IMPL(gpt_kernels, CPU, m) {
  m.impl("int8_pack", &int8_pack);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_pack", &int4_pack);
  m.impl("int4_linear", &int4_linear);
  m.impl("quantize_activation", &quantize_activation);
  m.impl("f32_linear", &f32_linear);
  m.impl("int8_linear_cat", &int8_linear_cat);
}
