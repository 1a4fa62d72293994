// WKV-4 sequence forward, one channel per thread. With e^u the bonus of the
// current token and w <= 0 the log decay (per channel):
//   wkv_t = (A_{t-1} + e^{u + k_t} v_t) / (B_{t-1} + e^{u + k_t})
//   A_t   = e^w A_{t-1} + e^{k_t} v_t,   B_t = e^w B_{t-1} + e^{k_t}
// computed on the rescaled state (a, b, p) of wkv4_header.metal.
//
// Inputs:  k, v         [B, T, C] (any float dtype)
//          w, u         [C] (any float dtype; w is the log decay)
//          state_in     [B, 3, C] float32: a, b, p
//          mask         [B, T] bool, read only when HAS_MASK
// Outputs: y            [B, T, C] float32 (0 at masked positions)
//          state_out    [B, 3, C] float32
//          checkpoints  [B, ceil(T / CHECKPOINT), 3, C] float32: the state
//                       before steps 0, CHECKPOINT, 2 CHECKPOINT, ...
//                       (written only when CHECKPOINT > 0)
// Template: CHECKPOINT interval (0: none), HAS_MASK.
//
// Layout: channels are independent, so thread n of the grid runs channels
// n, n + threads_per_grid, ... of the B * C (batch, channel) pairs with no
// communication; neighbouring threads read neighbouring channels. Any grid
// and threadgroup size is valid.
const uint T = k_shape[1];
const uint C = k_shape[2];
const uint channels = uint(k_shape[0]) * C;
// The interval is never 0 in a division, even in a branch that is not taken.
const uint interval = CHECKPOINT > 0 ? uint(CHECKPOINT) : 1u;
const uint segments = (T + interval - 1) / interval;

for (uint index = thread_position_in_grid.x; index < channels; index += threads_per_grid.x) {
  const uint batch = index / C;
  const uint channel = index % C;
  const float log_decay = float(w[channel]);
  const float bonus = float(u[channel]);
  const uint state_base = batch * 3 * C + channel;

  float a = state_in[state_base];
  float b = state_in[state_base + C];
  float p = state_in[state_base + 2 * C];

  for (uint t = 0; t < T; ++t) {
    const uint position = (batch * T + t) * C + channel;
    if (CHECKPOINT > 0 && t % interval == 0) {
      const uint slot = (batch * segments + t / interval) * 3 * C + channel;
      checkpoints[slot] = a;
      checkpoints[slot + C] = b;
      checkpoints[slot + 2 * C] = p;
    }

    float out = 0.0f;
    if (!HAS_MASK || mask[batch * T + t]) {
      const float key = float(k[position]);
      const float value = float(v[position]);
      out = wkv4_output(a, b, p, bonus + key, value);
      wkv4_update(a, b, p, log_decay, key, value);
    }
    y[position] = out;
  }

  state_out[state_base] = a;
  state_out[state_base + C] = b;
  state_out[state_base + 2 * C] = p;
}
