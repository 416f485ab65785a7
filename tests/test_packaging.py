"""What the wheel holds, read from setup.cfg by setuptools' own build_py (nothing is built or installed): every module
of the package and of `kernels/` (as `transformers_misa.kernels`, never a top-level `kernels`, which would shadow the
Hub's library), the built-in trained models, the model cards and the remote-code templates. The packages are listed
by name in setup.cfg, so a new subpackage left out of that list would silently be missing from the wheel."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _shipped_files(root: pathlib.Path) -> set[str]:
    """Every file of a source folder, as `transformers_misa/...` paths (caches left out)."""
    files = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        files.update(str(pathlib.Path(folder, name).relative_to(root)) for name in names if not name.endswith(".pyc"))
    return files


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    from setuptools.dist import Distribution

    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.cfg's paths are relative to the project root
    try:
        dist = Distribution({"script_name": "setup.py"})
        dist.parse_config_files(["setup.cfg"])
        build_py = dist.get_command_obj("build_py")
        build_py.build_lib = str(tmp_path_factory.mktemp("lib"))
        build_py.ensure_finalized()
        outputs = build_py.get_outputs(include_bytecode=False)
    finally:
        os.chdir(cwd)
    return {str(pathlib.Path(path).relative_to(build_py.build_lib)) for path in outputs}


def test_the_wheel_holds_every_module_and_data_file(wheel_files):
    package = {f"transformers_misa/{path}" for path in _shipped_files(ROOT / "src" / "transformers_misa")}
    kernels = {f"transformers_misa/kernels/{path}" for path in _shipped_files(ROOT / "kernels")}
    missing = sorted((package | kernels) - wheel_files)
    assert not missing, f"left out of the wheel (add the package or data to setup.cfg): {missing}"
    assert any(path.startswith("transformers_misa/trained/glm_moe_dsa/model.safetensors") for path in wheel_files)


def test_the_wheel_has_no_top_level_kernels_package(wheel_files):
    assert {path.split(os.sep)[0] for path in wheel_files} == {"transformers_misa"}


def test_the_command_line_entry_point_is_declared():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["options.entry_points"]["console_scripts"].strip() == "transformers-misa = transformers_misa.cli:main"
