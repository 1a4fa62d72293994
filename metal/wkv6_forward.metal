// WKV-6 sequence forward (also RWKV-5, whose decay does not depend on the
// position): with the bonus u of the current token,
//   y_t = S_{t-1} r_t + v_t (r_t . (u * k_t))
//   S_t = S_{t-1} diag(exp(w_t)) + v_t k_t^T
// state S[value, key] in float32, from the initial state `state_in`.
//
// Inputs:  r, w, k, v  [B, T, H, N] (any float dtype; w is the log decay)
//          u           [H, N] (any float dtype)
//          state_in    [B, H, N, N] float32
//          mask        [B, T] bool, read only when HAS_MASK
// Outputs: y           [B, T, H, N] float32 (0 at masked positions)
//          state_out   [B, H, N, N] float32
//          checkpoints [B, H, ceil(T / CHECKPOINT), N, N] float32: the state
//                      before steps 0, CHECKPOINT, 2 CHECKPOINT, ...
//                      (written only when CHECKPOINT > 0)
// Template: N head size, CHECKPOINT interval (0: none), HAS_MASK.
//
// Layout: each thread owns one value row of the state (N floats in thread
// memory), so a row's output and update need no communication; the
// threadgroup only shares the step's r, exp(w), k and u * k through
// threadgroup memory. A threadgroup covers `rows` = threads_per_threadgroup.x
// rows of one (batch, head), and rows must divide N. Threadgroups loop over
// the B * H * (N / rows) work items, so any number of threadgroups is valid
// (the grid must be a whole number of threadgroups).
const uint T = r_shape[1];
const uint H = r_shape[2];
const uint rows = threads_per_threadgroup.x;
const uint lane = thread_position_in_threadgroup.x;
const uint slices = uint(N) / rows;
const uint items = uint(r_shape[0]) * H * slices;
// The interval is never 0 in a division, even in a branch that is not taken.
const uint interval = CHECKPOINT > 0 ? uint(CHECKPOINT) : 1u;
const uint segments = (T + interval - 1) / interval;

threadgroup float shared_r[N];
threadgroup float shared_decay[N];
threadgroup float shared_k[N];
threadgroup float shared_uk[N];

for (uint item = threadgroup_position_in_grid.x; item < items; item += threadgroups_per_grid.x) {
  const uint batch_head = item / slices;
  const uint batch = batch_head / H;
  const uint head = batch_head % H;
  const uint row = (item % slices) * rows + lane;
  const uint state_row = (batch_head * N + row) * N;

  float s[N];
  for (int j = 0; j < N; ++j) {
    s[j] = state_in[state_row + j];
  }

  for (uint t = 0; t < T; ++t) {
    const uint base = ((batch * T + t) * H + head) * N;
    if (CHECKPOINT > 0 && t % interval == 0) {
      const uint slot = ((batch_head * segments + t / interval) * N + row) * N;
      for (int j = 0; j < N; ++j) {
        checkpoints[slot + j] = s[j];
      }
    }

    // The previous step's readers must be done before the vectors change.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint j = lane; j < uint(N); j += rows) {
      const float key = float(k[base + j]);
      shared_r[j] = float(r[base + j]);
      shared_decay[j] = metal::exp(float(w[base + j]));
      shared_k[j] = key;
      shared_uk[j] = float(u[head * N + j]) * key;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float out = 0.0f;
    if (!HAS_MASK || mask[batch * T + t]) {
      const float v_row = float(v[base + row]);
      for (int j = 0; j < N; ++j) {
        out += shared_r[j] * (s[j] + shared_uk[j] * v_row);
        s[j] = s[j] * shared_decay[j] + v_row * shared_k[j];
      }
    }
    y[base + row] = out;
  }

  for (int j = 0; j < N; ++j) {
    state_out[state_row + j] = s[j];
  }
}
