"""Small shared utilities (atomic publishing of outputs)."""
