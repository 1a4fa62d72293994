// WKV-4 backward, one channel per thread. For a step with state (a, b, p)
// before it, the gradients (ga, gb, gp) of the state after it and dy of its
// output, the forward operations of wkv4_header.metal are
//   o = u + k,  q = max(p, o),  e1 = e^{p - q},  e2 = e^{o - q}
//   y = (e1 a + e2 v) / (e1 b + e2) = num / den
//   d = p + w,  q' = max(d, k),  f1 = e^{d - q'},  f2 = e^{k - q'}
//   a' = f1 a + f2 v,  b' = f1 b + f2,  p' = q'
// and the step going backwards computes, with gn = dy / den, gd = -dy y / den:
//   g_o  = e2 (gn v + gd)                 (y does not depend on q: e^{-q} cancels)
//   g_d  = f1 (ga a + gb b),  g_k = f2 (ga v + gb)
//   g_q' = gp - ga a' - gb b', added to g_d when d > k, else to g_k
//          (at a tie MLX's maximum gives the gradient to its second argument)
//   dk_t = g_k + g_o,   dv_t = ga f2 + gn e2,   du += g_o,   dw += g_d
//   ga <- ga f1 + gn e1,  gb <- gb f1 + gd e1,  gp <- g_d + e1 (gn a + gd b)
// and finally dstate_in = (ga, gb, gp). A masked position leaves the
// gradients of the state unchanged and has zero gradients.
//
// The states come from recomputation: the forward pass saved the state every
// CHECKPOINT steps, and for each segment (last first) the thread recomputes
// the states before each of its steps into thread memory with the forward
// pass's own helper, so every maximum takes the forward pass's branch.
//
// Inputs:  k, v         [B, T, C] (any float dtype)
//          w, u         [C] (any float dtype; w is the log decay)
//          mask         [B, T] bool, read only when HAS_MASK
//          checkpoints  [B, ceil(T / CHECKPOINT), 3, C] float32
//          dy           [B, T, C] float32
//          dstate_out   [B, 3, C] float32
// Outputs: dk, dv       [B, T, C] float32
//          dw, du       [B, C] float32: each batch row's share (the caller
//                       sums over B)
//          dstate_in    [B, 3, C] float32
// Template: CHECKPOINT interval (> 0), HAS_MASK.
//
// Layout: as in the forward kernel, any grid and threadgroup size is valid.
const uint T = k_shape[1];
const uint C = k_shape[2];
const uint channels = uint(k_shape[0]) * C;
const uint segments = (T + CHECKPOINT - 1) / CHECKPOINT;

for (uint index = thread_position_in_grid.x; index < channels; index += threads_per_grid.x) {
  const uint batch = index / C;
  const uint channel = index % C;
  const float log_decay = float(w[channel]);
  const float bonus = float(u[channel]);
  const uint state_base = batch * 3 * C + channel;

  float grad_a = dstate_out[state_base];
  float grad_b = dstate_out[state_base + C];
  float grad_p = dstate_out[state_base + 2 * C];
  float grad_w = 0.0f;
  float grad_u = 0.0f;

  for (int segment = int(segments) - 1; segment >= 0; --segment) {
    const uint t0 = uint(segment) * CHECKPOINT;
    const uint t1 = metal::min(t0 + uint(CHECKPOINT), T);

    // Recompute the segment: index n holds the state before step t0 + n.
    float states_a[CHECKPOINT];
    float states_b[CHECKPOINT];
    float states_p[CHECKPOINT];
    const uint slot = (batch * segments + uint(segment)) * 3 * C + channel;
    float a = checkpoints[slot];
    float b = checkpoints[slot + C];
    float p = checkpoints[slot + 2 * C];
    for (uint t = t0; t < t1; ++t) {
      states_a[t - t0] = a;
      states_b[t - t0] = b;
      states_p[t - t0] = p;
      const uint position = (batch * T + t) * C + channel;
      if (!HAS_MASK || mask[batch * T + t]) {
        wkv4_update(a, b, p, log_decay, float(k[position]), float(v[position]));
      }
    }

    // Walk the segment backwards.
    for (int t = int(t1) - 1; t >= int(t0); --t) {
      const uint position = (batch * T + uint(t)) * C + channel;
      if (HAS_MASK && !mask[batch * T + uint(t)]) {
        dk[position] = 0.0f;
        dv[position] = 0.0f;
        continue;
      }
      a = states_a[uint(t) - t0];
      b = states_b[uint(t) - t0];
      p = states_p[uint(t) - t0];
      const float key = float(k[position]);
      const float value = float(v[position]);
      const float grad_y = dy[position];

      // Output.
      const float bonus_key = bonus + key;
      const float top = metal::max(p, bonus_key);
      const float e1 = metal::exp(p - top);
      const float e2 = metal::exp(bonus_key - top);
      const float denominator = e1 * b + e2;
      const float out = (e1 * a + e2 * value) / denominator;
      const float grad_numerator = grad_y / denominator;
      const float grad_denominator = -grad_y * out / denominator;
      const float grad_bonus_key = e2 * (grad_numerator * value + grad_denominator);

      // State update.
      const float decayed = p + log_decay;
      const float next_top = metal::max(decayed, key);
      const float f1 = metal::exp(decayed - next_top);
      const float f2 = metal::exp(key - next_top);
      const float next_a = f1 * a + f2 * value;
      const float next_b = f1 * b + f2;
      float grad_decayed = f1 * (grad_a * a + grad_b * b);
      float grad_key = f2 * (grad_a * value + grad_b);
      const float grad_top = grad_p - grad_a * next_a - grad_b * next_b;
      if (decayed > key) {
        grad_decayed += grad_top;
      } else {
        grad_key += grad_top;
      }

      dk[position] = grad_key + grad_bonus_key;
      dv[position] = grad_a * f2 + grad_numerator * e2;
      grad_u += grad_bonus_key;
      grad_w += grad_decayed;
      grad_p = grad_decayed + e1 * (grad_numerator * a + grad_denominator * b);
      grad_a = grad_a * f1 + grad_numerator * e1;
      grad_b = grad_b * f1 + grad_denominator * e1;
    }
  }

  dstate_in[state_base] = grad_a;
  dstate_in[state_base + C] = grad_b;
  dstate_in[state_base + 2 * C] = grad_p;
  dw[index] = grad_w;
  du[index] = grad_u;
}
