"""Typed configuration: dataclasses that are also the YAML and CLI schema.

A YAML file mirrors `Config` one-to-one (`model:`, `data:`, `loss:`, `reference:`, `lora:`,
`reward:`, `kto:`, `rl:`, `iterate:`, `train:` sections with exactly the field names below). Unknown keys and wrong types are errors
that name the key; `Config.validate()` checks values and cross-field rules. Overrides on the
command line use the same dotted names: `train.lr=1e-5 loss.type=ipo`.

Each field's `help` metadata is its documentation and is printed by `dpokit config`.
Imports only the standard library, yaml and `dpokit.resources` (the shipped presets).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpokit import resources
from dpokit.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with documentation; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "smollm2-135m-instruct",
        "local Hugging Face folder, a .gguf file, an alias (smollm2-135m-instruct, tiny-random-llama), or a "
        "Hugging Face Hub id org/name[@revision], downloaded into the Hub cache (HF_HUB_OFFLINE=1: cache only)",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto", "weight dtype; auto = bfloat16 on a GPU that supports it, float32 on CPU"
    )
    trust_remote_code: bool = _f(False, "run code shipped with the model folder (only for sources you trust)")
    allow_pickle: bool = _f(False, "allow loading pickled .bin weights (weights_only); safetensors otherwise")
    attn_implementation: str = _f(
        "auto",
        "attention kernel: sdpa, eager, flash_attention_2 (passed to transformers), or varlen: dpokit's "
        "flash varlen kernel for packed / prefix-shared batches on a CUDA GPU; auto = varlen on a CUDA GPU "
        "with bf16 (torch >= 2.10), else sdpa",
    )


@dataclass
class DataConfig:
    train_files: list[str] = _f(
        ["builtin:toy/train.jsonl"],
        "training files, globs or folders (jsonl/json/parquet/csv/save_to_disk), or Hugging Face Hub datasets "
        "org/name[@revision] (or hub:org/name) when no such local path exists",
    )
    eval_files: list[str] = _f([], "held-out files evaluated every train.eval_every steps and at the end")
    train_split: str = _f("train", "the split of Hub datasets in train_files")
    eval_split: str = _f("test", "the split of Hub datasets in eval_files")
    subset: str | None = _f(None, "Hub dataset subset (a config of its README, or a top-level folder); null = default")
    eval_fraction: float = _f(
        0.0,
        "when > 0 and eval_files is empty: hold out this fraction of the training rows (chosen per row before "
        "tokenizing, seeded by train.seed) as the eval split",
    )
    train_weights: list[float] = _f(
        [],
        "mixture weights, one per train_files entry (empty = all 1): entry i contributes round(w * its rows) rows, "
        "seeded by train.seed; w > 1 repeats rows, w < 1 subsamples, 0 leaves the entry out",
    )
    columns: dict[str, str] = _f(
        {},
        "rename dataset columns, dpokit name: column, e.g. {prompt: question, chosen: response_j, rejected: "
        "response_k}; applied to every row (files and Hub datasets) before validation",
    )
    format: Literal["auto", "standard", "conversational", "implicit"] = _f(
        "auto", "row format; auto detects prompt/chosen/rejected strings, message lists, or implicit prompt"
    )
    max_length: int = _f(512, "max tokens of prompt + response")
    max_prompt_length: int = _f(256, "max prompt tokens (cut first, then responses are cut to fit max_length)")
    truncation_mode: Literal["keep_end", "keep_start"] = _f(
        "keep_end", "which end of an over-long prompt to keep (keep_end keeps the last turns)"
    )
    on_bad_row: Literal["error", "skip"] = _f("error", "a malformed row stops the run (error) or is skipped and counted")
    num_proc: int = _f(1, "processes that tokenize (chunks of rows; the same pairs as with 1)")
    cache_tokenized: bool = _f(
        True,
        "cache tokenized pairs on disk ($DPOKIT_CACHE/tokenized, else ~/.cache/dpokit/tokenized), keyed by the "
        "tokenizer, the rows and the settings; a later run with the same inputs skips tokenizing",
    )
    pad_to_multiple_of: int = _f(8, "pad batch length up to a multiple of this (0 = no rounding)")
    group_by_length: bool = _f(
        True,
        "batch pairs of similar length (less padding): each epoch is shuffled, sorted by length within "
        "chunks of 64 optimizer steps, and the steps' order shuffled again; deterministic and resumable",
    )
    packing: bool = _f(
        False,
        "padding-free: pack a micro-batch's sequences back to back in rows (positions restart per "
        "sequence, attention kept within each); same log-probs as padded, fewer FLOPs",
    )
    prefix_sharing: bool | Literal["auto"] = _f(
        "auto",
        "run each pair as one [prompt, chosen, rejected] sequence so the prompt is computed once "
        "(rejected attends to the prompt, not to chosen; same log-probs); needs attn_implementation sdpa, "
        "eager or varlen. auto = on where it is faster: on CPU (sdpa/eager) and with varlen; off with "
        "sliding-window attention shorter than max_length",
    )
    packing_max_tokens: int = _f(
        0,
        "max tokens per packed row (first-fit); 0 = auto: the row count a FLOP model of the policy finds "
        "cheapest (dense-mask attention grows with row length; flash_attention_2: one row)",
    )
    sft_target: Literal["chosen"] | None = _f(
        None,
        "`dpokit sft` on preference pairs: chosen = train on prompt + chosen response (the DPO paper's "
        "Preferred-FT); null = the rows hold prompt/completion or messages",
    )
    sft_loss_on: Literal["all_assistant", "last_assistant"] = _f(
        "all_assistant", "`dpokit sft` on messages rows: the loss covers every assistant turn, or only the last one"
    )


# Names `loss.type` accepts: the built-in losses, plus any added with
# `dpokit.objectives.losses.register_loss` (which records its name here, since config sits below the
# losses and must not import them). tests/unit/test_losses.py checks this set equals the registry.
LOSS_TYPES: set[str] = {"sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"}


@dataclass
class LossConfig:
    type: str = _f("sigmoid", "sigmoid (DPO), ipo, hinge, robust, simpo, orpo")
    beta: float = _f(0.1, "strength of the KL constraint to the reference (inverse temperature)")
    label_smoothing: float = _f(0.0, "assumed label-flip rate: conservative DPO (sigmoid) / robust DPO, in [0, 0.5)")
    nll_weight: float = _f(0.0, "weight of an NLL term on chosen responses (RPO); counters likelihood displacement")
    ipo_length_normalize: bool = _f(True, "IPO on per-token average log-ratios (as TRL); false = summed (paper)")
    simpo_gamma: float = _f(0.5, "SimPO target reward margin gamma")


@dataclass
class ReferenceConfig:
    mode: Literal["auto", "copy", "adapter", "none"] = _f(
        "auto",
        "auto = adapter with LoRA, copy for full fine-tuning, none for reference-free losses; "
        "copy = frozen copy of the model; adapter = the LoRA base with adapters disabled",
    )
    name_or_path: str | None = _f(None, "a different reference model (copy mode); default: model.name_or_path")
    precompute: bool = _f(
        False,
        "compute reference log-probs for every train/eval pair in one pass before training and cache them on "
        "disk; training then keeps no reference model in memory and runs one forward per step. "
        "`dpokit evaluate` reuses a matching cache; with this set it also writes one",
    )
    cache_dir: str | None = _f(
        None, "where reference log-prob caches live (default: $DPOKIT_CACHE/ref_logps, else ~/.cache/dpokit/ref_logps)"
    )


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "train LoRA adapters instead of all weights")
    r: int = _f(16, "adapter rank")
    alpha: int = _f(32, "adapter scaling numerator (scale = alpha / r)")
    dropout: float = _f(0.0, "dropout on the adapter input")
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters (or ['all-linear'])",
    )
    merge: bool = _f(False, "also save a merged full model (output_dir/merged)")
    quantize: Literal["none", "int8", "nf4"] = _f(
        "none",
        "store the frozen base weights quantised (QLoRA): int8 or nf4 (4-bit NormalFloat), through torchao "
        "(pip install 'dpokit[quant]'); the adapters train in the compute dtype",
    )


@dataclass
class RewardConfig:
    """`dpokit reward` (a Bradley-Terry reward model on the pairs; loss.* and reference.* are DPO's)."""

    center_rewards_coefficient: float = _f(
        0.0,
        "`dpokit reward`: weight c of the centring term c * mean((r_chosen + r_rejected)^2), which keeps rewards "
        "near zero mean (arXiv 2312.09244; TRL's center_rewards_coefficient, e.g. 0.01); 0 = off",
    )


@dataclass
class KTOConfig:
    """`dpokit kto` (KTO on prompt/completion rows labelled desirable or not; loss.beta is its beta,
    reference.* its reference)."""

    desirable_weight: float = _f(
        1.0,
        "`dpokit kto`: weight lambda_D of the loss of desirable (label true) examples; with unbalanced data keep "
        "lambda_D * n_desirable / (lambda_U * n_undesirable) in [1, 4/3] (KTO paper Eq. 8; the run warns otherwise)",
    )
    undesirable_weight: float = _f(
        1.0, "`dpokit kto`: weight lambda_U of the loss of undesirable (label false) examples"
    )


@dataclass
class RLConfig:
    """`dpokit rl`: PPO / RLOO against a reward (train.* sets steps, lr, seed, batches, checkpoints)."""

    algorithm: Literal["ppo", "rloo"] = _f(
        "ppo", "ppo: clipped policy + value losses with GAE; rloo: k samples per prompt, leave-one-out baseline, no value model"
    )
    prompt_files: list[str] = _f(
        ["builtin:reviews/train_prompts.jsonl"], "prompt files (.jsonl with a prompt field, or text: one per line)"
    )
    reward: str = _f(
        "vader",
        "what scores a response: vader, textblob, rm:PATH (a `dpokit reward` folder; re-tokenises the text with its "
        "own tokenizer), module:function or file.py:function (texts, or prompts and texts -> one number each)",
    )
    missing_eos_penalty: float | None = _f(
        None, "subtracted from the score of a response that did not end (hit rl.max_new_tokens without EOS); null = none"
    )
    kl_coef: float = _f(0.05, "per-token KL penalty coefficient in the reward (the start value when rl.kl_target is set)")
    kl_target: float | None = _f(
        None,
        "adaptive KL controller (Ziegler et al. 2019): steer the coefficient so the sequence-level KL approaches this "
        "value; null = fixed rl.kl_coef",
    )
    kl_horizon: int = _f(10000, "adaptive controller horizon in samples (larger = slower coefficient changes)")
    kl_estimator: Literal["k1", "k3"] = _f(
        "k1", "per-token KL estimator: k1 = log pi - log ref; k3 = exp(log ref - log pi) - 1 - (log ref - log pi) (>= 0)"
    )
    prompts_per_step: int = _f(16, "prompts sampled per RL step (one rollout batch)")
    samples_per_prompt: int = _f(0, "responses per prompt; 0 = auto: 1 for ppo, 2 for rloo (needs >= 2)")
    max_new_tokens: int = _f(48, "max tokens of a sampled response")
    temperature: float = _f(1.0, "sampling temperature; log-probs are taken at the same temperature")
    max_prompt_length: int = _f(128, "prompts longer than this many tokens (chat template included) are skipped and counted")
    ppo_epochs: int = _f(4, "passes over each rollout batch (minibatch updates on the same samples)")
    num_minibatches: int = _f(1, "minibatches per pass over the rollout batch (one optimizer step each)")
    cliprange: float = _f(0.2, "policy ratio clip epsilon")
    cliprange_value: float = _f(0.2, "value clip range around the rollout values (ppo)")
    vf_coef: float = _f(0.1, "weight of the value loss (ppo)")
    gamma: float = _f(1.0, "discount (ppo GAE)")
    lam: float = _f(0.95, "GAE lambda (ppo)")
    whiten_advantages: bool = _f(True, "normalise advantages to zero mean, unit variance over the rollout batch")
    value_model: Literal["auto", "reward", "policy"] = _f(
        "auto",
        "ppo value model initialisation: reward = a copy of the rl.reward reward model (standard), policy = the "
        "policy's backbone with a new head; auto = reward when rl.reward is rm:PATH, else policy",
    )

    def samples(self) -> int:
        """Responses per prompt, with 0 (auto) resolved for the algorithm."""
        return self.samples_per_prompt or (2 if self.algorithm == "rloo" else 1)


@dataclass
class IterateConfig:
    """`dpokit iterate`: rounds of sample -> judge -> pairs -> DPO, each from the previous round's policy
    (model.*, data.max_length, loss.*, lora.*, train.* set each round's training; train.output_dir holds the rounds)."""

    rounds: int = _f(3, "feedback rounds; each samples the current policy, judges, keeps pairs and trains DPO on them")
    prompt_files: list[str] = _f(
        ["builtin:reviews/train_prompts.jsonl"], "training prompts (.jsonl with a prompt field, or text: one per line)"
    )
    prompts_per_round: int = _f(
        96, "prompts sampled per round: consecutive slices of one seeded shuffle of the prompts (wrapping around)"
    )
    heldout_file: str = _f(
        "builtin:reviews/eval_prompts.jsonl", "held-out prompts: each round's policy is judged and its KL measured on them"
    )
    heldout_prompts: int = _f(64, "how many of heldout_file's prompts (the first N) are sampled, one response each")
    judge: str = _f(
        "vader", "what scores responses: vader, textblob, rm:PATH (a `dpokit reward` folder), module:function"
    )
    n_samples: int = _f(3, "responses sampled per prompt; the judge's best and worst become a pair")
    min_gap: float = _f(0.2, "minimum judge score gap between best and worst for the prompt to give a pair")
    reference: Literal["previous", "original"] = _f(
        "previous",
        "DPO reference of round k: previous = the policy round k starts from (round k-1's); original = the starting "
        "model (model.name_or_path), loaded as a copy",
    )
    max_new_tokens: int = _f(40, "max tokens of a sampled response (pairs and held-out)")
    temperature: float = _f(0.8, "sampling temperature (pairs and held-out); KL is exact only at 1 with top_p 1")
    top_p: float = _f(0.95, "nucleus sampling (pairs and held-out)")
    seed: int = _f(0, "shuffles the prompts; round k samples its pairs with seed + k")
    heldout_seed: int = _f(1234, "held-out sampling seed, the same for every round so differences are not sampling luck")
    gen_batch_size: int = _f(64, "sequences per generate call (larger: more tokens/s on a CPU)")
    score_batch_size: int = _f(16, "sequences per forward of the KL estimate and of an rm: judge")


# Loggers `train.report_to` accepts besides metrics.jsonl; each is an optional extra
# (pip install 'dpokit[NAME]'). `dpokit.training.metrics.register_backend` adds to it (config sits below
# the loggers and must not import them); tests/unit/test_loggers.py checks it equals metrics.BACKENDS.
REPORT_TO: set[str] = {"tensorboard", "trackio", "wandb"}


def _is_repo_id(text: str) -> bool:
    """A Hugging Face Hub repo id: NAME or ORG/NAME of letters, digits, '-', '_' and '.'."""
    parts = text.split("/")
    return len(parts) <= 2 and all(p and all(c.isalnum() or c in "-_." for c in p) for p in parts)


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/dpo", "where the model, tokenizer, config and metrics.jsonl are written")
    overwrite: bool = _f(False, "allow writing into an output_dir that already holds another run")
    max_steps: int = _f(-1, "optimizer steps; -1 = derive from epochs")
    epochs: float = _f(1.0, "passes over train_files when max_steps is -1")
    micro_batch_size: int = _f(4, "pairs per forward pass (the forward sees 2x rows: chosen + rejected)")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step; pairs/step = micro_batch_size * this * world")
    eval_batch_size: int = _f(8, "pairs per forward pass during evaluation")
    lr: float = _f(5e-6, "peak learning rate")
    optimizer: Literal["adamw", "rmsprop", "adamw8bit"] = _f(
        "adamw",
        "optimizer; adamw8bit = AdamW with 8-bit moments (torchao; pip install 'dpokit[quant]'): a quarter of "
        "AdamW's state memory",
    )
    weight_decay: float = _f(0.0, "decoupled weight decay (adamw)")
    warmup_steps: int = _f(0, "linear warm-up steps from 0 to lr")
    scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "decay after warm-up (to 0 at the last step)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    seed: int = _f(42, "seed for data order, LoRA init and dropout")
    mixed_precision: Literal["no", "bf16"] = _f("no", "bf16 autocast for the forward (log-probs and loss stay fp32)")
    gradient_checkpointing: bool | int | Literal["auto"] = _f(
        "auto",
        "recompute activations in the backward to save memory: true = every decoder layer, false = none, an "
        "integer k = every k-th layer (1 = all); auto = off when the memory plan fits train.memory_budget, else "
        "the fewest layers that make it fit (every 4th, 3rd, 2nd, then all), logged with the plan's numbers",
    )
    memory_budget: float | Literal["auto"] = _f(
        "auto",
        "GiB one process may use (weights, gradients, optimizer state, reference, activations); auto = the "
        "device's free memory (CUDA free memory, else available RAM) less a margin. The plan (`dpokit plan`) "
        "chooses train.gradient_checkpointing=auto against it and refuses a run that cannot fit",
    )
    log_every: int = _f(10, "optimizer steps between log lines / metrics.jsonl rows")
    eval_every: int = _f(0, "optimizer steps between evaluations (0 = only at the end)")
    save_every: int = _f(0, "optimizer steps between checkpoints (0 = none during the run; the last step's is always written, "
                             "and kept only when this is > 0: it lets train.resume=auto finish an interrupted final save)")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep in output_dir/checkpoints")
    resume: str | bool = _f(
        "no",
        "no = start fresh; auto = continue from the newest complete checkpoint in output_dir/checkpoints "
        "(fresh if there is none); or the path of one checkpoint folder",
    )
    max_bad_steps: int = _f(
        5, "consecutive steps with a non-finite loss or gradient (each skipped) before the run stops"
    )
    report_to: list[str] = _f(
        [],
        "extra loggers besides metrics.jsonl: tensorboard, trackio, wandb (offline without WANDB_API_KEY); "
        "each needs its extra: pip install 'dpokit[NAME]'",
    )
    progress_bar: bool = _f(True, "show a progress bar (step, loss, accuracy, ETA)")
    push_to_hub: bool = _f(
        False, "after the final save, upload output_dir (model, card, metrics; not checkpoints) to train.hub_model_id"
    )
    hub_model_id: str | None = _f(None, "the Hub repo train.push_to_hub uploads to: ORG/NAME, or NAME in your namespace")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "reference": ReferenceConfig,
    "lora": LoraConfig,
    "reward": RewardConfig,
    "kto": KTOConfig,
    "rl": RLConfig,
    "iterate": IterateConfig,
    "train": TrainConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> Config:
        """Build from a nested dict; unknown keys and wrong types raise ConfigError naming them."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
        sections = {}
        for name, value in raw.items():
            if name not in SECTIONS:
                raise ConfigError(f"{where}: unknown section '{name}'{_suggest(name, SECTIONS)}")
            sections[name] = _build_section(SECTIONS[name], value, f"{name}", where)
        return cls(**sections)

    @classmethod
    def from_yaml(cls, path: str | Path, base: Config | None = None) -> Config:
        """Read a YAML config; with ``base``, the file's keys replace base's key by key (`merge`)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if base is not None:
            return base.merge(raw or {}, where=str(path))
        return cls.from_dict(raw or {}, where=str(path))

    @classmethod
    def from_preset(cls, name: str) -> Config:
        """A shipped config by name (`resources.presets()`: demo, full, lora, tiny), wherever dpokit is installed."""
        return cls.from_yaml(resources.preset_path(name))

    def merge(self, raw: dict[str, Any], where: str = "config") -> Config:
        """A new Config: this one with the keys present in ``raw`` (nested like a YAML file) replaced.

        Keys absent from ``raw`` keep this config's values; a list value replaces the whole list.
        Unknown sections or keys and wrong types are ConfigErrors naming ``where``.
        """
        overlay = Config.from_dict(raw, where=where)  # checks names and types against the schema
        merged = self.to_dict()
        for section, values in (raw or {}).items():
            for key in values or {}:
                merged[section][key] = getattr(getattr(overlay, section), key)
        return Config.from_dict(merged, where=where)

    def override(self, assignments: list[str]) -> Config:
        """Apply `section.key=value` strings (values parsed as YAML scalars/lists); returns a new Config."""
        raw = self.to_dict()
        for item in assignments:
            key, sep, text = item.partition("=")
            parts = key.strip().split(".")
            if not sep or len(parts) != 2:
                raise ConfigError(
                    f"override '{item}' must look like section.key=value (e.g. train.lr=1e-5){trl_hint(key)}"
                )
            section, name = parts
            if section not in SECTIONS:
                raise ConfigError(f"override '{item}': unknown section '{section}'{_suggest(section, SECTIONS)}")
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError:
                value = text
            raw[section][name] = value
        return Config.from_dict(raw, where="command line")

    # ---- output -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, commented: bool = True) -> str:
        """YAML text of the whole config; with comments, each key carries its help line."""
        lines: list[str] = []
        for name, section_cls in SECTIONS.items():
            section = getattr(self, name)
            lines.append(f"{name}:")
            for f in dataclasses.fields(section_cls):
                value = yaml.safe_dump({f.name: getattr(section, f.name)}, default_flow_style=True, width=1000)
                value = value.strip()[1:-1]  # strip the braces of the one-key flow mapping
                comment = f"  # {f.metadata['help']}{_choices(section_cls, f.name)}" if commented else ""
                lines.append(f"  {value}{comment}")
            lines.append("")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(commented=False), encoding="utf-8")

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> Config:
        """Check values and cross-field rules; raise ConfigError naming the key. Returns self."""
        d, t, lo, lora = self.data, self.train, self.loss, self.lora
        checks = [
            (t.lr > 0, "train.lr must be > 0"),
            (lo.beta > 0, "loss.beta must be > 0"),
            (0.0 <= lo.label_smoothing < 0.5, "loss.label_smoothing must be in [0, 0.5)"),
            (lo.nll_weight >= 0, "loss.nll_weight must be >= 0"),
            (
                0 <= self.reward.center_rewards_coefficient < float("inf"),
                "reward.center_rewards_coefficient must be >= 0 (0 = off)",
            ),
            (d.max_length >= 2, "data.max_length must be >= 2"),
            (d.max_prompt_length >= 1, "data.max_prompt_length must be >= 1"),
            (
                d.max_prompt_length < d.max_length,
                f"data.max_prompt_length ({d.max_prompt_length}) must be < data.max_length ({d.max_length}), "
                "or no room is left for the response",
            ),
            (d.pad_to_multiple_of >= 0, "data.pad_to_multiple_of must be >= 0"),
            (d.packing_max_tokens >= 0, "data.packing_max_tokens must be >= 0 (0 = auto)"),
            (
                d.prefix_sharing is not True or self.model.attn_implementation in ("auto", "sdpa", "eager", "varlen"),
                f"data.prefix_sharing needs a 4D attention mask or dpokit's segments, which model.attn_implementation="
                f"{self.model.attn_implementation} does not take; use varlen (GPU), sdpa or eager (or data.packing alone)",
            ),
            (
                self.model.attn_implementation != "varlen" or d.packing or d.prefix_sharing,
                "model.attn_implementation=varlen is for packed batches: set data.packing and/or data.prefix_sharing",
            ),
            (len(d.train_files) > 0, "data.train_files is empty: give at least one file"),
            *_data_checks(d),
            *_rl_checks(self.rl),
            *_kto_checks(self.kto),
            *_iterate_checks(self.iterate),
            *_train_checks(t),
            (lora.quantize == "none" or lora.enabled, "lora.quantize quantises the frozen base of a LoRA run: set lora.enabled=true"),
            (
                lora.quantize == "none" or not lora.merge,
                "lora.merge needs the full-precision base; with lora.quantize the adapter is saved alone (merge it "
                "onto the original base afterwards with peft's merge_and_unload)",
            ),
            (
                lora.quantize == "none" or self.reference.mode != "copy",
                "reference.mode=copy with lora.quantize would copy the quantised base; use reference.mode=adapter "
                "(the default with LoRA: the same base with the adapters off)",
            ),
            (t.resume is not True and t.resume != "", "train.resume must be no, auto or a checkpoint folder"),
            (lora.r >= 1 and lora.alpha > 0, "lora.r must be >= 1 and lora.alpha > 0"),
            (0.0 <= lora.dropout < 1.0, "lora.dropout must be in [0, 1)"),
            (len(lora.target_modules) > 0, "lora.target_modules is empty"),
            (
                self.reference.mode != "adapter" or lora.enabled,
                "reference.mode=adapter needs lora.enabled=true (the reference is the base with adapters off)",
            ),
            (
                set(t.report_to) <= REPORT_TO,
                f"train.report_to: unknown logger in {t.report_to}; known: {', '.join(sorted(REPORT_TO))}",
            ),
            (not t.push_to_hub or bool(t.hub_model_id), "train.push_to_hub needs train.hub_model_id (the Hub repo, ORG/NAME)"),
            (
                t.hub_model_id is None or _is_repo_id(t.hub_model_id),
                f"train.hub_model_id {t.hub_model_id!r} is not a Hub repo id: ORG/NAME or NAME "
                "(letters, digits, '-', '_', '.')",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if lo.type not in LOSS_TYPES:
            raise ConfigError(f"loss.type '{lo.type}' is not one of: {', '.join(sorted(LOSS_TYPES))}")
        return self


# ---- helpers ------------------------------------------------------------------------------
def _rl_checks(r: RLConfig) -> list[tuple[bool, str]]:
    """Config.validate's checks of the rl section (`dpokit rl`)."""
    return [
        (len(r.prompt_files) > 0, "rl.prompt_files is empty: give at least one prompts file"),
        (bool(r.reward.strip()), "rl.reward is empty: name a judge, rm:PATH or module:function"),
        (r.kl_coef >= 0, "rl.kl_coef must be >= 0"),
        (r.kl_target is None or r.kl_target > 0, "rl.kl_target must be > 0 (or null for a fixed rl.kl_coef)"),
        (r.kl_target is None or r.kl_coef > 0, "rl.kl_target adapts rl.kl_coef multiplicatively: start it > 0"),
        (r.kl_horizon >= 1, "rl.kl_horizon must be >= 1"),
        (r.missing_eos_penalty is None or r.missing_eos_penalty >= 0, "rl.missing_eos_penalty must be >= 0"),
        (r.prompts_per_step >= 1 and r.samples_per_prompt >= 0, "rl.prompts_per_step must be >= 1, rl.samples_per_prompt >= 0"),
        (
            r.algorithm != "rloo" or r.samples() >= 2,
            f"rl.algorithm=rloo needs rl.samples_per_prompt >= 2 (the baseline of a sample is the other samples of "
            f"its prompt), got {r.samples_per_prompt}",
        ),
        (r.max_new_tokens >= 1 and r.max_prompt_length >= 1, "rl.max_new_tokens and rl.max_prompt_length must be >= 1"),
        (r.temperature > 0, "rl.temperature must be > 0 (log-probs are taken at that temperature)"),
        (r.ppo_epochs >= 1 and r.num_minibatches >= 1, "rl.ppo_epochs and rl.num_minibatches must be >= 1"),
        (
            r.num_minibatches <= r.prompts_per_step * r.samples(),
            f"rl.num_minibatches ({r.num_minibatches}) exceeds the responses per step "
            f"({r.prompts_per_step} x {r.samples()})",
        ),
        (r.cliprange > 0 and r.cliprange_value > 0, "rl.cliprange and rl.cliprange_value must be > 0"),
        (r.vf_coef >= 0, "rl.vf_coef must be >= 0"),
        (0 <= r.gamma <= 1 and 0 <= r.lam <= 1, "rl.gamma and rl.lam must be in [0, 1]"),
    ]


def _train_checks(t: TrainConfig) -> list[tuple[bool, str]]:
    """Config.validate's checks of the train section's own values."""
    return [
        (t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1"),
        (t.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (t.max_steps == -1 or t.max_steps >= 1, "train.max_steps must be >= 1, or -1 to use train.epochs"),
        (t.max_steps >= 1 or t.epochs > 0, "train.epochs must be > 0 when train.max_steps is -1"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 = no clipping)"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.log_every >= 1, "train.log_every must be >= 1"),
        (t.eval_every >= 0 and t.save_every >= 0, "train.eval_every and train.save_every must be >= 0"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (t.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (
            isinstance(t.gradient_checkpointing, (bool, str)) or t.gradient_checkpointing >= 1,
            "train.gradient_checkpointing must be true, false, auto or an integer k >= 1 (every k-th layer)",
        ),
        (t.memory_budget == "auto" or t.memory_budget > 0, "train.memory_budget must be auto or a number of GiB > 0"),
    ]


def _iterate_checks(it: IterateConfig) -> list[tuple[bool, str]]:
    """Config.validate's checks of the iterate section (`dpokit iterate`)."""
    return [
        (it.rounds >= 1, "iterate.rounds must be >= 1"),
        (len(it.prompt_files) > 0, "iterate.prompt_files is empty: give at least one prompts file"),
        (it.prompts_per_round >= 1 and it.heldout_prompts >= 1, "iterate.prompts_per_round and iterate.heldout_prompts must be >= 1"),
        (bool(it.judge.strip()), "iterate.judge is empty: name a judge, rm:PATH or module:function"),
        (it.n_samples >= 2, f"iterate.n_samples must be >= 2 (a pair is the best and the worst of them), got {it.n_samples}"),
        (it.min_gap >= 0, "iterate.min_gap must be >= 0"),
        (it.max_new_tokens >= 1, "iterate.max_new_tokens must be >= 1"),
        (it.temperature > 0 and 0 < it.top_p <= 1, "iterate.temperature must be > 0 and iterate.top_p in (0, 1]"),
        (it.gen_batch_size >= 1 and it.score_batch_size >= 1, "iterate.gen_batch_size and iterate.score_batch_size must be >= 1"),
    ]


def _kto_checks(k: KTOConfig) -> list[tuple[bool, str]]:
    """Config.validate's checks of the kto section (`dpokit kto`)."""
    finite = all(0 <= w < float("inf") for w in (k.desirable_weight, k.undesirable_weight))
    return [
        (finite, "kto.desirable_weight and kto.undesirable_weight must be finite and >= 0"),
        (k.desirable_weight + k.undesirable_weight > 0, "kto.desirable_weight and kto.undesirable_weight are both 0"),
    ]


def _data_checks(d: DataConfig) -> list[tuple[bool, str]]:
    """Config.validate's checks of the data keys that choose rows and read Hub datasets."""
    weights, names = d.train_weights, list(d.columns.values())
    return [
        (bool(d.train_split.strip()) and bool(d.eval_split.strip()), "data.train_split and data.eval_split must be names"),
        (0.0 <= d.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (
            d.eval_fraction == 0 or not d.eval_files,
            "data.eval_fraction holds out training rows only when data.eval_files is empty; set one of the two",
        ),
        (
            not weights or len(weights) == len(d.train_files),
            f"data.train_weights has {len(weights)} weights for {len(d.train_files)} data.train_files entries; "
            "give one per entry, or none",
        ),
        (all(0 <= w < float("inf") for w in weights), "data.train_weights must be finite and >= 0"),
        (not weights or sum(weights) > 0, "data.train_weights are all 0: no training rows would be left"),
        (d.num_proc >= 1, "data.num_proc must be >= 1"),
        (
            set(d.columns) <= {"prompt", "chosen", "rejected", "margin", "completion", "messages", "label"},
            f"data.columns: unknown name(s) "
            f"{sorted(set(d.columns) - {'prompt', 'chosen', 'rejected', 'margin', 'completion', 'messages', 'label'})}; "
            "its keys are dpokit's names (prompt, chosen, rejected, margin; completion, messages for `dpokit sft`; "
            "label for `dpokit kto`), its values "
            "the dataset's columns",
        ),
        (all(n.strip() for n in names) and len(set(names)) == len(names), "data.columns: each name needs its own column"),
    ]


# TRL / transformers TrainingArguments names a user moving from TRL types, and dpokit's key for each
# (`key=value` overrides, YAML keys and `--flag` arguments written the TRL way get "did you mean").
TRL_NAMES: dict[str, str] = {
    "model_name_or_path": "model.name_or_path", "torch_dtype": "model.dtype", "dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation", "trust_remote_code": "model.trust_remote_code",
    "dataset_name": "data.train_files", "dataset_train_split": "data.train_split",
    "dataset_test_split": "data.eval_split", "dataset_config": "data.subset",
    "max_length": "data.max_length", "max_prompt_length": "data.max_prompt_length",
    "truncation_mode": "data.truncation_mode", "padding_free": "data.packing", "group_by_length": "data.group_by_length",
    "beta": "loss.beta", "loss_type": "loss.type", "label_smoothing": "loss.label_smoothing",
    "rpo_alpha": "loss.nll_weight", "simpo_gamma": "loss.simpo_gamma",
    "ref_model": "reference.name_or_path", "precompute_ref_log_probs": "reference.precompute",
    "use_peft": "lora.enabled", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "output_dir": "train.output_dir", "overwrite_output_dir": "train.overwrite", "max_steps": "train.max_steps",
    "num_train_epochs": "train.epochs", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps", "per_device_eval_batch_size": "train.eval_batch_size",
    "learning_rate": "train.lr", "optim": "train.optimizer", "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps", "lr_scheduler_type": "train.scheduler", "max_grad_norm": "train.max_grad_norm",
    "center_rewards_coefficient": "reward.center_rewards_coefficient",
    "desirable_weight": "kto.desirable_weight", "undesirable_weight": "kto.undesirable_weight",
    "kl_coef": "rl.kl_coef", "kl_estimator": "rl.kl_estimator", "num_ppo_epochs": "rl.ppo_epochs",
    "num_mini_batches": "rl.num_minibatches", "cliprange": "rl.cliprange", "cliprange_value": "rl.cliprange_value",
    "vf_coef": "rl.vf_coef", "lam": "rl.lam", "gamma": "rl.gamma", "missing_eos_penalty": "rl.missing_eos_penalty",
    "response_length": "rl.max_new_tokens", "num_generations": "rl.samples_per_prompt", "reward_model_path": "rl.reward",
    "reward_funcs": "rl.reward", "whiten_rewards": "rl.whiten_advantages",
    "seed": "train.seed", "bf16": "train.mixed_precision=bf16", "gradient_checkpointing": "train.gradient_checkpointing",
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every", "save_steps": "train.save_every",
    "save_total_limit": "train.keep_checkpoints", "resume_from_checkpoint": "train.resume", "report_to": "train.report_to",
    "disable_tqdm": "train.progress_bar=false", "push_to_hub": "train.push_to_hub", "hub_model_id": "train.hub_model_id",
}  # fmt: skip


def trl_hint(name: str) -> str:
    """" (did you mean train.lr?)" for a TRL argument name (with or without dashes), else ""."""
    key = name.strip().lstrip("-").replace("-", "_").split("=", 1)[0].split(".")[-1]
    return f" (did you mean {TRL_NAMES[key]}? dpokit names keys section.key: see `dpokit config`)" if key in TRL_NAMES else ""


def _suggest(name: str, choices: Any) -> str:
    hint = trl_hint(name)
    if hint:
        return hint
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(choices)})"


def _choices(section_cls: type, name: str) -> str:
    """" [one of: a, b, c]" for a key with a fixed set of values (a Literal, or loss.type's registry)."""
    if section_cls is LossConfig and name == "type":
        values = sorted(LOSS_TYPES)
    else:
        hint = typing.get_type_hints(section_cls)[name]
        options = [hint] + list(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
        values = [v for o in options if typing.get_origin(o) is Literal for v in typing.get_args(o)]
        if values and bool in options:  # e.g. data.prefix_sharing: true | false | auto
            values = ["true", "false", *values]
    return f" [one of: {', '.join(map(str, values))}]" if values else ""


def _build_section(cls: type, value: Any, section: str, where: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: section '{section}' must be a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, item in value.items():
        if key not in hints:
            raise ConfigError(f"{where}: unknown key '{section}.{key}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(item, hints[key], f"{section}.{key}", where)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Check `value` against the type annotation `hint`; allow only lossless conversions."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # First alternative that accepts the value wins: `str | bool` takes YAML's `no` (read as False).
        for alternative in inner[:-1]:
            try:
                return _coerce(value, alternative, key, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key, where)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false (train.mixed_precision=no)
            value = "no"
        if value not in args:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(k, args[0], f"{key} key", where): _coerce(v, args[1], f"{key}.{k}", where) for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):  # a single file is a list of one
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {hint}")  # pragma: no cover - schema bug
