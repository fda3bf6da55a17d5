"""Command line: `dpokit train | evaluate | config | pairs | demo`.

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

from dpokit.config import Config
from dpokit.errors import ConfigError, DpokitError


def _load_config(path: str | None, overrides: list[str]) -> Config:
    cfg = Config.from_yaml(path) if path else Config()
    return cfg.override(overrides) if overrides else cfg


def _validated(cfg: Config, path: str | None, overrides: list[str]) -> Config:
    """Config.validate(), with the message saying where the values came from (validate only knows keys)."""
    try:
        return cfg.validate()
    except ConfigError as exc:
        sources = [path] if path else []
        sources += ["command-line overrides"] if overrides else []
        raise ConfigError(f"{' + '.join(sources) or 'built-in defaults'}: {exc}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from dpokit.train.loop import train

    cfg = _validated(_load_config(args.config, args.overrides), args.config, args.overrides)
    result = train(cfg)
    if result.stopped_by:  # SIGINT/SIGTERM: a checkpoint was written; say how to go on
        again = [o for o in args.overrides if not o.startswith("train.resume=")] + ["train.resume=auto"]
        command = shlex.join(["dpokit", "train", args.config, *again])
        print(f"stopped at step {result.steps} (checkpoint {result.checkpoint}); to continue: {command}", file=sys.stderr)
        return 128 + result.stopped_by  # the shell's code for death by that signal: the run is not finished
    print(f"done: {result.steps} steps; outputs in {result.output_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
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


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config, args.overrides)
    print("# dpokit config: every key with its default (or the given file's value) and meaning.")
    print("# Use as `dpokit train THIS.yaml`; override any key with section.key=value.\n")
    print(cfg.to_yaml(commented=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpokit", description="Direct Preference Optimization for causal LMs.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model with DPO from a YAML config")
    t.add_argument("config", help="YAML config (see `dpokit config`)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="DPO loss and reward metrics of a model over a preference file")
    e.add_argument("--model", required=True, help="trained model: HF folder, LoRA adapter folder, .gguf or alias")
    e.add_argument("--ref", default=None, help="reference model (default: the adapter's base for adapter folders)")
    e.add_argument("--data", required=True, nargs="+", help="preference file(s)")
    e.add_argument("--beta", type=float, default=None, help="loss.beta (default 0.1)")
    e.add_argument("--loss", default=None, help="loss.type (default sigmoid)")
    e.add_argument("--batch-size", type=int, default=None, help="pairs per forward pass")
    e.add_argument("--config", default=None, help="YAML config for data/loss settings")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--skipped", default=None, metavar="FILE",
                   help="with data.on_bad_row=skip: write the skipped rows here (JSON Lines)")  # fmt: skip
    e.add_argument("overrides", nargs="*", help="section.key=value overrides")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("config", help="print the full config as commented YAML")
    c.add_argument("config", nargs="?", default=None, help="a YAML to resolve (default: built-in defaults)")
    c.add_argument("overrides", nargs="*", help="section.key=value overrides")
    c.set_defaults(func=cmd_config)

    _add_optional_commands(sub)
    return p


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Commands whose modules bring their own arguments (imported here, not at the top of this file)."""
    from dpokit.apps import demo, pairs

    pp = sub.add_parser("pairs", help="sample responses, label them with a judge, write preference pairs")
    pairs.add_pairs_arguments(pp)
    pp.set_defaults(func=pairs.pairs_command)
    dp = sub.add_parser("demo", help="LoRA DPO of SmolLM2 towards positive movie reviews, with a before/after report")
    demo.add_demo_arguments(dp)
    dp.set_defaults(func=demo.demo_command)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DPOKIT_DEBUG") == "1"
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except DpokitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
