"""Stage: micro-batches -> HF Trainer -> checkpoints (hf_sft.py)."""
