"""Training data for CoCoIns: images, two captions, a subject mask and SDXL's size conditioning per item.

CoCoIns trains its mapping network on CelebA (paper section 4: captions from a captioning
model, subject masks from a referring segmenter) and extends to other categories the same way.
Each training triplet needs, per image: the VAE latent `x`, two different captions `P1`, `P2`
that both name the subject with one concept word (`woman`, `dog`), the subject mask `m` at
latent resolution, and the six numbers of SDXL's micro-conditioning. This file produces exactly
that from the folders users have.

Reading order: the training item and the dataset that makes it (`ImageFolder`, and `collate`
that batches items); captions (captions.jsonl, or composed from CelebA's attributes); masks;
geometry (resize and crop); the latent cache. Which folder layout `--data` holds (CelebA's
releases, CelebA-HQ, any image folder with captions.jsonl and masks/) and the checks of its files
are folders.py's.

Captions. A `captions.jsonl` in the dataset folder (or beside the image folder) wins, one
JSON object per line:
    {"image": "000001.jpg", "captions": ["a woman with wavy hair", "a smiling woman"], "concept": "woman"}
at least two different captions, each containing the concept word as a whole word (lines that
break this fall back to the attributes). Each epoch draws two of them. Without the file, two
different captions are composed from CelebA's 40 attributes (`attribute_captions`).

Masks m (1 on the subject), in this order: a PNG of the image's size and name in `masks/`
beside the images (any nonzero pixel is subject); the CelebAMask-HQ parts in
`SUBJECT_PARTS`; a head ellipse from the aligned landmarks (`head_ellipse`).

Geometry follows SDXL's training convention (Podell et al. 2023, sec. 2.2; diffusers'
train_text_to_image_sdxl.py): the shorter side is resized to the resolution R, a square
R x R is cropped (center by default), and time_ids = (orig_h, orig_w, crop_top, crop_left,
R, R) with the original size of the file and the crop offsets in resized pixels. Masks go
through the same crop and are area-averaged to R/8, so a mask value is the subject fraction
of its latent cell.

Damaged data never stops a run: unreadable or unannotated images are counted in one summary
line at start-up (`ImageFolder.summary`); an image that still fails to decode later is replaced
by the next good one with a warning. `LatentCache` keeps VAE latents on disk.

Read next: folders.py (which folder layout `--data` holds), then train.py.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import re
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import folders
from model.errors import UserError

PARTITIONS = {"train": 0, "valid": 1, "test": 2}


@dataclass
class DataConfig:
    root: str  # --data: an image folder with captions.jsonl and masks/, or CelebA / CelebA-HQ (folders.py)
    resolution: int = 1024  # training size R (SDXL's native 1024); latents and masks are R/8
    split: str = "all"  # all | train | valid | test (list_eval_partition.txt); the mapper needs no held-out faces
    crop: str = "center"  # center | random square crop after resizing the shorter side to R
    seed: int = 0  # with the epoch, fixes random crops and which captions each image gets


# ----------------------------------------------------------------------------------------------
# A training item, the dataset that makes it, and the batch
#
# The dataset yields one dict per image:
#   key       str, the image path relative to the dataset folder (stable across runs)
#   image     (3, R, R) float32 in [-1, 1]   — or, when the latent cache holds it already,
#   latent    (4, R/8, R/8) the cached scaled latent
#   cache_key str, the entry name in the cache (only with a cache)
#   mask      (1, R/8, R/8) float32, the subject fraction of each latent cell
#   captions  (P1, P2), two different strings naming the subject with `concept`
#   concept   str, the concept word (man, woman, person, or captions.jsonl's)
#   time_ids  (6,) float32 = (orig_h, orig_w, crop_top, crop_left, R, R)


class ImageFolder(torch.utils.data.Dataset):
    """Training items (see "A training item" above) from any folder layout `folders.find_layout` knows.

    Captions and random crops depend on (seed, epoch, key): call `set_epoch` before each
    epoch's iterator is created (workers copy the dataset then; no persistent_workers)."""

    def __init__(self, cfg: DataConfig, cache: LatentCache | None = None, caption_ok=None):
        if cfg.resolution <= 0 or cfg.resolution % 8:
            raise UserError(f"resolution {cfg.resolution} must be a positive multiple of 8 (latents are resolution/8)")
        if cfg.crop not in ("center", "random"):
            raise UserError(f"crop {cfg.crop!r} is not one of center, random")
        if cfg.split != "all" and cfg.split not in PARTITIONS:
            raise UserError(f"split {cfg.split!r} is not one of all, train, valid, test")
        self.cfg, self.cache, self.epoch = cfg, cache, 0
        layout = self.layout = folders.find_layout(cfg.root)
        if cfg.split != "all" and layout.partition is None:
            raise UserError(
                f"split {cfg.split!r} needs CelebA's list_eval_partition.txt, which {layout.root} does not have; "
                f"use split all"
            )
        files = folders.scan_images(layout.images, nested=layout.nested)
        if not files and layout.nested:
            raise UserError(f"no images (jpg, jpeg, png, webp) in {layout.images} or its subfolders")

        # Caption sources: captions.jsonl first, the attribute table second.
        jsonl, bad_jsonl = {}, set()
        if layout.captions:
            jsonl, bad_jsonl = read_captions(layout.captions, caption_ok, key=folders.relative_stem if layout.nested else None)
            folders.check_captions_name_existing_images(layout, jsonl.keys() | bad_jsonl, files)
        self.attribute_names, attr_index, self.attributes, bad_attrs = [], {}, None, set()
        if layout.attributes:
            names, attr_index, self.attributes, bad_attrs = folders.read_table(layout.attributes, np.int8)
            self.attribute_names = names or []
            # Values are 1 / -1 (CelebA, CelebAMask-HQ) or 1 / 0: anything else marks a broken row.
            broken = [s for s, row in attr_index.items() if np.abs(self.attributes[row]).max(initial=0) > 1]
            for stem in broken:
                del attr_index[stem]
                bad_attrs.add(stem)
        # Mask sources: masks/ first, CelebAMask-HQ parts second, landmarks last.
        landmark_index, self.landmarks = {}, None
        if layout.landmarks:
            columns, landmark_index, table, _ = folders.read_table(layout.landmarks, np.float32, width=len(LANDMARK_COLUMNS))
            if columns and set(LANDMARK_COLUMNS) <= set(columns):
                table = table[:, [columns.index(c) for c in LANDMARK_COLUMNS]]
            self.landmarks = table
        given_masks = folders.scan_images(layout.masks, nested=layout.nested) if layout.masks else {}
        parts = folders.scan_parts(layout.parts, SUBJECT_PARTS) if layout.parts else {}

        # Every image the folder or its caption annotations name, limited to the split.
        named = set(files) | jsonl.keys() | attr_index.keys() | bad_jsonl | bad_attrs
        if cfg.split != "all":
            _, partition_index, partition, _ = folders.read_table(layout.partition, np.int8, width=1)
            wanted = PARTITIONS[cfg.split]
            named = {s for s in named if s in partition_index and partition[partition_index[s], 0] == wanted}

        counts = {"missing": 0, "unreadable": 0, "without annotations": 0}
        candidates, maskless = [], []  # maskless: images with captions but no mask source
        for stem in sorted(named):
            if stem not in files:
                counts["missing"] += 1
            elif (stem in jsonl or stem in attr_index) and (
                stem in given_masks or stem in parts or stem in landmark_index or layout.hq
            ):
                candidates.append(stem)
            else:
                counts["without annotations"] += 1
                if stem in jsonl or stem in attr_index:
                    maskless.append(stem)
        paths = [os.path.join(layout.images, files[s]) for s in candidates]
        mask_paths = [os.path.join(layout.masks, given_masks[s]) if s in given_masks else None for s in candidates]
        readable = folders.check_files(paths, mask_paths)
        counts["unreadable"] = readable.count(False)

        # One small record per usable image; attributes and landmarks stay rows of numpy tables.
        self.items, caption_sources, mask_sources = [], collections.Counter(), collections.Counter()
        for stem, path, mask_path, ok in zip(candidates, paths, mask_paths, readable):
            if not ok:
                continue
            captions = jsonl.get(stem)  # else the attribute row composes them
            caption_sources["captions.jsonl" if captions else "attributes"] += 1
            if mask_path is not None:
                mask = ("masks/", mask_path)
            elif stem in parts:
                mask = ("CelebAMask-HQ parts", parts[stem])
            else:
                mask = ("head ellipses", landmark_index.get(stem))
            mask_sources[mask[0]] += 1
            key = os.path.relpath(path, layout.root).replace(os.sep, "/")
            self.items.append((key, path, captions, attr_index.get(stem), mask))

        total, where = len(named), f"{layout.name} at {layout.root}"
        reasons = ", ".join(f"{n} {why}" for why, n in counts.items() if n)
        if maskless and layout.nested:  # masks/ is an image folder's one mask source: say where it was looked for
            reasons += f" ({folders.where_masks_go(layout, files[maskless[0]], given_masks)})"
        if not self.items:
            raise UserError(
                f"nothing usable in {where} (split {cfg.split}: {reasons or 'no images'}); each image needs a readable "
                f"file, captions (captions.jsonl or the attribute table) and a mask source (masks/, CelebAMask-HQ "
                f"parts or landmarks)"
            )
        sources = lambda c: ", ".join(f"{n} from {src}" for src, n in sorted(c.items()))
        skipped = total - len(self.items)
        self.summary = (
            f"{where}: {len(self.items)} images (split {cfg.split}; captions {sources(caption_sources)}; "
            f"masks {sources(mask_sources)}); "
            + (f"skipped {skipped} of {total} images: {reasons}" if skipped else "nothing skipped")
        )
        self._broken = set()  # indices that failed to load after start-up (per worker process)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def concepts(self) -> dict[str, int]:
        """Concept word -> how many usable images name it, most common first (what a mapper records
        it was trained on). The same word an item gets: captions.jsonl's, else the attribute row's."""
        male = self.attribute_names.index("Male") if "Male" in self.attribute_names else None
        counts = collections.Counter()
        for _, _, captions, attr_row, _ in self.items:
            if captions is not None:
                counts[captions[1]] += 1
            else:  # concept_from_attributes reads Male alone: only it is looked up (CelebA has 200,000 rows)
                attrs = {} if male is None else {"Male": bool(self.attributes[attr_row, male] > 0)}
                counts[concept_from_attributes(attrs)] += 1
        return dict(counts.most_common())

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        # A file that passed the start-up check can still fail to decode (or vanish): use the
        # next good image, so a long run never dies on one bad file.
        for attempt in range(min(len(self.items), 64)):
            i = (index + attempt) % len(self.items)
            if i in self._broken:
                continue
            try:
                return self._load(i)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
                self._broken.add(i)
                warnings.warn(f"skipping {self.items[i][1]}: it or its mask cannot be read ({e})", RuntimeWarning)
        raise UserError(
            f"{min(len(self.items), 64)} images in a row could not be read from {self.layout.images}; check the "
            f"disk and the folder"
        )

    def _load(self, i: int) -> dict:
        key, path, captions, attr_row, (mask_kind, mask_source) = self.items[i]
        R, r = self.cfg.resolution, self.cfg.resolution // 8
        rng = random.Random(f"{self.cfg.seed}:{self.epoch}:{key}")
        item = {"key": key}
        with Image.open(path) as im:
            w, h = im.size  # from the header: a cached latent needs no decoding
            crop = square_crop(h, w, R, rng if self.cfg.crop == "random" else None)
            latent = None
            if self.cache is not None:
                item["cache_key"] = self.cache.key(key, path, R, crop)
                latent = self.cache.load(item["cache_key"])
            if latent is not None:
                item["latent"] = latent
            else:
                pixels = np.asarray(im.convert("RGB").resize((R, R), Image.BICUBIC, box=crop.box), dtype=np.float32)
                # x = pixel / 127.5 − 1 ∈ [−1, 1]
                item["image"] = torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0

        if mask_kind == "head ellipses":
            landmarks = None if mask_source is None else self.landmarks[mask_source]
            mask = ellipse_mask(head_ellipse(landmarks, h, w), crop, r)
        else:
            # A given mask or the subject parts: union of nonzero pixels, then the image's crop.
            full = None
            for mask_path in (mask_source,) if mask_kind == "masks/" else mask_source:
                with Image.open(mask_path) as m:
                    part = np.asarray(m.convert("L")) > 0
                full = part if full is None else full | part
            mask = resample_mask(full, crop, h, w, r)
        item["mask"] = torch.from_numpy(mask)[None]

        if captions is not None:
            texts, concept = captions
            item["captions"], item["concept"] = tuple(rng.sample(texts, 2)), concept
        else:
            attrs = {name: bool(v > 0) for name, v in zip(self.attribute_names, self.attributes[attr_row])}
            item["captions"], item["concept"] = attribute_captions(attrs, rng)
        item["time_ids"] = torch.tensor([h, w, crop.top, crop.left, R, R], dtype=torch.float32)
        return item


def collate(items: list[dict]) -> dict:
    """Batch items whose pixels may or may not be cached already (use as DataLoader collate_fn).

    -> key, captions, concept (lists); mask (B, 1, R/8, R/8); time_ids (B, 6); image (M, 3, R, R)
    or None with image_rows (M,) its rows in the batch; latent (B−M, 4, R/8, R/8) or None with
    latent_rows; cache_key (list) with a cache. `LatentCache.fill(batch)` assembles the
    latents of all B rows; without a cache every row is an image, in batch order."""
    batch = {name: [it[name] for it in items] for name in ("key", "captions", "concept")}
    batch["mask"] = torch.stack([it["mask"] for it in items])
    batch["time_ids"] = torch.stack([it["time_ids"] for it in items])
    for name in ("image", "latent"):
        rows = [n for n, it in enumerate(items) if name in it]
        batch[name] = torch.stack([items[n][name] for n in rows]) if rows else None
        batch[name + "_rows"] = torch.tensor(rows, dtype=torch.long)
    if "cache_key" in items[0]:
        batch["cache_key"] = [it["cache_key"] for it in items]
    return batch


# ----------------------------------------------------------------------------------------------
# Captions


# The concept words of people: the paper's five subject words, in the order its evaluation
# lists them (Portraits: "A [subject] is looking at the camera." for man, woman, boy, girl and
# person). CelebA's attribute captions name the first two or the last; prepare_data.py's
# --concept auto chooses among all five; sample.py looks for them when --concept is not given;
# eval.py numbers its codes and seeds in this order, so the order is fixed.
PEOPLE = ("man", "woman", "boy", "girl", "person")


def concept_pattern(concept: str) -> re.Pattern:
    """The concept as a whole word, any case: "woman" matches "A woman's hat", not "womanly" or
    "superwoman"; a concept of several words ("teddy bear") matches them with any spacing."""
    words = r"\s+".join(re.escape(w) for w in concept.split())
    # Lookarounds rather than \b, so a concept that starts or ends with a non-letter works too.
    return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)


def count_concept(caption: str, concept: str) -> int:
    """How often `caption` names `concept` as a whole word (prepare_data.py wants exactly once)."""
    return len(concept_pattern(concept).findall(caption)) if concept.strip() else 0


def read_captions(path: str, caption_ok=None, key=None):
    """captions.jsonl -> ({image key: (captions, concept)}, bad keys); see the module docstring.

    `key(image) -> str` turns the line's "image" into the key the images are scanned under (its
    stem by default: CelebA's flat folders). `caption_ok(caption, concept) -> bool`, when given,
    is a further test a caption must pass (train.py checks with the tokenizer that the concept
    word survives truncation to 77 tokens)."""
    key = key or folders.file_stem
    good, bad = {}, set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                image, captions, concept = entry["image"], entry["captions"], entry["concept"]
            except (ValueError, KeyError, TypeError):
                continue  # no image name to blame: the line is simply unusable
            if not isinstance(image, str):
                continue
            concept = str(concept)
            captions = captions if isinstance(captions, list) else []
            # distinct captions that name the concept as a whole word
            usable = list(dict.fromkeys(c for c in captions if isinstance(c, str) and count_concept(c, concept)
                                        and (caption_ok is None or caption_ok(c, concept))))
            if len(usable) >= 2:
                good[key(image)] = (usable, concept)
            else:
                bad.add(key(image))
    return good, bad - good.keys()


# Captions from CelebA's attributes
#
# Concept word: Male > 0 -> "man", otherwise "woman"; no Male column -> "person". CelebA's
# "Young" marks young-looking adults (about three quarters of the images), not children, so
# it becomes the adjective "young" (a young man), never "boy" or "girl": captioning adults
# as children would teach the mapper the wrong concept. boy / girl come only from captions.jsonl.

_TEMPLATES = (
    "a photo of {}", "a portrait photo of {}", "a close-up of {}", "a headshot of {}", "a picture of {}", "{}",
)
_ADJECTIVES = {"Young": "young", "Chubby": "chubby"}
_HAIR_COLORS = {"Black_Hair": "black", "Blond_Hair": "blond", "Brown_Hair": "brown", "Gray_Hair": "gray"}
_HAIR_STYLES = {"Wavy_Hair": "wavy", "Straight_Hair": "straight"}
_WITH = {
    "Bangs": "bangs", "Receding_Hairline": "a receding hairline", "Goatee": "a goatee",
    "Mustache": "a mustache", "5_o_Clock_Shadow": "stubble", "Sideburns": "sideburns",
    "Arched_Eyebrows": "arched eyebrows", "Bushy_Eyebrows": "bushy eyebrows", "Big_Lips": "full lips",
    "Big_Nose": "a big nose", "Pointy_Nose": "a pointy nose", "Narrow_Eyes": "narrow eyes",
    "Bags_Under_Eyes": "bags under the eyes", "High_Cheekbones": "high cheekbones",
    "Rosy_Cheeks": "rosy cheeks", "Oval_Face": "an oval face", "Pale_Skin": "pale skin",
    "Double_Chin": "a double chin", "Mouth_Slightly_Open": "a slightly open mouth",
    "Heavy_Makeup": "heavy makeup",
}
_WEARING = {
    "Eyeglasses": "glasses", "Wearing_Hat": "a hat", "Wearing_Earrings": "earrings",
    "Wearing_Necklace": "a necklace", "Wearing_Necktie": "a necktie", "Wearing_Lipstick": "lipstick",
}
# Attractive and Blurry are judgements about the photo, not the person's appearance: unused.


def concept_from_attributes(attrs: dict[str, bool]) -> str:
    if "Male" not in attrs:
        return "person"
    return "man" if attrs["Male"] else "woman"


def _and(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _describe(concept, attrs, rng):
    """One noun phrase naming the concept, with a random subset of the true attributes."""
    adjectives = [a for k, a in _ADJECTIVES.items() if attrs.get(k) and rng.random() < 0.5]
    head = " ".join(adjectives + [concept])
    text = ("an " if head[0] in "aeiou" else "a ") + head
    features = []
    if attrs.get("Bald"):
        features.append("a bald head")
    else:
        hair = [a for k, a in _HAIR_STYLES.items() if attrs.get(k)]
        hair += [a for k, a in _HAIR_COLORS.items() if attrs.get(k)]
        if hair and rng.random() < 0.7:
            features.append(" ".join(hair[:2]) + " hair")
    others = [a for k, a in _WITH.items() if attrs.get(k)]
    if "No_Beard" in attrs and not attrs["No_Beard"]:
        others.append("a beard")
    features += rng.sample(others, min(len(others), rng.randint(0, 2)))
    wearing = [a for k, a in _WEARING.items() if attrs.get(k)]
    wearing = rng.sample(wearing, min(len(wearing), rng.randint(0, 2)))
    if features:
        text += " with " + _and(features)
    if wearing:
        text += (", " if features else " ") + "wearing " + _and(wearing)
    if attrs.get("Smiling") and rng.random() < 0.7:
        text += ", smiling"
    return text


def attribute_captions(attrs: dict[str, bool], rng: random.Random) -> tuple[tuple[str, str], str]:
    """Two different captions and the concept word, both captions naming the concept once."""
    concept = concept_from_attributes(attrs)
    # Two different templates make two different captions whatever the descriptions draw.
    t1, t2 = rng.sample(_TEMPLATES, 2)
    return (t1.format(_describe(concept, attrs, rng)), t2.format(_describe(concept, attrs, rng))), concept


# ----------------------------------------------------------------------------------------------
# Masks
#
# The subject is what identifies the person: the face and the hair. Eyeglasses and earrings
# are inside that silhouette (leaving them out would punch holes into the eyes and ears).
# Not subject: hat, neck, necklace and cloth — what prompts change ("a woman in a red hat"),
# so the background loss keeps them following the prompt; the landmark ellipse, the fallback
# for images without parts, covers the same head region. (A mask in masks/, e.g. from
# prepare_data.py, covers whatever its concept word refers to: the whole person, the whole dog.)
SUBJECT_PARTS = (
    "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "hair",
)

# The five aligned landmarks, in the column order of list_landmarks_align_celeba.txt.
LANDMARK_COLUMNS = (
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
)


def resample_mask(mask: np.ndarray, crop: Crop, h: int, w: int, r: int) -> np.ndarray:
    """A (mh, mw) mask covering the whole (h, w) image -> (r, r) subject fractions inside the crop.

    Part masks are 512 px for 1024 px images, so the crop box is rescaled to the mask's size;
    the BOX filter area-averages, which is what a mask at coarser resolution should mean."""
    mh, mw = mask.shape
    x0, y0, x1, y1 = crop.box
    box = (x0 * mw / w, y0 * mh / h, x1 * mw / w, y1 * mh / h)
    image = Image.fromarray(mask.astype(np.float32))  # mode F
    return np.asarray(image.resize((r, r), Image.BOX, box=box), dtype=np.float32).clip(0.0, 1.0)


def head_ellipse(landmarks: np.ndarray | None, h: int, w: int):
    """(center, half_across, half_down, down) of an ellipse around the face and the hair.

    From CelebA-HQ's alignment (Karras et al. 2018, create_celebahq): with eye midpoint e,
    mouth midpoint m and s = max(2·|eye_to_eye|, 1.8·|m − e|), the head fits in the square of
    half-side s centered at e + 0.1·(m − e). On CelebA's aligned faces (s ≈ 75 px in the
    178 x 218 images) the top of the hair lies about 0.95·s above that center, the chin about
    0.95·s below, the hair about 0.8·s to each side — estimated from the typical landmark
    positions and face proportions; an approximation for when no segmentation exists.
    CelebA-HQ images *are* that square, so without landmarks the ellipse is centered with
    s = half the image size."""
    if landmarks is None:
        return np.array([w / 2, h / 2]), 0.8 * w / 2, 0.95 * h / 2, np.array([0.0, 1.0])
    p = landmarks.reshape(5, 2)
    eye, mouth = (p[0] + p[1]) / 2, (p[3] + p[4]) / 2
    eye_to_mouth = mouth - eye
    s = max(2 * np.hypot(*(p[1] - p[0])), 1.8 * np.hypot(*eye_to_mouth))
    down = eye_to_mouth / max(np.hypot(*eye_to_mouth), 1e-6)
    return eye + 0.1 * eye_to_mouth, 0.8 * s, 0.95 * s, down


def ellipse_mask(ellipse, crop: Crop, r: int) -> np.ndarray:
    """Fraction of each of the (r, r) latent cells of the crop that lies inside the ellipse."""
    center, half_across, half_down, down = ellipse
    x0, y0, x1, y1 = crop.box
    supersample = 4  # 4 x 4 sample points per latent cell
    n = r * supersample
    xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
    ys = y0 + (np.arange(n) + 0.5) * (y1 - y0) / n
    dx, dy = xs[None, :] - center[0], ys[:, None] - center[1]
    # inside when (along / half_down)^2 + (across / half_across)^2 <= 1, axes turned with the face
    along, across = dx * down[0] + dy * down[1], dy * down[0] - dx * down[1]
    inside = (along / half_down) ** 2 + (across / half_across) ** 2 <= 1.0
    return inside.reshape(r, supersample, r, supersample).mean(axis=(1, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Geometry: resize, crop


@dataclass
class Crop:
    top: int  # crop offsets in resized pixels (SDXL's crop_coords_top_left)
    left: int
    box: tuple[float, float, float, float]  # the same square in source pixels: (x0, y0, x1, y1)


def square_crop(h: int, w: int, R: int, rng: random.Random | None = None) -> Crop:
    """Resize the shorter side to R, then crop R x R: centered, or uniformly at random with `rng`."""
    # The longer side is truncated, as torchvision's Resize (which diffusers' SDXL training uses) does.
    if w <= h:
        rw, rh = R, int(R * h / w)
    else:
        rw, rh = int(R * w / h), R
    if rng is None:
        # torchvision CenterCrop's offsets, Python's round included.
        top, left = int(round((rh - R) / 2.0)), int(round((rw - R) / 2.0))
    else:
        top, left = rng.randint(0, rh - R), rng.randint(0, rw - R)
    sx, sy = w / rw, h / rh
    return Crop(top, left, (left * sx, top * sy, (left + R) * sx, (top + R) * sy))


# ----------------------------------------------------------------------------------------------
# Latent cache


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _digest(*parts) -> str:
    return hashlib.sha1("\x00".join(str(p) for p in parts).encode()).hexdigest()


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A hash of the tensors that make latents (the VAE encoder and quant_conv), for the cache key.

    Content, not file names: the same VAE in either layout shares its latents, and a replaced
    --vae or a fine-tune never reads another VAE's."""
    h = hashlib.sha1()
    for name, tensor in vae.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class LatentCache:
    """VAE latents computed once and kept on disk, one safetensors file per image and crop.

    `encode_fn` (from train.py) maps images (B, 3, R, R) in [-1, 1] to scaled latents
    (B, 4, R/8, R/8); they are stored in the dtype it returns. `key_parts` names the encoder
    (e.g. a VAE fingerprint): each distinct key gets its own subfolder, so a different VAE
    never reads another's latents and an old folder can simply be deleted. Within it an entry
    is keyed by the image's path, size and modification time, the resolution and the crop, so
    a changed file, resolution or crop is encoded again. Writes go to a temporary file renamed
    into place: a killed run or several DDP ranks never leave a half-written latent.

    The dataset reads entries in its worker processes (`load`); the main process encodes what
    was missing and stores it (`fill`). Workers get a copy without `encode_fn`."""

    def __init__(self, cache_dir: str, encode_fn, key_parts):
        self.encode_fn = encode_fn
        self.key_parts = [str(p) for p in key_parts]
        self.dir = os.path.join(cache_dir, _digest(*self.key_parts)[:16])
        os.makedirs(self.dir, exist_ok=True)
        about = os.path.join(self.dir, "key.json")  # which encoder this folder belongs to, for people
        if not os.path.exists(about):
            self._atomic_write(about, lambda tmp: _write_text(tmp, json.dumps(self.key_parts) + "\n"))

    def __getstate__(self):
        # The encoder lives on the main process's GPU; workers only read finished entries.
        return {**self.__dict__, "encode_fn": None}

    def key(self, item_key: str, path: str, resolution: int, crop: Crop) -> str:
        st = os.stat(path)
        return _digest(item_key, st.st_size, st.st_mtime_ns, resolution, crop.top, crop.left)

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key[:2], key + ".safetensors")

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            return load_file(path)["latent"]
        except (SafetensorError, OSError, KeyError):
            return None  # damaged from outside (writes are atomic): encode it again

    @staticmethod
    def _atomic_write(path, write):
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def store(self, key: str, latent: torch.Tensor):
        path = self.path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensor = latent.detach().cpu().contiguous().clone()
        self._atomic_write(path, lambda tmp: save_file({"latent": tensor}, tmp, metadata={"key": key}))

    def fill(self, batch: dict) -> torch.Tensor:
        """Latents (B, 4, R/8, R/8) on the CPU for a batch from `collate`: cached rows as read,
        the rest encoded in one call to encode_fn and stored."""
        rows = [None] * len(batch["key"])
        for row, latent in zip(batch["latent_rows"].tolist(), batch["latent"] if batch["latent"] is not None else []):
            rows[row] = latent
        if batch["image"] is not None:
            with torch.no_grad():
                encoded = self.encode_fn(batch["image"]).detach().cpu()
            for row, latent in zip(batch["image_rows"].tolist(), encoded):
                self.store(batch["cache_key"][row], latent)
                rows[row] = latent
        return torch.stack(rows)


