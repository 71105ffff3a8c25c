"""Issue 24, export faults: an export writes only inside its output directory, never over existing files unless
asked, only routes the LiME model could run, and the command line refuses bad arguments with one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_lime
from peft_lime import collect_routing_profiles, export_static, save_routing_profiles
from peft_lime.export import main as export_main

from ._models import VOCAB, lime, lora, scatter_experts, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    model = get_peft_model(tiny_llama(), lime(lora()))
    scatter_experts(model)
    return model.eval()


def _profile(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    return collect_routing_profiles(model, [{"input_ids": ids}])["global"]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes): what a refused export must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_profile_named_dotdot_cannot_overwrite_the_adapter_above_output_dir(tmp_path, capsys):
    # The reported data loss: --output-dir my-adapter/exported with a profile ".." rewrote my-adapter itself (exit 0).
    model = _model()
    adapter = tmp_path / "my-adapter"
    model.save_pretrained(adapter)
    save_routing_profiles({"..": _profile(model)}, tmp_path / "routing.safetensors")
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        export_main(
            [
                "--adapter",
                str(adapter),
                "--routing",
                str(tmp_path / "routing.safetensors"),
                "--output-dir",
                str(adapter / "exported"),
            ]
        )
    assert exit_info.value.code not in (0, None)
    assert "'..' is not usable as a directory name" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before  # adapter_config.json and weights byte-identical, nothing added
    with pytest.raises(ValueError, match=r"'\.\.' is not usable as a directory name"):
        export_static(model, {"..": _profile(model)}, adapter / "exported")
    assert _snapshot(tmp_path) == before


def test_profile_names_that_are_not_one_plain_directory_name_are_refused(tmp_path):
    model = _model()
    profile = _profile(model)
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)  # a name that resolves outside output_dir
    before = _snapshot(tmp_path)
    for name in ["..", "a/b", "../x", "/abs", "", ".", "a\0b", "a\\b", "link"]:
        with pytest.raises(ValueError, match="^profiles: "):
            export_static(model, {"ok": profile, name: profile}, out)
        # refused before anything is written, the good profile included
        assert _snapshot(tmp_path) == before and sorted(os.listdir(out)) == ["link"], name
    assert not any(outside.iterdir())


def test_export_refuses_existing_adapter_files_unless_overwrite(tmp_path, capsys):
    model = _model()
    profiles = {"global": _profile(model)}
    out = tmp_path / "exported"
    export_static(model, profiles, out)
    (out / "global" / "adapter_model.bin").write_bytes(b"stale weights of an earlier export")
    before = _snapshot(out)
    with pytest.raises(ValueError, match="already exist.*overwrite=True"):
        export_static(model, profiles, out)
    assert _snapshot(out) == before
    # the command line refuses too, in one line, and writes nothing
    model.save_pretrained(tmp_path / "lime")
    save_routing_profiles(profiles, tmp_path / "routing.safetensors")
    argv = [
        "--adapter",
        str(tmp_path / "lime"),
        "--routing",
        str(tmp_path / "routing.safetensors"),
        "--output-dir",
        str(out),
    ]
    with pytest.raises(SystemExit) as exit_info:
        export_main(argv)
    assert exit_info.value.code not in (0, None) and "--overwrite" in capsys.readouterr().err
    assert _snapshot(out) == before
    # asked: the directory is replaced whole, the stale file is gone
    written = export_static(model, profiles, out, overwrite=True)
    assert sorted(os.listdir(written["global"])) == ["adapter_config.json", "adapter_model.safetensors"]
    assert set(export_main([*argv, "--overwrite"])) == {"global"}
    assert sorted(os.listdir(out)) == ["global", "lime_export.json"]  # no staging directory left behind


def test_export_refuses_non_convex_mixing_weights_like_static_routing(tmp_path):
    model = _model()
    profile = _profile(model)
    layer = next(iter(profile))
    bad = {**profile, layer: torch.tensor([2.0, -1.0, 0.0, 0.0])}
    with pytest.raises(ValueError, match=r"must be >= 0 and sum to 1"):
        peft_lime.set_static_routing(model, bad)
    with pytest.raises(ValueError, match=rf"profile\['{layer}'\]: mixing weights must be >= 0 and sum to 1"):
        export_static(model, {"first": profile, "bad": bad}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the good profile was not written either


def test_cli_routing_file_that_is_not_safetensors_is_a_one_line_error(tmp_path, capsys):
    model = _model()
    model.save_pretrained(tmp_path / "lime")
    routing = tmp_path / "routing.json"
    routing.write_text('{"global": [0.25, 0.25, 0.25, 0.25]}')
    with pytest.raises(SystemExit) as exit_info:
        export_main(
            ["--adapter", str(tmp_path / "lime"), "--routing", str(routing), "--output-dir", str(tmp_path / "out")]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "--routing" in error_lines[0] and str(routing) in error_lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
