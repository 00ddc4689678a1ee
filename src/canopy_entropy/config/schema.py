"""The typed experiment config: every section and field with its default."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

from canopy_entropy.tasks.catalog import TASK_NAMES
from canopy_entropy.tasks.spec import TaskSpec

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - Python 3.10
    pass


STAGES = (
    "generate", "embed", "semantic-entropy", "metrics", "score", "tables", "compare", "regress",
    "reward", "plots", "report",
)  # fmt: skip
# Stages that run only when their section says ``enabled = true`` or ``stages`` lists them
# (they call a judge or a reward model: slow, and the reward model has no offline default).
OPT_IN_STAGES = ("semantic-entropy", "reward")
DEFAULT_STAGES = tuple(s for s in STAGES if s not in OPT_IN_STAGES)


# What a stage's ``[section] options`` table may hold (name -> type), passed to the stage as
# keyword arguments; anything else is a config error. tests/test_config.py checks each name is
# a parameter of the stage's function.
STAGE_OPTIONS: dict[str, dict[str, type]] = {
    "embed": {"device": str},
    "compare": {},
    "regress": {"nsim": int, "seed": int, "reference": dict, "mean": str, "precision": str},
}


FIGURE_FORMATS = ("png", "pdf", "svg")


OFFLINE_ALIASES = ("gemma3-270m", "smollm2-135m-instruct")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSpec:
    """One model of the study: what to load, which variant it is, which family it belongs to."""

    model: str  # HF hub id, local folder or offline alias (gemma3-270m, smollm2-135m-instruct)
    variant: str = "base"  # 'base' or 'instruct' (instruct prompts go through the chat template)
    family: str = ""  # pairs a base with its instruct model; default: the label
    label: str = ""  # name in tables and the store; default: last part of `model`
    engine_options: dict[str, Any] = field(default_factory=dict)  # merged over [engine].options
    series: str = ""  # checkpoint series this model belongs to (e.g. one fine-tuning run)
    step: int | None = None  # its position in the series (e.g. the training step)
    enable_thinking: bool | None = None  # chat template's thinking mode; None = [generation]'s


@dataclass
class GenerationConfig:
    """Rollouts per prompt and the decoding policy (docs/metrics.md section 1)."""

    rollouts: int = 10  # rollouts per prompt (M)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    min_p: float = 0.0  # 0 = no min-p cut
    max_new_tokens: int = 512  # length cap T
    stop: list[str] = field(default_factory=list)  # optional stop strings
    seed: int = 0  # run seed: rollout seeds derive from (seed, prompt id, rollout index)
    common_random_numbers: bool = False  # reuse the same random streams across models
    batch_size: int = 0  # 0 = engine default / adaptive
    enable_thinking: bool = False  # the chat template's enable_thinking (instruct prompts)


BACKENDS = ("local", "ray")


@dataclass
class RayConfig:
    """``[engine.ray]``: where the Ray workers run and what each one reserves."""

    address: str = ""  # '' = $RAY_ADDRESS if set, else a local Ray started for the run
    num_cpus: float = 1.0  # CPUs per worker (on CPU also its torch threads)
    num_gpus: float = 0.0  # GPUs per worker (1 per replica; tensor_parallel_size with vLLM)
    restarts: int = 3  # dead workers replaced per model before the run fails


@dataclass
class EngineConfig:
    """Which sampling engine runs the models, and where its replicas run."""

    name: str = "hf"  # 'hf' (transformers), 'vllm' or 'openai' (an OpenAI-compatible server)
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16'
    options: dict[str, Any] = field(default_factory=dict)  # passed to the engine as is
    backend: str = "local"  # 'local': one child process per model; 'ray': Ray actor workers
    workers: int = 1  # engine replicas per model, fed from one queue of prompts ('ray')
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class PromptsConfig:
    """Where each task's prompts come from and how many are used."""

    n: int | None = None  # prompts per task; None ('all' in TOML) = every prompt of the source
    source: str = "builtin"  # 'builtin', 'jsonl', 'paper' or 'hf'
    path: str = ""  # JSONL file or folder ('jsonl'), paper prompt folder ('paper')
    fewshot: int = 0  # k exemplars before each prompt (0 = zero-shot)
    fewshot_path: str = ""  # JSONL of question/answer exemplars; default: the builtin ones
    sample: str = "first"  # 'first' n prompts or a seeded 'random' subset
    seed: int = 0  # seed of the random subset


@dataclass
class EmbedConfig:
    """Semantic diversity: the sentence-transformers encoder."""

    encoder: str = ""  # '' = the library default encoder
    prefix: str | None = None  # document prefix; None = the encoder's default
    batch_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareConfig:
    """Paired base-vs-instruct comparison with a cluster bootstrap over prompts."""

    on: str = "variant"  # compare variants ('base' vs 'instruct') or two models by label ('model')
    a: str = "base"  # side A: a variant, or a model label when on = 'model'
    b: str = "instruct"  # side B
    by: list[str] = field(default_factory=lambda: ["family", "task"])
    bootstrap: int = 2000
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegressConfig:
    """Beta mixed-effects regression of diversity on entropy rate (docs/regression.md)."""

    diagnostics: bool = True
    # reference level per factor, e.g. {task = "completion"} (the paper's tables); unset
    # factors: variant 'base', the first task alphabetically
    reference: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoringConfig:
    """Per-rollout correctness of the tasks that name a scorer."""

    execute_code: bool = False  # code-execution scorers run generated code only when true
    workers: int = 1  # rollouts scored in parallel (threads; code execution runs subprocesses)


@dataclass
class SemanticEntropyConfig:
    """Relaxed semantic entropy with an LLM judge (the semantic-entropy stage, off by default)."""

    enabled: bool = False  # true adds the semantic-entropy stage to the run
    judge: str = "smollm2-135m-instruct"  # judge model (offline default: a weak judge)
    engine: str = "hf"  # 'hf', 'openai' or 'vllm'
    m: int = 24  # rollouts per prompt judged (seeded subsample when M > m)
    seed: int = 0  # seed of the subsample
    max_new_tokens: int = 16  # tokens per verdict (greedy)
    judge_prompts: dict[str, str] = field(default_factory=dict)  # task -> prompt file
    engine_options: dict[str, Any] = field(default_factory=dict)  # the judge engine's options


@dataclass
class RewardConfig:
    """Reward-model filtering (the reward stage, off by default)."""

    enabled: bool = False  # true adds the reward stage to the run
    model: str = ""  # a sequence-classification reward model (HF id or folder); required
    keep: float = 0.7  # share of each prompt's rollouts kept: ceil(keep * M) best
    batch_size: int = 8
    max_length: int = 4096  # tokens of prompt + response the reward model reads
    device: str = "auto"  # 'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'
    dtype: str = "auto"  # 'auto' (bfloat16 on GPU, float32 on CPU), 'float32', ...


@dataclass
class PlotsConfig:
    """Figures (and the report's copies of them)."""

    formats: list[str] = field(default_factory=lambda: ["png", "pdf"])
    min_active: int = 5  # running-rate curves stop where fewer rollouts are still active


@dataclass
class AnalysisConfig:
    """Re-analyses of the stored rollouts (no new sampling)."""

    phase_markers: list[str] = field(default_factory=list)  # split rollouts at the first one


@dataclass
class ExperimentConfig:
    """A whole study. Build it with ``load_config`` / ``parse_config``."""

    name: str = "experiment"
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    models: list[ModelSpec] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    task_prompts: dict[str, PromptsConfig] = field(default_factory=dict)  # per-task overrides
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    regress: RegressConfig = field(default_factory=RegressConfig)
    semantic_entropy: SemanticEntropyConfig = field(default_factory=SemanticEntropyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    task_specs: dict[str, TaskSpec] = field(default_factory=dict)  # task files and [task.X] tables
    task_tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # [task.X] as written
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    source: str = ""  # the file it came from (not written back)

    def task_spec(self, task: str) -> TaskSpec:
        """The task named ``task``: a task file or [task.X] table of this config, or a built-in."""
        from canopy_entropy.tasks.catalog import TASKS

        return self.task_specs.get(task) or TASKS[task]

    def stop_strings(self) -> list[str]:
        """[generation] stop plus the stop strings the tasks declare (the parser checked that
        all tasks declare the same ones)."""
        extra = [s for t in self.tasks for s in self.task_spec(t).stop]
        return list(dict.fromkeys([*self.generation.stop, *extra]))

    def prompts_for(self, task: str) -> PromptsConfig:
        """The prompt settings of ``task`` ([prompts] with its [prompts.<task>] overrides)."""
        return self.task_prompts.get(task, self.prompts)

    def model_labels(self) -> list[str]:
        return [m.label for m in self.models]

    def variants(self) -> set[str]:
        return {m.variant for m in self.models}
