"""The published shapes of the seed's models and which shipped GPU recipe trains which: one leaf module that
gpu_check.py and gpu_memory.py both read (random weights of these shapes stand in for the real models)."""

CONFIGS = {
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                          max_position_embeddings=131072, rope_theta=500000.0,
                                          tie_word_embeddings=True)),
    "gemma-2-2b": ("Gemma2Config", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                         num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                         head_dim=256, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                         sliding_window=4096, query_pre_attn_scalar=256)),
}

RECIPES = {"sst2-llama3.2-1b.yaml": "llama-3.2-1b", "squad2-llama3.2-1b.yaml": "llama-3.2-1b",
           "sst2-gemma2-2b.yaml": "gemma-2-2b", "squad2-gemma2-2b.yaml": "gemma-2-2b"}
