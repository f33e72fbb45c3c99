"""Data flows one way (STYLE.md rule 1): a module of sft/ imports only modules of earlier stages."""
import re
from pathlib import Path

SFT = Path(__file__).resolve().parents[1] / "sft"

# Shared foundations first, then the pipeline stages in data-flow order.
STAGES = [
    "chat_templates", "models", "config", "cli",                                   # foundation
    "conversation", "sources", "formats", "dedup", "quality", "split", "build_steps", "builder",  # data builder
    "template", "encoding", "preview", "batching", "data",                         # tokens and batches
    "loss", "methods", "hybrid", "checkpoints", "plots", "callbacks", "train",     # training
    "generation", "metrics", "evaluator", "eval_report", "eval_cli", "inference_cli",  # evaluation
]
IMPORT = re.compile(r"^\s*from (?:\.|sft\.)(\w+) import|^\s*from \. import (\w+)", re.M)


def _imports(module: str) -> set[str]:
    text = (SFT / f"{module}.py").read_text(encoding="utf-8")
    return {a or b for a, b in IMPORT.findall(text)} - {module}


def test_every_module_has_a_stage():
    modules = {p.stem for p in SFT.glob("*.py")} - {"__init__"}
    assert modules == set(STAGES), f"add new modules to STAGES: {sorted(modules ^ set(STAGES))}"


def test_imports_point_to_earlier_stages_only():
    backwards = [f"sft/{m}.py imports sft.{dep}" for i, m in enumerate(STAGES) for dep in sorted(_imports(m))
                 if dep in STAGES and STAGES.index(dep) > i]
    assert backwards == []
