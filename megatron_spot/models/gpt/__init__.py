"""What GPT-style families share on Megatron-Core: the config base (config.py), mapping objects
(mappings.py), the state-dict adapter over them (state_dict.py), TransformerConfig + layer spec + model
construction (provider.py), the loss-head GPTModel subclass (model.py) and packed attention for the CPU
layer spec (packed_attention.py)."""
