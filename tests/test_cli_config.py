"""The CLI's flags and the configs agree: with no optional flag, each command runs its config's defaults, and every
option a config has is either a flag or set by the command itself."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest

from afprobe.cli import CONFIG_BUILDERS, build_parser

# The flags each command needs, and the config fields those flags give.
REQUIRED = {
    "gap": (["gap", "--out", "R"], {}),
    "doctor": (["doctor"], {}),
    "cache": (["cache", "--out", "S"], {"out": "S"}),
    "probe": (["probe", "--cache", "S", "--out", "P"], {"cache": "S", "out": "P"}),
    "steer": (["steer", "--directions", "P", "--out", "R"], {"directions": "P", "out": "R"}),
    "patch": (["patch", "--out", "R"], {"out": "R"}),
    "verdict": (["verdict", "R"], {"out": "R"}),
    "sae train": (
        ["sae", "train", "--cache", "S", "--layer", "3", "--out", "A"],
        {"caches": ("S",), "layer": 3, "out": "A"},
    ),
    "sae features": (
        ["sae", "features", "--sae", "A", "--cache", "S", "--layer", "3", "--out", "F"],
        {"sae": "A", "cache": "S", "layer": 3, "out": "F"},
    ),
    "organism train": (["organism", "train", "--kind", "token", "--out", "O"], {"kind": "token", "out": "O"}),
    "organism check": (["organism", "check"], {}),
}
# Config fields the command deliberately sets itself rather than through a flag of the same name.
NOT_FLAGS = {
    "gap": set(),
    "doctor": set(),
    "cache": set(),
    "probe": set(),
    "steer": set(),
    "patch": set(),
    "verdict": set(),
    "sae train": set(),
    "sae features": set(),
    # The organisms' training recipe is fixed (their ground truth rests on it): set in Python, not per run.
    "organism train": {
        "alpha",
        "device",
        "first_layer",
        "held_out_queries",
        "learning_rate",
        "margin",
        "rank",
        "refresh_every",
        "target_modules",
    },
    "organism check": set(),
}


def _config(command: str, argv: list[str]):
    return CONFIG_BUILDERS[command](build_parser().parse_args(argv))


@pytest.mark.parametrize("command", sorted(CONFIG_BUILDERS))
def test_flag_defaults_are_the_config_defaults(command):
    argv, given = REQUIRED[command]
    config = _config(command, argv)
    assert asdict(config) == asdict(type(config)(**given))


@pytest.mark.parametrize("command", sorted(CONFIG_BUILDERS))
def test_every_config_option_has_a_flag(command):
    argv, given = REQUIRED[command]
    args = build_parser().parse_args(argv)
    config = CONFIG_BUILDERS[command](args)
    spelled_otherwise = {"caches", "ablate", "components", "attribution"}  # --cache, --no-ablation, ...
    missing = {
        f.name for f in fields(config) if not hasattr(args, f.name) and f.name not in spelled_otherwise
    } - NOT_FLAGS[command]
    assert missing == set(), f"{command}: options without a flag: {sorted(missing)}"
