// WKV-7 single-token step for generation (same recurrence as the sequence
// forward, T = 1):
//   S' = S diag(exp(w)) + (S a) b^T + v k^T,  y = S' r.
//
// Inputs:  r, w, k, v, a, b  [B, H, N] (any float dtype; w is the log decay)
//          state_in          [B, H, N, N] float32
//          mask              [B] bool, read only when HAS_MASK
// Outputs: y                 [B, H, N] float32 (0 for masked batch rows)
//          state_out         [B, H, N, N] float32 (state_in for masked rows)
// Template: N head size (a multiple of 32), HAS_MASK.
//
// Layout: one simdgroup per value row, threadgroup (32, rows per group, 1),
// grid (32, B * H * N, 1). Lane l holds keys l, l + 32, ... of the row, and
// simd_sum forms S a and S' r. A step has only B * H * N rows of work, so
// spreading each row over 32 lanes keeps the GPU busy at batch size 1.
const uint H = r_shape[1];
const uint rows = uint(r_shape[0]) * H * N;
const uint row = thread_position_in_grid.y;
const uint lane = thread_index_in_simdgroup;
if (row >= rows) {
  return;
}
const uint batch_head = row / N;
const uint batch = batch_head / H;
const uint base = batch_head * N;
const uint state_row = row * N;

float s[N / 32];
float sa_part = 0.0f;
for (int q = 0; q < N / 32; ++q) {
  const uint j = lane + 32 * q;
  s[q] = state_in[state_row + j];
  sa_part += s[q] * float(a[base + j]);
}
const float sa = simd_sum(sa_part);

const bool valid = !HAS_MASK || mask[batch];
const float v_row = float(v[row]);
float y_part = 0.0f;
for (int q = 0; q < N / 32; ++q) {
  const uint j = lane + 32 * q;
  if (valid) {
    s[q] = s[q] * metal::exp(float(w[base + j])) + sa * float(b[base + j]) + v_row * float(k[base + j]);
  }
  y_part += s[q] * float(r[base + j]);
  state_out[state_row + j] = s[q];
}
const float out = simd_sum(y_part);
if (lane == 0) {
  y[row] = valid ? out : 0.0f;
}
