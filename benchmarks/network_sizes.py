"""Network overrides shared by the benchmark scripts (``--network tiny``: a smoke-test size, not a measured one)."""

TINY_NETWORK = {
    "encoder_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_channels": [8, 16, 32]},
    "head_channels": 32,
    "decoder_channels": [32, 16, 16, 8],
    "embedding_dim": 16,
}
