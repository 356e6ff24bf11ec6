"""The model registry: parsing, defaults, lookups, the catalog, and clear errors. No torch here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inference_server.errors import InvalidRequest, RegistryError
from inference_server.registry import load_registry

GOOD = """
[families.sd15]
tasks = ["txt2img", "img2img", "inpaint"]
limits = { max_size = 1024 }
defaults = { width = 512, height = 512, steps = 30 }
[[families.sd15.models]]
id = "base"
source = "sd15"
[[families.sd15.models]]
id = "inpainting"
source = "s3://bucket/sd15-inpaint"
tasks = ["inpaint"]
dtype = "float16"
memory_gb = 3.5
[[families.sd15.loras]]
name = "style"
source = "loras/style"

[families.qwen-image-edit]
queue = "edit-queue"
tasks = ["edit"]
[[families.qwen-image-edit.models]]
id = "plain"
source = "qwen"
[[families.qwen-image-edit.models]]
id = "compressed"
source = "qwen"
df11 = "qwen-df11"
default = true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_parses_defaults_and_lookups(tmp_path: Path) -> None:
    (tmp_path / "sd15").mkdir()
    reg = load_registry(write(tmp_path, GOOD))
    sd = reg.family("sd15")
    assert sd.queue == "jobs.sd15"
    assert sd.limits["max_size"] == 1024 and sd.limits["size_multiple"] == 8  # merged with defaults
    assert sd.model(None, "txt2img").id == "base"  # first model is the default when none says so
    assert sd.model("inpainting", "inpaint").dtype == "float16"
    assert sd.memory_gb == 3.5
    edit = reg.family("qwen-image-edit")
    assert edit.queue == "edit-queue"
    assert edit.model(None, "edit").id == "compressed" and edit.model(None, "edit").is_df11
    # Relative folders resolve against the registry file; remote sources stay as written.
    assert reg.resolve_source("sd15") == str((tmp_path / "sd15").resolve())
    assert reg.resolve_source("s3://bucket/x") == "s3://bucket/x"


def test_lookup_errors_carry_codes(tmp_path: Path) -> None:
    reg = load_registry(write(tmp_path, GOOD))
    with pytest.raises(InvalidRequest) as exc:
        reg.family("sd15").model("nope", "txt2img")
    assert exc.value.code == "unknown_model" and "base" in exc.value.message
    with pytest.raises(InvalidRequest) as exc:
        reg.family("sd15").model(None, "edit")
    assert exc.value.code == "unsupported_task"
    with pytest.raises(InvalidRequest) as exc:
        reg.family("sd15").model("inpainting", "txt2img")
    assert exc.value.code == "unsupported_task"
    with pytest.raises(InvalidRequest) as exc:
        reg.family("flux")
    assert exc.value.code == "unknown_family"


def test_catalog_shape(tmp_path: Path) -> None:
    catalog = load_registry(write(tmp_path, GOOD)).catalog()
    names = [f["name"] for f in catalog["families"]]
    assert names == ["sd15", "qwen-image-edit"]
    sd = catalog["families"][0]
    assert sd["tasks"] == ["txt2img", "img2img", "inpaint"]
    assert sd["defaults"]["steps"] == 30
    assert [(m["id"], m["default"], m["df11"]) for m in sd["models"]] == [
        ("base", True, False),
        ("inpainting", False, False),
    ]
    assert sd["loras"] == [{"name": "style"}]
    assert catalog["families"][1]["models"][1]["df11"] is True


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[families.sd15]\ntasks = ['txt2img']\n", "families.sd15.models"),
        (
            "[families.sd15]\ntasks = ['dance']\n[[families.sd15.models]]\nid='a'\nsource='b'\n",
            "families.sd15.tasks",
        ),
        (
            "[families.sd15]\ntasks = ['txt2img']\n[[families.sd15.models]]\nid='a'\n",
            "families.sd15.models[0].source",
        ),
        (
            "[families.sd15]\ntasks = ['txt2img']\n[[families.sd15.models]]\nid='a'\nsource='b'\n"
            "dtype='int8'\n",
            "families.sd15.models[0].dtype",
        ),
        (
            "[families.sd15]\ntasks = ['txt2img']\ncolour = 1\n[[families.sd15.models]]\n"
            "id='a'\nsource='b'\n",
            "families.sd15.colour",
        ),
        (
            "[families.sd15]\ntasks = ['txt2img']\nlimits = { max_size = -1 }\n[[families.sd15.models]]\n"
            "id='a'\nsource='b'\n",
            "families.sd15.limits.max_size",
        ),
        (
            "[families.sd15]\ntasks = ['txt2img']\n[[families.sd15.models]]\nid='a'\nsource='b'\n"
            "[[families.sd15.models]]\nid='a'\nsource='c'\n",
            "duplicate model id",
        ),
        (
            "[families.sd15]\ntasks = ['txt2img']\n[[families.sd15.models]]\nid='a'\nsource='b'\n"
            "[[families.sd15.loras]]\nname='x'\n",
            "families.sd15.loras[0].source",
        ),
        ("nothing = 1\n", "families"),
        ("[families\n", "cannot read registry"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RegistryError) as exc:
        load_registry(path)
    assert str(path) in exc.value.message and key in exc.value.message
    assert exc.value.code == "registry_error"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="not found"):
        load_registry(tmp_path / "absent.toml")


def test_registry_does_not_import_torch(tmp_path: Path) -> None:
    """The API imports the registry: it must stay free of torch and diffusers."""
    path = write(tmp_path, GOOD)
    code = (
        "import sys; from inference_server.registry import load_registry; "
        f"load_registry({str(path)!r}).catalog(); "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
