"""YAML presets shipped with minigpt (``minigpt train --preset NAME``)."""
