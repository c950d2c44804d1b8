"""Qwen3-MoE (Qwen3MoeForCausalLM): what differs from dense Qwen3: the router and experts of each MoE
layer (mappings.py)."""
