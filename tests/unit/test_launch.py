"""`--num-processes N`: the training commands re-run themselves under `accelerate launch` (dpokit.launch),
with the shipped Accelerate configs (dpokit/assets/accelerate/*.yaml)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dpokit import launch, resources
from dpokit.cli import main
from dpokit.dist import deepspeed_run_settings
from dpokit.errors import ConfigError, DpokitError
from tests.conftest import ASSETS

SHIPPED = ["ddp", "fsdp", "zero2", "zero3"]
DISTRIBUTED_TYPE = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
# pytest-timeout is not a dependency: the mark only where the plugin is there to read it


class _Execd(Exception):
    """Raised by the fake launcher: the command the process would have run, and its environment."""

    def __init__(self, path: str, argv: list[str], env: dict[str, str]):
        super().__init__(path)
        self.path, self.argv, self.env = path, argv, env


def _fake_supervise(argv: list[str], env: dict[str, str]) -> int:
    raise _Execd(argv[0], list(argv), dict(env))


@pytest.fixture
def no_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real launcher, and this process counts as the user's (not a launched worker)."""
    monkeypatch.setattr(launch, "_supervise", _fake_supervise)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# --- argv rewriting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--preset", "tiny", "--num-processes", "2", "--accelerate-config", "fsdp", "train.lr=1e-5", "my.yaml"],
        ["train", "--num-processes=2", "--preset", "tiny", "--accelerate-config=fsdp", "train.lr=1e-5", "my.yaml"],
        ["train", "--preset", "tiny", "--num", "2", "--acc=fsdp", "train.lr=1e-5", "my.yaml"],  # argparse abbreviations
    ],
)
def test_launch_flags_are_stripped_and_the_rest_kept_in_order(argv: list[str]) -> None:
    assert launch.strip_launch_flags(argv) == ["train", "--preset", "tiny", "train.lr=1e-5", "my.yaml"]


def test_nothing_after_a_double_dash_is_stripped() -> None:
    argv = ["train", "--num-processes", "2", "--", "--num-processes=3"]
    assert launch.strip_launch_flags(argv) == ["train", "--", "--num-processes=3"]


def test_relaunch_argv_is_accelerate_launch_of_dpokit_with_the_shipped_config() -> None:
    argv = ["--debug", "sft", "--preset", "sft-tiny", "--accelerate-config", "zero3", "--num-processes=4", "train.max_steps=3"]
    cmd = launch.relaunch_argv(argv, 4, "zero3", 29123)
    config = ASSETS / "accelerate" / "zero3.yaml"
    assert cmd == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "4",
        "--main_process_port", "29123", "-m", "dpokit", "--debug", "sft", "--preset", "sft-tiny", "train.max_steps=3",
    ]  # fmt: skip
    assert Path(cmd[4]).is_file()


def test_accelerate_config_by_path(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n", encoding="utf-8")
    assert launch.relaunch_argv(["train"], 2, str(own), 1)[4] == str(own.resolve())
    assert resources.accelerate_config_path("fsdp").samefile(ASSETS / "accelerate" / "fsdp.yaml")


@pytest.mark.parametrize("name", ["fdsp", "../presets/tiny", "no/such/file.yaml", ""])
def test_unknown_accelerate_config_lists_the_shipped_names(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        launch.relaunch_argv(["train"], 2, name, 1)
    assert "ddp, fsdp, zero2, zero3" in str(err.value)


def test_free_port_is_a_port() -> None:
    assert 0 < launch.free_port() < 65536


# --- when to relaunch -----------------------------------------------------------------------------


def test_more_than_one_process_runs_accelerate_launch(no_exec: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(_Execd) as ran:
        launch.maybe_relaunch("train", ["train", "--preset", "tiny", "--num-processes", "2"], 2, "ddp")
    assert ran.value.path == sys.executable
    assert ran.value.argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert ran.value.argv[ran.value.argv.index("-m", 3) :] == ["-m", "dpokit", "train", "--preset", "tiny"]
    out = capsys.readouterr().out
    assert "launching 2 processes" in out and "accelerate.commands.launch" in out
    assert ran.value.env[launch.LAUNCH_FLAGS_ENV] == "--num-processes 2"  # ddp, the default: not repeated


def test_the_workers_know_their_launch_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(launch.LAUNCH_FLAGS_ENV, raising=False)
    assert launch.launch_flags() == []
    monkeypatch.setenv(launch.LAUNCH_FLAGS_ENV, "--num-processes 2 --accelerate-config '/my dir/fsdp.yaml'")
    assert launch.launch_flags() == ["--num-processes", "2", "--accelerate-config", "/my dir/fsdp.yaml"]
    for rank, main_process in (("", True), ("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert launch.is_main_process() is main_process
    monkeypatch.delenv("RANK")
    assert launch.is_main_process()


def test_a_launched_worker_does_not_relaunch(no_exec: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.maybe_relaunch("train", ["train", "--num-processes", "2"], 2, "fsdp") is None


def test_one_process_runs_here_whatever_the_config(no_exec: None) -> None:
    assert launch.maybe_relaunch("train", ["train", "--accelerate-config", "zero3"], 1, "zero3") is None
    assert launch.maybe_relaunch("rl", ["rl"], 1, "ddp") is None


@pytest.mark.parametrize("n", [0, -2])
def test_fewer_than_one_process_is_refused(no_exec: None, n: int) -> None:
    with pytest.raises(ConfigError, match="--num-processes must be >= 1"):
        launch.maybe_relaunch("train", ["train"], n, "ddp")


def test_rl_refuses_several_processes(no_exec: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DpokitError, match="dpokit rl runs in one process") as err:
        launch.maybe_relaunch("rl", ["rl", "--num-processes", "2"], 2, "ddp")
    assert "DPO, SFT, reward models and KTO" in str(err.value)
    monkeypatch.setenv("WORLD_SIZE", "2")  # also as a launched worker
    with pytest.raises(DpokitError, match="dpokit rl runs in one process"):
        launch.maybe_relaunch("rl", ["rl"], 2, "ddp")


# --- through the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "sft", "reward"])
def test_cli_relaunches_its_own_arguments_without_the_launch_flags(no_exec: None, command: str) -> None:
    argv = ["--debug", command, "--preset", "tiny", "--num-processes=2", "--accelerate-config", "fsdp", "train.lr=1e-5"]
    with pytest.raises(_Execd) as ran:
        main(argv)
    cmd = ran.value.argv
    assert cmd[cmd.index("--config_file") + 1] == str(ASSETS / "accelerate" / "fsdp.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("-m", 3) :] == ["-m", "dpokit", "--debug", command, "--preset", "tiny", "train.lr=1e-5"]


def test_cli_takes_the_launch_flags_between_config_and_overrides(no_exec: None) -> None:
    """`dpokit train my.yaml --num-processes 2 train.lr=1e-5`: plain argparse takes no positional
    after such an option; the training commands parse intermixed."""
    config = str(resources.preset_path("tiny"))
    with pytest.raises(_Execd) as ran:
        main(["train", config, "--num-processes", "2", "train.lr=1e-5", "--accelerate-config=zero2", "train.max_steps=3"])
    cmd = ran.value.argv
    assert cmd[cmd.index("--config_file") + 1] == str(ASSETS / "accelerate" / "zero2.yaml")
    assert cmd[cmd.index("-m", 3) :] == ["-m", "dpokit", "train", config, "train.lr=1e-5", "train.max_steps=3"]


def test_cli_reports_a_config_error_once_before_launching(no_exec: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "tiny", "--num-processes", "2", "train.lr=-1"]) == 2  # no exec
    assert "train.lr" in capsys.readouterr().err
    assert main(["train", "--num-processes", "2"]) == 2
    assert "needs a config" in capsys.readouterr().err


def test_cli_worker_closing_lines_come_from_rank_0_with_the_launch_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """After SIGTERM every worker returns; rank 0 alone says how to continue, with the same processes."""
    from dpokit.training import loop

    stopped = SimpleNamespace(already_complete=False, stopped_by=15, steps=7, checkpoint="ck", output_dir="out")
    monkeypatch.setattr(loop, "train", lambda cfg, objective=None: stopped)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(launch.LAUNCH_FLAGS_ENV, "--num-processes 2 --accelerate-config fsdp")
    again = "to continue: dpokit train --num-processes 2 --accelerate-config fsdp --preset tiny train.lr=0.0001 train.resume=auto"
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--preset", "tiny", "train.lr=0.0001"]) == 128 + 15
        assert (again in capsys.readouterr().err) is says


def test_cli_rl_refuses_several_processes(no_exec: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rl", "--preset", "rl-tiny", "--num-processes", "2"]) == 2
    assert "dpokit rl runs in one process" in capsys.readouterr().err


def test_cli_unknown_accelerate_config_is_a_one_line_error(no_exec: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "tiny", "--num-processes", "2", "--accelerate-config", "zero4"]) == 2
    err = capsys.readouterr().err
    assert "zero4" in err and "ddp, fsdp, zero2, zero3" in err


# --- the shipped Accelerate configs ----------------------------------------------------------------


def test_the_shipped_accelerate_configs() -> None:
    assert resources.accelerate_configs() == SHIPPED == sorted(p.stem for p in (ASSETS / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_accelerate_config_loads_through_accelerate(name: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = resources.accelerate_config_path(name)
    cfg = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads; unknown keys fail
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == DISTRIBUTED_TYPE[name]
    assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank) == (2, 1, 0)
    assert cfg.mixed_precision == "no" and cfg.use_cpu is False  # dpokit sets both (train.mixed_precision; CPU groups)
    assert (cfg.rdzv_backend, cfg.same_network, cfg.main_training_function) == ("static", True, "main")
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if name.startswith("zero"):
        ds = cfg.deepspeed_config
        # dpokit loads the whole model on each process; the engine partitions it (dist.Dist.loading)
        assert ds["zero_stage"] == int(name[-1]) and ds["zero3_init_flag"] is False
        assert "gradient_clipping" not in ds and "gradient_accumulation_steps" not in ds  # dpokit fills them


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_configs_build_a_deepspeed_plugin(name: str) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (optional: make deepspeed)")
    from accelerate.utils import DeepSpeedPlugin

    ds = yaml.safe_load(resources.accelerate_config_path(name).read_text(encoding="utf-8"))["deepspeed_config"]
    keys = ("zero_stage", "offload_optimizer_device", "offload_param_device", "zero3_init_flag", "zero3_save_16bit_model")
    plugin = DeepSpeedPlugin(**{k: ds[k] for k in keys if k in ds})
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == int(name[-1])
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (name == "zero3")
    assert plugin.zero3_init_flag is False
    # checked against the run's settings: what dpokit fills in before Accelerate builds the engine
    filled = deepspeed_run_settings(plugin.deepspeed_config, 4, 2, 1.0, world=2)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (4, 2)
    assert (filled["train_batch_size"], filled["gradient_clipping"]) == (16, 1.0)
    assert filled["zero_optimization"] == plugin.deepspeed_config["zero_optimization"]


def test_deepspeed_run_settings_fill_auto_and_refuse_a_conflict() -> None:
    """DeepSpeed's engine accumulates and clips itself, so its numbers must be dpokit's (no DeepSpeed needed)."""
    filled = deepspeed_run_settings({"gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}, 2, 8, 0.0, 4)
    assert filled == {"gradient_accumulation_steps": 8, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": 2,
                      "train_batch_size": 64, "gradient_clipping": 0.0}  # fmt: skip
    assert deepspeed_run_settings({"gradient_clipping": 1}, 2, 8, 1.0, 1)["gradient_clipping"] == 1.0  # equal: fine
    with pytest.raises(DpokitError, match=r"gradient_accumulation_steps=4.*train.grad_accum_steps = 8.*auto"):
        deepspeed_run_settings({"gradient_accumulation_steps": 4}, 2, 8, 1.0, 1)
    with pytest.raises(DpokitError, match=r"train_micro_batch_size_per_gpu=16.*train.micro_batch_size = 2"):
        deepspeed_run_settings({"train_micro_batch_size_per_gpu": 16}, 2, 8, 1.0, 1)


_WORKER = """
import sys
from dpokit import launch
launch.record_outcome(int(sys.argv[1]), "could not write the checkpoint of step 16: No space left on device")
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize(("recorded", "launcher", "status"), [(74, 1, 74), (143, 1, 143), (0, 0, 0), (0, 1, 1)])
def test_the_supervisor_exits_with_the_main_workers_status(monkeypatch: pytest.MonkeyPatch, recorded: int,
                                                           launcher: int, status: int,
                                                           capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The launcher reports any failure as 1; dpokit exits with what its main worker recorded (74: a
    failed write, 128+N: signal N) and repeats its error line last. A main worker that finished while
    another failed does not hide the failure."""
    monkeypatch.setenv("RANK", "0")
    code = launch._supervise([sys.executable, "-c", _WORKER, str(recorded), str(launcher)], dict(os.environ))
    assert code == status
    err = capfd.readouterr().err
    assert ("error: could not write the checkpoint" in err) == (launcher != 0 and recorded != 0)
