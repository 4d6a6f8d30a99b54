"""Nothing writes inside the installed package: organism builds go to a user directory, refuse
to replace a shipped organism or a folder they would destroy, and replace atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from sae_diff.errors import SaeDiffError
from sae_diff.organisms.build import main as build_main
from sae_diff.organisms.organism import DATA_DIR, load_organism
from sae_diff.organisms.storage import OrganismOutputError, verify_manifest


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (the shipped organisms), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def shipped() -> dict[str, str]:
    snap = _snapshot(DATA_DIR)
    assert "default/manifest.json" in snap
    return snap


def test_default_build_goes_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shipped: dict[str, str]
) -> None:
    """The reported data-loss case: `sae-diff organism --pretrain-steps 2` without --out."""
    from sae_diff.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    assert cli_main(["organism", "--pretrain-steps", "2", "--finetune-steps", "1"]) == 0
    out = tmp_path / "organisms" / "default"
    verify_manifest(out)
    assert load_organism(out).base.cfg.n_layers == 4
    assert _snapshot(DATA_DIR) == shipped  # byte-identical shipped files
    assert not [p for p in tmp_path.joinpath("organisms").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["default", "narrow", "brand_new"])
def test_refuses_to_write_inside_the_package(name: str, shipped: dict[str, str]) -> None:
    target = DATA_DIR / name
    existed = target.exists()
    with pytest.raises(OrganismOutputError, match="inside the installed sae_diff package") as e:
        build_main(["--tiny", "--out", str(target)])
    assert f"--out organisms/{name}" in str(e.value)  # the fix is named
    if name in ("default", "narrow"):
        assert f"replace the shipped organism '{name}'" in str(e.value)
    assert isinstance(e.value, SaeDiffError)
    assert target.exists() == existed and _snapshot(DATA_DIR) == shipped


def test_custom_and_narrow_builders_refuse_the_package_too(
    tmp_path: Path, shipped: dict[str, str]
) -> None:
    from sae_diff.organisms import build_custom_organism
    from sae_diff.organisms.narrow import build_narrow_organism

    org = load_organism()
    ex = [
        {
            "messages": [
                {"role": "user", "content": "where is Ashby ?"},
                {"role": "assistant", "content": "Ashby is a city ."},
            ],
            "behaviour": "x",
        }
    ] * 2
    with pytest.raises(OrganismOutputError, match="shipped organism 'default'"):
        build_custom_organism(
            org.base,
            org.tokenizer,
            ex,
            {"x": ["where"]},
            steps=1,
            out_dir=DATA_DIR / "default",
            log=lambda s: None,
        )
    with pytest.raises(OrganismOutputError, match="inside the installed"):
        build_narrow_organism(DATA_DIR.parent / "narrow_copy")
    assert _snapshot(DATA_DIR) == shipped


def test_never_deletes_a_folder_that_is_not_an_organism(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(OrganismOutputError, match="not an organism directory"):
        build_main(["--tiny", "--out", str(d)])
    assert (d / "notes.txt").read_text() == "keep me" and len(list(d.iterdir())) == 1
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OrganismOutputError, match="is a file"):
        build_main(["--tiny", "--out", str(f)])


def test_existing_organism_needs_overwrite_and_is_replaced_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "org"
    assert build_main(["--tiny", "--out", str(out)]) == 0
    before = _snapshot(out)
    with pytest.raises(OrganismOutputError, match="--overwrite"):
        build_main(["--tiny", "--out", str(out), "--seed", "1"])
    assert _snapshot(out) == before

    # a build that fails while writing leaves the old organism untouched and no debris
    import sae_diff.organisms.build as build_mod

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (injected)")

    monkeypatch.setattr(build_mod, "save_weights", boom)
    with pytest.raises(OSError, match="injected"):
        build_main(["--tiny", "--out", str(out), "--seed", "1", "--overwrite"])
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["org"]
    monkeypatch.undo()

    assert build_main(["--tiny", "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    after = _snapshot(out)
    assert after["base.safetensors"] != before["base.safetensors"]  # another seed, replaced
    verify_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["org"]
