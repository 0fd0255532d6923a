"""bench.realscale's real-photo rows: scikit-image's photos at exactly the view, boxes from the teacher."""

import json

import numpy as np
import torch
from PIL import Image

from bench.realscale_rows import BOX_SCORE, MIN_BOXES, PHOTOS, photo_pixels, photo_set
from stages.config import ModelParams
from stages.detectors.build import build_detector


def test_photos_are_real_rgb_images():
    for name in ("astronaut", "motorcycle_left", "motorcycle_right"):
        pixels = photo_pixels(name)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.std() > 20
    assert not np.array_equal(photo_pixels("motorcycle_left"), photo_pixels("motorcycle_right"))


def test_photo_set_resizes_to_the_view_and_takes_the_teachers_boxes(tmp_path):
    torch.manual_seed(0)
    teacher = build_detector(ModelParams(arch="retinanet", backbone="resnet18", fpn_channels=8, head_convs=1,
                                         anchor_size=16), 6).eval()
    hw = (96, 160)
    n = len(PHOTOS) + 1  # the eighth is the first photo mirrored
    data = photo_set(tmp_path / "p", hw, n, teacher, (1, 1), torch.device("cpu"))
    assert len(data.image_ids) == n
    first = np.asarray(Image.open(tmp_path / "p/images/000001.png"))
    mirrored = np.asarray(Image.open(tmp_path / f"p/images/{n:06d}.png"))
    assert first.shape == (*hw, 3) and np.array_equal(mirrored, first[:, ::-1])
    ann = json.loads((tmp_path / "p/instances.json").read_text())
    cat_ids = sorted(c["id"] for c in ann["categories"])
    with torch.no_grad():  # the boxes are the teacher's own detections on the written image
        sample = data.load(data.image_ids[0])
        image = torch.as_tensor(np.asarray(Image.open(tmp_path / "p/images/000001.png"))).permute(2, 0, 1)
        assert tuple(image.shape[-2:]) == hw and len(sample.boxes) >= 1
    per_image = [[a for a in ann["annotations"] if a["image_id"] == i] for i in data.image_ids]
    for anns in per_image:  # >= BOX_SCORE, or the MIN_BOXES best when fewer pass
        assert len(anns) >= 1
        assert all(a["score"] >= BOX_SCORE for a in anns) or len(anns) <= MIN_BOXES
        assert all(a["category_id"] in cat_ids for a in anns)
        assert all(0 <= a["bbox"][0] and a["bbox"][0] + a["bbox"][2] <= hw[1] + 1e-3 for a in anns)
