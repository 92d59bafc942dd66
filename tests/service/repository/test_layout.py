"""Reading a model repository folder: versions, version policies and config.yaml errors."""

from __future__ import annotations

import pytest

from transfiner.service.repository.config import ConfigError, ModelFileConfig, VersionPolicy, read_model_config
from transfiner.service.repository.layout import RepositoryError, scan_repository, version_model_path


def test_version_policies_pick_the_versions_to_serve():
    on_disk = [1, 4, 2, 9]
    assert VersionPolicy(latest=1).select(on_disk) == [9]
    assert VersionPolicy(latest=2).select(on_disk) == [9, 4]
    assert VersionPolicy(specific=[2, 3, 4]).select(on_disk) == [4, 2]
    assert VersionPolicy(all=True).select(on_disk) == [9, 4, 2, 1]
    assert ModelFileConfig().version_policy.select(on_disk) == [9]  # latest 1 by default
    with pytest.raises(ValueError, match="exactly one of"):
        VersionPolicy(latest=1, all=True)
    with pytest.raises(ValueError, match="exactly one of"):
        VersionPolicy()


def test_a_config_file_sets_serving_settings_and_names_what_is_wrong(tmp_path):
    (tmp_path / "config.yaml").write_text("backend: onnxruntime\nmax_cells: 64,16,4\nversion_policy: {latest: 2}\n")
    config = read_model_config(tmp_path)
    assert config.settings() == {"backend": "onnxruntime", "max_cells": (64, 16, 4)}
    assert config.version_policy.latest == 2
    for text, message in (
        ("max_batch_size: 0\n", "max_batch_size: Input should be greater than or equal to 1"),
        ("backend: tensorflow\n", "backend: Input should be"),
        ("workerz: 2\n", "workerz: Extra inputs are not permitted"),
        ("- a list\n", "expected a mapping of settings, got list"),
        ("backend: [unclosed\n", "cannot be read as YAML"),
    ):
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_model_config(tmp_path)


def test_scanning_finds_models_versions_and_what_each_version_holds(tmp_path, checkpoint):
    with pytest.raises(RepositoryError, match="is not a folder"):
        scan_repository(tmp_path / "missing")
    (tmp_path / "a" / "1").mkdir(parents=True)
    (tmp_path / "a" / "3").mkdir()
    (tmp_path / "a" / "latest").mkdir()  # not a version
    (tmp_path / "a" / "0").mkdir()  # versions start at 1
    # Digits to str.isdigit() but not versions: int() raises on the first and reads 3 in the second.
    (tmp_path / "a" / "\u00b3").mkdir()  # superscript three
    (tmp_path / "a" / "\u0663").mkdir()  # Arabic-Indic three
    (tmp_path / ".hidden" / "1").mkdir(parents=True)  # not a model name
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.yaml").write_text("device: [1]\n")
    found = scan_repository(tmp_path)
    assert sorted(found) == ["a", "b"]
    assert sorted(found["a"].versions) == [1, 3] and found["a"].wanted() == [3]
    assert found["b"].error is not None and "device" in found["b"].error and found["b"].wanted() == []

    version = tmp_path / "a" / "3"
    with pytest.raises(ValueError, match="found checkpoints: none"):
        version_model_path(version)
    (version / "model.pth").write_bytes(checkpoint.read_bytes())
    (version / "README.txt").write_text("notes beside the weights are fine")
    assert version_model_path(version) == version / "model.pth"
    (version / "other.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="found checkpoints: model.pth, other.pt"):
        version_model_path(version)
    (version / "metadata.json").write_text("{}")  # an export folder: the runtime reads it
    assert version_model_path(version) == version


def test_only_ascii_digits_order_versions():
    from transfiner.service.engine.manager import version_order

    assert sorted(["10", "9", "2"], key=version_order) == ["2", "9", "10"]
    # A digest, or a name a request made up: ordered below the numbered versions, never int()'d.
    assert version_order("\u00b3") == (0, "\u00b3") and version_order("\u0663") == (0, "\u0663")
    assert version_order("5de8431b495d") == (0, "5de8431b495d")
