"""The benchmark scripts: every one imports on CPU (their GPU work runs from `main`, not at import;
`streamk_ncu` is a script for the profiler, all module level), and `bench.output.write` names and
writes a result as the scripts rely on."""
import importlib
import json
import pathlib

import pytest

from bench.output import write

SCRIPTS = sorted(p.stem for p in (pathlib.Path(__file__).parents[2] / "bench").glob("*.py")
                 if p.stem not in ("__init__", "streamk_ncu"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports(name):
    importlib.import_module(f"bench.{name}")


def test_write_names_the_file_by_device_date_and_name(tmp_path, capsys):
    gpu = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-27", "value": 1.5, "path": pathlib.Path("x")}
    path = write(gpu, str(tmp_path / "new"), "neo-tag")
    assert path == str(tmp_path / "new" / "NVIDIA-H100-80GB-HBM3-2026-11-27-neo-tag.json")
    assert json.loads(pathlib.Path(path).read_text()) == {**gpu, "path": "x"}     # what JSON lacks: its str
    assert f"wrote {path}" in capsys.readouterr().out
    assert write({"date": "2026-11-27"}, str(tmp_path), "host").endswith("/cpu-2026-11-27-host.json")
    assert write(gpu, str(tmp_path), "serve-tp2", device="NVIDIA H200x2").endswith("/NVIDIA-H200x2-2026-11-27-serve-tp2.json")


def test_decode_dtype_variants():
    from bench.decode import dtype_args
    assert dtype_args("float16") == {"dtype": "float16"}
    assert dtype_args("int8+head") == {"dtype": "int8", "quant": {"lm_head": {"enabled": True}}}
    for bad in ("float16+head", "int8+tail"):
        with pytest.raises(SystemExit, match="unknown variant"):
            dtype_args(bad)
