"""Every option of every config group composes and validates; each class of bad value gets
one clear line naming the field and the fix."""
import os
import subprocess
import sys

import pytest

from moepipe.config import ConfigError, MoepipeConfig, moe_layer_ids

from conftest import CONF_DIR, compose_cfg

GROUPS = ["model", "moe", "parallel", "schedule", "placer", "topology", "data", "optim", "logger", "experiment"]


def options(group):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def test_default_composes():
    cfg = compose_cfg(single_process=False)
    assert isinstance(cfg, MoepipeConfig)
    assert cfg.model.name == "tiny" and cfg.data.name == "stdlib_bytes" and cfg.logger.name == "none"
    # the default experiment: pp=2 x ep=2 on 4 processes with 1F1B
    assert (cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.dp, cfg.schedule.name) == (2, 2, 1, "1f1b")


def test_fixed_interface_keys_override():
    cfg = compose_cfg([
        "train.steps=7", "train.seed=3", "train.log_every=2", "train.eval_every=5", "model=tiny",
        "moe.num_experts=4", "moe.top_k=1", "moe.capacity_factor=1.5", "parallel.pp=1", "parallel.ep=1",
        "parallel.dp=1", "schedule.name=gpipe", "schedule.microbatches=2", "schedule.virtual_stages=1",
        "placer.name=eplb", "placer.interval=5", "topology=local_cpu", "logger=wandb",
        "logger.wandb.mode=disabled", "data=stdlib_bytes",
    ])
    assert (cfg.train.steps, cfg.train.seed, cfg.moe.num_experts, cfg.moe.top_k) == (7, 3, 4, 1)
    assert cfg.schedule.name == "gpipe" and cfg.placer.interval == 5 and cfg.logger.wandb.mode == "disabled"


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    opts = options(group)
    assert opts, f"conf/{group} is empty"
    for opt in opts:
        overrides = [f"{group}={opt}"]
        if group == "data" and opt == "memmap":
            overrides.append("data.path=/tmp/x.bin")  # validation needs a path; loading is not tried here
        if group == "parallel" or group == "schedule":
            overrides.append("model.n_layers=8")
        if group == "schedule" or opt.startswith("pp"):
            overrides += ["parallel.pp=2", "schedule.microbatches=4"]
        if group == "moe" and opt == "fairscale":
            overrides.append("moe.top_k=2")
        cfg = compose_cfg(overrides)
        assert cfg is not None


def test_model_sizes_are_distinct_and_moe_layers_follow_every():
    tiny, mix = compose_cfg(["model=tiny"]), compose_cfg(["model=mixtral_8x7b", "train.seq_len=128"])
    assert mix.model.d_model == 4096 and mix.moe.expert_hidden == 14336 and mix.model.n_kv_heads == 8
    assert moe_layer_ids(tiny.model, tiny.moe) == [0, 1, 2, 3]
    every2 = compose_cfg(["moe.every=2"])
    assert moe_layer_ids(every2.model, every2.moe) == [1, 3]
    first = compose_cfg(["moe.first_dense=1", "moe.every=1"])
    assert moe_layer_ids(first.model, first.moe) == [1, 2, 3]
    assert moe_layer_ids(tiny.model, compose_cfg(["moe=dense"]).moe) == []


BAD = [
    (["moe.top_k=9", "moe.num_experts=8"], "moe.top_k=9 > moe.num_experts=8"),
    (["moe.top_k=0"], "moe.top_k=0"),
    (["schedule.name=pipedream"], "schedule.name='pipedream' is not known"),
    (["placer.name=magic"], "placer.name='magic' is not known"),
    (["parallel.pp=8", "schedule.microbatches=8"], "parallel.pp*schedule.virtual_stages=8 > model.n_layers=4"),
    (["parallel.pp=2", "schedule.microbatches=1"], "schedule.microbatches=1 < parallel.pp=2"),
    (["schedule.virtual_stages=2"], "schedule.virtual_stages=2 needs a multi-stage schedule"),
    (["model.d_model=130"], "model.d_model=130 is not divisible by model.n_heads=4"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
    (["train.batch_size=10"], "train.batch_size=10 is not divisible"),
    (["train.seq_len=4096"], "train.seq_len=4096 > model.max_seq_len"),
    (["optim.lr=-1"], "optim.lr=-1"),
    (["moe.capacity_factor=inf"], "moe.capacity_factor=inf must be finite"),
    (["moe.backend=fairscale", "moe.top_k=1"], "moe.backend=fairscale supports only top-2"),
    (["moe=fairscale", "moe.capacity_factor=0"], "fairscale's Top2Gate always caps at 2T/E"),
    (["moe=fairscale", "parallel=pp2_ep2"], "parallel.ep=2 is not supported by moe.backend=fairscale"),
    (["parallel.ep=2", "train.batch_size=12", "schedule.microbatches=4"], "parallel.ep*parallel.dp*schedule.microbatches=8"),
    (["moe.every=9"], "leaves no MoE block"),
    (["data=memmap"], "data.path"),
    (["logger.wandb.mode=sometimes"], "logger.wandb.mode='sometimes' is not known"),
    (["parallel.ep=16"], "parallel.ep=16 > moe.num_experts=8"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 must be in (0, 1)"),
    (["parallel=pp2", "schedule=dualpipev", "schedule.microbatches=2", "train.batch_size=16"], "dualpipev needs schedule.microbatches >= 2*parallel.pp"),
    (["parallel=pp2", "schedule=zbv", "schedule.virtual_stages=1"], "runs exactly 2 stages per rank"),
    (["parallel=pp2", "schedule=interleaved_1f1b", "schedule.microbatches=5", "train.batch_size=10"], "does not split into rounds"),
    (["parallel.backend=nccl", "train.device=cpu"], "parallel.backend=nccl needs GPUs"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_values_get_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_cfg(overrides)
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text and ":" in text  # one line: problem, then the fix after a colon


def test_type_errors_are_caught_at_compose_time():
    with pytest.raises(Exception, match="train.steps"):
        compose_cfg(["train.steps=many"])


def test_cli_rejects_bad_value_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moepipe.train", "moe.top_k=9", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "moe.top_k=9 > moe.num_experts=8: set moe.top_k <= moe.num_experts" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and launcher.tasks_per_node == launcher.gpus_per_node
