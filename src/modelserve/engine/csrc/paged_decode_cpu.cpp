// Decode attention over paged KV memory on a CPU: each decoding row's one query token attends to its
// context read in place from the KV slots (no gather), one pass over the keys and one over the values.
// Built and loaded by paged_decode_cpu.py, which says why it is hand-written.
//
// query [rows, heads, dim] (last dim contiguous); keys, values [slots, kv_heads, dim] contiguous;
// slots [rows, width] int64, column t of a row is the slot of its position t; positions [rows] int64,
// the position of each row's token (it sees positions first..position, first = position - window + 1
// when window > 0). Grouped-query attention: query head j reads kv head j / (heads / kv_heads).
// softcap > 0 applies tanh(score / softcap) * softcap (Gemma 2). Accumulates in float.
//
// The general loops are written so the compiler vectorizes every inner loop: bf16 keys and values are widened to
// float a slot at a time by a shift (a cast per element did not vectorize, and left the bf16 kernel as slow as the
// fp32 one, which reads twice the bytes), the softmax's exponential is a polynomial (std::exp is a library call per
// score), and the common head dims are compile-time constants. One layer of gpt2-small, 32 rows of 192 tokens, an
// Intel CPU, 2 threads (AVX-512): bf16 0.98-1.00 -> 0.83-0.85 ms, fp32 0.99-1.05 -> 0.93-0.99 ms. What was left was
// waiting on memory, which the prefetches below cut (twelve such layers, blocks scattered as in service,
// bench/decode_attention_bench.py: bf16 16.3-17.0 -> 11.2-12.8 ms, fp32 19.7-21.1 -> 18.7-19.7 ms).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#include <immintrin.h>
#endif

namespace {

// exp(x) for x <= 0 (a softmax's shifted scores): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor
// series to r^6 (relative error under 2e-7), times 2^n built in the exponent bits. Below -87 it returns
// about 1e-38 where exp underflows towards 0; a softmax's sum is at least 1, so that is 0 to float.
inline float softmax_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504f - 0.5f));  // round to nearest, x <= 0
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts, for an exact n * ln2
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);  // std::memcpy here stopped the loop from vectorizing
}

// `n` elements from `src` as float: `src` itself when it is float, else widened into `buffer`.
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint16_t* half_words = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(half_words[i]) << 16;  // bf16 is float's upper half
      buffer[i] = __builtin_bit_cast(float, bits);
    }
    return buffer;
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<float>(src[i]);
    return buffer;
  }
}

// A score with Gemma 2's soft-cap applied (cap > 0), or as it is.
inline float capped(float s, float cap) { return cap > 0.f ? std::tanh(s / cap) * cap : s; }

// Ask for the cache lines of `bytes` bytes at `p`, PREFETCH_SLOTS slots before they are read. A row's
// slots lie in blocks scattered over the memory, and the hardware prefetcher loses the stream at each
// block (and each page), so without this every pass waits on memory at every block's start. 8 slots ahead
// measured best of 2, 4, 8 and 16 (bench/decode_attention_bench.py). `p` is where a slot's span starts:
// a whole number of cache lines in for the common head dims, so every line is asked for (with an odd head
// dim the last, partial line is not, and is read on demand). Starting from `p`'s own line instead, together
// with asking for a short row's values from its first key, measured 3-5% slower at 32 rows of 192 tokens.
constexpr int64_t PREFETCH_SLOTS = 8;

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// Built with AVX-512 (and, for bf16, AVX512-BF16: AMD Zen 4, Intel Cooper Lake, Sapphire Rapids and later), at the
// compiled-in head dims (64 and 128, whole vectors), fp32 and bf16 run both passes in vector intrinsics. The key
// pass takes the query as stored and applies the scale to each sum; it reduces four heads' dot products at once
// (bf16: vdpbf16ps, whose products are exact and summed in float, subnormals flushed to zero). The value pass
// widens each bf16 value in a register on its way into the sum. The general loops widen each bf16 slot into a
// buffer first and reduce each dot product on its own: on such a CPU that left the bf16 kernel computing, not
// waiting on memory. gpt2-small's 12 layers, 2 threads, AMD Zen 4, the kernel alone, builds alternated: bf16 32
// rows of 192 tokens 16.2-18.2 -> 12.4-14.8 ms, one row of 1,024 2.9-3.3 -> 2.3-2.9 ms; fp32 one row of 1,024 5.3
// -> 4.1-4.3 ms, 32 rows within 3% (20.8-21.7 against 21.3-22.4 ms: there fp32 reads memory as fast as it comes).
#if defined(__AVX512F__) && defined(__AVX512DQ__)
template <typename T>
constexpr bool VECTOR_KERNEL = std::is_same_v<T, float>
#if defined(__AVX512BF16__)
                               || std::is_same_v<T, uint16_t>
#endif
    ;

// The sums of a0..a3's lanes: four dot products' last step at once.
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// 16 values as floats (a bf16 value, as its bits, is float's upper half).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i half_words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half_words), 16));
}

// q . k over DIM values, as 16 partial sums.
template <int64_t DIM, typename T>
inline __m512 dot(const T* q, const T* k) {
  __m512 acc = _mm512_setzero_ps();
  if constexpr (std::is_same_v<T, float>) {
#pragma GCC unroll 8
    for (int64_t d = 0; d < DIM; d += 16) acc = _mm512_fmadd_ps(load16(q + d), load16(k + d), acc);
  } else {
#if defined(__AVX512BF16__)
#pragma GCC unroll 4
    for (int64_t d = 0; d < DIM; d += 32) {
      acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + d)),
                             reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + d)));
    }
#else
    static_assert(!std::is_same_v<T, T>, "bf16 dot products need AVX512-BF16 (VECTOR_KERNEL says so)");
#endif
  }
  return acc;
}

// The key pass at one slot: score[j * width] for each of the nq query heads (`q`, [nq, DIM], unscaled),
// query head j against kv head j / groups of the slot's keys `k`.
template <int64_t DIM, typename T>
inline void vector_scores(const T* k, const T* q, int64_t nq, int64_t groups, float scale, float cap, float* score,
                          int64_t width) {
  int64_t j = 0;
  for (; j + 4 <= nq; j += 4) {
    alignas(16) float s[4];
    _mm_store_ps(s, _mm_mul_ps(_mm_set1_ps(scale), sum4(dot<DIM>(q + j * DIM, k + (j / groups) * DIM),
                                                        dot<DIM>(q + (j + 1) * DIM, k + ((j + 1) / groups) * DIM),
                                                        dot<DIM>(q + (j + 2) * DIM, k + ((j + 2) / groups) * DIM),
                                                        dot<DIM>(q + (j + 3) * DIM, k + ((j + 3) / groups) * DIM))));
    for (int64_t u = 0; u < 4; ++u) score[(j + u) * width] = capped(s[u], cap);
  }
  for (; j < nq; ++j) {
    score[j * width] = capped(_mm512_reduce_add_ps(dot<DIM>(q + j * DIM, k + (j / groups) * DIM)) * scale, cap);
  }
}

// The value pass at one slot: acc[j] += p[j * width] * values[j / groups], acc [nq, DIM].
template <int64_t DIM, typename T>
inline void vector_add_values(const T* values, int64_t nq, int64_t groups, const float* p, int64_t width, float* acc) {
  for (int64_t j = 0; j < nq; ++j) {
    const __m512 weight = _mm512_set1_ps(p[j * width]);
    const T* vh = values + (j / groups) * DIM;
    float* aj = acc + j * DIM;
#pragma GCC unroll 8
    for (int64_t d = 0; d < DIM; d += 16) {
      _mm512_storeu_ps(aj + d, _mm512_fmadd_ps(weight, load16(vh + d), _mm512_loadu_ps(aj + d)));
    }
  }
}
#else
template <typename T>
constexpr bool VECTOR_KERNEL = false;
template <int64_t DIM, typename T>  // declared for the decode loop's discarded branches, never defined or called
void vector_scores(const T*, const T*, int64_t, int64_t, float, float, float*, int64_t);
template <int64_t DIM, typename T>
void vector_add_values(const T*, int64_t, int64_t, const float*, int64_t, float*);
#endif

// HEAD_DIM > 0 fixes the head dimension at compile time (the common ones), so the per-head loops become a
// few straight vector instructions: as loops of a run-time length, their set-up cost more than their work.
template <typename scalar_t, int64_t HEAD_DIM>
void decode(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& slots,
            const at::Tensor& positions, int64_t window, double scale, double softcap, at::Tensor& out) {
  const int64_t rows = query.size(0), heads = query.size(1), dim = HEAD_DIM > 0 ? HEAD_DIM : query.size(2);
  const int64_t kv_heads = keys.size(1), width = slots.size(1), groups = heads / kv_heads;
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t* v = values.data_ptr<scalar_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t q_row = query.stride(0), q_head = query.stride(1), per_slot = kv_heads * dim;
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);
  // the vector path's element type: float, or a bf16 value's bits
  using element = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, scalar_t>;
  constexpr bool vectors = VECTOR_KERNEL<element> && HEAD_DIM > 0 && HEAD_DIM % 32 == 0;
  // A task is one row's kv heads, or a share of them when there are fewer rows than threads (batch 1
  // still uses every thread). A task walks its slots in order: each slot's heads are adjacent.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(kv_heads, std::max<int64_t>(1, (threads + rows - 1) / rows));
  const int64_t per_split = (kv_heads + splits - 1) / splits;
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    const int64_t span = per_split * groups;
    std::vector<float> acc(span * dim), scores(span * width);
    std::vector<float> qf(vectors ? 0 : span * dim), widened(vectors ? 0 : per_split * dim);  // the general loops'
    std::vector<element> query_raw(vectors ? span * dim : 0);                                // the vector path's
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / splits, h0 = (task % splits) * per_split;
      const int64_t h1 = std::min(kv_heads, h0 + per_split);
      if (h0 >= h1) continue;
      const int64_t qh0 = h0 * groups, nq = (h1 - h0) * groups;
      const int64_t last = pos[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      const int64_t* row_slots = slot + r * width + first;
      for (int64_t j = 0; j < nq; ++j) {
        const scalar_t* qp = q + r * q_row + (qh0 + j) * q_head;
        if constexpr (vectors) {
          std::memcpy(query_raw.data() + j * dim, qp, dim * sizeof(element));
        } else {
          for (int64_t d = 0; d < dim; ++d) qf[j * dim + d] = static_cast<float>(qp[d]) * fscale;
        }
      }
      const int64_t span_values = (h1 - h0) * dim;  // a slot's keys (or values) for this task's kv heads
      const int64_t span_bytes = span_values * static_cast<int64_t>(sizeof(scalar_t));
      for (int64_t t = 0; t < n; ++t) {
        if (t + PREFETCH_SLOTS < n) {
          prefetch(k + row_slots[t + PREFETCH_SLOTS] * per_slot + h0 * dim, span_bytes);
        } else if (t + PREFETCH_SLOTS - n < n) {  // the first values for the next pass (of a row under 8 slots,
          // only those after its first 8 - n)
          prefetch(v + row_slots[t + PREFETCH_SLOTS - n] * per_slot + h0 * dim, span_bytes);
        }
        if constexpr (vectors) {
          vector_scores<HEAD_DIM>(reinterpret_cast<const element*>(k + row_slots[t] * per_slot + h0 * dim),
                                  query_raw.data(), nq, groups, fscale, cap, scores.data() + t, width);
          continue;
        }
        const float* kp = as_float(k + row_slots[t] * per_slot + h0 * dim, widened.data(), span_values);
        for (int64_t j = 0; j < nq; ++j) {
          const float* kh = kp + (j / groups) * dim;
          const float* qj = qf.data() + j * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qj[d] * kh[d];
          scores[j * width + t] = capped(s, cap);
        }
      }
      for (int64_t j = 0; j < nq; ++j) {
        float* sj = scores.data() + j * width;
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < n; ++t) m = sj[t] > m ? sj[t] : m;  // std::max's NaN rule does not vectorize
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
          sj[t] = softmax_exp(sj[t] - m);
          sum += sj[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        if (t + PREFETCH_SLOTS < n) prefetch(v + row_slots[t + PREFETCH_SLOTS] * per_slot + h0 * dim, span_bytes);
        if constexpr (vectors) {
          vector_add_values<HEAD_DIM>(reinterpret_cast<const element*>(v + row_slots[t] * per_slot + h0 * dim), nq,
                                      groups, scores.data() + t, width, acc.data());
          continue;
        }
        const float* vp = as_float(v + row_slots[t] * per_slot + h0 * dim, widened.data(), span_values);
        for (int64_t j = 0; j < nq; ++j) {
          const float* vh = vp + (j / groups) * dim;
          const float p = scores[j * width + t];
          float* aj = acc.data() + j * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) aj[d] += p * vh[d];
        }
      }
      for (int64_t j = 0; j < nq; ++j) {
        scalar_t* op = o + (r * heads + qh0 + j) * dim;
        for (int64_t d = 0; d < dim; ++d) op[d] = static_cast<scalar_t>(acc[j * dim + d]);
      }
    }
  });
}

at::Tensor paged_decode(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& slots, const at::Tensor& positions, int64_t window, double scale,
                        double softcap) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 3 && values.dim() == 3,
              "query [rows, heads, dim]; keys and values [slots, kv_heads, dim]");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "keys and values must be contiguous");
  TORCH_CHECK(query.stride(2) == 1, "the query's last dimension must be contiguous");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == query.size(0) && slots.is_contiguous() &&
                  slots.scalar_type() == at::kLong,
              "slots: [rows, width] contiguous int64");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == query.size(0) && positions.is_contiguous() &&
                  positions.scalar_type() == at::kLong,
              "positions: [rows] contiguous int64");
  TORCH_CHECK(query.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type(),
              "query, keys and values must share a dtype");
  TORCH_CHECK(query.size(2) == keys.size(2) && query.size(1) % keys.size(1) == 0,
              "heads must be a multiple of kv_heads, with one head dim");
  auto out = at::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode", [&] {
    switch (query.size(2)) {
      case 64:
        decode<scalar_t, 64>(query, keys, values, slots, positions, window, scale, softcap, out);
        break;
      case 128:
        decode<scalar_t, 128>(query, keys, values, slots, positions, window, scale, softcap, out);
        break;
      default:
        decode<scalar_t, 0>(query, keys, values, slots, positions, window, scale, softcap, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(modelserve, m) {
  m.def(
      "paged_decode(Tensor query, Tensor keys, Tensor values, Tensor slots, Tensor positions, int window, "
      "float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(modelserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
