// WKV-7 backward. Per (batch, head), with d_t = exp(w_t), sa_t = S_{t-1} a_t,
//   S_t = S_{t-1} diag(d_t) + sa_t b_t^T + v_t k_t^T,   y_t = S_t r_t,
// and G = dL/dS_t (starting from `dstate_out` after the last step), step t
// going backwards computes:
//   G        += dy_t r_t^T
//   dr_t[j]   = sum_i S_t[i, j] dy_t[i]
//   dv_t[i]   = sum_j G[i, j] k_t[j]
//   dsa[i]    = sum_j G[i, j] b_t[j]
//   dk_t[j]   = sum_i G[i, j] v_t[i]
//   db_t[j]   = sum_i G[i, j] sa_t[i]
//   dw_t[j]   = d_t[j] * sum_i G[i, j] S_{t-1}[i, j]
//   da_t[j]   = sum_i S_{t-1}[i, j] dsa[i]
//   G         <- G diag(d_t) + dsa a_t^T          (now dL/dS_{t-1})
// and finally dstate_in = G. A masked position leaves G unchanged and has
// zero gradients.
//
// The states S_t come from recomputation, never from dividing by d_t: the
// forward pass saved the state every CHECKPOINT steps, and for each segment
// (last first) the threadgroup recomputes the segment's states from its
// checkpoint into `scratch`, then walks the segment backwards.
//
// Inputs:  r, w, k, v, a, b  [B, T, H, N] (any float dtype; w is the log decay)
//          mask              [B, T] bool, read only when HAS_MASK
//          checkpoints       [B, H, ceil(T / CHECKPOINT), N, N] float32
//          dy                [B, T, H, N] float32
//          dstate_out        [B, H, N, N] float32
// Outputs: dr, dw, dk, dv, da, db  [B, T, H, N] float32
//          dstate_in         [B, H, N, N] float32
//          scratch           [threadgroups, CHECKPOINT + 1, N, N] float32
// Template: N head size, CHECKPOINT interval (> 0), HAS_MASK.
//
// Layout: threadgroups of exactly N threads loop over the B * H heads.
// Thread i owns row i and column i of G (2 N floats), so the sums over j
// above are thread-local for the row quantities (dv, dsa) and the column
// quantities (dr, dk, db, dw, da). Only dsa and the step's vectors go
// through threadgroup memory. The two copies of G get the same arithmetic, so
// they stay equal.
// NOTE: a thread keeps 3 N floats (G row, G column, recomputed S row) in
// thread memory; at N = 128 the Metal compiler may spill them or lower the
// pipeline's maximum threadgroup size below N, which MLX would reject.
const uint T = r_shape[1];
const uint H = r_shape[2];
const uint items = uint(r_shape[0]) * H;
const uint segments = (T + CHECKPOINT - 1) / CHECKPOINT;
const uint i = thread_position_in_threadgroup.x;
const uint scratch_base = threadgroup_position_in_grid.x * (CHECKPOINT + 1) * N * N;

threadgroup float shared_r[N];
threadgroup float shared_decay[N];
threadgroup float shared_k[N];
threadgroup float shared_v[N];
threadgroup float shared_a[N];
threadgroup float shared_b[N];
threadgroup float shared_dy[N];
threadgroup float shared_dsa[N];
threadgroup float shared_sa[CHECKPOINT * N];

for (uint item = threadgroup_position_in_grid.x; item < items; item += threadgroups_per_grid.x) {
  const uint batch_head = item;
  const uint batch = batch_head / H;
  const uint head = batch_head % H;

  float grad_row[N];
  float grad_col[N];
  for (int j = 0; j < N; ++j) {
    grad_row[j] = dstate_out[(batch_head * N + i) * N + j];
    grad_col[j] = dstate_out[(batch_head * N + j) * N + i];
  }

  for (int segment = int(segments) - 1; segment >= 0; --segment) {
    const uint t0 = uint(segment) * CHECKPOINT;
    const uint t1 = metal::min(t0 + uint(CHECKPOINT), T);

    // Recompute the segment: scratch slot n holds S after n steps of it,
    // written row by row. Wait until every thread is done reading the
    // previous segment's slots.
    threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
    float s[N];
    const uint checkpoint_row = ((batch_head * segments + uint(segment)) * N + i) * N;
    for (int j = 0; j < N; ++j) {
      s[j] = checkpoints[checkpoint_row + j];
      scratch[scratch_base + i * N + j] = s[j];
    }
    for (uint t = t0; t < t1; ++t) {
      const uint base = ((batch * T + t) * H + head) * N;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      shared_decay[i] = metal::exp(float(w[base + i]));
      shared_k[i] = float(k[base + i]);
      shared_a[i] = float(a[base + i]);
      shared_b[i] = float(b[base + i]);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      float sa = 0.0f;
      if (!HAS_MASK || mask[batch * T + t]) {
        sa = wkv7_advance_row<N>(s, float(v[base + i]), shared_decay, shared_k, shared_a, shared_b);
      }
      shared_sa[(t - t0) * N + i] = sa;
      const uint slot = scratch_base + ((t - t0 + 1) * N + i) * N;
      for (int j = 0; j < N; ++j) {
        scratch[slot + j] = s[j];
      }
    }
    threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);

    // Walk the segment backwards.
    for (int t = int(t1) - 1; t >= int(t0); --t) {
      const uint step = uint(t) - t0;
      const uint base = ((batch * T + uint(t)) * H + head) * N;
      const uint after = scratch_base + (step + 1) * N * N;
      const uint before = scratch_base + step * N * N;
      const bool valid = !HAS_MASK || mask[batch * T + uint(t)];

      threadgroup_barrier(mem_flags::mem_threadgroup);
      shared_r[i] = float(r[base + i]);
      shared_decay[i] = metal::exp(float(w[base + i]));
      shared_k[i] = float(k[base + i]);
      shared_v[i] = float(v[base + i]);
      shared_a[i] = float(a[base + i]);
      shared_b[i] = float(b[base + i]);
      shared_dy[i] = dy[base + i];
      threadgroup_barrier(mem_flags::mem_threadgroup);

      float grad_r = 0.0f;
      float grad_v = 0.0f;
      float grad_k = 0.0f;
      float grad_b = 0.0f;
      float dsa = 0.0f;
      if (valid) {
        const float dy_i = shared_dy[i];
        const float r_i = shared_r[i];
        for (int j = 0; j < N; ++j) {
          grad_row[j] += dy_i * shared_r[j];
          grad_col[j] += shared_dy[j] * r_i;
        }
        for (int j = 0; j < N; ++j) {
          grad_r += scratch[after + j * N + i] * shared_dy[j];
          grad_v += grad_row[j] * shared_k[j];
          dsa += grad_row[j] * shared_b[j];
          grad_k += grad_col[j] * shared_v[j];
          grad_b += grad_col[j] * shared_sa[step * N + j];
        }
      }
      shared_dsa[i] = dsa;
      threadgroup_barrier(mem_flags::mem_threadgroup);

      float grad_decay = 0.0f;
      float grad_a = 0.0f;
      if (valid) {
        for (int j = 0; j < N; ++j) {
          const float previous = scratch[before + j * N + i];
          grad_decay += grad_col[j] * previous;
          grad_a += previous * shared_dsa[j];
        }
        const float decay_i = shared_decay[i];
        const float a_i = shared_a[i];
        for (int j = 0; j < N; ++j) {
          grad_row[j] = grad_row[j] * shared_decay[j] + dsa * shared_a[j];
          grad_col[j] = grad_col[j] * decay_i + shared_dsa[j] * a_i;
        }
      }
      dr[base + i] = grad_r;
      dw[base + i] = grad_decay * shared_decay[i];
      dk[base + i] = grad_k;
      dv[base + i] = grad_v;
      da[base + i] = grad_a;
      db[base + i] = grad_b;
    }
  }

  for (int j = 0; j < N; ++j) {
    dstate_in[(batch_head * N + i) * N + j] = grad_row[j];
  }
}
