"""Stage: checkpoints -> scores, answers, reports (hf_sft_eval.py)."""
