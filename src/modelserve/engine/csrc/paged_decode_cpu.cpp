// Decode attention over paged KV memory on a CPU: each decoding row's one query token attends to its
// context read in place from the KV slots (no gather), one pass over the keys and one over the values.
// Built and loaded by paged_decode_cpu.py, which says why it is hand-written.
//
// query [rows, heads, dim] (last dim contiguous); keys, values [slots, kv_heads, dim] contiguous;
// slots [rows, width] int64, column t of a row is the slot of its position t; positions [rows] int64,
// the position of each row's token (it sees positions first..position, first = position - window + 1
// when window > 0). Grouped-query attention: query head j reads kv head j / (heads / kv_heads).
// softcap > 0 applies tanh(score / softcap) * softcap (Gemma 2). Accumulates in float.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void decode(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& slots,
            const at::Tensor& positions, int64_t window, double scale, double softcap, at::Tensor& out) {
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
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
    std::vector<float> qf(span * dim), acc(span * dim), scores(span * width);
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
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* kp = k + row_slots[t] * per_slot;
        for (int64_t j = 0; j < nq; ++j) {
          const scalar_t* kh = kp + (h0 + j / groups) * dim;
          const float* qj = qf.data() + j * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qj[d] * static_cast<float>(kh[d]);
          if (cap > 0.f) s = std::tanh(s / cap) * cap;
          scores[j * width + t] = s;
        }
      }
      for (int64_t j = 0; j < nq; ++j) {
        float* sj = scores.data() + j * width;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::max(m, sj[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) {
          sj[t] = std::exp(sj[t] - m);
          sum += sj[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* vp = v + row_slots[t] * per_slot;
        for (int64_t j = 0; j < nq; ++j) {
          const scalar_t* vh = vp + (h0 + j / groups) * dim;
          const float p = scores[j * width + t];
          float* aj = acc.data() + j * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) aj[d] += p * static_cast<float>(vh[d]);
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
    decode<scalar_t>(query, keys, values, slots, positions, window, scale, softcap, out);
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
