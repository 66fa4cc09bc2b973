
import pytest
import torch
from hydra import compose, initialize_config_dir

from moepipe.config import compose_config, conf_dir, register_configs

CONF_DIR = conf_dir()
register_configs()


def compose_cfg(overrides=(), validated=True, single_process=True):
    """Compose conf/ with overrides as the CLI would; validated -> typed MoepipeConfig.

    The default experiment is a 4-process pp2 x ep2 job; tests run one process unless they
    ask for a layout (single_process=False keeps conf/config.yaml's own default)."""
    overrides = list(overrides)
    if single_process and not any(o.startswith("parallel") for o in overrides):
        overrides = ["parallel=single"] + overrides
    if validated:
        return compose_config(overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on 2 intra-op threads crawl when another process holds a core: use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

