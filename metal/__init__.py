"""Metal kernel sources for the WKV recurrences, loaded by `rwkv_mlx.ops`."""
