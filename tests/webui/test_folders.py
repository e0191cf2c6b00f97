"""Which folders TextGen's Model tab gives the MixtralOffload loader: always those only it can read (offload format,
mixtral-offloading layout); plain folders of a supported family while `auto_select` is on."""

from __future__ import annotations

from pathlib import Path

from mixtral_offload_plugin.webui import LOADER, integration
from mixtral_offload_plugin.webui.folders import claims_folder


def test_claims_mixtral_offloading_folders_but_not_plain_ones(mo_demo, tmp_path: Path) -> None:
    assert claims_folder(mo_demo.seed)
    assert not claims_folder(mo_demo.src)
    assert not claims_folder(tmp_path / "missing")


def test_textgen_picks_our_loader_for_a_mixtral_offloading_folder(textgen, mo_demo, monkeypatch) -> None:
    from modules import extensions, models, models_settings

    (Path(textgen.args.model_dir) / "mo-seed").symlink_to(mo_demo.seed, target_is_directory=True)
    extensions.load_extensions()
    assert models_settings.get_model_metadata("mo-seed")["loader"] == LOADER
    assert models_settings.get_model_metadata("tiny-mixtral")["loader"] == LOADER  # auto_select (default)
    monkeypatch.setitem(integration._params, "auto_select", False)
    assert models_settings.get_model_metadata("tiny-mixtral")["loader"] == "Transformers"
    assert models_settings.get_model_metadata("mo-seed")["loader"] == LOADER  # only we can read it
    model, tok = models.load_model("mo-seed")  # no loader given: inferred from the folder
    assert textgen.args.loader == LOADER and hasattr(model, "offload_stats")
    ids = tok("w5 w9", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4
    assert model.offload_stats().requests > 0  # the experts ran through our cache
