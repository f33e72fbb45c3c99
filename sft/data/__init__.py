"""Stage: raw records -> canonical conversations -> ShareGPT files (sft_data_builder.py)."""
