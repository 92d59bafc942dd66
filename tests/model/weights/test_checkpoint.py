"""Loading official SysCV/transfiner checkpoints, and our own checkpoint round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import DATA
from transfiner.cli.main import main
from transfiner.model.config import TransfinerConfig, preset, small_config
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.checkpoint import (
    build_model,
    convert_official_state_dict,
    load_checkpoint,
    official_to_ours,
    save_checkpoint,
)
from transfiner.model.weights.files import CheckpointError

KEYS = DATA / "official_keys"


def official_state_dict(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the official names and shapes (from the test data)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for line in (KEYS / f"{variant}.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape = line.split("\t")
        state[name] = torch.randn(tuple(int(s) for s in shape.split(",")), generator=g)
    return state


@pytest.fixture(scope="module")
def r50_official() -> dict[str, torch.Tensor]:
    return official_state_dict("R50-FPN")


@pytest.mark.parametrize("variant", ["R50-FPN", "R101-FPN", "R50-FPN-DCN", "R101-FPN-DCN"])
def test_official_checkpoint_loads_with_zero_missing_inference_keys(variant):
    official = official_state_dict(variant)
    model = MaskTransfiner(preset(variant))
    converted, report = convert_official_state_dict(official, model)
    assert report.ok, report.format()
    assert report.missing == [] and report.wrong_shape == [] and report.unexpected == []
    assert sorted(report.ignored) == sorted(
        k
        for k in official
        if any(p in k for p in ("mask_head.deconv_bo.", "mask_head.predictor_bo.", "mask_head.predictor_semantic_s."))
    )
    assert len(report.ignored) == 6
    model.load_state_dict(converted, strict=True)
    # Values land where they belong, including the renamed and reshaped (1x1 conv -> linear) ones.
    ours = model.state_dict()
    for name, tensor in official.items():
        if name in report.ignored:
            continue
        torch.testing.assert_close(ours[official_to_ours(name)].reshape(tensor.shape), tensor, rtol=0, atol=0)


def test_renames_cover_the_mask_branch():
    assert (
        official_to_ours("roi_heads.mask_pooler.conv_norm_relus_semantic.6.bias") == "mask_head.semantic.convs.6.bias"
    )
    assert official_to_ours("roi_heads.mask_head.mask_fcn_uncertain4.weight") == "mask_head.incoherence.conv4.weight"
    assert (
        official_to_ours("roi_heads.mask_head.encoder.conv_r1.2.weight")
        == "mask_head.refiner.pixel_decoder.layers.2.weight"
    )
    assert official_to_ours("roi_heads.mask_head.predictor.weight") == "mask_head.coarse.predictor.weight"
    assert (
        official_to_ours("backbone.bottom_up.res2.0.conv1.norm.weight") == "backbone.bottom_up.res2.0.conv1.norm.weight"
    )


def test_missing_and_misshapen_keys_are_reported(r50_official):
    broken = dict(r50_official)
    del broken["roi_heads.mask_head.encoder.conv_fuse.weight"]
    broken["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(3, 1024)
    broken["roi_heads.mask_head.something_new.weight"] = torch.zeros(1)
    _, report = convert_official_state_dict(broken, MaskTransfiner(preset("R50-FPN")))
    assert not report.ok
    assert "mask_head.refiner.node_encoder.fuse.weight" in report.missing
    assert [w[0] for w in report.wrong_shape] == ["roi_heads.box_predictor.cls_score.weight"]
    assert report.unexpected == ["roi_heads.mask_head.something_new.weight"]


def test_convert_official_cli(tmp_path, r50_official, capsys):
    good = tmp_path / "official.pth"
    torch.save({"model": r50_official, "__author__": "test"}, good)
    out = tmp_path / "converted.pth"
    assert main(["convert-official", str(good), str(out), "--config", "R50-FPN"]) == 0
    printed = capsys.readouterr().out
    assert "missing (needed for inference): 0" in printed
    assert "roi_heads.mask_head.predictor_bo.weight" in printed  # listed as ignored
    config, state = load_checkpoint(out)
    assert config.name == "R50-FPN"
    torch.testing.assert_close(
        state["mask_head.refiner.node_encoder.fuse.weight"],
        r50_official["roi_heads.mask_head.encoder.conv_fuse.weight"][:, :, 0, 0],
    )

    # Caps that cover every cell: the converted model selects exactly the official nodes, even
    # where the incoherence saturates (the default caps (784, 196, 64) would drop most of them).
    assert config.transfiner.max_cells == (784, 784, 784)
    refiner = build_model(config, out).mask_head.refiner
    g = torch.Generator().manual_seed(5)
    incoherence = torch.rand(4, 28, 28, generator=g) * 0.5 + 0.1
    incoherence[0] = 0.95  # every node of every level: 16,660 tokens
    incoherence[1, 3:20, 5:25] = 0.9
    incoherence[2] = torch.rand(28, 28, generator=g)
    selected = {}
    for index, levels in refiner.chunks(incoherence):
        for row, box in enumerate(index.tolist()):
            selected[box] = [set(level.nodes[row][level.valid[row]].tolist()) for level in levels]
    assert sorted(selected) == [0, 1, 2, 3]
    for box in range(4):
        for size, threshold, nodes in zip((28, 56, 112), config.transfiner.thresholds, selected[box]):
            # The official selection: nonzero of the nearest-upsampled map against the threshold.
            upsampled = torch.nn.functional.interpolate(incoherence[box][None, None], size=(size, size))[0, 0]
            assert nodes == set(torch.nonzero(upsampled.flatten() >= threshold).flatten().tolist()), (box, size)
    assert [len(n) for n in selected[0]] == [784, 3136, 12544]

    # A bare state dict works too; a checkpoint with a missing key fails with status 1.
    broken = {k: v for k, v in r50_official.items() if "mask_fcn_uncertain2" not in k}
    torch.save(broken, tmp_path / "broken.pth")
    assert main(["convert-official", str(tmp_path / "broken.pth"), str(tmp_path / "x.pth"), "--config", "R50-FPN"]) == 1
    assert "mask_head.incoherence.conv2.weight" in capsys.readouterr().out
    assert not (tmp_path / "x.pth").exists()


def test_convert_official_cli_pickle_needs_flag(tmp_path, r50_official, capsys):
    import pickle

    pkl = tmp_path / "official.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in r50_official.items()}}, f)
    assert main(["convert-official", str(pkl), str(tmp_path / "o.pth"), "--config", "R50-FPN"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["convert-official", str(pkl), str(tmp_path / "o.pth"), "--config", "R50-FPN", "--allow-pickle"]) == 0


def test_convert_official_cli_wrong_config(tmp_path, r50_official, capsys):
    torch.save(r50_official, tmp_path / "r50.pth")
    # R50 weights are not R101 weights: res4 has 6 blocks instead of 23.
    assert main(["convert-official", str(tmp_path / "r50.pth"), str(tmp_path / "o.pth"), "--config", "R101-FPN"]) == 1
    assert "backbone.bottom_up.res4.22.conv3.weight" in capsys.readouterr().out
    assert (
        main(["convert-official", str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"), "--config", "R50-FPN"]) == 2
    )


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    model = MaskTransfiner(small_config(("a", "b"))).eval()
    save_checkpoint(tmp_path / "m.pth", model)
    loaded = build_model(load_checkpoint(tmp_path / "m.pth")[0], tmp_path / "m.pth")
    assert loaded.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # Weights of another architecture are refused with a clear error.
    with pytest.raises(CheckpointError, match="does not match"):
        build_model(small_config(("a", "b", "c")), tmp_path / "m.pth")


def test_a_checkpoints_chunk_budgets_give_way_to_this_codes(tmp_path):
    # Chunking changes no result, only speed and memory on the machine at hand: the budgets
    # stored with a model (the shipped one has the old CPU budget, 65,536 tokens) are replaced.
    torch.manual_seed(3)
    cfg = small_config(("a", "b"))
    stored = dataclasses.replace(
        cfg,
        transfiner=dataclasses.replace(
            cfg.transfiner,
            tokens_per_chunk=65_536,
            gpu_tokens_per_chunk=7,
            boxes_per_chunk=3,
            max_cells=(784, 100, 50),
        ),
    )
    save_checkpoint(tmp_path / "m.pth", MaskTransfiner(stored).eval())
    loaded, _ = load_checkpoint(tmp_path / "m.pth")
    current = TransfinerConfig()
    assert (
        (loaded.transfiner.tokens_per_chunk, loaded.transfiner.gpu_tokens_per_chunk, loaded.transfiner.boxes_per_chunk)
        == (current.tokens_per_chunk, current.gpu_tokens_per_chunk, current.boxes_per_chunk)
        != (65_536, 7, 3)
    )
    assert loaded.transfiner.max_cells == (784, 100, 50)  # what shapes results stays as stored
    assert dataclasses.replace(loaded, transfiner=stored.transfiner) == stored


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    torch.manual_seed(4)
    model = MaskTransfiner(small_config()).eval()
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save({"format": "transfiner/1", "config": model.cfg.to_dict(), "model": state}, tmp_path / "h.pth")
    loaded = build_model(model.cfg, tmp_path / "h.pth")
    weight = loaded.state_dict()["mask_head.coarse.predictor.weight"]
    assert weight.dtype == torch.float32
    np.testing.assert_allclose(
        weight.numpy(), model.state_dict()["mask_head.coarse.predictor.weight"].numpy(), atol=1e-3
    )


@pytest.fixture
def torch_loads(monkeypatch):
    """Every file torch.load reads, in order (the real torch.load still does the reading)."""
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return reads


def test_building_a_model_reads_its_checkpoint_once(tmp_path, torch_loads):
    from transfiner.model.inference.predictor import Predictor, load_predictor

    torch.manual_seed(5)
    model = MaskTransfiner(small_config(("a", "b"))).eval()
    save_checkpoint(tmp_path / "ours.pth", model)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    torch_loads.clear()

    # Config from the checkpoint, then its weights: one read.
    predictor = Predictor(weights=tmp_path / "ours.pth", device="cpu")
    assert torch_loads == ["ours.pth"]
    assert predictor.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), predictor.model.state_dict().values()):
        assert torch.equal(a, b), name
    # A bare state dict with a given config (what --config is for): one read too.
    load_predictor(tmp_path / "bare.pth", model.cfg, "cpu")
    assert torch_loads == ["ours.pth", "bare.pth"]
    # A bare state dict without a config says so, after its one read.
    with pytest.raises(ValueError, match="holds no config"):
        Predictor(weights=tmp_path / "bare.pth", device="cpu")
    assert torch_loads == ["ours.pth", "bare.pth", "bare.pth"]


def test_max_cells_override_the_checkpoint_caps(tmp_path, capsys):
    """``--max-cells`` / ``max_cells=`` replaces the stored caps at inference only."""
    from transfiner.cli.main import build_parser
    from transfiner.model.config import parse_max_cells
    from transfiner.model.inference.predictor import load_predictor

    torch.manual_seed(5)
    save_checkpoint(tmp_path / "m.pth", MaskTransfiner(small_config()).eval())
    stored = load_predictor(tmp_path / "m.pth", device="cpu")
    assert stored.cfg.transfiner.max_cells == (784, 196, 64)
    covering = load_predictor(tmp_path / "m.pth", device="cpu", max_cells=(784, 784, 784))
    assert covering.model.mask_head.refiner.quadtree.max_cells == (784, 784, 784)
    for a, b in zip(stored.model.state_dict().values(), covering.model.state_dict().values()):
        assert torch.equal(a, b)

    assert parse_max_cells("784,196,64") == (784, 196, 64)
    for bad in ("784,196", "0,1,1", "785,1,1", "a,b,c"):
        with pytest.raises(ValueError, match="max cells"):
            parse_max_cells(bad)
    args = build_parser().parse_args(["predict", "x.png", "--out", "r.json", "--max-cells", "784,392,128"])
    assert args.max_cells == (784, 392, 128)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-cells", "784,392"])
    err = capsys.readouterr().err
    assert "--max-cells: max cells must be three integers in 1..784" in err and "parse_max_cells" not in err


def test_service_max_cells_setting(monkeypatch):
    from transfiner.service.settings import ServiceSettings

    assert ServiceSettings().max_cells is None  # the checkpoint's caps
    monkeypatch.setenv("TRANSFINER_MAX_CELLS", "784,196,64")
    assert ServiceSettings().max_cells == (784, 196, 64)
    monkeypatch.setenv("TRANSFINER_MAX_CELLS", "784,196")
    with pytest.raises(ValueError, match="max cells"):
        ServiceSettings()
