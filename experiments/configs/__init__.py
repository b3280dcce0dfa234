"""Per-experiment config overrides (big_vision style: each file opens with its command)."""
