"""Tests for model.weights.files (reading weight files safely) and the official key lists in tests/data."""

from __future__ import annotations

import math
import os
import pickle
import re
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import DATA
from transfiner.model.weights.files import CheckpointError, _NumpyOnlyUnpickler, read_state_dict

KEYS_DIR = DATA / "official_keys"


def _weights() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.tensor([1.5, -2.0])}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


# --------------------------------------------------------------------------- .pth


def test_pth_with_model_entry(tmp_path: Path) -> None:
    p = tmp_path / "ckpt.pth"
    torch.save({"model": _weights(), "iteration": 5, "optimizer": {"state": {}}}, p)
    _assert_same(read_state_dict(p), _weights())


def test_bare_pth_and_pt(tmp_path: Path) -> None:
    for name in ("bare.pth", "bare.pt"):
        torch.save(OrderedDict(_weights()), tmp_path / name)
        _assert_same(read_state_dict(str(tmp_path / name)), _weights())


@pytest.mark.parametrize("payload", [[1, 2, 3], {"optimizer": {}, "iteration": 3}, {"model": {"x": 3}}])
def test_pth_without_state_dict(tmp_path: Path, payload: object) -> None:
    p = tmp_path / "odd.pth"
    torch.save(payload, p)
    with pytest.raises(CheckpointError, match="odd.pth"):
        read_state_dict(p)


# --------------------------------------------------------------------------- .pkl


def _np_weights() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in _weights().items()}


def test_pkl_refused_without_flag(tmp_path: Path) -> None:
    p = tmp_path / "R-50.pkl"
    p.write_bytes(pickle.dumps({"model": _np_weights()}))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        read_state_dict(p)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("wrapped", [False, True])
def test_pkl_accepted_with_flag(tmp_path: Path, protocol: int, wrapped: bool) -> None:
    arrays = _np_weights() | {"big": np.arange(1000, dtype=">i8").reshape(10, 100)}  # non-native byte order
    obj = {"model": arrays, "__author__": "Detectron2 Model Zoo"} if wrapped else OrderedDict(arrays)
    p = tmp_path / "w.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    sd = read_state_dict(p, allow_pickle=True)
    _assert_same({k: sd[k] for k in _weights()}, _weights())
    assert torch.equal(sd["big"], torch.arange(1000).reshape(10, 100))
    sd["a.bias"].add_(1)  # tensors must be writable copies


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 ``str`` opcodes, as the detectron2 model-zoo pickles have them."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def test_pkl_written_like_python2(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump({"model": _np_weights(), "__author__": "MSRA"})
    data = re.sub(rb"numpy\._core\.", b"numpy.core.", buf.getvalue())  # numpy 1.x module paths
    assert b"numpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data
    p = tmp_path / "R-50.pkl"
    p.write_bytes(data)
    _assert_same(read_state_dict(p, allow_pickle=True), _weights())


def test_numpy2_dtype_classes_allowed() -> None:
    import io

    up = _NumpyOnlyUnpickler(io.BytesIO(b""))
    assert up.find_class("numpy.dtypes", "Float32DType") is type(np.dtype("f4"))
    for bad in [("numpy.dtypes", "__builtins__"), ("numpy", "load"), ("numpy.core.multiarray", "eval")]:
        with pytest.raises(CheckpointError):
            up.find_class(*bad)


class _Evil:
    def __init__(self, fn: object, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return self.fn, (self.arg,)


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "nested"])
def test_malicious_pkl_not_executed(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    shell = f"touch {marker}"
    if kind == "os.system":
        obj: object = _Evil(os.system, shell)
    elif kind == "builtins.eval":
        obj = _Evil(eval, f"__import__('os').system({shell!r})")
    else:
        obj = {"model": {"a": np.zeros(2), "b": _Evil(os.system, shell)}}
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match="evil.pkl"):
        read_state_dict(p, allow_pickle=True)
    assert not marker.exists()


def test_malicious_pth_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.zeros(1), "b": _Evil(os.system, f"touch {marker}")}}, p)
    with pytest.raises(CheckpointError, match="posix.system|os.system|nt.system"):
        read_state_dict(p)
    assert not marker.exists()


def test_pkl_non_array_value(tmp_path: Path) -> None:
    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps({"model": {"a": np.zeros(2), "b": [1, 2]}}))
    with pytest.raises(CheckpointError, match="'b'"):
        read_state_dict(p, allow_pickle=True)


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("name", ["bad.pth", "bad.pkl"])
def test_corrupt_file(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"PK\x03\x04 this is not a checkpoint \x00\xff" * 3)
    with pytest.raises(CheckpointError, match=name):
        read_state_dict(p, allow_pickle=True)


def test_truncated_pth(tmp_path: Path) -> None:
    p = tmp_path / "cut.pth"
    torch.save({"model": _weights()}, p)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.pth"):
        read_state_dict(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


def test_unknown_extension_and_directory(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="w.safetensors"):
        read_state_dict(p)
    with pytest.raises(CheckpointError, match="not a file"):
        read_state_dict(tmp_path)


# --------------------------------------------------------------------------- official key lists

# The mask head of the official checkpoint (COCO, 80 classes), transcribed from the module
# definitions of the official SysCV/transfiner code (detectron2/modeling/roi_heads/mask_head.py).
_MASK_HEAD_SPEC: dict[str, tuple[int, ...]] = {}
for _i in range(1, 5):
    _MASK_HEAD_SPEC |= {f"mask_fcn{_i}.weight": (256, 256, 3, 3), f"mask_fcn{_i}.bias": (256,)}
for _n, _w in {"deconv": (256, 256, 2, 2), "deconv_bo": (256, 256, 2, 2), "predictor": (80, 256, 1, 1),
               "predictor_bo": (1, 256, 1, 1), "encoder.conv_fuse": (256, 257, 1, 1),
               "encoder.conv_r1.0": (256, 256, 1, 1), "encoder.conv_r1.2": (1, 256, 1, 1),
               "mask_fcn_uncertain1": (256, 256, 3, 3), "mask_fcn_uncertain2": (256, 256, 3, 3),
               "mask_fcn_uncertain3": (256, 256, 3, 3), "mask_fcn_uncertain4": (128, 256, 3, 3),
               "deconv_uncertain": (128, 128, 2, 2), "predictor_uncertain": (1, 128, 1, 1),
               "predictor_semantic_s": (1, 256, 1, 1)}.items():  # fmt: skip
    _out = _w[1] if "deconv" in _n else _w[0]  # ConvTranspose2d weight is [in, out, kH, kW]
    _MASK_HEAD_SPEC |= {f"{_n}.weight": _w, f"{_n}.bias": (_out,)}
for _i in range(3):
    _l = f"encoder.layers.{_i}."
    _MASK_HEAD_SPEC |= {
        _l + "self_attn.in_proj_weight": (768, 256), _l + "self_attn.in_proj_bias": (768,),
        _l + "self_attn.out_proj.weight": (256, 256), _l + "self_attn.out_proj.bias": (256,),
        _l + "linear1.weight": (2048, 256), _l + "linear1.bias": (2048,),
        _l + "linear2.weight": (256, 2048), _l + "linear2.bias": (256,),
        _l + "norm1.weight": (256,), _l + "norm1.bias": (256,),
        _l + "norm2.weight": (256,), _l + "norm2.bias": (256,),
    }  # fmt: skip

_VARIANTS = ["R50-FPN", "R50-FPN-DCN", "R101-FPN", "R101-FPN-DCN"]
_MIB = {"R50-FPN": 203.3, "R50-FPN-DCN": 205.5, "R101-FPN": 275.9, "R101-FPN-DCN": 280.8}


def _read_tsv(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (KEYS_DIR / f"{name}.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(","))))
    return rows


def test_official_key_files_present() -> None:
    assert sorted(p.stem for p in KEYS_DIR.glob("*.tsv")) == sorted(_VARIANTS)


@pytest.mark.parametrize("variant", _VARIANTS)
def test_official_keys(variant: str) -> None:
    rows = _read_tsv(variant)
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)), "duplicate keys"
    assert all(shape and all(d > 0 for d in shape) for _, shape in rows)
    assert not any("num_batches_tracked" in k or "anchor_generator" in k for k in keys)
    # backbone convs (DeformConv included) carry no bias; only the offset convs do
    biased = [k for k in keys if k.startswith("backbone.bottom_up.") and k.endswith(".bias") and ".norm." not in k]
    assert all(".conv2_offset." in k for k in biased)

    head = {k.removeprefix("roi_heads.mask_head."): s for k, s in rows if k.startswith("roi_heads.mask_head.")}
    assert head == _MASK_HEAD_SPEC
    semantic = {k for k in keys if k.startswith("roi_heads.mask_pooler.")}
    assert semantic == {f"roi_heads.mask_pooler.conv_norm_relus_semantic.{i}.{p}" for i in (0, 2, 4, 6)
                        for p in ("weight", "bias")}  # fmt: skip

    total = sum(math.prod(s) for _, s in rows)
    assert total * 4 / 2**20 == pytest.approx(_MIB[variant], abs=0.05)
    if variant == "R50-FPN":
        assert total == pytest.approx(53.28e6, abs=0.01e6)

    offsets = [k for k in keys if ".conv2_offset." in k]
    if variant.endswith("DCN"):
        stages = {re.match(r"backbone\.bottom_up\.(res\d)\.", k).group(1) for k in offsets}  # type: ignore[union-attr]
        assert stages == {"res3", "res4", "res5"}
        blocks = {k.rsplit(".conv2_offset.", 1)[0] for k in offsets}
        conv2 = {k.removesuffix(".conv2.weight") for k in keys if k.endswith(".conv2.weight") and ".res2." not in k}
        assert blocks == conv2  # every res3..res5 block has one
        for k, s in rows:
            if ".conv2_offset.weight" in k:
                assert s[0] == 18 and s[2:] == (3, 3)
    else:
        assert offsets == []


def test_official_key_files_match_generator() -> None:
    import subprocess
    import sys

    script = KEYS_DIR / "make_official_keys.py"
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
