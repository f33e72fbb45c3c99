"""Data flows one way (STYLE.md rule 1): a module of sft/ imports only modules of earlier stages.

The stages are the subpackages, in pipeline order after the shared top level; inside a subpackage the
modules are listed in their own order. An import is any `from sft.x import`, `import sft.x`, `from sft
import x` or relative `from .x import`/`from . import x`, at any indentation (imports inside functions
count too).
"""
import re
from pathlib import Path

SFT = Path(__file__).resolve().parents[1] / "sft"

# Shared top level first (the conversation contract, template strings, models, config, CLI plumbing),
# then each stage in data-flow order, each with its modules in their own order.
STAGES = [
    "sft.conversation", "sft.chat_templates", "sft.files", "sft.models", "sft.config", "sft.cli",
    # raw records -> canonical conversations -> ShareGPT files
    "sft.data", "sft.data.sources", "sft.data.json_checks", "sft.data.formats", "sft.data.dedup", "sft.data.stats",
    "sft.data.split", "sft.data.steps", "sft.data.progress", "sft.data.builder",
    # canonical conversations -> token ids + labels -> micro-batches
    "sft.tokens", "sft.tokens.template", "sft.tokens.encoding", "sft.tokens.preview", "sft.tokens.collate",
    "sft.tokens.plan", "sft.tokens.stream", "sft.tokens.prefetch", "sft.tokens.evalset",
    # micro-batches -> Trainer -> checkpoints
    "sft.train", "sft.train.checkpoint_files", "sft.train.checkpoints", "sft.train.plots", "sft.train.linear_cross_entropy", "sft.train.loss",
    "sft.train.collator", "sft.train.export", "sft.train.methods", "sft.train.engine",
    "sft.train.callbacks", "sft.train.banner", "sft.train.hybrid", "sft.train.output_dir", "sft.train.run",
    # checkpoints -> scores, answers, reports
    "sft.evaluate", "sft.evaluate.options", "sft.evaluate.inference", "sft.evaluate.metrics",
    "sft.evaluate.evaluator", "sft.evaluate.report", "sft.evaluate.cli", "sft.evaluate.chat",
    "sft.evaluate.batch", "sft.evaluate.openai_api", "sft.evaluate.generation_worker", "sft.evaluate.serve",
    "sft.evaluate.compare_html", "sft.evaluate.compare",
]
NAMES = r"(\([^)]*\)|[^\n]*)"  # a parenthesized list over several lines, or the rest of the line
ABSOLUTE = re.compile(r"^[ \t]*(?:from (sft(?:\.\w+)*) import " + NAMES + r"|import (sft(?:\.\w+)+))", re.M)
RELATIVE = re.compile(r"^[ \t]*from (\.+)(\w+(?:\.\w+)*)? import " + NAMES, re.M)


def module_name(path: Path) -> str:
    parts = path.relative_to(SFT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every sft module `path` imports (a name imported from a package counts when it is a module)."""
    text = path.read_text(encoding="utf-8")
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    hits = [(mod or imp, names) for mod, names, imp in ABSOLUTE.findall(text)]
    for dots, mod, names in RELATIVE.findall(text):
        base = package.rsplit(".", len(dots) - 1)[0] if len(dots) > 1 else package
        hits.append((f"{base}.{mod}" if mod else base, names))
    for mod, names in hits:
        found.add(mod)
        for name in re.findall(r"\w+", names or ""):
            if f"{mod}.{name}" in STAGES:  # `from sft.train import run` imports the module sft.train.run
                found.add(f"{mod}.{name}")
    return found - {here}


def sources() -> list[Path]:
    return sorted(SFT.rglob("*.py"))


def test_every_module_has_a_stage():
    modules = {module_name(p) for p in sources()} - {"sft"}
    assert modules == set(STAGES), f"add new modules to STAGES: {sorted(modules ^ set(STAGES))}"


def test_every_module_imports():
    """A moved name left behind in an import fails here, not in the first run that reaches it."""
    import importlib

    for name in STAGES:
        importlib.import_module(name)


def test_imports_point_to_earlier_stages_only():
    backwards = [f"{module_name(p)} imports {dep}" for p in sources() for dep in sorted(imported_modules(p))
                 if dep in STAGES and module_name(p) != "sft"
                 and STAGES.index(dep) > STAGES.index(module_name(p))]
    assert backwards == []


def test_the_checker_sees_every_import_form(tmp_path, monkeypatch):
    """The parser must catch `import sft.x`, `from sft import x`, relative and indented imports."""
    pkg = tmp_path / "sft" / "tokens"
    pkg.mkdir(parents=True)
    probe = pkg / "collate.py"
    probe.write_text("import sft.train.run\nfrom sft import evaluate\ndef f():\n    from . import stream\n"
                     "    from ..train import loss\nfrom sft.evaluate import (\n    chat,\n)\n")
    monkeypatch.setattr(__import__(__name__), "SFT", tmp_path / "sft")
    assert imported_modules(probe) == {"sft", "sft.train.run", "sft.evaluate", "sft.tokens", "sft.tokens.stream", "sft.train.loss",
                                       "sft.evaluate.chat", "sft.train"}
