"""Model arguments a timm ViT is built from, checked before anything is built.

They come from users (`create_model(..., img_size=...)`, `--img-size`) and from artifacts'
`config.json`, which may have been edited: every key must be a `VisionTransformer` argument,
every value of the right type and within a range that a real model can have. The ranges are wide
(ViT-22B fits) and only stop values that would allocate absurd amounts of memory or break timm.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..validate import flag, in_range, integer

MAX_IMG_SIZE = 8192
MAX_EMBED_DIM = 16384
MAX_DEPTH = 256
MAX_CHANNELS = 64
MAX_CLASSES = 1_000_000
MAX_MLP_RATIO = 64.0
# Total parameters of a model to build: 2^32 (16 GiB in fp32) is far beyond any model vitcompact
# is for, and refuses a config that would have the process killed for memory instead.
MAX_PARAMS = 2**32

INTS = {"in_chans": (1, MAX_CHANNELS), "num_classes": (0, MAX_CLASSES), "embed_dim": (1, MAX_EMBED_DIM),
        "depth": (1, MAX_DEPTH), "num_heads": (1, MAX_EMBED_DIM), "reg_tokens": (0, 1024)}
SIZES = {"img_size": (1, MAX_IMG_SIZE), "patch_size": (1, MAX_IMG_SIZE)}  # an int or [height, width]
FRACTIONS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
             "drop_path_rate")
FLAGS = ("qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "class_token",
         "no_embed_class", "pre_norm", "final_norm", "pool_include_prefix", "dynamic_img_size",
         "dynamic_img_pad", "fix_init")
OPTIONAL_FLAGS = ("fc_norm",)
# Names timm resolves itself (e.g. act_layer="gelu"); anything else it refuses.
NAMES = ("global_pool", "pos_embed", "weight_init", "embed_norm_layer", "norm_layer", "act_layer",
         "attn_layer")
KNOWN = (*INTS, *SIZES, "mlp_ratio", "init_values", *FRACTIONS, *FLAGS, *OPTIONAL_FLAGS, *NAMES)


def _size(name: str, value: Any, low: int, high: int) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{name} must be an integer or [height, width], got {value!r}")
        return (integer(f"{name}[0]", value[0], low, high), integer(f"{name}[1]", value[1], low, high))
    side = integer(name, value, low, high)
    return side, side


def check_model_args(args: dict[str, Any], prefix: str = "model argument ") -> dict[str, Any]:
    """Refuse an unknown key, a value of the wrong type or out of range; names start with `prefix`.

    Also refuses what only shows as a mix of values: `num_heads` not dividing `embed_dim` and a
    patch larger than the image.
    """
    for key, value in args.items():
        name = f"{prefix}{key}"
        if key in INTS:
            integer(name, value, *INTS[key])
        elif key in SIZES:
            _size(name, value, *SIZES[key])
        elif key == "mlp_ratio":
            in_range(name, value, 0.0, MAX_MLP_RATIO, low_open=True)
        elif key == "init_values":
            if value is not None:
                in_range(name, value, 0.0, 1e6)
        elif key in FRACTIONS:
            in_range(name, value, 0.0, 1.0, high_open=True)
        elif key in FLAGS or (key in OPTIONAL_FLAGS and value is not None):
            flag(name, value)
        elif key in NAMES:
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a name (a string), got {value!r}")
        else:
            raise ConfigError(f"{name} is not an argument vitcompact builds a ViT with; known: "
                              f"{', '.join(KNOWN)}")
    if "embed_dim" in args and "num_heads" in args and args["embed_dim"] % args["num_heads"]:
        raise ConfigError(f"{prefix}num_heads ({args['num_heads']}) must divide {prefix}embed_dim "
                          f"({args['embed_dim']})")
    if "img_size" in args and "patch_size" in args:
        image, patch = _size("img_size", args["img_size"], *SIZES["img_size"]), \
            _size("patch_size", args["patch_size"], *SIZES["patch_size"])
        if patch[0] > image[0] or patch[1] > image[1]:
            raise ConfigError(f"{prefix}patch_size {args['patch_size']} is larger than "
                              f"{prefix}img_size {args['img_size']}")
    return args
