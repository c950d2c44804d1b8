"""megatron_spot: Surgical Post-Training (SPoT) on Megatron-Core."""
__version__ = "0.1.0"
