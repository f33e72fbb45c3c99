#!/usr/bin/env python
"""Peak host RSS while loading a model for LoRA, per load dtype (each in a fresh process).

    python bench/load_memory.py [--model smollm2-135m-instruct] [--dtypes float32 bfloat16]

Prints, per dtype, growth over the RSS after imports: the peak while loading (all of RSS, and its
private/anonymous part, sampled every 2 ms), and the private and file-backed (mmap of the checkpoint,
page cache) memory after loading and after one forward pass; plus the weights' own size in that dtype.
A peak near one copy of the weights means the checkpoint is not first materialized in another dtype.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, threading, time
sys.path.insert(0, os.getcwd())
import torch, transformers, peft  # imports counted in the baseline, not in the load
from transformers import TrainingArguments
from sft.config import MethodArguments, ModelArguments
from sft.models import resolve_model_path
from sft.train.methods import load_model_for_method, prepare_model

def rss_mb():
    with open("/proc/self/status") as f:
        fields = dict(l.split(":", 1) for l in f if l.startswith(("VmRSS", "RssAnon", "RssFile")))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()}

peaks = {"VmRSS": 0.0, "RssAnon": 0.0}
done = threading.Event()
def sample():  # ru_maxrss mixes page-cache (file) pages with private ones: sample both kinds
    while not done.is_set():
        now = rss_mb()
        for k in peaks:
            peaks[k] = max(peaks[k], now[k])
        time.sleep(0.002)

model_name, dtype = sys.argv[1], sys.argv[2]
resolve_model_path(model_name)  # materialize a built-in before measuring
args = TrainingArguments(output_dir="/tmp/load_memory", use_cpu=True, report_to="none")
base = rss_mb()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
method = MethodArguments(finetuning_type="lora")
model = prepare_model(load_model_for_method(ModelArguments(model=model_name, torch_dtype=dtype), method, args),
                      method, args)
loaded = rss_mb()
with torch.no_grad():
    model(input_ids=torch.tensor([[1, 2, 3, 4]]))  # touches every weight (mmap-backed ones become resident)
done.set(); thread.join()
after = rss_mb()
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
r = lambda x: round(x)
print(json.dumps({"dtype": dtype, "weights_mb": r(weights),
                  "base_rss_mb": r(base["VmRSS"]), "base_anon_mb": r(base["RssAnon"]),
                  "peak_rss_growth_mb": r(peaks["VmRSS"] - base["VmRSS"]),
                  "peak_anon_growth_mb": r(peaks["RssAnon"] - base["RssAnon"]),
                  "after_load_anon_file_mb": [r(loaded["RssAnon"] - base["RssAnon"]), r(loaded["RssFile"] - base["RssFile"])],
                  "after_forward_anon_file_mb": [r(after["RssAnon"] - base["RssAnon"]), r(after["RssFile"] - base["RssFile"])]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    opts = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for dtype in opts.dtypes:
        out = subprocess.run([sys.executable, "-c", CHILD, opts.model, dtype], cwd=root, check=True,
                             capture_output=True, text=True).stdout
        print(json.dumps({"model": opts.model, **json.loads(out.strip().splitlines()[-1])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
