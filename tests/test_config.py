import argparse
import re
from pathlib import Path

import pytest
import yaml

from model.config import DIFFP_LAST_KEPT_THRESHOLD, SessionConfig
from model.configtree import from_dict
from vl3live.config import CONFIG_DIR, Config, add_dataclass_arguments, dataclass_from_args, load_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_in_configs_loads(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "each config starts with a comment naming the command that uses it"
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    def check(node, values):
        for key, value in (values or {}).items():
            if isinstance(value, dict):
                check(getattr(node, key), value)
            else:
                assert getattr(node, key) == value, f"{path.name}: {key}"

    check(cfg, yaml.safe_load(path.read_text()))


def test_default_yaml_spells_out_the_dataclass_defaults():
    assert load_config() == Config()


def test_default_config_is_the_2b_video_checkpoint_with_live_diffp():
    cfg = load_config()
    assert cfg.model.spec == "DAMO-NLP-SG/VideoLLaMA3-2B"  # the video-trained model, not the image one
    assert cfg.session.layout == "video-turn"
    assert cfg.session.diffp_reference == "last_kept"
    assert cfg.session.threshold == DIFFP_LAST_KEPT_THRESHOLD
    assert SessionConfig(diffp_reference="previous").threshold == 0.1


def test_dotted_overrides_are_typed():
    cfg = load_config(overrides=["session.layout=stream", "session.frame_pixels=100352",
                                 "session.diffp_threshold=2.5", "model.spec=tiny", "model.device=null"])
    assert cfg.session.layout == "stream"
    assert cfg.session.frame_pixels == 100352
    assert cfg.session.diffp_threshold == 2.5
    assert cfg.model.spec == "tiny" and cfg.model.device is None


@pytest.mark.parametrize("overrides, message", [
    (["session.layout=sideways"], "session.layout"),
    (["session.no_such_key=1"], "no_such_key"),
    (["session.frame_pixels=10"], "frame_pixels"),
    (["session.diffp_reference=next"], "diffp_reference"),
    (["model.dtype=int3"], "model.dtype"),
    (["nonsense"], "section.key=value"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


@pytest.mark.parametrize("overrides, message", [
    (["session.frame_pixels=abc"], r"^session\.frame_pixels: expected an integer, got 'abc'$"),
    (["session.budget.max_tokens=1.5"], r"^session\.budget\.max_tokens: expected an integer, got 1\.5 \(or null\)$"),
    (["engine.fps=fast"], r"^engine\.fps: expected a number, got 'fast'$"),
    (["train.lora=maybe"], r"^train\.lora: expected a boolean"),
    (["session.layout=["], r"^--set session\.layout=\[: the value is not valid YAML"),
])
def test_a_value_of_the_wrong_type_names_its_key_and_the_type(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=overrides)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  spec: tiny\n session: [\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}:3:2: invalid YAML: "):
        load_config(bad)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        load_config("/nonexistent/config.yaml")


def test_cli_flags_come_from_dataclass_fields():
    from vl3live.bench import BenchConfig

    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, BenchConfig)
    args = p.parse_args(["--frames", "12", "--max-new-tokens", "4", "--json", "--size", "2b"])
    cfg = dataclass_from_args(BenchConfig, args)
    assert (cfg.frames, cfg.max_new_tokens, cfg.json, cfg.size) == (12, 4, True, "2b")
    assert "frames streamed before the question" in p.format_help()
    with pytest.raises(ValueError):
        dataclass_from_args(BenchConfig, p.parse_args(["--frames", "many"]))


def test_a_flag_on_by_default_can_be_turned_off():
    from vl3live.proof import ProofConfig

    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, ProofConfig, positional=("out",))
    assert dataclass_from_args(ProofConfig, p.parse_args(["o"])).curve is True
    assert dataclass_from_args(ProofConfig, p.parse_args(["o", "--no-curve"])).curve is False
    assert dataclass_from_args(ProofConfig, p.parse_args(["o", "--online-only"])).online_only is True


def test_from_dict_rejects_wrong_types():
    with pytest.raises(ValueError, match="session"):
        from_dict(Config, {"session": "not a mapping"})
