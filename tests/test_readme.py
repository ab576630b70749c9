"""Every Python block of README.md runs as written, in order, in one namespace holding the user
data the README says its snippets assume."""
import re
from pathlib import Path

import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def user_data() -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (96,), generator=g)
    loader = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 32, 16)]
    x, y = loader[0]
    return {"torch": torch, "F": F, "x": x, "y": y, "loader": loader, "images": images, "labels": labels,
            "batch_size": x.shape[0], "H": x.shape[2], "W": x.shape[3]}


def test_the_readme_has_its_snippets():
    assert len(BLOCKS) >= 7


def test_every_python_block_runs_in_order():
    namespace = user_data()
    for number, block in enumerate(BLOCKS, 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001 - name the block that failed
            raise AssertionError(f"README python block {number} failed: {err!r}\n{block}") from err
    assert namespace["tracker"].affinity.shape == (10, 10)
    assert torch.isfinite(namespace["engine"].tracker.affinity).all()
