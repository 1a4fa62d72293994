// WKV-6 (and RWKV-5) backward. Per (batch, head), with d_t = exp(w_t),
//   y_t = S_{t-1} r_t + v_t (r_t . (u * k_t)),   S_t = S_{t-1} diag(d_t) + v_t k_t^T,
// and G = dL/dS_t (starting from `dstate_out` after the last step), step t
// going backwards computes, with vdy = v_t . dy_t and ruk = r_t . (u * k_t):
//   dr_t[j] = sum_i S_{t-1}[i, j] dy_t[i] + u[j] k_t[j] vdy
//   dk_t[j] = sum_i G[i, j] v_t[i] + r_t[j] u[j] vdy
//   dv_t[i] = sum_j G[i, j] k_t[j] + dy_t[i] ruk
//   dw_t[j] = d_t[j] sum_i G[i, j] S_{t-1}[i, j]
//   du[j]  += r_t[j] k_t[j] vdy
//   G       <- G diag(d_t) + dy_t r_t^T          (now dL/dS_{t-1})
// and finally dstate_in = G. A masked position leaves G unchanged and has
// zero gradients.
//
// The states S_{t-1} come from recomputation, never from dividing by d_t:
// the forward pass saved the state every CHECKPOINT steps, and for each
// segment (last first) the threadgroup recomputes the states before each of
// the segment's steps into `scratch`, then walks the segment backwards.
//
// Inputs:  r, w, k, v   [B, T, H, N] (any float dtype; w is the log decay)
//          u            [H, N] (any float dtype)
//          mask         [B, T] bool, read only when HAS_MASK
//          checkpoints  [B, H, ceil(T / CHECKPOINT), N, N] float32
//          dy           [B, T, H, N] float32
//          dstate_out   [B, H, N, N] float32
// Outputs: dr, dw, dk, dv  [B, T, H, N] float32
//          du           [B, H, N] float32: each batch row's share (the caller
//                       sums over B)
//          dstate_in    [B, H, N, N] float32
//          scratch      [threadgroups, CHECKPOINT, N, N] float32
// Template: N head size, CHECKPOINT interval (> 0), HAS_MASK.
//
// Layout: threadgroups of exactly N threads loop over the B * H heads.
// Thread i owns row i and column i of G (2 N floats) and column i of the
// recomputed states, so the sums over i above are thread-local for the
// column quantities (dr, dk, dw) and the sum over j for the row quantity
// (dv). A thread reads and writes only its own column of `scratch`, so the
// scratch needs no barriers; only the step's vectors go through threadgroup
// memory. The two copies of G get the same arithmetic, so they stay equal.
const uint T = r_shape[1];
const uint H = r_shape[2];
const uint items = uint(r_shape[0]) * H;
const uint segments = (T + CHECKPOINT - 1) / CHECKPOINT;
const uint i = thread_position_in_threadgroup.x;
const uint scratch_base = threadgroup_position_in_grid.x * CHECKPOINT * N * N;

threadgroup float shared_r[N];
threadgroup float shared_decay[N];
threadgroup float shared_k[N];
threadgroup float shared_v[N];
threadgroup float shared_uk[N];
threadgroup float shared_dy[N];

for (uint item = threadgroup_position_in_grid.x; item < items; item += threadgroups_per_grid.x) {
  const uint batch_head = item;
  const uint batch = batch_head / H;
  const uint head = batch_head % H;
  const float u_i = float(u[head * N + i]);

  float grad_row[N];
  float grad_col[N];
  for (int j = 0; j < N; ++j) {
    grad_row[j] = dstate_out[(batch_head * N + i) * N + j];
    grad_col[j] = dstate_out[(batch_head * N + j) * N + i];
  }
  float grad_u = 0.0f;

  for (int segment = int(segments) - 1; segment >= 0; --segment) {
    const uint t0 = uint(segment) * CHECKPOINT;
    const uint t1 = metal::min(t0 + uint(CHECKPOINT), T);

    // Recompute the segment: scratch slot n holds S before step t0 + n, of
    // which this thread writes column i.
    const uint checkpoint_base = (batch_head * segments + uint(segment)) * N * N;
    for (int l = 0; l < N; ++l) {
      scratch[scratch_base + l * N + i] = checkpoints[checkpoint_base + l * N + i];
    }
    for (uint t = t0; t + 1 < t1; ++t) {
      const uint base = ((batch * T + t) * H + head) * N;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      shared_v[i] = float(v[base + i]);
      threadgroup_barrier(mem_flags::mem_threadgroup);

      const uint current = scratch_base + (t - t0) * N * N + i;
      const uint next = current + N * N;
      if (!HAS_MASK || mask[batch * T + t]) {
        const float key = float(k[base + i]);
        const float decay = metal::exp(float(w[base + i]));
        for (int l = 0; l < N; ++l) {
          scratch[next + l * N] = scratch[current + l * N] * decay + shared_v[l] * key;
        }
      } else {
        for (int l = 0; l < N; ++l) {
          scratch[next + l * N] = scratch[current + l * N];
        }
      }
    }

    // Walk the segment backwards.
    for (int t = int(t1) - 1; t >= int(t0); --t) {
      const uint base = ((batch * T + uint(t)) * H + head) * N;
      const uint before = scratch_base + (uint(t) - t0) * N * N + i;
      const bool valid = !HAS_MASK || mask[batch * T + uint(t)];

      threadgroup_barrier(mem_flags::mem_threadgroup);
      const float key_i = float(k[base + i]);
      shared_r[i] = float(r[base + i]);
      shared_decay[i] = metal::exp(float(w[base + i]));
      shared_k[i] = key_i;
      shared_v[i] = float(v[base + i]);
      shared_uk[i] = u_i * key_i;
      shared_dy[i] = dy[base + i];
      threadgroup_barrier(mem_flags::mem_threadgroup);

      float grad_r = 0.0f;
      float grad_decay = 0.0f;
      float grad_k = 0.0f;
      float grad_v = 0.0f;
      if (valid) {
        float value_dy = 0.0f;
        float bonus = 0.0f;
        for (int j = 0; j < N; ++j) {
          const float previous = scratch[before + j * N];
          value_dy += shared_v[j] * shared_dy[j];
          bonus += shared_r[j] * shared_uk[j];
          grad_r += previous * shared_dy[j];
          grad_decay += grad_col[j] * previous;
          grad_k += grad_col[j] * shared_v[j];
          grad_v += grad_row[j] * shared_k[j];
        }
        const float r_i = shared_r[i];
        const float dy_i = shared_dy[i];
        grad_r += u_i * key_i * value_dy;
        grad_k += r_i * u_i * value_dy;
        grad_v += dy_i * bonus;
        grad_u += r_i * key_i * value_dy;

        const float decay_i = shared_decay[i];
        for (int j = 0; j < N; ++j) {
          grad_row[j] = grad_row[j] * shared_decay[j] + dy_i * shared_r[j];
          grad_col[j] = grad_col[j] * decay_i + shared_dy[j] * r_i;
        }
      }
      dr[base + i] = grad_r;
      dw[base + i] = grad_decay * shared_decay[i];
      dk[base + i] = grad_k;
      dv[base + i] = grad_v;
    }
  }

  for (int j = 0; j < N; ++j) {
    dstate_in[(batch_head * N + i) * N + j] = grad_row[j];
  }
  du[batch_head * N + i] = grad_u;
}
