"""Checks and path resolution done in the driver before any actor starts, so a bad
config fails in seconds with the field's name, not minutes later inside a worker."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import Config, ConfigError
from common.prompts import load_prompts, resolve_prompt_path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _prompt_path(path: str) -> Path:
    """Relative prompt paths: the working directory, then $FLOWGRPO_DATASETS, then the
    repository (where the shipped deploy/prompts live)."""
    try:
        return resolve_prompt_path(path).resolve()
    except FileNotFoundError:
        if not Path(path).is_absolute() and (REPO_ROOT / path).is_file():
            return REPO_ROOT / path
        raise


def prepare(config: Config) -> Config:
    """Resolve local paths to absolute ones (actors may run elsewhere), build the tiny
    model when `model.tiny_preset` asks for one that is not there yet, and check the
    prompt files (scorer names were checked when the config was loaded)."""
    from common.models import is_hub_id, make_tiny_model, tiny_model_is_current  # heavy imports here: `flowgrpo --help` stays fast

    model = config.model
    path = Path(model.path).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path / "model_index.json").is_file():
        path = REPO_ROOT / path  # a model shipped in the repository (common/toy_model)
    if model.tiny_preset is not None:
        if not tiny_model_is_current(path, model.tiny_preset):
            print(f"flowgrpo: building the tiny '{model.tiny_preset}' model in {path}")
            make_tiny_model(path, model.tiny_preset, seed=0)
        model = dataclasses.replace(model, path=str(path.resolve()))
    elif path.exists():
        if not (path / "model_index.json").is_file():
            raise ConfigError(f"model.path: {path} has no model_index.json; it is not a diffusers pipeline directory")
        model = dataclasses.replace(model, path=str(path.resolve()))
    elif not is_hub_id(model.path):
        raise ConfigError(f"model.path: {path} does not exist and is not a hub id (org/name); build the tiny "
                          "model there with `flowgrpo make-tiny-model DIR` or set model.tiny_preset")

    prompts = config.prompts
    try:
        train = _prompt_path(prompts.train)
        load_prompts(train, prompts.format)
        evaluation = _prompt_path(prompts.eval) if prompts.eval else None
        if evaluation:
            load_prompts(evaluation, prompts.format)
    except FileNotFoundError as err:
        raise ConfigError(f"prompts: {err}") from None
    prompts = dataclasses.replace(prompts, train=str(train), eval=str(evaluation) if evaluation else None)
    return dataclasses.replace(config, model=model, prompts=prompts)
