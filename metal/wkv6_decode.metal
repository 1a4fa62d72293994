// WKV-6 (and RWKV-5) single-token step for generation (same recurrence as
// the sequence forward, T = 1):
//   y = S r + v (r . (u * k)),  S' = S diag(exp(w)) + v k^T.
//
// Inputs:  r, w, k, v  [B, H, N] (any float dtype; w is the log decay)
//          u           [H, N] (any float dtype)
//          state_in    [B, H, N, N] float32
//          mask        [B] bool, read only when HAS_MASK
// Outputs: y           [B, H, N] float32 (0 for masked batch rows)
//          state_out   [B, H, N, N] float32 (state_in for masked rows)
// Template: N head size (a multiple of 32), HAS_MASK.
//
// Layout: one simdgroup per value row, threadgroup (32, rows per group, 1),
// grid (32, B * H * N, 1). Lane l holds keys l, l + 32, ... of the row, and
// simd_sum adds the lanes' shares of y. A step has only B * H * N rows of
// work, so spreading each row over 32 lanes keeps the GPU busy at batch
// size 1.
const uint H = r_shape[1];
const uint rows = uint(r_shape[0]) * H * N;
const uint row = thread_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
if (row >= rows) {
  return;
}
const uint batch_head = row / N;
const uint batch = batch_head / H;
const uint head = batch_head % H;
const uint base = batch_head * N;
const uint state_row = row * N;

const bool valid = !HAS_MASK || mask[batch];
const float v_row = float(v[row]);
float y_part = 0.0f;
for (int q = 0; q < N / 32; ++q) {
  const uint j = lane + 32 * q;
  float s = state_in[state_row + j];
  if (valid) {
    const float key = float(k[base + j]);
    y_part += float(r[base + j]) * (s + float(u[head * N + j]) * key * v_row);
    s = s * metal::exp(float(w[base + j])) + v_row * key;
  }
  state_out[state_row + j] = s;
}
const float out = simd_sum(y_part);
if (lane == 0) {
  y[row] = valid ? out : 0.0f;
}
