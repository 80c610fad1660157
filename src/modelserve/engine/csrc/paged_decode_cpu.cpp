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
// Written so the compiler vectorizes every inner loop: bf16 keys and values are widened to float a slot
// at a time by a shift (a cast per element did not vectorize, and left the bf16 kernel as slow as the fp32
// one, which reads twice the bytes), the softmax's exponential is a polynomial (std::exp is a library call
// per score), and the common head dims are compile-time constants. One layer of gpt2-small, 32 rows of 192
// tokens, 2 threads (AVX-512): bf16 0.98-1.00 -> 0.83-0.85 ms, fp32 0.99-1.05 -> 0.93-0.99 ms. What was
// left was waiting on memory, which the prefetches below cut (twelve such layers, blocks scattered as in
// service, bench/decode_attention_bench.py: bf16 16.3-17.0 -> 11.2-12.8 ms, fp32 19.7-21.1 -> 18.7-19.7 ms).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

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
  // A task is one row's kv heads, or a share of them when there are fewer rows than threads (batch 1
  // still uses every thread). A task walks its slots in order: each slot's heads are adjacent.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(kv_heads, std::max<int64_t>(1, (threads + rows - 1) / rows));
  const int64_t per_split = (kv_heads + splits - 1) / splits;
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    const int64_t span = per_split * groups;
    std::vector<float> qf(span * dim), acc(span * dim), scores(span * width), widened(per_split * dim);
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
        for (int64_t d = 0; d < dim; ++d) qf[j * dim + d] = static_cast<float>(qp[d]) * fscale;
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
        const float* kp = as_float(k + row_slots[t] * per_slot + h0 * dim, widened.data(), span_values);
        for (int64_t j = 0; j < nq; ++j) {
          const float* kh = kp + (j / groups) * dim;
          const float* qj = qf.data() + j * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qj[d] * kh[d];
          if (cap > 0.f) s = std::tanh(s / cap) * cap;
          scores[j * width + t] = s;
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
