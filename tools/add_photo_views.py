"""Append crops of photographs and textures, as new classes, to a copy of a packed corpus (BiT-Mini's eighth A/B).

The corpus `bigtransfer corpus` renders has icons, emoji and characters, and no photographs; issue 11 asked whether
natural pictures from Debian packages would make BiT-Mini's features transfer better. This adds them exemplar-style:
each picture is a class `photo:KEY`, and each cell of a 3x3 grid over a picture larger than 256 px a class
`photo:KEY@ROW,COL` too (a view gets the cell that holds its centre). A view is an Inception-style crop
(`random_resized_crop_box`, as pre-training draws) of 2-25% of the
picture's area (aspect 3/4 to 4/3), resized to 64x64; a texture tile (at most 256 px) is tiled 2x2 first and
cropped to 10-100%. The card's set was made with:

    apt-get install plasma-workspace-wallpapers ukui-wallpapers mate-backgrounds gnome-backgrounds gimp-data
    python tools/add_photo_views.py /root/bitmini/packed /root/bitmini/packed-photos --views 400

Pictures: every JPEG, PNG, WebP, GIMP pattern (.pat) and brush (.gbr) under the roots (default: Debian's wallpaper
folders and GIMP's patterns; 148 pictures on Debian 12 with those packages). A KDE wallpaper's copies at several
sizes are one picture (its largest file); screenshots and previews are left out, and files whose 16x16 thumbnails
agree are one picture. Transparent pictures are drawn over mid grey, one-colour pictures left out, and all scaled
to at most 1024 px first. The views are a function of the files and
--seed. The result is written to a hidden partial folder and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch
from add_glyph_views import SIZE, open_source, save_grid, views_parser, write_packed  # the script beside this one, in tools/
from PIL import Image

from bigtransfer.data.pretraining import random_resized_crop_box

ROOTS = ["/usr/share/wallpapers", "/usr/share/backgrounds", "/usr/share/gimp/2.0/patterns"]
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".pat", ".gbr")
LONGEST = 1024  # pictures are scaled down to this first: crops of 2% of the area stay larger than a view
TEXTURE = 256  # a picture no larger than this is a texture tile
PHOTO_SCALE = (0.02, 0.25)  # of a picture's area: a crop shows a part of it, which its grid cell names
TEXTURE_SCALE = (0.1, 1.0)  # of a 2x2 tiling of a texture tile
FLAT = 2.0  # pixel standard deviation under which a picture is one colour: nothing to tell its crops apart by


def read_gimp_pattern(path: Path) -> Image.Image:
    """A GIMP .pat file (big-endian header: size, version, width, height, bytes per pixel, b"GPAT", name; pixels)."""
    data = path.read_bytes()
    if len(data) < 24 or data[20:24] != b"GPAT":
        raise ValueError(f"{path}: not a GIMP pattern")
    header, _version, w, h, depth = struct.unpack(">5I", data[:20])
    if depth not in (1, 2, 3, 4) or len(data) < header + w * h * depth:
        raise ValueError(f"{path}: a GIMP pattern of {depth} bytes per pixel, {len(data)} bytes: truncated or unknown")
    px = np.frombuffer(data[header:header + w * h * depth], np.uint8).reshape(h, w, depth)
    return Image.fromarray(px[..., 0] if depth == 1 else px, {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[depth])


def picture_key(path: Path) -> str | None:
    """The picture a file shows: a KDE wallpaper's folder name for each of its sizes, else the file's stem."""
    if "screenshot" in path.stem or "preview" in path.stem.lower():
        return None
    parts = path.parts
    if "contents" in parts[:-1]:  # KDE: NAME/contents/images[_dark]/WxH.ext
        i = parts.index("contents")
        return parts[i - 1] + ("-dark" if parts[i + 1].endswith("_dark") else "")
    return re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem)


def find_pictures(roots: list[str]) -> dict[str, Image.Image]:
    """Key -> RGB picture (at most LONGEST px), in key order; the largest file of a key, duplicates by content out."""
    best: dict[str, tuple[int, Path]] = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in sorted(files):
                path = Path(os.path.realpath(os.path.join(folder, name)))
                key = picture_key(path)
                if key is None or path.suffix.lower() not in SUFFIXES:
                    continue
                size = path.stat().st_size
                if key not in best or size > best[key][0]:
                    best[key] = (size, path)
    pictures: dict[str, Image.Image] = {}
    seen: set[str] = set()
    for key in sorted(best):
        path = best[key][1]
        try:
            im = opaque(read_gimp_pattern(path) if path.suffix.lower() == ".pat" else Image.open(path))
        except (OSError, ValueError) as e:
            print(f"skipped {path}: {e}")
            continue
        if max(im.size) > LONGEST:
            s = LONGEST / max(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.BOX)
        if np.asarray(im).std() < FLAT:
            print(f"skipped {path}: a flat picture")
            continue
        thumb = hashlib.sha1((np.asarray(im.resize((16, 16), Image.BOX)) // 16).tobytes()).hexdigest()
        if thumb not in seen:
            seen.add(thumb)
            pictures[key] = im
    return pictures


def opaque(im: Image.Image) -> Image.Image:
    """RGB; a picture with transparency drawn over mid grey first (MATE's stripes are drawn in their alpha alone:
    dropping it left them one flat colour)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (128, 128, 128, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def crop_views(im: Image.Image, n: int, gen: torch.Generator) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """n random crops of `im` as SIZE x SIZE x 3 uint8 views, and the grid cell of each one's centre ((-1, -1): a
    texture, which has no cells)."""
    texture = max(im.size) <= TEXTURE
    if texture:
        im = Image.fromarray(np.tile(np.asarray(im), (2, 2, 1)))
    scale = TEXTURE_SCALE if texture else PHOTO_SCALE
    W, H = im.size
    views, cells = [], []
    for _ in range(n):
        box = random_resized_crop_box(W, H, gen, scale)
        views.append(np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR, box=box, reducing_gap=2.0), np.uint8))
        x, y = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        cells.append((-1, -1) if texture else (min(2, 3 * y // H), min(2, 3 * x // W)))
    return views, cells


def new_views(pictures: dict[str, Image.Image], classes: list[str], views: int, seed: int,
              limit: int | None = None) -> tuple[list[np.ndarray], list[list[int]], list[str]]:
    """`views` crops of every picture, their labels, and `classes` followed by the new class names."""
    gen = torch.Generator().manual_seed(seed)
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}

    def label(name: str) -> int:
        if name not in index:
            index[name] = len(classes)
            classes.append(name)
        return index[name]

    images: list[np.ndarray] = []
    targets: list[list[int]] = []
    for key, im in pictures.items():
        if limit is not None and len(images) >= limit:
            break
        crops, cells = crop_views(im, views, gen)
        for crop, (r, c) in zip(crops, cells, strict=True):
            images.append(crop)
            targets.append([label(f"photo:{key}")] + ([label(f"photo:{key}@{r},{c}")] if r >= 0 else []))
    return images, targets, classes


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    p = views_parser(__doc__, "a grid of 4 crops of each of the first 24 pictures")
    p.add_argument("--views", type=positive, default=400, help="crops of each picture (default %(default)s)")
    p.add_argument("--roots", nargs="+", default=ROOTS, help="folders to find pictures in (default: %(default)s)")
    p.add_argument("--seed", type=int, default=8, help="seed of the crops (default %(default)s, the card's)")
    args = p.parse_args(argv)
    packed = open_source(args.src, args.dst, args.preview is not None)
    pictures = find_pictures(args.roots)
    if not pictures:
        raise SystemExit(f"no picture under {', '.join(args.roots)} (see the module doc for the packages)")
    if args.preview:  # four crops of each of the first 24 pictures
        save_grid(new_views(pictures, packed.classes, 4, args.seed, limit=96)[0], args.preview)
        return 0
    images, targets, classes = new_views(pictures, packed.classes, args.views, args.seed)
    print(f"{len(pictures)} pictures: {len(images)} new views, {len(classes) - len(packed.classes)} new classes")
    note = f"tools/add_photo_views.py --views {args.views} --seed {args.seed}" + (" --only-new" if args.only_new else "")
    write_packed(args.src, args.dst, images, targets, args.only_new, note, classes)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
