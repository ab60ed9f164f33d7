// CPU kernels for dictlearn.sparse, as XLA FFI custom calls (see cpu_kernels.py).
//
// SelectActive: row-wise compaction of JumpReLU-active latents. XLA:CPU's only selection
// primitive, TopK, costs ~3 ns per element whatever k is; on 2 cores it added ~18% to a
// block scan whose matmul it follows. Compaction needs one compare per element and a
// store per active latent, which is what this does.
//
//   pre   (n, B) float32   pre-activations of one block of the width
//   thr   (B,)   float32   thresholds of that block
//   vals  (n, kb) float32  the first kb values with pre > thr, in column order, then 0
//   cols  (n, kb) int32    their columns within the block, then 0
//   count (n,)   int32     how many columns have pre > thr (may exceed kb)

#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error SelectActive(ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> thr,
                               ffi::ResultBuffer<ffi::F32> vals,
                               ffi::ResultBuffer<ffi::S32> cols,
                               ffi::ResultBuffer<ffi::S32> count) {
  auto dims = pre.dimensions();
  if (dims.size() != 2 || thr.dimensions().size() != 1 || thr.dimensions()[0] != dims[1] ||
      vals->dimensions().size() != 2 || vals->dimensions()[0] != dims[0]) {
    return ffi::Error::InvalidArgument("select_active: expects pre (n, B), thr (B,), vals (n, kb)");
  }
  const int64_t n = dims[0], b = dims[1], kb = vals->dimensions()[1];
  const float* p = pre.typed_data();
  const float* t = thr.typed_data();
  float* v = vals->typed_data();
  int32_t* c = cols->typed_data();
  int32_t* cnt = count->typed_data();
  constexpr int64_t kChunk = 16;
  for (int64_t r = 0; r < n; ++r) {
    const float* row = p + r * b;
    float* vr = v + r * kb;
    int32_t* cr = c + r * kb;
    int64_t m = 0;
    int64_t j = 0;
    // Actives are rare: test a chunk with a branch-free (vectorisable) reduction first.
    for (; j + kChunk <= b; j += kChunk) {
      int any = 0;
      for (int64_t q = 0; q < kChunk; ++q) any |= row[j + q] > t[j + q];
      if (!any) continue;
      for (int64_t q = j; q < j + kChunk; ++q) {
        if (row[q] > t[q]) {
          if (m < kb) { vr[m] = row[q]; cr[m] = static_cast<int32_t>(q); }
          ++m;
        }
      }
    }
    for (; j < b; ++j) {
      if (row[j] > t[j]) {
        if (m < kb) { vr[m] = row[j]; cr[m] = static_cast<int32_t>(j); }
        ++m;
      }
    }
    for (int64_t s = m; s < kb; ++s) { vr[s] = 0.0f; cr[s] = 0; }
    cnt[r] = static_cast<int32_t>(m);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnSelectActive, SelectActive,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// Widening bfloat16 weights. XLA:CPU turns a bf16 parameter into a float32 copy of the
// whole array before any loop that reads it (and this CPU has no bf16 arithmetic), but
// leaves operands of custom calls alone: these read only the slice a block needs and
// widen it (bf16 is the top half of a float32) into a block-sized float32 buffer.
//
//   WidenColumns  w (R, C) bf16, start () int32 -> out (R, B) f32 = w[:, s:s+B]
//   WidenRows     w (R, C) bf16, start () int32 -> out (B, C) f32 = w[s:s+B, :]
//   GatherRows    w (R, C) bf16, idx (m,) int32 -> out (m, C) f32 = w[idx, :]
// Starts are clamped to [0, extent - B] and indices to [0, R - 1] (jnp's "clip").

static inline void Widen(const uint16_t* src, uint32_t* dst, int64_t len) {
  for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<uint32_t>(src[j]) << 16;
}

static const uint16_t* Bits(ffi::Buffer<ffi::BF16>& w) {
  return reinterpret_cast<const uint16_t*>(w.typed_data());
}

static ffi::Error WidenColumns(ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> start,
                               ffi::ResultBuffer<ffi::F32> out) {
  const int64_t r = w.dimensions()[0], c = w.dimensions()[1], b = out->dimensions()[1];
  const int64_t s = std::clamp<int64_t>(*start.typed_data(), 0, c - b);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out->typed_data());
  for (int64_t i = 0; i < r; ++i) Widen(Bits(w) + i * c + s, dst + i * b, b);
  return ffi::Error::Success();
}

static ffi::Error WidenRows(ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> start,
                            ffi::ResultBuffer<ffi::F32> out) {
  const int64_t r = w.dimensions()[0], c = w.dimensions()[1], b = out->dimensions()[0];
  const int64_t s = std::clamp<int64_t>(*start.typed_data(), 0, r - b);
  Widen(Bits(w) + s * c, reinterpret_cast<uint32_t*>(out->typed_data()), b * c);
  return ffi::Error::Success();
}

static ffi::Error GatherRows(ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::S32> idx,
                             ffi::ResultBuffer<ffi::F32> out) {
  const int64_t r = w.dimensions()[0], c = w.dimensions()[1];
  const int64_t m = idx.element_count();
  const int32_t* ix = idx.typed_data();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out->typed_data());
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = std::clamp<int64_t>(ix[i], 0, r - 1);
    Widen(Bits(w) + row * c, dst + i * c, c);
  }
  return ffi::Error::Success();
}

#define DICTLEARN_WIDEN_HANDLER(symbol, fn)                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn,                                            \
                                ffi::Ffi::Bind()                                       \
                                    .Arg<ffi::Buffer<ffi::BF16>>()                     \
                                    .Arg<ffi::Buffer<ffi::S32>>()                      \
                                    .Ret<ffi::Buffer<ffi::F32>>());

DICTLEARN_WIDEN_HANDLER(DictlearnWidenColumns, WidenColumns)
DICTLEARN_WIDEN_HANDLER(DictlearnWidenRows, WidenRows)
DICTLEARN_WIDEN_HANDLER(DictlearnGatherRows, GatherRows)
