"""The shipped model and its card agree (benchmarks/ship_model.py wrote both; nothing is trained here)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from alignkit.train.checkpoint import load_checkpoint

MODELS = Path(__file__).resolve().parents[1] / "src" / "alignkit" / "methods" / "models"
CARDS = sorted(MODELS.glob("*.card.json"))


def test_there_is_a_shipped_model() -> None:
    assert (MODELS / "voxelmorph_oasis3d.card.json") in CARDS


@pytest.mark.parametrize("card_path", CARDS, ids=lambda p: p.name.removesuffix(".card.json"))
def test_card_matches_its_model(card_path: Path) -> None:
    card = json.loads(card_path.read_text())
    name = card_path.name.removesuffix(".card.json")
    model = MODELS / f"{name}.pt"
    recipe = MODELS / f"{name}.recipe.json"
    assert card["name"] == name
    assert model.is_file() and recipe.is_file()
    assert card["recipe"].endswith(recipe.name)

    data = model.read_bytes()
    assert card["file_bytes"] == len(data) <= 2 * 1024 * 1024
    assert card["file_sha256"] == hashlib.sha256(data).hexdigest()

    state = load_checkpoint(model)
    assert set(state) == {"format", "version", "method", "networks", "model"}
    assert state["method"]["name"] == card["method"] == json.loads(recipe.read_text())["method"]
    config = state["method"]["config"]
    assert config["ndim"] == card["dimensions"]
    if "input_size" in card:  # fully convolutional models run at any size and record none
        assert list(config["size"]) == list(card["input_size"])
    # a method without a pre-alignment (avsm learns its own affine) records none: the key is absent
    assert config.get("prealign") == card.get("prealignment")
    floating = [t for t in state["model"].values() if t.is_floating_point()]
    # float16 weights, unless the card says the export kept float32 (a model whose float16 copy failed
    # the ship script's check against the trained one: stereo_net_synthetic2d)
    dtype = getattr(torch, card.get("export", {}).get("dtype", "float16"))
    assert dtype in (torch.float16, torch.float32)
    assert floating and all(t.dtype == dtype for t in floating)
    from alignkit.methods import load_model

    # trainable parameters (buffers such as batch-norm statistics are not counted)
    assert sum(p.numel() for p in load_model(model).parameters()) == card["parameters"]
    # every card says what the model learnt from, under which licence, and how to make it again
    assert card["training_data"] and card["weights_licence"] and card["command"] and card["commit"]

    # the card's scores are on subjects the recipe neither trained nor validated on
    data_card = card["training_data"]
    if not (isinstance(data_card, dict) and "held_out_subjects" in data_card):
        return  # held-out data named in other terms (scenes, pairs): the card's own record
    assert data_card["held_out_subjects"]
    assert not set(data_card["held_out_subjects"]) & set(
        data_card["training_subjects"] + data_card["validation_subjects"]
    )
    for pair in card["held_out"]["pairs"]:
        assert {pair["fixed"], pair["moving"]} <= set(data_card["held_out_subjects"])
