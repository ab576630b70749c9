"""The `mtdl-fast demo` command: PNG of the views, their timing, clean errors."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtdl_fast.app.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_demo_quick_writes_png_and_timing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0

    png = out / "views.png"
    assert png.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        w, h = im.size
        assert w > 400 and h > 400   # 10 task rows x 8 image columns
        grey = np.asarray(im.convert("L"))
        assert len(np.unique(grey)) > 50   # real pictures, not a blank canvas

    stdout = capsys.readouterr().out
    timing = re.search(r"10 views of 32 images \(64, 64\) on cpu: ([0-9.]+) ms/call, ([0-9,]+) images/s", stdout)
    assert timing is not None, stdout
    assert float(timing.group(1)) > 0 and int(timing.group(2).replace(",", "")) > 0


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_demo_unknown_device_is_exit_2(tmp_path, capsys, device):
    assert main(["demo", "--quick", "--device", device, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "device" in err and device in err
    assert "Traceback" not in err
    assert not (tmp_path / "views.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_demo_cuda_without_gpu_is_exit_2(tmp_path, capsys):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err


def test_usage_errors_are_exit_2(capsys):
    assert main(["no-such-command"]) == 2
    assert main(["demo", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "mtdl_fast", "demo", "--device", "tpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown device" in proc.stderr and "Traceback" not in proc.stderr
