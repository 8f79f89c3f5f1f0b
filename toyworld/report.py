"""The toy world's report: RESULTS.md from the experiment's facts, with its figures.

The report puts first what a reader came for: the five criteria of "working", met or not, with the spread over
base models and mapper seeds, then the findings (FINDINGS.md beside the report, written by hand from the
numbers), then the tables every number comes from, then the raw facts as JSON.

Every headline number is a mean over base models (each trained from scratch on its own seed) of a mean over
mapper seeds, and carries both spreads: `± b` over base models, `± m` over mapper seeds within a base model.

Read next: toyworld/ship.py (the model this project ships, made by these steps).
"""

import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from toyworld import judge as judge_lib, world

CONCEPTS = ("man", "woman")
METRICS = ("face_sim", "face_div", "identity_agreement", "scene_accuracy", "concept_accuracy")


# -- figures -------------------------------------------------------------------------------------


def contact_sheet(images: torch.Tensor, jobs: list[dict], path: str, codes: int = 4, title: str = "") -> None:
    """Rows = codes (man codes, then woman codes), columns = scenes (first seed), 2x size, labelled."""
    scenes = list(dict.fromkeys(j["scene"] for j in jobs))
    keys = list(dict.fromkeys((j["concept"], j["code"]) for j in jobs))
    keys = [k for c in CONCEPTS for k in [k for k in keys if k[0] == c][:codes]]
    S, left, top = 2 * world.SIZE, 110, 34
    sheet = Image.new("RGB", (left + S * len(scenes), top + S * len(keys)), "white")
    d = ImageDraw.Draw(sheet)
    d.text((4, 2), title, fill="black")
    for col, scene in enumerate(scenes):
        d.text((left + col * S + 4, top - 14), scene, fill="black")
    for row, (concept, code) in enumerate(keys):
        d.text((4, top + row * S + S // 2 - 6), f"{concept} code {code}", fill="black")
        for col, scene in enumerate(scenes):
            i = next(i for i, j in enumerate(jobs) if (j["concept"], j["code"], j["scene"]) == (concept, code, scene))
            tile = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((S, S), Image.NEAREST)
            sheet.paste(tile, (left + col * S, top + row * S))
    sheet.save(path)


def line_plot(series: dict[str, list[tuple[float, float]]], path: str, title: str, ylabel: str) -> None:
    """A small PNG line plot (PIL only): one polyline per named series of (x, y) points."""
    W, H, m = 520, 300, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def at(x, y):
        return m + (x - x0) / (x1 - x0) * (W - 2 * m), H - m - (y - y0) / (y1 - y0) * (H - 2 * m)

    d.rectangle([m, m, W - m, H - m], outline="black")
    d.text((m, 10), title, fill="black")
    d.text((4, m - 14), f"{ylabel}: {y1:.4g}", fill="black")
    d.text((4, H - m), f"{y0:.4g}", fill="black")
    d.text((m, H - m + 6), f"step {x0:g}", fill="black")
    d.text((W - m - 60, H - m + 6), f"step {x1:g}", fill="black")
    colours = ["blue", "red", "green", "orange", "purple", "black"]
    for k, (name, s) in enumerate(series.items()):
        c = colours[k % len(colours)]
        if len(s) > 1:
            d.line([at(x, y) for x, y in s], fill=c, width=2)
        d.text((W - m - 150, m + 6 + 14 * k), name, fill=c)
    img.save(path)


# -- numbers over seeds --------------------------------------------------------------------------


def _sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(rows: list[dict]) -> dict:
    """Mean and standard deviation (`_sd`) of every number the rows share."""
    out = {}
    for k in rows[0]:
        if all(isinstance(r.get(k), (int, float)) for r in rows):
            values = [r[k] for r in rows]
            out[k], out[k + "_sd"] = float(np.mean(values)), _sd(values)
    return out


def over_bases(per_base: list[list[dict]]) -> dict:
    """Rows of each base model (its mapper seeds, or sampling offsets) -> the mean over base models of each base's
    mean, with `_sd_base` (the spread of the base models' means), `_sd_seed` (the seeds' spread within a base
    model, pooled) and `_sd` (over every row, whichever base)."""
    out = {}
    for k in per_base[0][0]:
        if not all(isinstance(r.get(k), (int, float)) for rows in per_base for r in rows):
            continue
        means = [float(np.mean([r[k] for r in rows])) for rows in per_base]
        within = [np.var([r[k] for r in rows], ddof=1) for rows in per_base if len(rows) > 1]
        out[k] = float(np.mean(means))
        out[k + "_sd_base"] = _sd(means)
        out[k + "_sd_seed"] = float(np.sqrt(np.mean(within))) if within else 0.0
        out[k + "_sd"] = _sd([r[k] for rows in per_base for r in rows])
    return out


def headline(facts: dict) -> dict:
    """The rows every criterion and table starts from, each over the base models (`over_bases`)."""
    bases = facts["bases"]
    rows = {"dataset": [[b["dataset"]] for b in bases], "dataset_vae": [[b["dataset_vae"]] for b in bases],
            "base": [b["base_rows"] for b in bases], "words": [[b["named"]["all 7"]] for b in bases],
            "full": [b["full_rows"] for b in bases]}
    if all("by_name" in b for b in bases):
        rows["by_name"] = [[b["by_name"]] for b in bases]
    if all("inverted" in b for b in bases):
        rows["inverted"] = [[b["inverted"]] for b in bases]
    for key in NAMED_KEYS:
        rows[f"named {key}"] = [[b["named"][key]] for b in bases]
    return {name: over_bases(r) for name, r in rows.items()}


NAMED_KEYS = ("1 (shirt colour)", "3 (+ pattern, hair colour)", "all 7")


def _pm(m: dict, k: str, digits: int = 3) -> str:
    """`mean ± b (bases) ± m (seeds)`, as far as the row has spreads."""
    if k not in m:
        return "–"
    fmt = f".{digits}f" if m[k] == 0 or 0.01 <= abs(m[k]) < 1000 else f".{digits}g"  # (γ, D² and the like)
    text = f"{m[k]:{fmt}}"
    if m.get(k + "_sd_base") or m.get(k + "_sd_seed"):
        text += f" ± {m.get(k + '_sd_base', 0):.{digits}f} b"
        if m.get(k + "_sd_seed"):
            text += f" ± {m[k + '_sd_seed']:.{digits}f} m"
    elif m.get(k + "_sd"):
        text += f" ± {m[k + '_sd']:.{digits}f}"
    return text


def verdicts(facts: dict) -> list[tuple[str, str, str]]:
    """The five criteria of "working" (the issue's corrected ones): (criterion, "met" / "missed" / "within the
    spread", value). A criterion is decided only when its margin exceeds twice the spread of the full row over
    every run (base models and mapper seeds together)."""
    h = headline(facts)
    full, vae, base, words = h["full"], h["dataset_vae"], h["base"], h["words"]

    def judge(margin: float, spread: float) -> str:
        if abs(margin) < 2 * spread:
            return "within the spread"
        return "met" if margin >= 0 else "missed"

    out = []
    target = 0.5 * vae["identity_agreement"]
    out.append((f"identity agreement ≥ 0.5 × the dataset through the VAE ({target:.3f})",
                judge(full["identity_agreement"] - target, full["identity_agreement_sd"]),
                _pm(full, "identity_agreement")))
    target = 0.8 * vae["face_div"]
    out.append((f"Face Div ≥ 0.8 × the dataset through the VAE ({target:.3f})",
                judge(full["face_div"] - target, full["face_div_sd"]), _pm(full, "face_div")))
    out.append((f"Face Sim within 0.05 of the all-words row ({words['face_sim']:.3f})",
                judge(full["face_sim"] - (words["face_sim"] - 0.05), full["face_sim_sd"]), _pm(full, "face_sim")))
    for k, label in (("scene_accuracy", "scene accuracy"), ("concept_accuracy", "concept accuracy")):
        out.append((f"{label} within 5 points of the base model ({base[k]:.3f})",
                    judge(full[k] - (base[k] - 0.05), full[k + "_sd"]), _pm(full, k)))
    return out


# -- tables --------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, dict]], columns=METRICS + ("w_dims",)) -> list[str]:
    names = {"face_sim": "Face Sim", "face_div": "Face Div", "identity_agreement": "identity agreement",
             "scene_accuracy": "scene acc.", "concept_accuracy": "concept acc.", "w_dims": "word dims",
             "truth_agreement": "is the named person", "w_rms": "word RMS", "w_cos": "word cos",
             "d_neg_first": "d_neg (first 50 steps)", "d_neg_last": "d_neg (last 50)",
             "d_pos_first": "d_pos (first 50)", "gamma_abs": "γ_abs", "gamma_rel": "γ_abs / D²", "D2": "D²"}
    out = ["| row | " + " | ".join(names.get(c, c) for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, m in rows:
        out.append(f"| {name} | " + " | ".join(_pm(m, c) for c in columns) + " |")
    return out


def _factor_table(facts: dict, h: dict) -> list[str]:
    """Which parts of a person each row holds: per factor, the share of a group's image pairs that agree."""
    names = list(judge_lib.IDENTITY)
    fp = facts["bases"][0].get("footprints")
    out = ["Per factor, the share of a group's image pairs whose judged value agrees (a code's, a named person's, "
           "a dataset person's); the base model's row is what chance agreement looks like. Pair div is 1 − the mean "
           "cosine between images of different groups.", "",
           "| row | " + " | ".join(names) + " | pair div |", "|" + "---|" * (len(names) + 2)]
    if fp:
        out.append("| latent footprint (l2, base seed 0's VAE) | " + " | ".join(f"{fp[n]:.3f}" for n in names)
                   + " | – |")
    for label, key in ROW_LABELS:
        m = h.get(key)
        if m and f"agree_{names[0]}" in m:
            cells = " | ".join(f"{m[f'agree_{n}']:.2f}" for n in names)
            out.append(f"| {label} | {cells} | {m['pair_div']:.2f} |")
    return out


ROW_LABELS = (("Dataset (its people drawn as 64 px originals)", "dataset"),
              ("Dataset through the VAE (the best a generated image can look)", "dataset_vae"),
              ("Base model, no code (images grouped by index: random people)", "base"),
              ("Base model, 1 attribute in words (shirt colour)", "named 1 (shirt colour)"),
              ("Base model, 3 attributes in words", "named 3 (+ pattern, hair colour)"),
              ("Base model, all 7 attributes in words", "words"),
              ("Base model, a named person called by name", "by_name"),
              ("One word learned per person (textual inversion)", "inverted"),
              ("CoCoIns (full)", "full"))


def _census_table(facts: dict) -> list[str]:
    shirts = list(world.FACTORS["shirt"])
    rows = [("Dataset (one vote per person)", [b["dataset_census"] for b in facts["bases"]]),
            ("Base model, no code", [b["base_rows"][0]["census"] for b in facts["bases"]
                                     if "census" in b["base_rows"][0]]),
            ("CoCoIns (full, every mapper seed)", [r["census"] for b in facts["bases"] for r in b["full_rows"]
                                                   if "census" in r]),
            ("CoCoIns with the word-spread term (λ = 10, base seed 0)",
             [facts["spread"]["census"]] if facts.get("spread") else [])]
    out = ["| row | " + " | ".join(shirts) + " | largest share |", "|" + "---|" * (len(shirts) + 2)]
    for name, censuses in rows:
        if not censuses:
            continue
        shares = [float(np.mean([c[s] for c in censuses])) for s in shirts]
        out.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in shares) + f" | {max(shares):.2f} |")
    return out


def write_results(path: str, facts: dict) -> None:
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(path)))  # noqa: E731
    f, L = facts, []
    h = headline(f)
    bases = f["bases"]
    L += ["# Toy-world results", "",
          "Made by one command (`toyworld/experiment.py`; the numbers and figures below are its output):", "",
          f"    {f['command']}", "",
          f"Scale `{f['scale']}`; {f['world']['images']} images of {f['world']['identities']} people "
          f"({f['world'].get('named', 0)} of them known by a one-token name; the mapper trains on the other "
          f"{f['world'].get('mapper_images', 0)} images); {len(bases)} base models trained from scratch, CoCoIns "
          f"over {f['mapper_seeds']} mapper seeds on each; torch {f['torch']}, Pillow {f.get('pillow')}, "
          f"{f['machine']}; wall time {f['seconds'] / 60:.0f} min, mapper runs {f.get('mapper_minutes', 0):.0f} min "
          "summed (one thread each).", "",
          "Spreads: `± b` is the standard deviation over base models (each retrained from scratch on its own seed), "
          "`± m` over mapper seeds within a base model (pooled).", "",
          "## Is CoCoIns working here?", "",
          "A criterion is decided when its margin exceeds twice the full row's spread over every run (base models "
          "and mapper seeds together); otherwise it is \"within the spread\".", "",
          "| criterion | verdict | CoCoIns |", "|---|---|---|"]
    L += [f"| {c} | {'**' + v + '**' if v != 'met' else v} | {value} |" for c, v, value in verdicts(f)]
    L += [""]
    findings = os.path.join(os.path.dirname(os.path.abspath(path)), "FINDINGS.md")
    if os.path.isfile(findings):
        with open(findings) as fh:
            L += [fh.read().strip(), ""]
    L += ["## Main table", "",
          "Face Sim and Face Div are eval.py's, on the judge's embedding (the seven factors' probabilities); "
          "identity agreement, the share of a group's image pairs whose seven judged factors all agree; scene "
          "accuracy, the share of images whose judged scene is the prompt's (the toy CLIP-T); concept accuracy, "
          "the share whose judged gender is the prompt's man/woman; word dims, the effective number of directions "
          "the codes' CLIP-L words vary in (over codes 0-255; the learned words over the evaluated people"
          + (f"; an untrained mapper's: {bases[0]['untrained']['w_dims']:.1f}" if bases[0].get("untrained") else "")
          + ").", ""]
    L += _table([(label, h[key]) for label, key in ROW_LABELS if key in h]) + [""]
    if "by_name" in h:
        L += [f"A named person called by name is drawn as exactly that person (all seven judged factors right) in "
              f"{_pm(h['by_name'], 'truth_agreement')} of the images.", ""]
    L += ["### Per base model", "", "The full row on each base model (mean ± sd over its mapper seeds), beside its "
          "reference rows.", ""]
    per = []
    for b in bases:
        per += [(f"{b['tag']}: base model, no code", aggregate(b["base_rows"])),
                (f"{b['tag']}: all 7 words", b["named"]["all 7"]),
                *([(f"{b['tag']}: called by name", b["by_name"])] if "by_name" in b else []),
                *([(f"{b['tag']}: one learned word", b["inverted"])] if "inverted" in b else []),
                (f"{b['tag']}: CoCoIns (full)", aggregate(b["full_rows"]))]
    L += _table(per) + [""]
    L += ["### What a group holds, factor by factor", ""] + _factor_table(f, h) + [""]
    L += ["### How the codes' people spread over shirt colours", "",
          "Each group's most frequent judged shirt colour, as shares of the groups (codes: the "
          "evaluation's and the census's, one image per scene each; the dataset: one vote per person).", ""]
    L += _census_table(f) + [""]
    if f.get("spread"):
        L += ["The word-spread term beside the full rows of base seed 0 (one seed; `--lambda-spread 10`, not in the "
              "paper):", ""]
        L += _table([("CoCoIns (full, base seed 0)", aggregate(bases[0]["full_rows"])),
                     ("with the word-spread term, λ = 10", f["spread"])]) + [""]
    if f.get("time_ids"):
        t = f["time_ids"]
        L += ["## Size conditioning in training (`--time-ids`)", "",
              "The mapper's images are 44 x 54 px files (aligned CelebA's shape, smaller than the model's 64), "
              "resized and centre-cropped by data.py; `data` tells the UNet so (54, 44, 7, 0, 64, 64), `sampling` "
              "passes what generation does (64, 64, 0, 0, 64, 64). Base model seed 0, "
              f"{len(bases[0]['full_rows'][:3])} mapper seeds each.", ""]
        L += _table([("--time-ids data (the full rows)", t["data"]), ("--time-ids sampling", t["sampling"])]) + [""]
    if f.get("gamma"):
        L += ["## γ on two base models", "",
              "γ, the final weight of the reciprocal negative term λ_neg/d_m(x̂*, x̂-) (λ_neg = γ·(k/K)^β), one mapper "
              "seed each. Each row also gives γ_abs / D², D the mean d_neg of the run's first 20 steps (the unit of "
              "`--gamma-unit d_neg`, not swept here). d_neg and d_pos as logged over the run's first and last 50 "
              "steps.", ""]
        for label, rows in f["gamma"].items():
            L += [f"### {label}", ""]
            L += _table([(f"γ = {r['gamma']:g}", r) for r in rows],
                        ("face_sim", "face_div", "identity_agreement", "scene_accuracy", "concept_accuracy",
                         "gamma_abs", "gamma_rel", "D2", "d_neg_first", "d_neg_last", "d_pos_first")) + [""]
    b0 = bases[0]
    if b0.get("bleed"):
        b = b0["bleed"]
        L += ["How far a word inserted before the concept moves the context of the words after it (base seed 0): "
              f"a real skin word {b['real_word']:.3f}, a trained pseudo-word {b['pseudo_word']:.3f}; swapping the "
              f"scene phrase itself {b['other_scene']:.3f}.", ""]
    L += ["## The base models and the judges", ""]
    for b in bases:
        bf, q = b["base_facts"], b["quality"]
        L += [f"- {b['tag']}: VAE {bf['vae_seconds'] / 60:.1f} min (latent scale {bf['latent_scale']:.3f}, L1 "
              f"{bf['vae_l1_64px']:.3f}), UNet and text {bf['unet_seconds'] / 60:.1f} min; a named attribute appears "
              f"{q['named_attribute_accuracy']:.3f} of the time; judge: person "
              f"{b['judge']['held_out_rendered']['person']:.3f} "
              f"rendered, {b['judge']['held_out_through_vae']['person']:.3f} through the VAE."]
    L += ["", "## Figures", ""]
    for title, name in (("CoCoIns: rows are codes, columns scenes (base seed 0, mapper seed 0)", "contact_cocoins.png"),
                        ("Base model, no code: rows are code indices (random people)", "contact_base.png"),
                        ("Base model, each code's person named in full", "contact_named.png"),
                        ("Base model, named people called by name", "contact_by_name.png"),
                        ("One word learned per person (textual inversion)", "contact_inverted.png"),
                        ("Loss terms over training (full CoCoIns, base seed 0, mapper seed 0)", "curve_loss.png"),
                        ("Face Sim and Face Div over training", "curve_face_sim.png"),
                        ("VAE: images (top) and reconstructions (bottom), base seed 0",
                         "vae_reconstructions_seed0.png")):
        if os.path.isfile(os.path.join(f["figures"], name)):
            L += [f"**{title}**", "", f"![{title}]({rel(os.path.join(f['figures'], name))})", ""]
    L += ["## Raw numbers", "", "```json", json.dumps(f, indent=1, default=str), "```", ""]
    with open(path + ".tmp", "w") as fh:
        fh.write("\n".join(L))
    os.replace(path + ".tmp", path)
