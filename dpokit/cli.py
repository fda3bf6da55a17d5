"""Command line: `dpokit train | reward | sft | kto | rl | evaluate | score | config | export | pairs | sample
| label | agreement | bon | compare | demo | iterate`.

Only argument parsing lives here: each command builds a Config and calls the library. Errors the
user can fix (DpokitError) print one line and exit 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from dpokit import launch, resources
from dpokit.config import Config, trl_hint
from dpokit.errors import ConfigError, DpokitError, WriteError


def _split_config_arg(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """argparse hands the first `key=value` to an optional CONFIG positional: give it back to the overrides."""
    if config is not None and "=" in config and not os.path.isfile(config):
        return None, [config, *overrides]
    return config, overrides


def _load_config(path: str | None, overrides: list[str], preset: str | None = None) -> Config:
    """The preset (or the built-in defaults), then the YAML file's keys over it, then the overrides."""
    cfg = Config.from_preset(preset) if preset else Config()
    if path:
        cfg = Config.from_yaml(path, base=cfg if preset else None)
    return cfg.override(overrides) if overrides else cfg


def _sources(path: str | None, overrides: list[str], preset: str | None = None) -> str:
    """Where a config's values came from, for messages: "preset tiny + my.yaml + command-line overrides"."""
    sources = [f"preset {preset}"] if preset else []
    sources += [path] if path else []
    sources += ["command-line overrides"] if overrides else []
    return " + ".join(sources) or "built-in defaults"


def _validated(cfg: Config, path: str | None, overrides: list[str], preset: str | None = None) -> Config:
    """Config.validate(), with the message saying where the values came from (validate only knows keys)."""
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{_sources(path, overrides, preset)}: {exc}") from None


def _training_command(args: argparse.Namespace, command: str, example_preset: str, what: str) -> int:
    """The body of `dpokit train | sft | reward | kto`: the config from preset, file and overrides; training
    with the command's objective; then how it ended (done, stopped by a signal, already complete).
    With --num-processes N > 1 it re-runs itself under `accelerate launch` (dpokit.launch) once the
    config is known to be valid, so that a config error is reported once, not by every worker."""
    config, overrides = _split_config_arg(args.config, args.overrides)
    if config is None and args.preset is None:
        misplaced = f" (`{overrides[0]}` is an override, not a config file: overrides come after it)" if overrides else ""
        raise ConfigError(
            f"dpokit {command} needs a config{misplaced}: a YAML file (`dpokit config > my.yaml` writes one), "
            f"--preset NAME (one of: {', '.join(resources.presets())}), or a preset and a YAML file over it; "
            f"e.g. `dpokit {command} --preset {example_preset} train.lr=1e-5`"
        )
    cfg = _validated(_load_config(config, overrides, args.preset), config, overrides, args.preset)
    if args.own_process:  # the command line's process, not main() called from Python (a test)
        launch.maybe_preload_allocator(args.argv)
    launch.maybe_relaunch(command, args.argv, args.num_processes, args.accelerate_config)
    from dpokit.dist import close_process_group
    from dpokit.rl.loop import train_rl
    from dpokit.training.loop import OBJECTIVES, train

    again = [o for o in overrides if not o.startswith("train.resume=")] + ["train.resume=auto"]
    base = (["--preset", args.preset] if args.preset else []) + ([config] if config else [])
    again_cmd = shlex.join(["dpokit", command, *launch.launch_flags(), *base, *again])
    try:
        if command == "rl":  # RL reuses the training pieces, not the training loop (dpokit.rl.loop)
            result: Any = train_rl(cfg)
        else:
            result = train(cfg, objective=OBJECTIVES[{"train": "dpo"}.get(command, command)](cfg))
    except WriteError as exc:  # the disk is full or failing: the exact command that continues the run
        raise exc.elaborate(then=f"{exc.then}: {again_cmd}" if exc.then else f"To continue: {again_cmd}") from None
    if args.own_process:  # a launched worker exits next: its process group must not outlive the run
        close_process_group()
    if result.already_complete:  # train.resume=auto on a finished run: the message was printed
        return 0
    if result.stopped_by:  # SIGINT/SIGTERM: a checkpoint was written; say how to go on
        if launch.is_main_process():
            print(f"stopped at step {result.steps} (checkpoint {result.checkpoint}); to continue: {again_cmd}", file=sys.stderr)
        return 128 + result.stopped_by  # the shell's code for death by that signal: the run is not finished
    if launch.is_main_process():  # one line for the run, not one per process
        print(f"done: {what.format(steps=result.steps)}; outputs in {result.output_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`dpokit train`: DPO (or a variant, loss.type) on preference pairs."""
    return _training_command(args, "train", "tiny", "{steps} steps")


def cmd_plan(args: argparse.Namespace) -> int:
    """`dpokit plan`: the memory plan of a config (dpokit.apps.plan; imports torch, so only when it runs)."""
    from dpokit.apps.plan import plan_command

    return plan_command(args, _config_of(args))


def _config_of(args: argparse.Namespace) -> Config:
    """The validated config of a command with --preset, CONFIG and overrides (as `dpokit train`)."""
    config, overrides = _split_config_arg(args.config, args.overrides)
    return _validated(_load_config(config, overrides, args.preset), config, overrides, args.preset)


def cmd_reward(args: argparse.Namespace) -> int:
    """`dpokit reward`: a Bradley-Terry reward model on preference pairs."""
    return _training_command(args, "reward", "reward-tiny", "reward model after {steps} steps")


def cmd_sft(args: argparse.Namespace) -> int:
    """`dpokit sft`: supervised fine-tuning on completions (or the chosen side of pairs)."""
    return _training_command(args, "sft", "sft-tiny", "{steps} SFT steps")


def cmd_kto(args: argparse.Namespace) -> int:
    """`dpokit kto`: KTO on prompt/completion rows labelled desirable or undesirable."""
    return _training_command(args, "kto", "kto-tiny", "{steps} KTO steps")


def cmd_rl(args: argparse.Namespace) -> int:
    """`dpokit rl`: PPO or RLOO against a reward (rl.algorithm, rl.reward)."""
    return _training_command(args, "rl", "rl-tiny", "{steps} RL steps")


def cmd_evaluate(args: argparse.Namespace) -> int:
    if (args.prompts is None) == (args.data is None):
        raise ConfigError("dpokit evaluate needs --data PAIRS (pair metrics) or --prompts FILE (judged generation)")
    if args.prompts is not None:
        return cmd_evaluate_prompts(args)
    if len(args.model) > 1:
        raise ConfigError("dpokit evaluate --data takes one --model (several models are compared with --prompts)")
    args.model = args.model[0]
    from dpokit.eval.pairs import evaluate

    cfg = _load_config(args.config, args.overrides)
    if args.loss is not None:
        cfg = cfg.override([f"loss.type={args.loss}"])
    if args.beta is not None:
        cfg = cfg.override([f"loss.beta={args.beta}"])
    if args.batch_size is not None:
        cfg = cfg.override([f"train.eval_batch_size={args.batch_size}"])
    cfg.validate()
    result = evaluate(args.model, args.data, ref=args.ref, cfg=cfg, skipped_path=args.skipped)
    if args.json:
        print(json.dumps({"loss_type": cfg.loss.type, "beta": cfg.loss.beta, **result}, indent=2))
    else:
        print(f"evaluated {int(result['pairs'])} pairs (loss {cfg.loss.type}, beta {cfg.loss.beta})")
        for k, v in result.items():
            if k not in ("pairs", "dropped"):
                print(f"  {k:<20} {v: .6f}")
        if result.get("dropped"):
            print(f"  dropped pairs        {int(result['dropped'])} (see the data summary)")
    return 0


def cmd_evaluate_prompts(args: argparse.Namespace) -> int:
    """`dpokit evaluate --prompts FILE --model NAME=PATH ...`: sample, judge, compare with a baseline."""
    from dpokit.eval import generate_eval as ge

    cfg = _load_config(args.config, args.overrides).validate()
    sampling = ge.SamplingSettings(
        n=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, batch_size=args.batch_size or 16, score_batch_size=cfg.train.eval_batch_size,
    )  # fmt: skip
    settings = ge.PromptEvalSettings(
        prompts=args.prompts, models=[_named_model(m) for m in args.model], baseline=args.baseline,
        judges=args.judge or ["vader"], out=args.out, n_prompts=args.n_prompts, sampling=sampling,
        n_boot=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
    )  # fmt: skip
    result = ge.evaluate_prompts(settings, cfg, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(Path(result.files["summary"]).read_text(encoding="utf-8"))
    else:
        print(ge.markdown_table(ge.table_rows(result.models, settings.judges, settings.baseline or settings.models[0][0])))
        print(f"written: {', '.join(result.files.values())}")
    return 0


def _named_model(spec: str) -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH); a bare PATH is named by its last path component."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, path
    return Path(spec.rstrip("/")).name or spec, spec


def _add_prompt_eval_arguments(e: argparse.ArgumentParser) -> None:
    """`dpokit evaluate --prompts`: judged evaluation by generation (dpokit/eval/generate_eval.py)."""
    g = e.add_argument_group("judged generation (--prompts)")
    g.add_argument("--prompts", default=None, metavar="FILE", help="prompts (.jsonl with prompt fields, or .txt); builtin: paths work")
    g.add_argument("--baseline", default=None, metavar="NAME", help="model the others are compared with (default: the first)")
    g.add_argument("--judge", action="append", default=None, metavar="SPEC",
                   help="repeatable: vader, textblob, rm:PATH, module:function (default: vader)")  # fmt: skip
    g.add_argument("--n-prompts", type=int, default=None, help="use the first N prompts")
    g.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt and model (default 1)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (with top-p 1 the KL estimate is unbiased)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the win-rate interval")
    g.add_argument("--bootstrap-seed", type=int, default=0)
    g.add_argument("--out", default="runs/evaluate", help="folder for samples.jsonl, summary.json, summary.md")


def cmd_score(args: argparse.Namespace) -> int:
    """`dpokit score --data FILE [--model POLICY [--ref REF]] [--reward rm:PATH] [--judge J] --out FILE`."""
    from dpokit.eval.score import render_summary, score

    cfg = _load_config(args.config, args.overrides, args.preset)
    if args.beta is not None:
        cfg = cfg.override([f"loss.beta={args.beta}"])
    if args.batch_size is not None:
        cfg = cfg.override([f"train.eval_batch_size={args.batch_size}"])
    cfg.validate()
    rewards = [r if r.lower().startswith("rm:") else f"rm:{r}" for r in args.reward or []]
    result = score(args.data, cfg, model=args.model, ref=args.ref, scorers=rewards + (args.judge or []), out=args.out)
    print(json.dumps(result.summary, indent=2) if args.json else render_summary(result.summary))
    return 0


def _add_score_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("score", help="score responses or pairs: DPO implicit reward, a reward model, or a judge")
    s.add_argument("--data", required=True, nargs="+", help="pairs (prompt/chosen/rejected) or rows (prompt/response)")
    s.add_argument("--model", default=None, help="trained policy for the implicit reward beta*(log pi - log ref)")
    s.add_argument("--ref", default=None, help="its reference (default: the adapter's base for adapter folders)")
    s.add_argument("--beta", type=float, default=None, help="loss.beta of the implicit reward (default 0.1)")
    s.add_argument("--reward", action="append", default=None, metavar="rm:PATH", help="a reward model folder; repeatable")
    s.add_argument("--judge", action="append", default=None, metavar="SPEC",
                   help="repeatable: vader, textblob, module:function")  # fmt: skip
    s.add_argument("--out", default=None, metavar="FILE.jsonl", help="write one JSON line per row with its scores")
    s.add_argument("--batch-size", type=int, default=None, help="rows per forward pass")
    s.add_argument("--config", default=None, help="YAML config for data settings (max_length, format, ...)")
    s.add_argument("--preset", metavar="NAME", default=None, help="the shipped config a model was trained with (its beta, lengths)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides")
    s.set_defaults(func=cmd_score)


def _preset_summary(name: str) -> str:
    """The first comment line of a preset file: what it is for."""
    for line in resources.preset_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def cmd_config(args: argparse.Namespace) -> int:
    if args.list_presets:
        for name in resources.presets():
            print(f"{name:<8} {_preset_summary(name)}")
        return 0
    config, overrides = _split_config_arg(args.config, args.overrides)
    cfg = _load_config(config, overrides, args.preset)
    print(f"# dpokit config: every key with its value ({_sources(config, overrides, args.preset)}) and meaning.")
    print("# Use as `dpokit train THIS.yaml`; override any key with section.key=value.\n")
    print(cfg.to_yaml(commented=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`dpokit export MODEL_DIR --gguf OUT.gguf [--type f16|q8_0]`."""
    from dpokit.models.export import export_gguf

    export_gguf(args.model_dir, args.gguf, args.type)
    return 0


def cmd_iterate(args: argparse.Namespace) -> int:
    """`dpokit iterate`: rounds of sample, judge, pairs and DPO (dpokit.apps.iterate; torch only when it runs)."""
    if args.config is None and args.preset is None:
        raise ConfigError(
            "dpokit iterate needs a config: --preset NAME (iterate-reviews, iterate-tiny) and/or a YAML file with "
            "an iterate: section; e.g. `dpokit iterate --preset iterate-tiny train.output_dir=runs/it`"
        )
    cfg = _config_of(args)
    if args.own_process:  # mimalloc for the CPU training (dpokit.allocator)
        launch.maybe_preload_allocator(args.argv)
    from dpokit.apps.iterate import iterate_command

    return iterate_command(cfg, doc=args.doc)


def cmd_label(args: argparse.Namespace) -> int:
    """`dpokit label CANDIDATES --out LABELS.jsonl`: the labelling page (dpokit.apps.label; needs the label extra)."""
    from dpokit.apps.label import label_command

    try:
        return label_command(args)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("starlette", "uvicorn"):
            raise
        raise DpokitError(f"dpokit label needs starlette and uvicorn ({exc.name} is missing): pip install 'dpokit[label]'") from None


def cmd_demo(args: argparse.Namespace) -> int:
    """`dpokit demo`, where --preset NAME stands for --config <that preset's file>."""
    from dpokit.apps import demo

    if args.own_process:  # mimalloc for the CPU training (dpokit.allocator)
        launch.maybe_preload_allocator(args.argv)
    if args.preset is not None:
        if args.config != demo.DEFAULT_CONFIG:
            raise ConfigError("dpokit demo: give --config FILE or --preset NAME, not both")
        args.config = str(resources.preset_path(args.preset))
    return demo.demo_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dpokit", description="Direct Preference Optimization for causal LMs.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    names = ", ".join(resources.presets())
    for name, func, what, example in (
        ("train", cmd_train, "train a model with DPO from a YAML config and/or a preset", "train.lr=1e-5"),
        ("reward", cmd_reward, "train a Bradley-Terry reward model on preference pairs (config as for train)",
         "reward.center_rewards_coefficient=0.01"),
        ("sft", cmd_sft, "supervised fine-tuning on prompt/completion or messages rows (config as for train)",
         "data.sft_loss_on=last_assistant"),
        ("kto", cmd_kto, "KTO on prompt/completion rows with a true/false label (thumbs up/down; config as for train)",
         "kto.desirable_weight=1.33"),
        ("rl", cmd_rl, "RLHF's RL stage: PPO or RLOO against a reward model, judge or callable (rl.* keys)",
         "rl.algorithm=rloo rl.kl_coef=0.1"),
    ):  # fmt: skip
        t = sub.add_parser(name, help=what)
        t.intermixed = True  # `dpokit train my.yaml --num-processes 8 train.lr=1e-5`: options among the overrides
        t.add_argument("--preset", metavar="NAME", default=None,
                       help=f"start from a shipped config ({names}); a CONFIG file then sets only the keys it names")  # fmt: skip
        t.add_argument("config", nargs="?", default=None, help="YAML config (see `dpokit config`); optional with --preset")
        t.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {example}")
        _add_launch_arguments(t, name)
        t.set_defaults(func=func)

    e = sub.add_parser("evaluate", help="DPO metrics over a preference file (--data), or judged generation (--prompts)")
    e.add_argument("--model", required=True, action="append",
                   help="trained model: HF folder, LoRA adapter folder, .gguf or alias; with --prompts NAME=PATH, repeatable")  # fmt: skip
    e.add_argument("--ref", default=None, help="reference model (default: the adapter's base for adapter folders)")
    e.add_argument("--data", default=None, nargs="+", help="preference file(s)")
    _add_prompt_eval_arguments(e)
    e.add_argument("--beta", type=float, default=None, help="loss.beta (default 0.1)")
    e.add_argument("--loss", default=None, help="loss.type (default sigmoid)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="pairs per forward pass (--data); sequences per generate call (--prompts, default 16)")  # fmt: skip
    e.add_argument("--config", default=None, help="YAML config for data/loss settings")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--skipped", default=None, metavar="FILE",
                   help="with data.on_bad_row=skip: write the skipped rows here (JSON Lines)")  # fmt: skip
    e.add_argument("overrides", nargs="*", help="section.key=value overrides")
    e.set_defaults(func=cmd_evaluate)
    _add_score_parser(sub)

    c = sub.add_parser("config", help="print the full config as commented YAML")
    c.add_argument("--preset", metavar="NAME", default=None, help=f"print a shipped config ({names})")
    c.add_argument("--list-presets", action="store_true", help="list the shipped configs and exit")
    c.add_argument("config", nargs="?", default=None, help="a YAML to resolve (default: built-in defaults)")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides")
    c.set_defaults(func=cmd_config)

    x = sub.add_parser("export", help="write a trained llama-family folder (full model or LoRA adapter) as a GGUF file")
    x.add_argument("model_dir", metavar="MODEL_DIR", help="a dpokit output folder: full model, or LoRA adapter (merged)")
    x.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    x.add_argument("--type", default="f16", choices=["f16", "q8_0"], help="tensor type of the weights (default f16)")
    x.set_defaults(func=cmd_export)

    _add_optional_commands(sub)
    return p


def _add_launch_arguments(t: argparse.ArgumentParser, command: str) -> None:
    """--num-processes / --accelerate-config of the training commands (dpokit.launch)."""
    one = " (dpokit rl: 1 only)" if command == "rl" else ""
    t.add_argument(launch.NUM_PROCESSES_FLAG, type=int, default=1, metavar="N",
                   help=f"train in N processes (GPUs) through `accelerate launch`; default 1{one}")  # fmt: skip
    t.add_argument(launch.ACCELERATE_CONFIG_FLAG, default=launch.DEFAULT_ACCELERATE_CONFIG, metavar="NAME|PATH",
                   help=f"with --num-processes > 1: a shipped Accelerate config ({', '.join(resources.accelerate_configs())}; "
                   f"default {launch.DEFAULT_ACCELERATE_CONFIG}) or your own YAML")  # fmt: skip


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Commands whose modules bring their own arguments (imported here, not at the top of this file)."""
    from dpokit.apps import agreement, bon, compare, demo, label, pairs, sample

    pl = sub.add_parser("plan", help="estimate a run's peak memory from the model's config and the data, before training")
    pl.intermixed = True
    pl.add_argument("--preset", metavar="NAME", default=None, help=f"start from a shipped config ({', '.join(resources.presets())})")
    pl.add_argument("config", nargs="?", default=None, help="YAML config (as for train); optional with --preset")
    pl.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.micro_batch_size=8")
    pl.add_argument("--for", dest="for_command", default="train", choices=["train", "sft", "reward", "kto"],
                    help="the command the config is for (default train: DPO)")  # fmt: skip
    pl.add_argument("--num-processes", type=int, default=1, metavar="N",
                    help="processes (GPUs) of the run; the strategy table is per process at N (default 1: at 8)")  # fmt: skip
    pl.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="plan for this device (default: CUDA if there is one, else CPU)")  # fmt: skip
    pl.add_argument("--json", action="store_true", help="print the plans as JSON")
    pl.set_defaults(func=cmd_plan)

    it = sub.add_parser("iterate", help="iterative DPO: rounds of sampling the policy, judging, pairs and DPO from the "
                        "previous round (iterate.* keys)")  # fmt: skip
    it.intermixed = True
    it.add_argument("--preset", metavar="NAME", default=None, help="start from a shipped config (iterate-reviews, iterate-tiny)")
    it.add_argument("config", nargs="?", default=None, help="YAML config with an iterate: section; optional with --preset")
    it.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. iterate.rounds=2 iterate.reference=original")
    it.add_argument("--doc", metavar="FILE.md", default=None, help="also write the report (OUT/iterate.md) to this file")
    it.set_defaults(func=cmd_iterate)

    bp = sub.add_parser("bon", help="best-of-N baseline: sample N, keep the reward's best, judge it, KL bound")
    bon.add_bon_arguments(bp)
    bp.set_defaults(func=bon.bon_command)
    cp = sub.add_parser("compare", help="RLHF vs DPO: reward model, DPO betas, Preferred-FT, PPO, RLOO, Best-of-N; "
                        "gold reward vs KL frontier (docs/rlhf-vs-dpo.md)")
    compare.add_compare_arguments(cp)
    cp.set_defaults(func=compare.compare_command)
    pp = sub.add_parser("pairs", help="sample responses, label them with a judge, write preference pairs")
    pairs.add_pairs_arguments(pp)
    pp.set_defaults(func=pairs.pairs_command)
    lp = sub.add_parser("label", help="a local web page on which people label response pairs (or thumbs up/down)")
    label.add_label_arguments(lp)
    lp.set_defaults(func=cmd_label)
    sp = sub.add_parser("sample", help="sample responses per prompt and write a candidates file for people to label")
    sample.add_sample_arguments(sp)
    sp.set_defaults(func=sample.sample_command)
    ap = sub.add_parser("agreement", help="agreement of labellers (raw, Cohen, Fleiss), judges vs people, position "
                        "bias; --merge writes the labels as pairs (or KTO rows)")  # fmt: skip
    agreement.add_agreement_arguments(ap)
    ap.set_defaults(func=agreement.agreement_command)
    dp = sub.add_parser("demo", help="LoRA DPO of SmolLM2 towards positive movie reviews, with a before/after report")
    demo.add_demo_arguments(dp)
    dp.add_argument("--preset", metavar="NAME", default=None, help="a shipped LoRA config instead of --config: demo, lora")
    dp.set_defaults(func=cmd_demo)


class _Parser(argparse.ArgumentParser):
    """argparse, plus a "did you mean train.lr" hint when a refused option is a TRL argument name, and
    with `intermixed` set, options anywhere among the positionals (plain argparse takes no positional
    after an option that follows the first one: `CONFIG --num-processes 2 key=value` would fail)."""

    intermixed = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if not self.intermixed:
            return super().parse_known_args(args, namespace)
        self.intermixed = False  # parse_known_intermixed_args calls parse_known_args itself (Python < 3.13)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self.intermixed = True

    def error(self, message: str) -> NoReturn:
        if "unrecognized arguments" in message:
            hints = [f"{a.split('=', 1)[0]}{trl_hint(a)}" for a in message.split(":", 1)[1].split() if trl_hint(a)]
            if hints:
                message += "; " + "; ".join(hints)
        super().error(message)


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """(argv without `--debug`, whether it was there): --debug is accepted anywhere, also after the subcommand."""
    return [a for a in argv if a != "--debug"], "--debug" in argv


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the command line's own process: only then may it re-run itself (dpokit.launch)
    given = list(sys.argv[1:] if argv is None else argv)
    argv, debug = _pop_debug(given)
    debug = debug or os.environ.get("DPOKIT_DEBUG") == "1"
    args = build_parser().parse_args(argv)
    args.argv = given  # as given: `--num-processes N` re-runs the command with these (dpokit.launch)
    args.own_process = own_process
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = int(func(args) or 0)
        launch.record_outcome(code)  # a launched run's main worker: the supervising process exits with it
        return code
    except DpokitError as exc:
        if debug:
            raise
        code = exc.exit_code if isinstance(exc, WriteError) else 2
        launch.record_outcome(code, str(exc))
        if not isinstance(exc, WriteError) or launch.is_main_process():  # every process has the same WriteError
            print(f"error: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        launch.record_outcome(130)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
