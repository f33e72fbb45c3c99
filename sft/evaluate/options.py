"""The flags of `hf_sft_eval.py` (evaluator) and its subcommands, as argument groups.

    evaluator:  EvalArguments + GenerationOptions
    chat:       ModelChoice + GenerationOptions
    batch:      ModelChoice + BatchFiles + GenerationOptions
    serve:      ModelChoice + ServeOptions (decoding comes with each request)
    compare:    CompareArguments + GenerationOptions

Parsed by sft.config.parse_args like training's flags (`--config x.yaml` defaults, unknown flags named,
every problem in one ConfigError). The generation flags are declared once, here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sft.chat_templates import TEMPLATES


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class GenerationOptions:
    """How answers are generated; shared by the evaluator, chat and batch."""

    # 256: room for a chat answer of a few paragraphs, while an evaluation pass over a base model that
    # never stops (every prompt runs to the limit) stays minutes, not an hour, on a CPU.
    max_new_tokens: int = field(default=256, metadata=_help("Longest answer, in new tokens."))
    do_sample: bool = field(default=False, metadata=_help(
        "Sample instead of greedy decoding (greedy keeps evaluations repeatable)."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature (with --do_sample)."))
    top_p: float = field(default=0.9, metadata=_help("Nucleus sampling mass (with --do_sample)."))
    batch_size: int = field(default=8, metadata=_help(
        "Prompts generated together by the evaluator and batch (chat answers one at a time)."))
    seed: int = field(default=0, metadata=_help("Random seed for sampling."))

    def problems(self) -> list[str]:
        out = [f"--{name} {getattr(self, name)}: must be at least 1" for name in ("max_new_tokens", "batch_size")
               if getattr(self, name) < 1]
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            out.append(f"--do_sample with --temperature {self.temperature} --top_p {self.top_p}: the temperature "
                       "must be > 0 and top_p in (0, 1]")
        return out


def _template_problems(template: str | None) -> list[str]:
    if template is not None and template not in TEMPLATES:
        return [f"--template {template!r}: expected one of {', '.join(TEMPLATES)}"]
    return []


def _threads_problems(threads: int | None) -> list[str]:
    return [f"--threads {threads}: must be at least 1"] if threads is not None and threads < 1 else []


EVAL_DTYPES = ("auto", "float32", "bfloat16")


def eval_dtype_field():
    """--eval_dtype, declared once for the evaluator, chat, batch and serve."""
    return field(default="auto", metadata=_help(
        "Weights dtype: auto (bfloat16 where the CPU has native bf16: AMX or AVX512_BF16, else float32; serve "
        "--device cuda: bfloat16 where the GPU has it natively, else float16), float32 or bfloat16. The report "
        "(evaluator, compare) or the startup line (chat, batch, serve) says which and why."))


def _eval_dtype_problems(eval_dtype: str) -> list[str]:
    if eval_dtype not in EVAL_DTYPES:
        return [f"--eval_dtype {eval_dtype!r}: expected auto, float32 or bfloat16"]
    return []


@dataclass
class EvalArguments:
    """The evaluator's own flags; everything else comes from the run's resolved config (RUN/sft_config.yaml)."""

    run: str = field(metadata=_help("hf_sft.py output folder (has sft_config.yaml and checkpoint-N/)."))
    watch: bool = field(default=False, metadata=_help(
        "Keep polling for new checkpoints until the run writes run_end.json and nothing is pending."))
    poll_seconds: float = field(default=10.0, metadata=_help("Polling interval with --watch."))
    max_idle_minutes: float | None = field(default=None, metadata=_help(
        "With --watch: give up when no checkpoint appeared for this long (a crashed run)."))
    threads: int | None = field(default=None, metadata=_help(
        "CPU threads for the evaluator (default: half the usable CPUs - affinity mask, cgroup quota - while the "
        "run is training, all once it ended)."))
    nice: int = field(default=10, metadata=_help("Scheduling niceness increment (0 disables)."))
    val_data: str | None = field(default=None, metadata=_help(
        "Validation file (default: the run's --val_data / --val_size)."))
    num_val: int | None = field(default=None, metadata=_help("Use only the first N validation records."))
    prompts: str | None = field(default=None, metadata=_help(
        "Prompts file to generate on (default: the run's --eval_prompts, else the validation records with their "
        "last answer as reference)."))
    num_prompts: int | None = field(default=None, metadata=_help("Use only the first N prompts."))
    general: str | None = field(default=None, metadata=_help(
        "General-ability prompts for the forgetting check (default: the run's --general_eval)."))
    base_model: str | None = field(default=None, metadata=_help("Base model (default: the run's --model)."))
    no_base: bool = field(default=False, metadata=_help("Do not evaluate the base model as step 0."))
    eval_dtype: str = eval_dtype_field()
    generate_every: int = field(default=1, metadata=_help(
        "Generate (prompts, general set) on every k-th checkpoint only (by step / --save_steps); the validation "
        "loss runs on every one, and the base and final models always generate. For large models on a CPU."))
    template: str | None = field(default=None, metadata=_help("Override the run's chat template (default: the run's)."))
    system_prompt: str | None = field(default=None, metadata=_help(
        "Override the run's system prompt (default: the run's)."))
    eval_batch_size: int | None = field(default=None, metadata=_help(
        "Validation-loss batch size (default: the run's --per_device_eval_batch_size)."))
    merge: bool = field(default=False, metadata=_help(
        "Export the run's final LoRA-family adapter as plain merged weights into RUN/merged (or --merge_output), "
        "then exit."))
    merge_from: str | None = field(default=None, metadata=_help(
        "With --merge: the adapter folder to merge (default: RUN or its latest checkpoint)."))
    merge_output: str | None = field(default=None, metadata=_help(
        "With --merge: where to write the merged model (default: RUN/merged). An existing folder is replaced "
        "only if an earlier --merge wrote it, or with --overwrite; never the run or a folder holding it."))
    overwrite: bool = field(default=False, metadata=_help(
        "With --merge: replace an existing --merge_output folder that an earlier --merge did not write."))

    def problems(self) -> list[str]:
        out = _template_problems(self.template) + _threads_problems(self.threads)
        out += [f"--{name} {getattr(self, name)}: must be at least 1" for name in ("num_val", "num_prompts",
                                                                                  "eval_batch_size", "generate_every")
                if getattr(self, name) is not None and getattr(self, name) < 1]
        out += _eval_dtype_problems(self.eval_dtype)
        if self.poll_seconds <= 0:
            out.append(f"--poll_seconds {self.poll_seconds}: must be > 0")
        if (self.merge_from or self.merge_output or self.overwrite) and not self.merge:
            out.append("--merge_from/--merge_output/--overwrite only apply with --merge; add --merge or drop them")
        return out


@dataclass
class ModelChoice:
    """Which model chat, batch and serve talk to, how it is loaded, and how prompts are rendered for it."""

    model: str = field(metadata=_help("Model folder, built-in name, hub id or adapter folder."))
    base_model: str | None = field(default=None, metadata=_help(
        "Base model of an adapter (default: the one it records; give it when that moved)."))
    template: str = field(default="auto", metadata=_help(f"Chat template, as in training: {'|'.join(TEMPLATES)}."))
    system_prompt: str | None = field(default=None, metadata=_help(
        "System prompt text or a preset name (qwen, firefly) (default: the template's)."))
    threads: int | None = field(default=None, metadata=_help(
        "CPU threads for torch (default: the CPUs this process may use (affinity and cgroup quota))."))
    eval_dtype: str = eval_dtype_field()

    def problems(self) -> list[str]:
        return (_template_problems(self.template) + _threads_problems(self.threads)
                + _eval_dtype_problems(self.eval_dtype))


@dataclass
class BatchFiles:
    """batch: where the prompts come from and the answers go."""

    input: str = field(metadata=_help("JSONL: {\"prompt\": ...} lines or training-format records."))
    output: str = field(metadata=_help("JSONL answers; an existing file is resumed."))

    def problems(self) -> list[str]:
        import os

        if os.path.abspath(self.input) == os.path.abspath(self.output):
            return [f"--output {self.output} is the --input file; pass another --output path"]
        return []


@dataclass
class ServeOptions:
    """serve: where the OpenAI-compatible server listens and what one request may ask for."""

    host: str = field(default="127.0.0.1", metadata=_help(
        "Address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it: set --api_key then)."))
    port: int = field(default=8000, metadata=_help("TCP port (0: any free port; uvicorn's start line names it)."))
    api_key: str | None = field(default=None, metadata=_help(
        "Require `Authorization: Bearer KEY` on every request (default: $SFT_SERVE_API_KEY, else no key)."))
    served_name: str | None = field(default=None, metadata=_help(
        "The model name clients send (default: the --model value)."))
    device: str = field(default="cpu", metadata=_help("cpu or cuda."))
    max_request_bytes: int = field(default=1_000_000, metadata=_help("Largest request body (413 above it)."))
    max_messages: int = field(default=512, metadata=_help("Most messages in one chat request."))
    max_tokens_limit: int = field(default=2048, metadata=_help("Largest max_tokens a request may ask for."))
    default_max_tokens: int = field(default=256, metadata=_help(
        "max_tokens of a chat request that gives none (cut to what the context leaves)."))
    max_context: int | None = field(default=None, metadata=_help(
        "Prompt + max_tokens limit in tokens (default: the model's max_position_embeddings)."))
    max_queue: int = field(default=64, metadata=_help(
        "Requests waiting for the model at most; more get 503 (generation runs one request at a time)."))
    shutdown_seconds: float = field(default=30.0, metadata=_help(
        "On SIGTERM: how long in-flight requests may finish before they are cancelled."))

    def problems(self) -> list[str]:
        out = [f"--{name} {getattr(self, name)}: must be at least 1" for name in
               ("max_request_bytes", "max_messages", "max_tokens_limit", "default_max_tokens", "max_queue")
               if getattr(self, name) < 1]
        if not 0 <= self.port <= 65535:
            out.append(f"--port {self.port}: expected 0..65535")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            out.append(f"--device {self.device!r}: expected cpu, cuda or cuda:N")
        if self.max_context is not None and self.max_context < 2:
            out.append(f"--max_context {self.max_context}: must be at least 2")
        return out


@dataclass
class CompareArguments:
    """compare: the two models (A, B), the prompts, and where the report goes."""

    models: list[str] = field(default_factory=list, metadata=_help(
        "A and B: each a run folder (its best checkpoint as the evaluator ranked it), RUN:STEP, a checkpoint "
        "folder or a model name."))
    prompts: str | None = field(default=None, metadata=_help(
        "Prompts JSONL ({\"prompt\", \"check\"?, \"reference\"?, \"kind\"?}); default: A's or B's run --eval_prompts."))
    output_dir: str | None = field(default=None, metadata=_help(
        "Where compare.md / compare.html / compare.jsonl go (default: outputs/compare/A_vs_B)."))
    num_prompts: int | None = field(default=None, metadata=_help("Use only the first N prompts."))
    template: str | None = field(default=None, metadata=_help(
        "Chat template for both (default: each run's own, else auto)."))
    system_prompt: str | None = field(default=None, metadata=_help(
        "System prompt for both (default: each run's own, else the template's)."))
    judge_url: str | None = field(default=None, metadata=_help(
        "OpenAI-compatible base URL of a judge model (e.g. http://127.0.0.1:8000/v1 from `serve`)."))
    judge_model: str | None = field(default=None, metadata=_help("Judge model name (default: the server's first)."))
    judge_api_key: str | None = field(default=None, metadata=_help(
        "Bearer key for the judge (default: $SFT_JUDGE_API_KEY)."))
    judge_max_tokens: int = field(default=16, metadata=_help("Tokens the judge may write per verdict."))
    bootstrap_samples: int = field(default=2000, metadata=_help("Paired bootstrap resamples (0 disables)."))
    threads: int | None = field(default=None, metadata=_help(
        "CPU threads (default: half the usable CPUs - affinity mask, cgroup quota - beside a training run)."))
    nice: int = field(default=10, metadata=_help("Scheduling niceness increment (0 disables)."))
    eval_dtype: str = eval_dtype_field()

    def problems(self) -> list[str]:
        out = (_template_problems(self.template) + _threads_problems(self.threads)
               + _eval_dtype_problems(self.eval_dtype))
        if len(self.models) != 2:
            out.append(f"expected two models A B, got {len(self.models)} ({' '.join(self.models) or 'none'}); "
                       "e.g. `compare smollm2-135m-instruct outputs/demo --prompts data/demo_eval_prompts.jsonl`")
        if self.num_prompts is not None and self.num_prompts < 1:
            out.append(f"--num_prompts {self.num_prompts}: must be at least 1")
        if self.bootstrap_samples < 0:
            out.append(f"--bootstrap_samples {self.bootstrap_samples}: must be >= 0")
        return out
