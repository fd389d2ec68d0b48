"""Rebuilds this fixture from coco-tiny (see PROVENANCE.md): copies the chosen images and filters coco-tiny's
annotation files down to them. Usage: python make_fixture.py PATH/TO/coco-tiny (needs Pillow for the one
single-channel conversion)."""

import json
import shutil
import sys
from pathlib import Path

from PIL import Image

# Image ids per split and why each is here.
CHOSEN = {
    "train2017": {
        499716: "used by the detector tests; a two-part polygon",
        425988: "used by the detector tests; two-part polygons",
        204805: "grayscale photo, stored here as a single-channel JPEG; a crowd RLE region",
        180239: "a 7-part polygon",
        319492: "23 instances of 8 classes; a 5-part polygon",
        116740: "portrait, 18 instances",
        253955: "portrait, 15 instances",
    },
    "val2017": {
        5001: "used by the torchvision parity test; a crowd RLE region, 18 instances",
        10764: "used by the torchvision parity test",
        166918: "portrait, 45 instances of 8 classes; a crowd RLE region",
        357888: "36 instances; a crowd RLE region",
        184324: "32 instances; a crowd RLE region; 3-part polygons",
        349184: "portrait",
        404484: "small",
    },
}
GRAYSCALE = {204805}

# coco-tiny's annotation files have no `info` / `licenses`; these are COCO 2017's, as published in
# annotations_trainval2017.zip (the images' `license` fields refer to these ids).
INFO = {
    "description": "COCO 2017 Dataset",
    "url": "http://cocodataset.org",
    "version": "1.0",
    "year": 2017,
    "contributor": "COCO Consortium",
    "date_created": "2017/09/01",
}
LICENSES = [
    {"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "Attribution-NonCommercial-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nc/2.0/", "id": 2, "name": "Attribution-NonCommercial License"},
    {"url": "http://creativecommons.org/licenses/by-nc-nd/2.0/", "id": 3, "name": "Attribution-NonCommercial-NoDerivs License"},
    {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 4, "name": "Attribution License"},
    {"url": "http://creativecommons.org/licenses/by-sa/2.0/", "id": 5, "name": "Attribution-ShareAlike License"},
    {"url": "http://creativecommons.org/licenses/by-nd/2.0/", "id": 6, "name": "Attribution-NoDerivs License"},
    {"url": "http://flickr.com/commons/usage/", "id": 7, "name": "No known copyright restrictions"},
    {"url": "http://www.usa.gov/copyright.shtml", "id": 8, "name": "United States Government Work"},
]


def main(source: Path, out: Path) -> None:
    for split, ids in CHOSEN.items():
        full = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        images = [i for i in full["images"] if i["id"] in ids]
        assert len(images) == len(ids), f"{split}: missing ids {set(ids) - {i['id'] for i in images}}"
        annotations = [a for a in full["annotations"] if a["image_id"] in ids]
        subset = {
            "info": full.get("info", INFO),
            "licenses": full.get("licenses", LICENSES),
            "images": images,
            "annotations": annotations,
            "categories": full["categories"],
        }
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(subset, separators=(",", ":")) + "\n")
        (out / split).mkdir(exist_ok=True)
        for image in images:
            src, dst = source / split / image["file_name"], out / split / image["file_name"]
            if image["id"] in GRAYSCALE:
                rgb = Image.open(src)
                gray = rgb.convert("L")
                # The photo is grayscale (R = G = B in every decoded pixel), so dropping two channels loses nothing
                # before the JPEG re-encode.
                assert rgb.getchannel(0).tobytes() == rgb.getchannel(2).tobytes() == gray.tobytes()
                gray.save(dst, quality=95)
            else:
                shutil.copyfile(src, dst)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
