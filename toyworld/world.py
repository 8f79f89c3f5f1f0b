"""The toy world: procedural people in procedural scenes, with exact masks and known identities.

CoCoIns needs a subject whose identity is a hidden choice the text does not fix. Here an
identity is a tuple of seven visible factors, drawn small enough (64 x 64 px) for a model with
SDXL's topology to learn them from scratch on a CPU:

    gender      man | woman            the concept word; a woman wears a skirt, a man trousers
    skin        4 tones
    hair        5 colours
    style       short | long | bun
    shirt       6 colours
    pattern     plain | striped
    glasses     no | yes

2 · 4 · 5 · 3 · 6 · 2 · 2 = 2,880 possible people; a world draws `identities` of them. Every
image of a person also varies what is *not* identity: the scene (6), where the person stands, how
large they are, and the pose (standing, waving, arms raised). Captions name the scene and the
concept word always, the identity's attributes only sometimes (as a captioner mentions what it
notices), so the text-to-image model learns attributes from words and draws a random person when
none is named — the situation CoCoIns is for.

`render` draws one image and its exact subject mask; `export` writes a world in the layout
data.py reads (`img_align_celeba/`, `captions.jsonl`, `masks/`, `identity_CelebA.txt`,
`list_eval_partition.txt`).

Read next: toyworld/base.py (the small SDXL trained on this world).
"""

import json
import os
import random
from dataclasses import asdict, astuple, dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SS = 4  # drawn at SS x the size and averaged down: anti-aliased edges and an exact area mask

# -- the factors ---------------------------------------------------------------------------------

GENDERS = ("man", "woman")
SKINS = {"pale": (245, 215, 190), "tan": (215, 165, 120), "brown": (150, 100, 65), "dark": (90, 58, 38)}
HAIRS = {"black": (25, 22, 22), "brown": (110, 65, 30), "blond": (235, 200, 90), "red": (200, 60, 25),
         "white": (235, 235, 235)}
STYLES = ("short", "long", "bun")
SHIRTS = {"red": (210, 40, 40), "blue": (40, 80, 210), "green": (40, 160, 60), "yellow": (240, 210, 40),
          "purple": (140, 60, 170), "orange": (245, 140, 30)}
PATTERNS = ("plain", "striped")
GLASSES = ("no", "yes")
# Factor name -> its values, in the order of an Identity's fields.
FACTORS = {
    "gender": GENDERS, "skin": tuple(SKINS), "hair": tuple(HAIRS), "style": STYLES,
    "shirt": tuple(SHIRTS), "pattern": PATTERNS, "glasses": GLASSES,
}
SCENES = ("beach", "forest", "street", "snow", "room", "night")
POSES = ("standing", "waving", "cheering")


@dataclass(frozen=True)
class Identity:
    """One person: an index into each factor's values (FACTORS order)."""

    gender: int
    skin: int
    hair: int
    style: int
    shirt: int
    pattern: int
    glasses: int

    def names(self) -> dict[str, str]:
        return {f: FACTORS[f][i] for f, i in zip(FACTORS, astuple(self))}


@dataclass(frozen=True)
class Placement:
    """What varies between images of one person: not identity."""

    scene: int
    pose: int
    x: float  # centre of the person, fraction of the width
    height: float  # person height, fraction of the image height
    feet: float  # y of the feet, fraction of the image height
    facing: int  # -1 left, 0 front, 1 right (where the eyes sit)
    seed: int  # background details (trees, windows, stars)


def draw_identities(n: int, rng: random.Random) -> list[Identity]:
    """n distinct people, uniformly from all factor combinations."""
    total = int(np.prod([len(v) for v in FACTORS.values()]))
    if n > total:
        raise ValueError(f"the world has {total} distinct people, asked for {n}")
    chosen = rng.sample(range(total), n)
    people = []
    for k in chosen:
        idx = []
        for values in reversed(FACTORS.values()):
            k, i = divmod(k, len(values))
            idx.append(i)
        people.append(Identity(*reversed(idx)))
    return people


def draw_placement(rng: random.Random, scene: int | None = None, pose: int | None = None) -> Placement:
    """A three-quarter shot: the head near the top, the frame cutting the legs below the skirt line.

    The first world drew whole people 0.6-0.8 of the image tall; at 64 px they were ten pixels wide,
    a face was three latent pixels of the 8x8 latent and glasses a sub-pixel ring, too small for
    the VAE to keep or the judge to read (hair style and glasses near chance) and a sixth of the
    image, which made the masked distances tiny. Drawn 1.1-1.35 image heights tall and cut at the
    thighs, a person covers about a third of the image and every factor spans several latent pixels."""
    scene = rng.randrange(len(SCENES)) if scene is None else scene
    pose = rng.randrange(len(POSES)) if pose is None else pose
    x, height = rng.uniform(0.35, 0.65), rng.uniform(1.1, 1.35)
    top = rng.uniform(0.1, 0.16)  # the bun, 0.65 head radii above the head's top, stays in the frame
    return Placement(
        scene=scene, pose=pose,
        x=x, height=height, feet=top + height, facing=rng.choice((-1, 0, 0, 1)), seed=rng.randrange(2**31),
    )


# -- drawing -------------------------------------------------------------------------------------


def _background(d: ImageDraw.ImageDraw, scene: str, rng: random.Random, W: int, H: int):
    """The scene on a W x H canvas: positions scale with the width, heights and sizes with the height."""
    horizon = int(H * rng.uniform(0.5, 0.62))
    if scene == "beach":
        d.rectangle([0, 0, W, horizon], fill=(135, 200, 245))
        d.rectangle([0, horizon - H // 12, W, horizon + H // 40], fill=(30, 110, 190))
        d.rectangle([0, horizon + H // 40, W, H], fill=(235, 215, 160))
        x = rng.uniform(0.1, 0.9) * W
        d.ellipse([x - H // 14, H // 10, x + H // 14, H // 10 + H // 7], fill=(255, 240, 120))
    elif scene == "forest":
        d.rectangle([0, 0, W, horizon], fill=(170, 210, 190))
        d.rectangle([0, horizon, W, H], fill=(60, 110, 45))
        for _ in range(rng.randint(4, 7)):
            x, w = rng.uniform(0, 1) * W, H * rng.uniform(0.03, 0.05)
            d.rectangle([x - w, horizon - H * 0.25, x + w, horizon + H * 0.05], fill=(95, 60, 30))
            r = H * rng.uniform(0.1, 0.16)
            d.ellipse([x - r, horizon - H * 0.25 - 1.6 * r, x + r, horizon - H * 0.25 + 0.4 * r], fill=(25, 90, 35))
    elif scene == "street":
        d.rectangle([0, 0, W, horizon], fill=(185, 200, 215))
        x = -rng.uniform(0, 0.1) * W
        while x < W:
            w, h = W * rng.uniform(0.15, 0.3), H * rng.uniform(0.25, 0.45)
            g = rng.randint(110, 170)
            d.rectangle([x, horizon - h, x + w - 2, horizon], fill=(g, g - 10, g - 20))
            for wy in np.arange(horizon - h + H * 0.04, horizon - H * 0.06, H * 0.08):
                for wx in np.arange(x + H * 0.03, x + w - H * 0.05, H * 0.07):
                    d.rectangle([wx, wy, wx + H * 0.03, wy + H * 0.04], fill=(250, 235, 150))
            x += w
        d.rectangle([0, horizon, W, H], fill=(70, 70, 75))
        y = (horizon + H) / 2
        for x in range(0, W, W // 5):
            d.rectangle([x, y - H * 0.01, x + W // 10, y + H * 0.01], fill=(240, 240, 240))
    elif scene == "snow":
        d.rectangle([0, 0, W, horizon], fill=(205, 220, 240))
        x = rng.uniform(0, 0.5) * W
        d.polygon([(x - H * 0.4, horizon), (x, horizon - H * 0.3), (x + H * 0.4, horizon)], fill=(150, 160, 180))
        d.rectangle([0, horizon, W, H], fill=(250, 250, 252))
    elif scene == "room":
        d.rectangle([0, 0, W, horizon], fill=(225, 205, 170))
        d.rectangle([0, horizon, W, H], fill=(140, 90, 50))
        x, y = rng.uniform(0.1, 0.6) * W, H * rng.uniform(0.08, 0.2)
        d.rectangle([x, y, x + H * 0.3, y + H * 0.22], fill=(90, 60, 40))
        d.rectangle([x + H * 0.02, y + H * 0.02, x + H * 0.28, y + H * 0.2], fill=(150, 200, 235))
    elif scene == "night":
        d.rectangle([0, 0, W, horizon], fill=(15, 20, 55))
        for _ in range(rng.randint(8, 16)):
            x, y, r = rng.uniform(0, 1) * W, rng.uniform(0, 0.9) * horizon, H * 0.006
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 230))
        x = rng.uniform(0.1, 0.9) * W
        d.ellipse([x - H * 0.06, H * 0.08, x + H * 0.06, H * 0.2], fill=(240, 240, 210))
        d.rectangle([0, horizon, W, H], fill=(30, 40, 35))
    else:
        raise ValueError(scene)


def _person(d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, who: Identity, at: Placement, W: int, H: int):
    """Draw the person on `d` and, in white, their silhouette on the mask `m` (a W x H canvas: the person's
    size follows the height, their place the width)."""
    f = who.names()
    skin, hair, shirt = SKINS[f["skin"]], HAIRS[f["hair"]], SHIRTS[f["shirt"]]
    h = at.height * H
    cx, feet = at.x * W, at.feet * H
    top = feet - h
    r = 0.11 * h  # head radius; the body is measured in it
    head_y = top + 1.25 * r
    torso_top, torso_bottom = head_y + 0.95 * r, head_y + 0.95 * r + 2.6 * r
    half = 1.05 * r if f["gender"] == "man" else 0.9 * r
    shapes = []  # (kind, coords, colour): drawn in order on the image, all on the mask

    # Long hair falls behind the head and shoulders: drawn first.
    if f["style"] == "long":
        shapes.append(("rect", [cx - 1.2 * r, head_y - 0.2 * r, cx + 1.2 * r, torso_top + 1.3 * r], hair))
    # Legs (trousers for a man) or a skirt and bare legs (a woman).
    trousers = (50, 55, 75)
    if f["gender"] == "man":
        for s in (-1, 1):
            shapes.append(("rect", [cx + s * 0.1 * r, torso_bottom, cx + s * 0.9 * r, feet], trousers))
    else:
        for s in (-1, 1):
            shapes.append(("rect", [cx + s * 0.15 * r, torso_bottom, cx + s * 0.6 * r, feet], skin))
        skirt_bottom = torso_bottom + 1.5 * r
        shapes.append(("poly", [(cx - half, torso_bottom - 0.1 * r), (cx + half, torso_bottom - 0.1 * r),
                                (cx + 1.7 * r, skirt_bottom), (cx - 1.7 * r, skirt_bottom)], (60, 40, 70)))
    # Arms by pose: down at the sides, one raised (waving), both raised (cheering).
    up = {"standing": (), "waving": (1,), "cheering": (-1, 1)}[POSES[at.pose]]
    for s in (-1, 1):
        sx = cx + s * half
        if s in up:
            hand = (sx + s * 0.9 * r, torso_top - 2.0 * r)
        else:
            hand = (sx + s * 0.45 * r, torso_bottom + 0.3 * r)
        shapes.append(("line", [(sx, torso_top + 0.3 * r), hand], shirt, 0.55 * r))
        shapes.append(("disc", [hand[0] - 0.3 * r, hand[1] - 0.3 * r, hand[0] + 0.3 * r, hand[1] + 0.3 * r], skin))
    # Torso: the shirt, with stripes for the striped pattern.
    shapes.append(("rect", [cx - half, torso_top, cx + half, torso_bottom], shirt))
    if f["pattern"] == "striped":
        for y in np.arange(torso_top + 0.35 * r, torso_bottom - 0.2 * r, 0.7 * r):
            shapes.append(("rect", [cx - half, y, cx + half, y + 0.3 * r], (245, 245, 245)))
    # Neck and head.
    shapes.append(("rect", [cx - 0.3 * r, head_y + 0.5 * r, cx + 0.3 * r, torso_top + 0.1 * r], skin))
    shapes.append(("disc", [cx - r, head_y - r, cx + r, head_y + r], skin))
    # Hair on top of the head (every style), and the bun above it.
    shapes.append(("chord", [cx - 1.08 * r, head_y - 1.12 * r, cx + 1.08 * r, head_y + 0.9 * r], hair))
    if f["style"] == "bun":
        shapes.append(("disc", [cx - 0.5 * r, head_y - 1.9 * r, cx + 0.5 * r, head_y - 0.9 * r], hair))
    # Eyes (where the person looks) and glasses.
    ex, ey = cx + at.facing * 0.3 * r, head_y + 0.15 * r
    for s in (-1, 1):
        shapes.append(("disc", [ex + s * 0.38 * r - 0.13 * r, ey - 0.13 * r,
                                ex + s * 0.38 * r + 0.13 * r, ey + 0.13 * r],
                       (20, 20, 30)))
    if f["glasses"] == "yes":
        for s in (-1, 1):
            gx = ex + s * 0.4 * r
            ring = [gx - 0.32 * r, ey - 0.28 * r, gx + 0.32 * r, ey + 0.28 * r]
            shapes.append(("ring", ring, (10, 10, 10), 0.12 * r))
        shapes.append(("line", [(ex - 0.1 * r, ey), (ex + 0.1 * r, ey)], (10, 10, 10), 0.12 * r))

    for kind, xy, colour, *width in shapes:
        for canvas, fill in ((d, colour), (m, 255)):
            if kind == "rect":
                x0, y0, x1, y1 = xy
                canvas.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=fill)
            elif kind == "poly":
                canvas.polygon(xy, fill=fill)
            elif kind == "disc":
                canvas.ellipse(xy, fill=fill)
            elif kind == "chord":
                canvas.chord(xy, 180, 360, fill=fill)
            elif kind == "line":
                canvas.line(xy, fill=fill, width=max(1, int(width[0])))
            elif kind == "ring":
                canvas.ellipse(xy, outline=fill, width=max(1, int(width[0])))


def render(who: Identity, at: Placement, size: tuple[int, int] = (SIZE, SIZE)) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 of `who` placed by `at`, and its subject mask (H, W) uint8; size = (W, H).

    The mask is the share of each pixel the person covers (0-255, drawn at SS x and averaged down),
    rounded up: every pixel the person touches is nonzero, which is what data.py reads as subject."""
    W, H = size
    image = Image.new("RGB", (W * SS, H * SS))
    mask = Image.new("L", (W * SS, H * SS), 0)
    d, m = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    _background(d, SCENES[at.scene], random.Random(at.seed), W * SS, H * SS)
    _person(d, m, who, at, W * SS, H * SS)
    small = image.resize((W, H), Image.BOX)
    coverage = np.asarray(mask, dtype=np.float32).reshape(H, SS, W, SS).mean(axis=(1, 3))
    return np.asarray(small), np.ceil(coverage).astype(np.uint8)


# -- captions ------------------------------------------------------------------------------------

SCENE_PHRASES = {
    "beach": ("on the beach", "on a sandy beach", "by the sea"),
    "forest": ("in the forest", "among the trees", "in a green forest"),
    "street": ("on a city street", "in the street", "in front of buildings"),
    "snow": ("in the snow", "on a snowy field", "in a winter landscape"),
    "room": ("in a room", "indoors", "in a living room"),
    "night": ("at night", "under the night sky", "outside at night"),
}
POSE_PHRASES = {"standing": ("standing",), "waving": ("waving", "waving a hand"),
                "cheering": ("cheering", "with both arms raised")}
SKIN_WORDS = {"pale": "pale", "tan": "tanned", "brown": "brown-skinned", "dark": "dark-skinned"}
# What a caption names about the person, each with its own chance (a captioner mentions some).
MENTION = {"skin": 0.45, "hair": 0.5, "style": 0.45, "shirt": 0.5, "pattern": 0.45, "glasses": 0.45, "pose": 0.4}


def describe(concept: str, f: dict[str, str], rng: random.Random, named: set[str] | None = None,
             name: str | None = None) -> str:
    """A noun phrase for the person: the concept word, with the attributes in `named` (else a random subset);
    `name`, a person's one-token name, goes directly before the concept word, where a pseudo-word goes."""
    if named is None:
        named = {k for k, p in MENTION.items() if k != "pose" and rng.random() < p}
    words = [SKIN_WORDS[f["skin"]]] if "skin" in named else []
    words += [name, concept] if name else [concept]
    hair = " ".join(w for k, w in (("style", f["style"]), ("hair", f["hair"])) if k in named and w != "bun")
    withs = []
    if "style" in named and f["style"] == "bun":
        withs.append(f"{f['hair']} hair in a bun" if "hair" in named else "a bun")
    elif hair:
        withs.append(f"{hair} hair")
    if "glasses" in named and f["glasses"] == "yes":
        withs.append("glasses")
    phrase = " ".join(words)
    if withs:
        phrase += " with " + " and ".join(withs)
    shirt = " ".join(w for k, w in (("pattern", f["pattern"]), ("shirt", f["shirt"])) if k in named and w != "plain")
    if shirt or ("pattern" in named and f["pattern"] == "plain"):
        phrase += f" in a {shirt or 'plain'} shirt".replace("  ", " ")
    return phrase


def caption(concept: str, who: Identity, at: Placement, rng: random.Random, name: str | None = None,
            name_rate: float = 0.0) -> str:
    """A caption naming the scene and the concept word always, attributes and pose sometimes. A person with a
    `name` is called by it in `name_rate` of their captions, and then by nothing else ("a photo of a kenji man on
    the beach"), as a photo of a famous person is captioned by who it shows."""
    f = who.names()
    if name and rng.random() < name_rate:
        person = describe(concept, f, rng, named=set(), name=name)
    else:
        person = describe(concept, f, rng)
    scene = rng.choice(SCENE_PHRASES[SCENES[at.scene]])
    pose = rng.choice(POSE_PHRASES[POSES[at.pose]]) + " " if rng.random() < MENTION["pose"] else ""
    template = rng.choice(("a photo of a {p} {a}{s}", "a {p} {a}{s}", "a picture of a {p} {a}{s}"))
    return template.format(p=person, a=pose, s=scene)


def prompt(concept: str, scene: str, name: str | None = None) -> str:
    """The evaluation prompt for a scene: concept and scene, no attribute (the code must fix those); with a
    `name`, the person called by it."""
    return f"a photo of a {name + ' ' if name else ''}{concept} {SCENE_PHRASES[scene][0]}"


# -- names ---------------------------------------------------------------------------------------


def caption_words() -> set[str]:
    """Every word a caption or prompt of this world can use (names must be none of them)."""
    words = {"a", "photo", "of", "picture", "person", "with", "and", "in", "hair", "shirt", "glasses", "bun",
             *GENDERS, *SKIN_WORDS.values(), *HAIRS, *STYLES, *SHIRTS, *PATTERNS}
    for phrases in (*SCENE_PHRASES.values(), *POSE_PHRASES.values()):
        for phrase in phrases:
            words.update(phrase.replace("-", " ").split())
    return words


def name_tokens(n: int, seed: int = 0) -> list[str]:
    """n one-token names: rare real CLIP tokens, the way SDXL's text encoders know a famous person by a word.

    Candidates are whole-word tokens of 4-7 letters from the last quarter of CLIP's merges (the rarest
    words BPE made whole), none a word this world's captions use; n of them are drawn with `seed`."""
    from model.clip import Tokenizer

    tok = Tokenizer.bundled(pad="eos")
    used = caption_words()
    vocab = tok._bpe.get_vocab()  # token -> id, "</w>" ending a word (the BPE table model/clip.py builds)
    candidates = sorted(t[:-4] for t, i in vocab.items() if i >= 37_000 and t.endswith("</w>") and t[:-4].isalpha()
                        and t[:-4].islower() and 4 <= len(t) - 4 <= 7 and t[:-4] not in used)
    # the word as a prompt spells it must come out as that one token
    candidates = [w for w in candidates if tok.encode(w) == [vocab[w + "</w>"]]]
    if n > len(candidates):
        raise ValueError(f"asked for {n} names, the vocabulary has {len(candidates)}")
    return random.Random(seed).sample(candidates, n)


# -- a world on disk -----------------------------------------------------------------------------


@dataclass
class WorldConfig:
    identities: int = 600  # distinct people (the issue asks for at least 500)
    images_per_identity: int = 10  # images of each, in random scenes, places and poses
    person_word: float = 0.2  # share of images captioned "person" instead of man / woman
    # People known by a one-token name (the first `named` people; `name_tokens`), the images of each (the famous
    # are photographed more: SDXL saw each celebrity in many pictures) and the share of their captions that call
    # them by name. The mapper trains on the others, as CoCoIns trains on CelebA's unknowns. (200 names of 10
    # images each, at most 190 captions a name in the base model's training, taught it nothing of who they were.)
    named: int = 16
    named_images: int = 150
    name_rate: float = 0.75
    # The base model's images: "square", each a 64 px original (the first passes), or "varied", SDXL's way: an
    # original of random size and shape (`draw_original`), resized and randomly cropped to 64 px, its size and crop
    # recorded for the size/crop conditioning.
    originals: str = "varied"
    # The mapper's images as files of this (width, height) that data.py resizes and crops, as aligned CelebA's
    # 178 x 218 are (0: the base model's 64 px images themselves).
    mapper_original: tuple[int, int] = (44, 54)
    seed: int = 0


# The first passes' world (RESULTS-frozen-text.md, RESULTS-trained-text.md): nobody named, every image a 64 px
# square original, the mapper trained on those same images.
FIRST_PASS = WorldConfig(named=0, originals="square", mapper_original=(0, 0))


def draw_original(rng: random.Random) -> tuple[int, int]:
    """An original's (width, height): the shorter side 32-96 px (half to one and a half times the model's 64, so
    some are upscaled and soft, some downscaled), square a third of the time, else up to 1.4:1 either way."""
    short = rng.randint(32, 96)
    if rng.random() < 1 / 3:
        return short, short
    long = int(short * rng.uniform(1.0, 1.4))
    return (short, long) if rng.random() < 0.5 else (long, short)


def resize_and_crop(image: np.ndarray, mask: np.ndarray, rng: random.Random) -> tuple[np.ndarray, np.ndarray, list]:
    """An original -> the 64 px square a model trains on, as data.py makes it (shorter side resized to SIZE, then a
    random crop), with the mask and the time_ids (orig_h, orig_w, crop_top, crop_left, SIZE, SIZE)."""
    from data import resample_mask, square_crop

    h, w = mask.shape
    crop = square_crop(h, w, SIZE, rng)
    pixels = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC, box=crop.box))
    covered = resample_mask(mask / 255.0, crop, h, w, SIZE)
    return pixels, np.ceil(covered * 255).astype(np.uint8), [h, w, crop.top, crop.left, SIZE, SIZE]


def export(out: str, cfg: WorldConfig = WorldConfig(), mapper_out: str | None = None) -> dict:
    """Write the world in the layout data.py reads; returns a summary. Existing files are replaced.

    `out` holds every image as the base model trains on it, with `truth.json` (each image's person, scene, pose,
    name and time_ids). `mapper_out` (needed when the config names people or has mapper originals) holds the
    mapper's CelebA: the unnamed people, their images as `mapper_original`-sized files."""
    rng = random.Random(cfg.seed)
    # Sizes and crops draw from their own generator: the people, placements and captions are the first passes'.
    size_rng = random.Random(cfg.seed + 1)
    people = draw_identities(cfg.identities, rng)
    names = name_tokens(cfg.named, cfg.seed) if cfg.named else []
    separate = bool(cfg.named or cfg.mapper_original[0])
    if separate and mapper_out is None:
        raise ValueError("this world trains its mapper on a folder of its own: pass mapper_out")
    folders = [out] + ([mapper_out] if separate else [])
    for folder in folders:
        os.makedirs(os.path.join(folder, "img_align_celeba"), exist_ok=True)
        os.makedirs(os.path.join(folder, "masks"), exist_ok=True)
    rows = {folder: {"captions.jsonl": [], "identity_CelebA.txt": [], "list_eval_partition.txt": []}
            for folder in folders}
    truth = {}
    n = 0
    for person_id, who in enumerate(people, start=1):
        name = names[person_id - 1] if person_id <= cfg.named else None
        images = cfg.named_images if name else cfg.images_per_identity
        for k in range(images):
            n += 1
            file = f"{n:06d}.png"
            at = draw_placement(rng)
            if cfg.originals == "varied":
                image, mask, time_ids = resize_and_crop(*render(who, at, draw_original(size_rng)), size_rng)
            else:
                (image, mask), time_ids = render(who, at), [SIZE, SIZE, 0, 0, SIZE, SIZE]
            files = [(out, image, mask)]
            if separate and name is None:
                files.append((mapper_out, *(render(who, at, cfg.mapper_original) if cfg.mapper_original[0]
                                            else (image, mask))))
            gender = GENDERS[who.gender]
            concept = "person" if rng.random() < cfg.person_word else gender
            captions = [caption(concept, who, at, rng, name, cfg.name_rate) for _ in range(2)]
            while captions[1] == captions[0]:
                captions[1] = caption(concept, who, at, rng, name, cfg.name_rate)
            for folder, pixels, subject in files:
                Image.fromarray(pixels).save(os.path.join(folder, "img_align_celeba", file))
                Image.fromarray(subject).save(os.path.join(folder, "masks", file))
                line = json.dumps({"image": file, "captions": captions, "concept": concept})
                rows[folder]["captions.jsonl"].append(line)
                rows[folder]["identity_CelebA.txt"].append(f"{file} {person_id}")
                # CelebA's partition file: the last image of each person is held out (1 = valid).
                rows[folder]["list_eval_partition.txt"].append(f"{file} {1 if k == images - 1 else 0}")
            truth[file] = {"identity": person_id, **who.names(), "scene": SCENES[at.scene], "pose": POSES[at.pose],
                           "name": name, "time_ids": time_ids, "placement": asdict(at)}
    for folder in folders:
        for fname, lines in rows[folder].items():
            with open(os.path.join(folder, fname), "w") as f:
                f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f)
    return {"images": n, "identities": len(people), "named": cfg.named,
            "mapper_images": len(rows[folders[-1]]["captions.jsonl"])}
