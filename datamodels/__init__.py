"""datamodels: estimate per-example linear datamodels from many models trained on random
subsets, find brittle predictions and label-flip attacks, and verify them by retraining.

Python entry points (each stage a plain function; the CLI is a thin shell around them)::

    from datamodels import load_config, collect, RunStore
    cfg = load_config("pipelines/digits.yaml", ["collect.models=64"])
    collect(cfg, "runs/digits")
    RunStore.open("runs/digits").status()
"""

from datamodels.config import RunConfig, load_config
from datamodels.errors import ConfigError, DataError, DatamodelsError, StoreError

__all__ = ["RunConfig", "load_config", "collect", "RunStore", "load_dataset", "train_model",
           "ConfigError", "DataError", "DatamodelsError", "StoreError"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package stays cheap and Ray-free
    if name == "collect":
        from datamodels.collect import collect
        return collect
    if name == "RunStore":
        from datamodels.store import RunStore
        return RunStore
    if name == "load_dataset":
        from datamodels.data import load_dataset
        return load_dataset
    if name == "train_model":
        from datamodels.train import train_model
        return train_model
    raise AttributeError(name)
