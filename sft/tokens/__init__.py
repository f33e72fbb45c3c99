"""Stage: canonical conversations -> token ids + labels -> micro-batches (the training stream)."""
