"""Which folder layout `--data` holds, and the files in it: where the images, annotation tables,
captions.jsonl and masks/ are, read and checked once at start-up (data.py's ImageFolder calls it).

Folders (`--data FOLDER`):

- **Any image folder**: jpg / jpeg / png / webp images, in subfolders too, with `captions.jsonl`
  and `masks/` beside them (`prepare_data.py` writes both). An image `dogs/rex.jpg` is named
  `"image": "dogs/rex.jpg"` in captions.jsonl and has its mask at `masks/dogs/rex.png`; the
  concept is captions.jsonl's (`"concept": "dog"`).
- **CelebA** (the first match in FOLDER, FOLDER/celeba, FOLDER/CelebA, FOLDER/CelebAMask-HQ,
  FOLDER/CelebA-HQ wins; the summary line names it):
  - the official release (Liu et al. 2015): `img_align_celeba/` (or `img_align_celeba_png/`)
    and the annotation files `list_attr_celeba.txt`, `list_landmarks_align_celeba.txt`,
    `list_eval_partition.txt`, either all flat or under `Img/`, `Anno/`, `Eval/`. torchvision's
    `CelebA(root)` keeps the same files flat in `root/celeba/`; Kaggle's copy has `list_*.csv`
    files and `img_align_celeba/img_align_celeba/`. Text tables: a count line, a header line of
    column names, then `000001.jpg v1 v2 ...` (attributes are 1 / -1; landmarks are the five
    aligned points `lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x
    leftmouth_y rightmouth_x rightmouth_y`); `list_eval_partition.txt` has no header,
    `000001.jpg 0` with 0 = train, 1 = valid, 2 = test. `identity_CelebA.txt` is not read: the
    method needs no identity labels. Any of the tables may be missing when captions.jsonl and
    masks/ stand in for them (the toy world exports exactly that).
  - CelebA-HQ as shipped in CelebAMask-HQ (Karras et al. 2018; Lee et al. 2020):
    `CelebA-HQ-img/N.jpg` (1024x1024), `CelebAMask-HQ-attribute-anno.txt` (CelebA's table
    format; values 1 / -1, and 1 / 0 is read too: positive means > 0) and the hand-drawn
    512x512 part masks `CelebAMask-HQ-mask-anno/{N // 2000}/{N:05d}_{part}.png`.
  CelebA images are matched to annotation rows by file stem, so the PNG release reads the
  `.jpg` tables.

Mistakes in what the user wrote stop at start-up with one sentence (a folder without images, a
captions.jsonl line for an image that is not there, a mask of the wrong size). Damaged files are
found here (`check_files`) and counted in data.py's summary line, as are an image folder's images
without a mask, with the path where the first one's was looked for (`where_masks_go`).

Read next: train.py (the loop that feeds data.py's batches to the step).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


# ----------------------------------------------------------------------------------------------
# Which layout a folder holds


@dataclass
class Layout:
    name: str  # for the summary line
    root: str  # the dataset folder (annotation files, captions.jsonl, masks/ live here)
    images: str  # the folder of image files
    attributes: str | None
    landmarks: str | None
    partition: str | None
    parts: str | None  # CelebAMask-HQ-mask-anno/
    captions: str | None  # captions.jsonl
    masks: str | None  # masks/
    hq: bool = False  # CelebA-HQ: every image is the same aligned square, so its head ellipse needs no landmarks
    nested: bool = False  # an image folder: images in subfolders too, named by their path without extension


def _first_file(folders, names):
    for folder in folders:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _first_dir(folders, name):
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            return path
    return None


def find_layout(folder: str, need_captions: bool = True) -> Layout:
    """Detect which layout `folder` holds: a CelebA layout, else an image folder with captions.jsonl
    (without it too when not `need_captions`: prepare_data.py writes it); one UserError saying what
    is expected if neither."""
    if not os.path.isdir(folder):
        raise UserError(f"--data {folder} is not a folder")
    candidates = [folder] + [os.path.join(folder, n) for n in ("celeba", "CelebA", "CelebAMask-HQ", "CelebA-HQ")]
    for root in filter(os.path.isdir, candidates):
        hq = os.path.join(root, "CelebA-HQ-img")
        if os.path.isdir(hq):
            beside = [root]
            return Layout(
                name="CelebA-HQ",
                root=root,
                images=hq,
                attributes=_first_file(beside, ["CelebAMask-HQ-attribute-anno.txt"]),
                landmarks=None,
                partition=None,
                parts=_first_dir(beside, "CelebAMask-HQ-mask-anno"),
                captions=_first_file(beside, ["captions.jsonl"]),
                masks=_first_dir(beside, "masks"),
                hq=True,
            )
        for parent, style in ((root, "flat"), (os.path.join(root, "Img"), "Img/Anno/Eval")):
            for images_name in ("img_align_celeba", "img_align_celeba_png"):
                images = os.path.join(parent, images_name)
                if not os.path.isdir(images):
                    continue
                kaggle = os.path.isdir(os.path.join(images, images_name))
                if kaggle:
                    # Kaggle's zip nests the folder in itself: img_align_celeba/img_align_celeba/.
                    images = os.path.join(images, images_name)
                name = "Kaggle CelebA" if kaggle else f"official CelebA ({style})"
                if os.path.basename(root) == "celeba" and root != folder:
                    name = "torchvision CelebA (celeba/)"
                annotations = [root, os.path.join(root, "Anno"), os.path.join(root, "Eval")]
                # captions.jsonl and masks/ sit beside the image folder, or in the dataset folder.
                beside = list(dict.fromkeys([os.path.dirname(images), root]))
                return Layout(
                    name=name,
                    root=root,
                    images=images,
                    attributes=_first_file(annotations, ["list_attr_celeba.txt", "list_attr_celeba.csv"]),
                    landmarks=_first_file(
                        annotations, ["list_landmarks_align_celeba.txt", "list_landmarks_align_celeba.csv"]
                    ),
                    partition=_first_file(annotations, ["list_eval_partition.txt", "list_eval_partition.csv"]),
                    parts=None,
                    captions=_first_file(beside, ["captions.jsonl"]),
                    masks=_first_dir(beside, "masks"),
                )
    captions = os.path.join(folder, "captions.jsonl")
    if os.path.isfile(captions) or (not need_captions and any_image(folder)):
        return Layout(name="image folder", root=folder, images=folder, attributes=None, landmarks=None,
                      partition=None, parts=None, captions=captions if os.path.isfile(captions) else None,
                      masks=_first_dir([folder], "masks"), nested=True)
    if not any_image(folder):
        raise UserError(
            f"no CelebA found in {folder} and no images (jpg, jpeg, png, webp) in it or its subfolders; point --data at "
            f"a folder of images with captions.jsonl and masks/ beside them, or at CelebA (img_align_celeba/ with "
            f"list_attr_celeba.txt and list_landmarks_align_celeba.txt, or CelebA-HQ-img/ with "
            f"CelebAMask-HQ-attribute-anno.txt)"
        )
    raise UserError(
        f"{folder} holds images but no captions.jsonl and no CelebA layout; write captions and masks for them with "
        f"python prepare_data.py --data {folder} --concept WORD"
    )


def file_stem(filename: str) -> str:
    # os.path.splitext(os.path.basename(...)) at a quarter of the cost: 600k calls at start-up
    base = filename[filename.rfind("/") + 1 :]
    dot = base.rfind(".")
    return base[:dot] if dot > 0 else base


def relative_stem(path: str) -> str:
    """An image folder's name for `dogs/rex.jpg` (or `./dogs\\rex.jpg`): `dogs/rex`."""
    path = os.path.normpath(path.replace("\\", "/")).replace(os.sep, "/")
    dot, slash = path.rfind("."), path.rfind("/")
    return path[:dot] if dot > slash + 1 else path


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def scan_images(folder: str, nested: bool = False) -> dict[str, str]:
    """{name: path relative to `folder`} of its images: CelebA's flat folders by stem; with
    `nested`, every subfolder too, by relative path without extension (`masks/` is not images)."""
    if not nested:
        with os.scandir(folder) as entries:
            return {file_stem(e.name): e.name for e in entries if _is_image(e.name) and e.is_file()}
    found = {}
    for parent, dirs, names in os.walk(folder):
        if parent == folder:
            dirs[:] = [d for d in dirs if d != "masks"]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # hidden folders (.cache, .git) hold no data
        for name in names:
            if _is_image(name):
                relative = os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
                found[relative_stem(relative)] = relative
    return found


def any_image(folder: str) -> bool:
    for _, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(_is_image(n) for n in names):
            return True
    return False


def scan_parts(folder, subject_parts):
    """{stem of N.jpg: (paths of its subject part masks)} from CelebAMask-HQ-mask-anno/{k}/:
    the parts named in `subject_parts` (data.py's SUBJECT_PARTS)."""
    found = {}
    with os.scandir(folder) as shards:
        for shard in shards:
            if not shard.is_dir():
                continue
            with os.scandir(shard.path) as entries:
                for e in entries:
                    index, _, part = e.name[:-4].partition("_")
                    if e.name.endswith(".png") and part in subject_parts and index.isdigit():
                        found.setdefault(str(int(index)), []).append(e.path)
    return {stem: tuple(sorted(paths)) for stem, paths in found.items()}


def read_table(path: str, dtype, width: int | None = None):
    """Read a CelebA annotation table -> (column names or None, {stem: row}, rows (N, K) array, bad stems).

    Text tables may start with a count line and a header line of column names (attributes,
    landmarks) or have neither (partition); Kaggle's .csv tables start with `image_id,...`.
    A row with the wrong number of fields or a non-number is bad: its image counts as without
    annotations. All values are converted by one numpy call (200k rows of 40 values would
    take 300 MB as Python strings and seconds as 200k small arrays)."""
    columns, stems, values, bad = None, [], [], set()
    csv = path.endswith(".csv")
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            fields = line.strip().split(",") if csv else line.split()
            if not fields or fields == [""]:
                continue
            if n == 0 and len(fields) == 1 and fields[0].isdigit():
                continue  # the count line
            if not fields[0].lower().endswith(IMAGE_EXTENSIONS):
                if columns is None and not stems:
                    columns = fields[1:] if csv else fields  # csv headers name the image column too
                continue
            if width is None:
                width = len(columns) if columns is not None else len(fields) - 1
            if len(fields) != width + 1:
                bad.add(file_stem(fields[0]))
                continue
            stems.append(file_stem(fields[0]))
            values.append(" ".join(fields[1:]))
    try:
        table = np.loadtxt(io.StringIO("\n".join(values)), dtype=dtype, ndmin=2) if values else None
    except ValueError:
        # Some value is not a number: find its rows one by one (only for a damaged file).
        parsed = {}
        for stem, row in zip(stems, values):
            try:
                parsed[stem] = np.array(row.split(), dtype=dtype)
            except ValueError:
                bad.add(stem)
        stems, table = list(parsed), np.stack(list(parsed.values())) if parsed else None
    table = table if table is not None else np.zeros((0, width or 0), dtype=dtype)
    index = {stem: k for k, stem in enumerate(stems)}
    return columns, index, table, bad - index.keys()


# ----------------------------------------------------------------------------------------------
# What the user wrote, checked at start-up; damaged files


def check_captions_name_existing_images(layout: Layout, named, files):
    """A captions.jsonl line for an image that is not in the folder is a mistake (a typo, a moved
    folder): one sentence, before any model loads, rather than a silently smaller dataset."""
    absent = sorted(set(named) - files.keys())
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise UserError(
            f"{layout.captions} has a line for {absent[0]}{more}, which is not an image in {layout.images}; "
            f"fix or remove those lines, or put the images back"
        )


def where_masks_go(layout: Layout, image: str, masks: dict[str, str]) -> str:
    """For an image folder's `image` (its path in the folder) that has no mask: where its mask was
    looked for, the layout masks/ must mirror, and a mask of its name found at another path."""
    name = relative_stem(image)
    expected = os.path.join(layout.masks or os.path.join(layout.root, "masks"), name + ".png")
    text = (f"the first without a mask, {image}, has none at {expected}: masks/ must mirror the image folder, "
            f"each mask at its image's path and name with .png")
    elsewhere = sorted(m for n, m in masks.items() if n.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1])
    return text + (f"; masks/{elsewhere[0]} is there, at another path" if elsewhere else "")


def check_files(paths: list[str], mask_paths: list[str | None]) -> list[bool]:
    """Which images (and their masks/ masks) are readable; a mask whose size is not its image's
    is a UserError naming it (a mask for another image, or one saved at another resolution,
    would put the subject in the wrong place)."""

    def check(path, mask_path):
        if not image_is_readable(path):
            return True, False
        if mask_path is None:
            return True, True
        try:
            with Image.open(path) as im, Image.open(mask_path) as m:
                return im.size == m.size, True
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return True, False

    # Threads overlap the small reads (file systems, network ones above all, are latency-bound);
    # one task per chunk of files, as a task per file costs more than the check itself.
    pairs = list(zip(paths, mask_paths))
    chunks = [pairs[k : k + 512] for k in range(0, len(pairs), 512)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = [r for chunk in pool.map(lambda c: [check(*p) for p in c], chunks) for r in chunk]
    wrong = [k for k, (size_ok, _) in enumerate(results) if not size_ok]
    if wrong:
        k = wrong[0]
        with Image.open(paths[k]) as im, Image.open(mask_paths[k]) as m:
            (w, h), (mw, mh) = im.size, m.size
        more = f" ({len(wrong)} masks differ from their images' sizes)" if len(wrong) > 1 else ""
        raise UserError(f"mask {mask_paths[k]} is {mw}x{mh} but its image {paths[k]} is {w}x{h}{more}; a mask in masks/ "
                        f"must have its image's size")
    return [ok for _, ok in results]


def image_is_readable(path: str) -> bool:
    """True when `path` looks like a complete JPEG, PNG or WebP; decodes it only when in doubt.

    Reading the first and last bytes catches missing, empty and truncated files (the usual
    damage of an interrupted download or unzip) in two small reads, fast enough for 200k files
    at start-up. A file without the end marker (trailing bytes, other formats) is decoded once."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 32))
            tail = f.read()
    except OSError:
        return False
    # JPEG: FFD8FF ... FFD9 (FFD9 cannot occur inside the entropy-coded data); PNG: signature ... IEND.
    if head.startswith(b"\xff\xd8\xff") and b"\xff\xd9" in tail:
        return True
    if head.startswith(b"\x89PNG\r\n\x1a\n") and tail.endswith(b"IEND\xaeB`\x82"):
        return True
    # WebP: a RIFF container whose header states the file's length (a truncated copy is shorter).
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 == size:
        return True
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return False
