"""Independent implementations used as parity oracles ("peers") in tests and tools.

`transformers_v4`: Hugging Face transformers' `DeepseekV4ForCausalLM` loaded from one of our official-layout
checkpoints. Peers import their heavy dependency lazily, so importing this package costs nothing.
"""
