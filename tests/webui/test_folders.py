"""The MixtralOffload loader claims the folders only it can read: offload format and mixtral-offloading layout."""

from __future__ import annotations

from pathlib import Path

from mixtral_offload_plugin.webui import LOADER
from mixtral_offload_plugin.webui.folders import claims_folder


def test_claims_mixtral_offloading_folders_but_not_plain_ones(mo_demo, tmp_path: Path) -> None:
    assert claims_folder(mo_demo.seed)
    assert not claims_folder(mo_demo.src)
    assert not claims_folder(tmp_path / "missing")


def test_textgen_picks_our_loader_for_a_mixtral_offloading_folder(textgen, mo_demo) -> None:
    from modules import extensions, models, models_settings

    (Path(textgen.args.model_dir) / "mo-seed").symlink_to(mo_demo.seed, target_is_directory=True)
    extensions.load_extensions()
    assert models_settings.get_model_metadata("mo-seed")["loader"] == LOADER
    assert models_settings.get_model_metadata("tiny-mixtral")["loader"] == "Transformers"
    model, tok = models.load_model("mo-seed")  # no loader given: inferred from the folder
    assert textgen.args.loader == LOADER and hasattr(model, "offload_stats")
    ids = tok("w5 w9", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4
    assert model.offload_stats().requests > 0  # the experts ran through our cache
