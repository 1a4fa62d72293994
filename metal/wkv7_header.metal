// Helpers shared by the WKV-7 kernels (the `header` of mx.fast.metal_kernel).
//
// Threadgroup arrays reach these helpers through the template parameter
// `Vector`, so the same code takes threadgroup or thread memory.

// Advance one value row `s` (all N keys) of the state by one step and return
// sa = S_{t-1}[row] . a, the row's share of S_{t-1} a_t:
//   s[j] <- s[j] * decay[j] + sa * b[j] + v_row * k[j]
template <int N, typename Vector>
inline float wkv7_advance_row(thread float* s, float v_row, Vector decay, Vector k, Vector a, Vector b) {
  float sa = 0.0f;
  for (int j = 0; j < N; ++j) {
    sa += s[j] * a[j];
  }
  for (int j = 0; j < N; ++j) {
    s[j] = s[j] * decay[j] + sa * b[j] + v_row * k[j];
  }
  return sa;
}

// Dot product of a row held by the thread with a vector.
template <int N, typename Vector>
inline float wkv7_row_dot(thread const float* s, Vector x) {
  float total = 0.0f;
  for (int j = 0; j < N; ++j) {
    total += s[j] * x[j];
  }
  return total;
}
