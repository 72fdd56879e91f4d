"""Import timm without letting it import wandb.

`timm.utils.summary` imports wandb whenever it is installed: seconds of start-up, a folder in /tmp
and global hooks on every command, though only a requested wandb project uses it (and
`train.metrics_log` imports it then). timm expects the ImportError and carries on without it.
"""

import sys

if "timm" not in sys.modules and "wandb" not in sys.modules:
    sys.modules["wandb"] = None  # a None entry makes `import wandb` raise ImportError
    try:
        import timm
        import timm.utils  # noqa: F401  (the module that imports wandb, should timm stop loading it)
    finally:
        if sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
