"""Planted-object data shared by the training and calibration tests; camlabel's own output for the tests that
read it."""

import re

import pytest
import torch
import torch.nn.functional as F
from camlabel.pipeline.train import TrainConfig, train
from PIL import Image

# a line Ray's driver forwards from its processes: "(raylet) ...", "(Annotator pid=12, ip=10.0.0.2) ...", in colour
RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|autoscaler |[^\n]*?\bpid=\d+[,)])")


@pytest.fixture
def capsys(capsys):
    """pytest's capsys, less the lines that Ray's log monitor prints in this process whenever one of its
    processes logs (a raylet's "disk over 95% full" came mid-test on a full CI machine, 2026-12-07): a Ray
    session started by one test lives on through the next, and a test reads what camlabel wrote."""

    def own(text: str) -> str:
        return "".join(line for line in text.splitlines(keepends=True) if not RAY_FORWARDED.match(line))

    class Captured:
        def readouterr(self):
            captured = capsys.readouterr()
            return captured._replace(out=own(captured.out), err=own(captured.err))

    return Captured()


CLASSES = ("disc", "square")
SIZE = 160


def planted(root, count: int, seed: int) -> list[tuple[str, str, tuple[int, int, int, int], torch.Tensor]]:
    """Images of a red disc or a blue square on a smooth random background; (path, class, box xyxy, mask)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    made = []
    for i in range(count):
        name = CLASSES[i % 2]
        background = F.interpolate(torch.rand(1, 3, 5, 5, generator=g) * 0.5 + 0.25, size=(SIZE, SIZE),
                                   mode="bicubic", align_corners=False)[0].clamp(0, 1)
        side = int(torch.randint(40, 57, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, SIZE - side, (2,), generator=g))
        cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
        inside = ((xs - cx) ** 2 + (ys - cy) ** 2 <= r * r) if name == "disc" else (
            (xs >= x0) & (xs < x0 + side) & (ys >= y0) & (ys < y0 + side))
        colour = torch.tensor([0.9, 0.1, 0.1] if name == "disc" else [0.1, 0.2, 0.9])[:, None, None]
        image = torch.where(inside, colour, background)
        path = root / name / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255).byte().permute(1, 2, 0).numpy()).save(path)
        made.append((str(path), name, (x0, y0, x0 + side, y0 + side), inside))
    return made


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    planted(root / "train", 48, seed=1)
    # 10 epochs: after 5 the model boxed only 5 of test_calibrate's 8 objects on a CPU without native bfloat16
    # (2026-12-02), the training's numerics being the host's; after 10 it boxed all 8 there
    spec = train(TrainConfig(images=str(root / "train"), out=str(root / "model"), epochs=10, input_size=SIZE,
                             val_fraction=0.2), progress=False)
    return root, spec


