"""`TokenMergeConfig`: how many tokens each block merges (ToMe), a setting a model records
(`ModelRecord.token_merge`); `token_merge` applies it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..errors import ConfigError
from ..knobs import knob
from ..validate import field_types, flag, integer, one_of

MERGE_SCHEDULES = ("constant", "decreasing")


@dataclass
class TokenMergeConfig:
    """How many tokens each block merges away.

    `r`: tokens merged per block (0 turns merging off). `schedule`: "constant" merges `r` in every
    block; "decreasing" merges `2r` in the first block, then linearly fewer, 0 in the last (ToMe's
    schedule with inflection -1; about the same total as "constant"), see `merge_schedule`.
    `protect_cls`: keep the prefix tokens (class, distillation, registers) out of matching; a model
    that has any needs it, since its head reads them at fixed positions. `proportional_attention`:
    add `log(size)` to the attention logits of merged tokens.
    """

    r: int = knob(0, "Token merging (ToMe): tokens merged per block, at most half a block's tokens (0: off).")
    schedule: str = knob("constant", "Token merging schedule: constant (r in every block) or decreasing "
                                     "(2r in the first block down to 0 in the last).")
    protect_cls: bool = knob(True, "Keep the class, distillation and register tokens out of token merging.")
    proportional_attention: bool = knob(True, "Weigh each merged token's attention by the tokens it stands for.")

    def __post_init__(self) -> None:
        integer("token merge r", self.r, 0, note="tokens merged per block; 0 turns merging off")
        one_of("token merge schedule", self.schedule, MERGE_SCHEDULES)
        flag("protect_cls", self.protect_cls)
        flag("proportional_attention", self.proportional_attention)

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TokenMergeConfig":
        if not isinstance(values, Mapping):
            raise ConfigError(f"token merge setting must be a table of r, schedule, protect_cls and "
                              f"proportional_attention, got {values!r}")
        try:
            return cls(**field_types(cls, values))
        except ConfigError as e:
            raise ConfigError(f"token merge setting: {e}") from None
