"""Build the BiT-Mini upstream corpus: classes from icons, emoji and font glyphs, many random views each,
written as multi-label tar shards (train/ and val/) plus config.json and stats.json.

The output folder appears only when the build has finished: everything is written into a hidden temporary
folder beside it and renamed at the end, and the temporary folder is removed if the build fails.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..core.atomic import write_text
from ..data.shards import ShardWriter, derive_seed
from .config import APT_COMMAND, APT_PACKAGES, SOURCES, CorpusConfig, CorpusError  # noqa: F401 - re-exported
from .fonts import Font, FontError, builtin_font, find_fonts, font_codepoints, open_font
from .render import Shape, encode, render_view, signature
from .sources import Candidate, emoji_candidates, glyph_candidates, icon_candidates, svg_renderer


@dataclass
class ChosenClass:
    """A class in the corpus: its candidate, drawn shapes and label indices common to all its views."""

    candidate: Candidate
    shapes: list[Shape]
    labels: list[int] = field(default_factory=list)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def discover(cfg: CorpusConfig) -> tuple[dict[str, list[Candidate]], dict[str, Any]]:
    """Candidate classes of every requested source, and notes on what was found."""
    found: dict[str, list[Candidate]] = {}
    notes: dict[str, Any] = {}
    px = cfg.shape_px
    if "icons" in cfg.sources:
        found["icons"], notes["icons"] = icon_candidates(cfg.icon_themes, px, cfg.styles_per_class, cfg.seed)
        if notes["icons"]["svg_skipped"]:
            _log(f"corpus: {notes['icons']['svg_skipped']} SVG icons skipped: rsvg-convert is not installed "
                 "(apt-get install librsvg2-bin)")
    if "emoji" in cfg.sources:
        path = Path(cfg.emoji_font)
        if path.is_file():
            cps = font_codepoints(path.read_bytes(), name=str(path))
            found["emoji"], notes["emoji"] = emoji_candidates(path, cps, px)
        else:
            found["emoji"], notes["emoji"] = [], {"missing_font": str(path)}
    if "glyphs" in cfg.sources:
        fonts: list[Font] = []
        skipped = 0
        for p in find_fonts(cfg.font_dirs):
            try:
                fonts.append(open_font(p))
            except FontError:
                skipped += 1  # bitmap-only fonts (colour emoji) and damaged files
        fallback = not fonts
        if fallback:
            fonts = [builtin_font()]
        notes["glyphs"] = {"fonts": len(fonts), "fonts_skipped": skipped, "builtin_font": fallback,
                           "families": len({f.family for f in fonts})}
        found["glyphs"] = glyph_candidates(fonts, px, cfg.styles_per_class, cfg.seed)
    for source, cands in found.items():
        if not cands:
            raise CorpusError(f"source {source!r} found nothing to draw (searched {_where(cfg, source)}); "
                              f"install its packages: {APT_COMMAND}")
    return found, notes


def _where(cfg: CorpusConfig, source: str) -> str:
    return {"icons": ", ".join(cfg.icon_themes), "emoji": cfg.emoji_font, "glyphs": ", ".join(cfg.font_dirs)}[source]


def _order(cands: list[Candidate], seed: int, source: str) -> list[Candidate]:
    """Candidates in the order they are tried: core first, then one group after another in turn (seeded)."""
    rng = random.Random(derive_seed("order", seed, source))
    core = [c for c in cands if c.core]
    groups: dict[str, list[Candidate]] = {}
    for c in cands:
        if not c.core:
            groups.setdefault(c.group, []).append(c)
    for members in groups.values():
        rng.shuffle(members)
    rng.shuffle(core)
    names = sorted(groups)
    rng.shuffle(names)
    turns = [groups[n][i] for i in range(max((len(g) for g in groups.values()), default=0)) for n in names
             if i < len(groups[n])]
    return core + turns


def _loaded(cands: list[Candidate], workers: int) -> Iterator[tuple[Candidate, list[Shape]]]:
    """(candidate, shapes) in order; slow loaders (external SVG renderer) run in threads, a batch at a time."""
    batch = max(1, 8 * workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(0, len(cands), batch):
            part = cands[i:i + batch]
            if workers > 1 and any(c.slow for c in part):
                yield from zip(part, pool.map(lambda c: c.load(), part), strict=True)
            else:
                yield from ((c, c.load()) for c in part)


def select(found: dict[str, list[Candidate]], cfg: CorpusConfig) -> tuple[list[ChosenClass], dict[str, int]]:
    """Choose up to max_classes classes, shared evenly by the sources, skipping near-duplicate pictures."""
    chosen: list[ChosenClass] = []
    dropped: dict[str, int] = {}
    left = cfg.max_classes
    # Smaller sources first, so what they cannot fill passes to the larger ones.
    pending = sorted(found, key=lambda s: (len(found[s]), s))
    for k, source in enumerate(pending):
        quota = left // (len(pending) - k)
        kept: dict[str | None, list[np.ndarray]] = {}  # style -> signatures of kept shapes
        mine = 0
        dropped[source] = 0
        bar = tqdm(total=quota, desc=f"choosing {source}", unit="class", leave=False, disable=None)
        for cand, shapes in _loaded(_order(found[source], cfg.seed, source), cfg.workers):
            if mine >= quota:
                break
            if not shapes:
                dropped[source] += 1
                continue
            sigs = [(s.style, signature(s)) for s in shapes]
            if any(style in kept and np.abs(np.stack(kept[style]) - sig).mean(axis=1).min() < cfg.dedupe_threshold
                   for style, sig in sigs):
                dropped[source] += 1
                continue
            for style, sig in sigs:
                kept.setdefault(style, []).append(sig)
            chosen.append(ChosenClass(cand, shapes))
            mine += 1
            bar.update(1)
        bar.close()
        left -= mine
    return chosen, dropped


def label_space(chosen: list[ChosenClass], cfg: CorpusConfig) -> tuple[list[str], dict[str, int]]:
    """All label names (identities, then groups, styles, tags) and how many of each kind; sets class labels."""
    identities = [c.candidate.identity for c in chosen]
    groups = sorted({c.candidate.group for c in chosen})
    styles = sorted({s.style for c in chosen for s in c.shapes if s.style})
    group_words = {w for g in groups for w in g.split(":", 1)[1].split("-")}
    words = Counter(w for c in chosen for w in set(c.candidate.words) if w not in group_words)
    limit = max(cfg.min_tag_count, int(cfg.max_tag_share * len(chosen)))
    tags = sorted(w for w, n in words.items() if cfg.min_tag_count <= n <= limit)
    classes = identities + groups + styles + [f"tag:{w}" for w in tags]
    if len(set(classes)) != len(classes):
        raise CorpusError("two classes have the same label name")
    where = {name: i for i, name in enumerate(classes)}
    for c in chosen:
        c.labels = [where[c.candidate.identity], where[c.candidate.group]]
        c.labels += [where[f"tag:{w}"] for w in dict.fromkeys(c.candidate.words) if f"tag:{w}" in where]
    return classes, {"identity": len(identities), "group": len(groups), "style": len(styles), "tag": len(tags)}


# Shared with forked render workers (set just before the pool starts, read-only afterwards).
_JOB: dict[str, Any] = {}


def _render_one(item: tuple[int, int, int]) -> tuple[int, int, bytes, str | None]:
    """Encoded view `view` of class `cls` in split `split`, with the style of the shape drawn."""
    split, cls, view = item
    cfg: CorpusConfig = _JOB["cfg"]
    c: ChosenClass = _JOB["chosen"][cls]
    rng = np.random.default_rng([cfg.seed, split, cls, view])
    shape = c.shapes[int(rng.integers(len(c.shapes)))]
    img = render_view(shape, cfg.size, rng, c.candidate.max_rotation)
    return cls, view, encode(img, cfg.image_format, cfg.jpeg_quality), shape.style


def write_split(folder: Path, split: int, views: int, chosen: list[ChosenClass], classes: list[str],
                cfg: CorpusConfig, info: dict[str, Any]) -> dict[str, Any]:
    """Render every view of one split in a seeded random order and write it as shards."""
    order = np.random.default_rng([cfg.seed, split, 7]).permutation(len(chosen) * views)
    items = [(split, int(i) // views, int(i) % views) for i in order]
    where = {name: i for i, name in enumerate(classes)}
    n_labels = 0
    _JOB.update(cfg=cfg, chosen=chosen)
    name = "train" if split == 0 else "val"
    with ShardWriter(folder, classes, prefix=name, max_count=cfg.shard_size, info=info) as writer:
        if cfg.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(cfg.workers)
            results = pool.imap(_render_one, items, chunksize=64)
        else:
            pool, results = None, map(_render_one, items)
        try:
            for cls, view, data, style in tqdm(results, total=len(items), desc=f"rendering {name}", unit="img",
                                               disable=None):
                c = chosen[cls]
                labels = c.labels + ([where[style]] if style else [])
                n_labels += len(labels)
                writer.write(f"c{cls:05d}_v{view:03d}", data, labels, ext=cfg.image_format,
                             meta={"class": c.candidate.identity, "source": c.candidate.source})
        finally:
            if pool is not None:
                pool.terminate()
        paths = writer.close()
    return {"images": len(items), "shards": len(paths), "bytes": sum(p.stat().st_size for p in paths),
            "labels_per_image": round(n_labels / max(1, len(items)), 3)}


def build_corpus(cfg: CorpusConfig, overwrite: bool = False) -> dict[str, Any]:
    """Build the corpus described by cfg into cfg.out; return its statistics (also saved as stats.json)."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise CorpusError(f"{out}: already exists; choose a new folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished corpus is meant to be shared
    try:
        found, notes = discover(cfg)
        t_discover = time.perf_counter() - start
        chosen, dropped = select(found, cfg)
        classes, kinds = label_space(chosen, cfg)
        t_select = time.perf_counter() - start - t_discover
        per_source = Counter(c.candidate.source for c in chosen)
        _log(f"corpus: {len(chosen)} classes ({dict(per_source)}), {len(classes)} labels; rendering views")
        info = {"identity_classes": kinds["identity"], "label_kinds": kinds, "size": cfg.size,
                "sources": dict(per_source)}
        splits = {"train": write_split(tmp / "train", 0, cfg.views_per_class, chosen, classes, cfg, info)}
        if cfg.val_views_per_class:
            splits["val"] = write_split(tmp / "val", 1, cfg.val_views_per_class, chosen, classes, cfg, info)
        stats = {
            "classes": len(chosen), "classes_per_source": dict(per_source), "labels": len(classes),
            "label_kinds": kinds, "candidates_per_source": {s: len(c) for s, c in found.items()},
            "near_duplicates_or_empty_skipped": dropped, "found": notes, "splits": splits,
            "bytes": sum(s["bytes"] for s in splits.values()),
            "seconds": {"discover": round(t_discover, 1), "select": round(t_select, 1),
                        "total": round(time.perf_counter() - start, 1)},
            "svg_renderer": svg_renderer(),
        }
        write_text(tmp / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")
        write_text(tmp / "stats.json", json.dumps(stats, indent=1) + "\n")
        write_text(tmp / "classes.txt", "".join(f"{name}\n" for name in classes))
        for name in ("config.json", "stats.json", "classes.txt"):
            os.chmod(tmp / name, 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return stats
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
