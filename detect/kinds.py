"""The detector kinds raywatch trains, registers and serves: one name each, in one place."""

from __future__ import annotations

# The order is the order in which `raywatch up` trains and `raywatch models` lists them.
DETECTOR_KINDS: tuple[str, ...] = ("autoencoder", "lstm", "ensemble")
