// Helpers shared by the WKV-4 kernels (the `header` of mx.fast.metal_kernel).
//
// The state of one channel is (a, b, p): the sums A = a e^p and B = b e^p of
// the recurrence kept relative to the running maximum exponent p, so every
// exponential taken here is at most e^0 and keys of any size stay finite.
// The operations are those of `wkv4_step` in rwkv_mlx/ops/wkv4.py, in the
// same order, so both take the same branch at every maximum.

// Output of one step: (A + e^{u + k} v) / (B + e^{u + k}), with bonus_key = u + k.
inline float wkv4_output(float a, float b, float p, float bonus_key, float value) {
  const float top = metal::max(p, bonus_key);
  const float from_state = metal::exp(p - top);
  const float from_token = metal::exp(bonus_key - top);
  return (from_state * a + from_token * value) / (from_state * b + from_token);
}

// State update of one step: A <- e^w A + e^k v and B <- e^w B + e^k, with the
// new exponent p = max(p + w, k).
inline void wkv4_update(thread float& a, thread float& b, thread float& p, float log_decay, float key, float value) {
  const float decayed = p + log_decay;
  const float top = metal::max(decayed, key);
  const float from_state = metal::exp(decayed - top);
  const float from_token = metal::exp(key - top);
  a = from_state * a + from_token * value;
  b = from_state * b + from_token;
  p = top;
}
