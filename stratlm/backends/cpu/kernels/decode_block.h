// A whole Llama-style decoder block for a few new positions (decoding) as one MLX Primitive:
// h + attention(rms_norm(h)), then + swiglu_mlp(rms_norm(.)), with the seven products on the
// quantized kernels above (compute), RoPE (Hugging Face half-split layout), the new keys and
// values written into the cache's storage and attention over it. On MLX's CPU stream every graph
// node costs several microseconds of host work; the reference block is ~60 nodes a layer, this
// is one. quantized.cpp includes this file inside its anonymous namespace.
//
// The block's weights (the two norm weights; w, scales, biases of q, k, v, o, gate, up, down: the
// scales and biases fp32 or fp16, as quantized_matmul takes them) are
// a BlockWeights the op holds, made once per plan (block_weights), not graph inputs: each input
// costs every step's graph walk and the encoder's bookkeeping, on the two threads the step has.
// Inputs: h (B, L, hidden) fp32; inv_freq (head_dim / 2) fp32; starts (B) int32, each row's left
// padding; keys, values: the cache's storage (B, n_kv_heads, capacity, head_dim) fp32. Outputs:
// the block's output (B, L, hidden) and the storage with positions write_at .. write_at + L - 1
// written (the input's buffer when MLX may reuse it, else a copy). Row b's query l sits at RoPE
// position write_at + l - starts[b] and sees storage positions starts[b] .. write_at + l.

enum { IN_H, IN_INV_FREQ, IN_STARTS, IN_KEYS, IN_VALUES, N_INPUTS };
enum { P_Q, P_K, P_V, P_O, P_GATE, P_UP, P_DOWN, N_PROJ };
enum { W_NORM_IN, W_NORM_POST, W_PROJ, N_WEIGHTS = W_PROJ + 3 * N_PROJ };

// A block's weights, evaluated and row-contiguous, with the widths they imply (checked once).
struct BlockWeights {
  std::vector<mx::array> arrays;  // the norms, then (w, scales, biases) of each projection
  float eps_in, eps_post;
  int group_size[N_PROJ], bits[N_PROJ];
  int hidden, inter, q_width, kv_width;  // q_width = n_heads * head_dim, kv_width for k and v
  const float* norm(int which) const { return arrays[which].data<float>(); }
  const mx::array& proj(int which, int part) const { return arrays[W_PROJ + 3 * which + part]; }
};

// Python's handle on a BlockWeights. (Not a shared_ptr through nanobind: its caster's deleter
// takes the GIL, and the last owner is a task on MLX's stream thread.)
struct BlockWeightsHandle {
  std::shared_ptr<const BlockWeights> weights;
};

struct BlockParams {
  float scale, rope_scale;
  int n_heads, n_kv_heads, write_at;
};

// Longest head the attention below takes (its accumulators live on the stack).
constexpr int MAX_HEAD_DIM = 512;

// whether a block's attention heads are spread over the pool (a tuning knob for benchmarks)
static std::atomic<bool> g_parallel_attention{true};

// sum of a[i] * b[i] in 8 independent partial sums: the compiler vectorizes them (one running
// sum is a chain of dependent adds, ~4 cycles each)
static inline float dot(const float* a, const float* b, int n) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7])) + tail;
}

// y = w * (x * 1 / sqrt(mean(x^2) + eps)) per row, as mx.fast.rms_norm rounds it in fp32
static void rms_norm_rows(const float* x, const float* w, float eps, int M, int K, float* y) {
  for (int m = 0; m < M; ++m) {
    const float* xr = x + (size_t)m * K;
    float* yr = y + (size_t)m * K;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, K) * (1.0f / (float)K) + eps);
    for (int k = 0; k < K; ++k) yr[k] = w[k] * (xr[k] * inv);
  }
}

// the cosines and sines of theta_i = (rope_scale * position) * inv_freq_i, i < half
static void rope_angles(int half, const float* inv_freq, float rope_scale, int position, float* cos_out, float* sin_out) {
  const float at = rope_scale * (float)position;
  for (int i = 0; i < half; ++i) {
    const float theta = at * inv_freq[i];
    cos_out[i] = std::cos(theta);
    sin_out[i] = std::sin(theta);
  }
}

// one head's pairs (i, i + D/2) turned by the angles, in place (Hugging Face half-split layout)
static void rope_head(float* x, int half, const float* c, const float* s) {
  for (int i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * c[i] - x2 * s[i];
    x[i + half] = x1 * s[i] + x2 * c[i];
  }
}

// Vector loops below are compiled for AVX-512 and AVX2 too, picked at load by the CPU (the same
// expressions each way: the same results).
#if SQ_X86 && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SQ_CLONES
#endif

// One query head over storage positions first..last of its KV head: out = softmax((q * scale) .
// k) v, the values summed four positions at a time. scores: room for last + 1 floats.
SQ_CLONES static void attend_head(const float* q, float scale, const float* keys, const float* values, int D, int first,
                                  int last, float* scores, float* out) {
  alignas(64) float qs[MAX_HEAD_DIM], acc[MAX_HEAD_DIM];
  for (int d = 0; d < D; ++d) qs[d] = q[d] * scale;
  float top = -INFINITY;
  for (int c = first; c <= last; ++c) {
    scores[c] = dot(qs, keys + (size_t)c * D, D);
    top = std::max(top, scores[c]);
  }
  float total = 0;
  for (int c = first; c <= last; ++c) total += (scores[c] = std::exp(scores[c] - top));
  const float norm = 1.0f / total;
  for (int d = 0; d < D; ++d) acc[d] = 0.0f;
  int c = first;
  for (; c + 4 <= last + 1; c += 4) {
    const float p0 = scores[c] * norm, p1 = scores[c + 1] * norm, p2 = scores[c + 2] * norm, p3 = scores[c + 3] * norm;
    const float *v0 = values + (size_t)c * D, *v1 = v0 + D, *v2 = v1 + D, *v3 = v2 + D;
    for (int d = 0; d < D; ++d) acc[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
  }
  for (; c <= last; ++c) {
    const float pc = scores[c] * norm;
    const float* vc = values + (size_t)c * D;
    for (int d = 0; d < D; ++d) acc[d] += pc * vc[d];
  }
  std::memcpy(out, acc, D * sizeof(float));
}

struct BlockJob {
  BlockParams p;
  const BlockWeights* weights;
  int B, L, hidden, inter, D, capacity;
  const float *h, *inv_freq;
  const int32_t* starts;
  float *keys, *values, *out;

  Problem problem(int which, const float* x, int M, int N, int K, float* y) const {
    const BlockWeights& wt = *weights;
    const int gs = wt.group_size[which];
    const mx::array &s = wt.proj(which, 1), &b = wt.proj(which, 2);
    const bool half = s.dtype() == mx::float16;
    Problem p{x, wt.proj(which, 0).data<uint32_t>(), half ? nullptr : s.data<float>(), half ? nullptr : b.data<float>(),
              y, M, N, K, K / gs, gs, wt.bits[which]};
    if (half) {
      p.s16 = s.data<uint16_t>();
      p.b16 = b.data<uint16_t>();
    }
    return p;
  }
  void project(int which, const float* x, int M, int N, int K, float* y) const {
    compute(problem(which, x, M, N, K, y));
  }

  void run() const {
    const int M = B * L, HQ = p.n_heads, HK = p.n_kv_heads, group = HQ / HK;
    const size_t cap = (size_t)capacity;
    thread_local std::vector<float> ybuf, qbuf, kbuf, vbuf, attbuf, hbuf, gbuf, ubuf;
    ybuf.resize((size_t)M * std::max(hidden, inter));
    qbuf.resize((size_t)M * HQ * D);
    kbuf.resize((size_t)M * HK * D);
    vbuf.resize((size_t)M * HK * D);
    attbuf.resize((size_t)M * HQ * D);
    hbuf.resize((size_t)M * hidden);
    gbuf.resize((size_t)M * inter);
    ubuf.resize((size_t)M * inter);
    float *y = ybuf.data(), *q = qbuf.data(), *k = kbuf.data(), *v = vbuf.data(), *att = attbuf.data();
    float *h1 = hbuf.data(), *gate = gbuf.data(), *up = ubuf.data();

    rms_norm_rows(h, weights->norm(W_NORM_IN), weights->eps_in, M, hidden, y);
    const Problem qkv[3] = {problem(P_Q, y, M, HQ * D, hidden, q), problem(P_K, y, M, HK * D, hidden, k),
                            problem(P_V, y, M, HK * D, hidden, v)};
    compute_many(qkv, 3);
    const int half = D / 2;
    float cos_t[MAX_HEAD_DIM / 2], sin_t[MAX_HEAD_DIM / 2];
    for (int b = 0; b < B; ++b)
      for (int l = 0; l < L; ++l) {
        const int m = b * L + l;
        rope_angles(half, inv_freq, p.rope_scale, p.write_at + l - starts[b], cos_t, sin_t);
        for (int hq = 0; hq < HQ; ++hq) rope_head(q + ((size_t)m * HQ + hq) * D, half, cos_t, sin_t);
        for (int hk = 0; hk < HK; ++hk) {
          float* kr = k + ((size_t)m * HK + hk) * D;
          rope_head(kr, half, cos_t, sin_t);
          const size_t at = (((size_t)b * HK + hk) * cap + p.write_at + l) * D;
          std::memcpy(keys + at, kr, D * sizeof(float));
          std::memcpy(values + at, v + ((size_t)m * HK + hk) * D, D * sizeof(float));
        }
      }
    // attention: each (row, query head) on its own, as pool chunks when it is worth a job (a
    // head's result does not depend on which thread takes it)
    auto attend = [&](int i) {
      // a padding query (left of its row's start) sees its own key, as the reference mask lets it
      const int m = i / HQ, hq = i % HQ, b = m / L, l = m % L;
      const int last = p.write_at + l, first = std::min(starts[b], last);
      const size_t kv = ((size_t)b * HK + hq / group) * cap * D;
      thread_local std::vector<float> scores;
      if (scores.size() < cap) scores.resize(cap);
      attend_head(q + ((size_t)m * HQ + hq) * D, p.scale, keys + kv, values + kv, D, first, last, scores.data(),
                  att + ((size_t)m * HQ + hq) * D);
    };
    const double attention_work = (double)M * HQ * (p.write_at + L) * D;
    Pool* pl = attention_work >= 16.0 * 1024 && g_parallel_attention.load(std::memory_order_relaxed) ? pool() : nullptr;
    if (pl != nullptr) {
      pl->run(M * HQ, attend);
    } else {
      for (int i = 0; i < M * HQ; ++i) attend(i);
    }
    project(P_O, att, M, hidden, HQ * D, h1);
    for (size_t i = 0; i < (size_t)M * hidden; ++i) h1[i] += h[i];
    rms_norm_rows(h1, weights->norm(W_NORM_POST), weights->eps_post, M, hidden, y);
    const Problem gate_up[2] = {problem(P_GATE, y, M, inter, hidden, gate), problem(P_UP, y, M, inter, hidden, up)};
    compute_many(gate_up, 2);
    for (size_t i = 0; i < (size_t)M * inter; ++i) {  // silu(gate) * up, as nn.silu(gate) * up
      const float g = gate[i];
      gate[i] = (g * (1.0f / (1.0f + std::exp(-g)))) * up[i];
    }
    project(P_DOWN, gate, M, hidden, inter, out);
    for (size_t i = 0; i < (size_t)M * hidden; ++i) out[i] += h1[i];
  }
};

// how many times decode_block copied a storage it could not reuse (for tests)
static std::atomic<long> g_block_storage_copies{0};

class StratlmDecodeBlock : public mx::Primitive {
 public:
  StratlmDecodeBlock(mx::Stream stream, BlockParams params, std::shared_ptr<const BlockWeights> weights)
      : mx::Primitive(stream), p_(params), weights_(std::move(weights)) {}

  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    outs[0].set_data(mx::allocator::malloc(outs[0].nbytes()));
    // The storage is written in place when no other array shares its buffer (no view of it, no
    // copy made from it without copying), else copied first. Only positions at and past the
    // cache's offset change, which KVCache's protocol holds unwritten. (MLX's is_donatable also
    // asks that no other handle reference the array; here each of the three outputs holds one.)
    bool copy[2];
    for (int i = 0; i < 2; ++i) {
      const auto& src = in[IN_KEYS + i];
      const auto& buffer = src.data_shared_ptr();
      copy[i] = !(src.flags().row_contiguous && buffer.use_count() == 1 && buffer->is_owned());
      if (copy[i]) g_block_storage_copies.fetch_add(1);
      if (copy[i]) outs[1 + i].set_data(mx::allocator::malloc(outs[1 + i].nbytes()));
      else outs[1 + i].copy_shared_buffer(src);
    }
    for (auto& a : in) enc.set_input_array(a);
    for (auto& a : outs) enc.set_output_array(a);
    // The task keeps the inputs' addresses, and their shapes only when one must be gathered (not
    // row-contiguous): a task of a kilobyte or more makes glibc consolidate its free lists on
    // every step's allocation.
    std::array<const void*, N_INPUTS> ptrs;
    std::shared_ptr<std::array<View, N_INPUTS>> gather;
    for (int i = 0; i < N_INPUTS; ++i) {
      ptrs[i] = in[i].data<void>();
      if (!in[i].flags().row_contiguous && !gather) gather = std::make_shared<std::array<View, N_INPUTS>>();
    }
    if (gather)
      for (int i = 0; i < N_INPUTS; ++i) (*gather)[i] = View::of(in[i]);
    const size_t storage_size = in[IN_KEYS].size();
    const auto& h = in[IN_H];
    BlockJob job{};
    job.p = p_;
    job.weights = weights_.get();
    job.B = h.shape(0);
    job.L = h.shape(1);
    job.hidden = h.shape(2);
    job.inter = weights_->inter;
    job.D = in[IN_KEYS].shape(3);
    job.capacity = in[IN_KEYS].shape(2);
    // the task holds the weights too: it may run after the graph (and this primitive) is gone
    enc.dispatch([job, ptrs, gather, storage_size, weights = weights_, out = outs[0].data<float>(),
                  keys = outs[1].data<float>(), values = outs[2].data<float>(), copy0 = copy[0],
                  copy1 = copy[1]]() mutable {
      std::array<std::vector<uint32_t>, N_INPUTS> tmp;
      auto data = [&](int i) { return gather ? (*gather)[i].data(tmp[i]) : ptrs[i]; };
      job.h = static_cast<const float*>(data(IN_H));
      job.inv_freq = static_cast<const float*>(data(IN_INV_FREQ));
      job.starts = static_cast<const int32_t*>(data(IN_STARTS));
      if (copy0) std::memcpy(keys, data(IN_KEYS), storage_size * sizeof(float));
      if (copy1) std::memcpy(values, data(IN_VALUES), storage_size * sizeof(float));
      job.keys = keys;
      job.values = values;
      job.out = out;
      job.run();
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("stratlm decode_block runs on the CPU only");
  }
  const char* name() const override { return "StratlmDecodeBlock"; }

 private:
  BlockParams p_;
  std::shared_ptr<const BlockWeights> weights_;
};

[[noreturn]] static void block_fail(const char* op, const std::string& why) {
  throw std::invalid_argument(std::string(op) + ": " + why);
}

// Checks the weights' shapes and dtypes, evaluates them and makes them row-contiguous.
BlockWeightsHandle block_weights(const std::vector<mx::array>& arrays, float eps_in, float eps_post,
                                                  const std::vector<int>& group_sizes, const std::vector<int>& bits) {
  auto fail = [](const std::string& why) { block_fail("block_weights", why); };
  if (arrays.size() != N_WEIGHTS) fail("expected " + std::to_string(N_WEIGHTS) + " arrays");
  if (group_sizes.size() != N_PROJ || bits.size() != N_PROJ) fail("one group size and bit width per projection");
  auto wt = std::make_shared<BlockWeights>();
  wt->arrays = arrays;
  mx::eval(wt->arrays);
  for (auto& a : wt->arrays)
    if (!a.flags().row_contiguous) {
      a = mx::contiguous(a);
      a.eval();
    }
  wt->eps_in = eps_in;
  wt->eps_post = eps_post;
  const auto& norm_in = wt->arrays[W_NORM_IN];
  if (norm_in.ndim() != 1) fail("norm weights must be (hidden,) float32");
  const int hidden = norm_in.shape(0);
  for (int i : {W_NORM_IN, W_NORM_POST})
    if (wt->arrays[i].dtype() != mx::float32 || wt->arrays[i].shape() != mx::Shape{hidden})
      fail("norm weights must be (hidden,) float32");
  auto rows_of = [&](int j) { return wt->proj(j, 0).ndim() == 2 ? wt->proj(j, 0).shape(0) : -1; };
  const int q_width = rows_of(P_Q), kv_width = rows_of(P_K), inter = rows_of(P_GATE);
  const int out_dims[N_PROJ] = {q_width, kv_width, kv_width, hidden, inter, inter, hidden};
  const int in_dims[N_PROJ] = {hidden, hidden, hidden, q_width, hidden, hidden, inter};
  for (int j = 0; j < N_PROJ; ++j) {
    const auto &w = wt->proj(j, 0), &s = wt->proj(j, 1), &b = wt->proj(j, 2);
    if (bits[j] != 4 && bits[j] != 8) fail("bits must be 4 or 8");
    if (group_sizes[j] != 32 && group_sizes[j] != 64 && group_sizes[j] != 128) fail("group_size must be 32, 64 or 128");
    if (w.dtype() != mx::uint32 || w.ndim() != 2 || w.shape(0) != out_dims[j] || in_dims[j] <= 0 ||
        w.shape(1) * 32 / bits[j] != in_dims[j])
      fail("projection " + std::to_string(j) + "'s weights do not fit the block's shapes");
    mx::Shape sshape{out_dims[j], in_dims[j] / group_sizes[j]};
    if ((s.dtype() != mx::float32 && s.dtype() != mx::float16) || b.dtype() != s.dtype() || s.shape() != sshape ||
        b.shape() != sshape)
      fail("projection " + std::to_string(j) + "'s scales and biases must be float32 or float16 (N, K / group_size)");
    wt->group_size[j] = group_sizes[j];
    wt->bits[j] = bits[j];
  }
  wt->hidden = hidden;
  wt->inter = inter;
  wt->q_width = q_width;
  wt->kv_width = kv_width;
  return BlockWeightsHandle{std::move(wt)};
}

// Checks the inputs against the weights and each other; returns (out, keys, values).
std::vector<mx::array> decode_block(const std::vector<mx::array>& inputs, const BlockWeightsHandle& handle, float scale, float rope_scale, int n_heads, int n_kv_heads, int write_at) {
  auto fail = [](const std::string& why) { block_fail("decode_block", why); };
  if (inputs.size() != N_INPUTS) fail("expected " + std::to_string(N_INPUTS) + " inputs: h, inv_freq, starts, keys, values");
  const auto& weights = handle.weights;
  if (!weights) fail("no weights");
  const auto &h = inputs[IN_H], &keys = inputs[IN_KEYS], &values = inputs[IN_VALUES];
  if (h.ndim() != 3 || h.dtype() != mx::float32 || h.shape(2) != weights->hidden)
    fail("h must be (B, L, hidden) float32, hidden the weights' width");
  const int B = h.shape(0), L = h.shape(1);
  if (keys.ndim() != 4 || keys.dtype() != mx::float32 || keys.shape() != values.shape() || values.dtype() != mx::float32)
    fail("keys and values must be (B, n_kv_heads, capacity, head_dim) float32 of one shape");
  const int D = keys.shape(3), capacity = keys.shape(2);
  if (keys.shape(0) != B || keys.shape(1) != n_kv_heads || n_kv_heads <= 0 || n_heads % n_kv_heads || D % 2)
    fail("the storage's rows or heads do not match");
  if (n_heads * D != weights->q_width || n_kv_heads * D != weights->kv_width)
    fail("the heads do not match the q, k and v projections' widths");
  if (D > MAX_HEAD_DIM) fail("head_dim above " + std::to_string(MAX_HEAD_DIM));
  if (write_at < 0 || write_at + L > capacity) fail("no room in the storage for the new positions");
  if (inputs[IN_INV_FREQ].dtype() != mx::float32 || inputs[IN_INV_FREQ].shape() != mx::Shape{D / 2})
    fail("inv_freq must be (head_dim / 2,) float32");
  if (inputs[IN_STARTS].dtype() != mx::int32 || inputs[IN_STARTS].shape() != mx::Shape{B}) fail("starts must be (B,) int32");
  BlockParams p{scale, rope_scale, n_heads, n_kv_heads, write_at};
  auto cpu = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays({h.shape(), keys.shape(), values.shape()}, {mx::float32, mx::float32, mx::float32},
                                std::make_shared<StratlmDecodeBlock>(cpu, p, weights), inputs);
}
