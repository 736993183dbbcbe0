"""Field access for a Hugging Face ``config.json``: every error names the file and the field."""

from __future__ import annotations

from typing import Any

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_TOKENS, check_max


class ConfigFields:
    """Field access that names the file and field in every error."""

    def __init__(self, data: dict[str, Any], path: str) -> None:
        self.data, self.path = data, path

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None = None, minimum: int = 1, maximum: int = MAX_TOKENS) -> int:
        """An integer field in [minimum, maximum]; every dimension and length of a config is
        far below MAX_TOKENS (2^40), and products of them are checked where they are made."""
        value = self.get(key, default)
        if value is None:
            raise ConfigError(f"{self.path}: missing field {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{self.path}: field {key!r} must be an integer >= {minimum}, "
                              f"got {value!r:.60}")
        check_max(f"{self.path}: field {key!r}", value, maximum, "no model needs that much")
        return value

    def model_type(self) -> str:
        mt = self.get("model_type", "")
        return mt if isinstance(mt, str) else ""
