"""Writes prompts/scenes.jsonl: the paper's Scenes set, 1,000 sentences written for this project.

The paper (section 4.2) had a language model write 1,000 sentences of five subjects (man, woman,
boy, girl, person) "doing something in diverse situations" in four settings: daily life,
professional environments, cultural or recreational occasions, outdoor activities, 50 each per
subject. Its sentences are not published, so ours are composed here from hand-written parts: an
activity in a place, a framing and a light, joined by one of several sentence shapes. The choice
is seeded, so the committed file is exactly what this script writes:

    python prompts/make_scenes.py   # rewrites prompts/scenes.jsonl; tests/test_eval.py checks it

Each line is {"setting": ..., "subject": ..., "prompt": ...}. Every prompt names its subject word
exactly once (the word the pseudo-word is inserted before) and no other subject word.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import PEOPLE  # noqa: E402  (the subject words, in the order the file lists them)

PER_SETTING = 50  # sentences per setting and subject, as in the paper

# Activities in a place, as "-ing" clauses that follow "a <subject> is". None names a person
# (no "fisherman", "cowboy", "salesperson": their last BPE piece could be a subject word).
ACTIVITIES = {
    "daily life": [
        "reading a paperback on a sunlit window seat",
        "chopping vegetables at a cluttered kitchen counter",
        "folding laundry on an unmade bed",
        "waiting for a bus at a rainy street corner",
        "pushing a shopping cart down a supermarket aisle",
        "watering potted herbs on a narrow balcony",
        "drinking a hot chocolate at a small cafe table by the window",
        "tying {their} shoes on the front steps of a brick house",
        "walking a golden retriever along a quiet suburban sidewalk",
        "washing dishes in a sink full of soap suds",
        "browsing shelves in a cozy secondhand bookshop",
        "riding a crowded subway car with headphones on",
        "carrying grocery bags up a stairwell",
        "sweeping fallen leaves from a porch",
        "brushing {their} teeth in a small tiled bathroom",
        "eating a bowl of noodles at a busy food court",
        "looking at the departures board in a train station",
        "hanging a framed picture on a living room wall",
        "feeding ducks at the edge of a city pond",
        "sitting on a sofa with a cup of tea and a blanket",
        "picking apples at a farmers market stall",
        "doing homework at a wooden dining table",
        "unlocking a bicycle outside a corner shop",
        "baking cookies in a warm, flour-dusted kitchen",
        "checking the mail at a row of metal mailboxes",
        "waiting in line at a bakery counter",
    ],
    "professional environments": [
        "typing on a laptop at a desk in an open-plan office",
        "presenting a chart to colleagues in a glass-walled meeting room",
        "kneading dough in the back kitchen of a bakery",
        "examining a microscope slide in a bright laboratory",
        "arranging flowers behind the counter of a florist shop",
        "repairing a car engine in a busy garage",
        "serving espresso behind a cafe counter",
        "sorting parcels in a warehouse full of shelves",
        "painting a large canvas in an airy art studio",
        "reviewing blueprints at a construction site",
        "stocking shelves in a small pharmacy",
        "tuning a guitar in a music shop workshop",
        "slicing fish at a stall in a seafood market",
        "speaking into a microphone in a radio studio",
        "cutting hair in a retro barbershop",
        "shelving returned books in a university library",
        "checking inventory on a tablet in a hardware store",
        "welding a steel beam in a factory workshop",
        "plating dishes in a restaurant kitchen",
        "watering seedlings in a commercial greenhouse",
        "sketching a design on a drafting table",
        "recording a podcast in a small soundproof booth",
        "taking notes during a lecture in a wood-paneled hall",
        "packing boxes of fresh bread at a bakery",
    ],
    "cultural or recreational occasions": [
        "dancing at a wedding reception under a white tent",
        "playing the violin on a small concert stage",
        "looking at paintings in a quiet museum gallery",
        "lighting lanterns at a night festival",
        "cheering in the stands of a crowded football stadium",
        "bowling a strike in a neon-lit bowling alley",
        "singing karaoke in a small private room",
        "painting pottery at a weekend craft workshop",
        "playing chess in a park pavilion",
        "watching a parade from the edge of a busy street",
        "blowing out candles on a birthday cake",
        "trying on a costume backstage at a community theater",
        "tasting street food at a lively night market",
        "taking a photo of fireworks over a harbor",
        "drumming in a circle at a summer music festival",
        "riding a carousel at a county fair",
        "practicing calligraphy at a cultural center",
        "playing a board game at a cafe table",
        "visiting a sculpture garden",
        "decorating a holiday tree in a living room",
        "learning a folk dance in a village square",
        "reading poetry aloud at an open mic night",
        "watching a movie in a vintage cinema",
        "browsing stalls at a craft fair in a town hall",
    ],
    "outdoor activities": [
        "hiking along a rocky ridge above the clouds",
        "paddling a kayak across a calm mountain lake",
        "riding a bicycle down a tree-lined country road",
        "building a sandcastle on a wide sandy beach",
        "climbing a granite boulder in a pine forest",
        "flying a kite on a windy hilltop",
        "skiing down a powdery slope",
        "fishing from a wooden pier at sunrise",
        "jogging along a riverside path",
        "pitching a tent at a forest campsite",
        "surfing a small wave near the shore",
        "picking wildflowers in an alpine meadow",
        "skateboarding in a concrete skate park",
        "rowing a boat on a misty river",
        "walking across a suspension bridge in a canyon",
        "throwing a frisbee in a city park",
        "snowshoeing through a quiet birch forest",
        "roasting marshmallows over a campfire",
        "exploring tide pools on a rocky coast",
        "riding a horse along a dusty trail",
        "gardening in a raised bed behind a cottage",
        "crossing a stream on stepping stones",
        "watching birds through binoculars at a marsh",
        "sledding down a snowy hill",
    ],
}
# Professional settings a child is found in (the adult list would have children at work).
CHILD_PROFESSIONAL = [
    "visiting a fire station and sitting in a fire truck",
    "helping out behind the counter of a family bakery",
    "watching a veterinarian examine a puppy at a clinic",
    "touring a science laboratory in safety goggles",
    "sitting in the dentist's chair at a bright clinic",
    "watching a potter at a wheel in a ceramics studio",
    "looking at fish tanks in a pet shop",
    "helping a librarian stack books in a school library",
    "watching a baker decorate a cake in a pastry shop",
    "touring a newspaper printing press",
    "visiting a recording studio and wearing large headphones",
    "watching a mechanic fix a tractor in a farm workshop",
    "sorting letters at a small post office with a clerk",
    "trying on a hard hat at a construction site open day",
    "visiting a greenhouse with a gardener",
    "looking through a telescope at an observatory",
    "watching a carpenter sand a table in a workshop",
    "shadowing a chef in a restaurant kitchen",
    "feeding calves on a dairy farm with a farmer",
    "watching a glassblower shape a vase in a studio",
    "holding a stethoscope in a pediatric clinic",
    "exploring the cockpit of a parked airplane on a museum tour",
    "stamping library cards at a public library desk",
    "sitting at a news desk in a school television studio",
]
FRAMING_LEADS = [  # start a sentence: "<lead> of a woman reading ..."
    "A candid photo", "A close-up photograph", "A wide-angle shot", "A medium shot",
    "A documentary-style photograph", "A low-angle shot", "A side-view photograph",
    "An over-the-shoulder shot", "A cinematic still", "A snapshot",
]
FRAMING_TAILS = [  # end a sentence: "..., seen from across the room."
    "seen from a distance", "framed in a tight close-up", "captured in a wide shot",
    "photographed from a low angle", "shown from the side", "photographed from above",
    "framed by a doorway", "in a candid snapshot", "shot at eye level", "with a shallow depth of field",
]
LIGHT = {
    "daily life": ["in soft morning light", "under warm lamplight", "on a gray, rainy afternoon",
                   "in the golden light of late afternoon", "under a flickering ceiling light",
                   "in bright midday sun", "in the blue light of dusk", "lit by a single window"],
    "professional environments": ["under cool fluorescent lights", "in bright overhead light",
                                  "in the soft light of early morning", "lit by a wall of windows",
                                  "under warm pendant lamps", "in the late evening glow of desk lamps",
                                  "in flat, even daylight", "under harsh work lights"],
    "cultural or recreational occasions": ["under strings of warm lights", "in colorful stage lighting",
                                           "in the glow of lanterns", "in bright afternoon sun",
                                           "under soft spotlights", "in neon light at dusk",
                                           "in warm candlelight", "in the warm light of evening"],
    "outdoor activities": ["at golden hour", "in the pale light of dawn", "under a bright blue sky",
                           "on an overcast day", "in dappled forest shade", "under a dramatic stormy sky",
                           "in the last light of sunset", "on a crisp, clear winter morning"],
}
# Sentence shapes: a subject phrase ("a woman"), an activity, a framing and a light.
SHAPES = [
    "{lead} of {subj} {act} {light}.",
    "{Subj} is {act} {light}, {tail}.",
    "{Light}, {subj} is {act}.",
    "{Light}: {subj} {act}, {tail}.",
    "{Subj} {act} {light}.",  # a caption without a verb, as photo captions often are
]


# The possessive an activity uses ("tying {their} shoes"), agreeing with the subject word.
THEIR = {"man": "his", "woman": "her", "boy": "his", "girl": "her", "person": "their"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def sentences(setting: str, subject: str, rng: random.Random) -> list[str]:
    child = subject in ("boy", "girl")
    activities = CHILD_PROFESSIONAL if child and setting == "professional environments" else ACTIVITIES[setting]
    out: list[str] = []
    while len(out) < PER_SETTING:
        act = activities[len(out) % len(activities)].format(their=THEIR[subject])  # all once before any repeats
        subj = f"{article(subject)} {subject}"
        light = rng.choice(LIGHT[setting])
        shape = rng.choice(SHAPES)
        text = shape.format(lead=rng.choice(FRAMING_LEADS), tail=rng.choice(FRAMING_TAILS), subj=subj,
                            Subj=subj[0].upper() + subj[1:], act=act, light=light, Light=light[0].upper() + light[1:])
        if text not in out:
            out.append(text)
    return out


def main(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenes.jsonl")):
    rng = random.Random(2025)  # the paper's year: any fixed seed, so the file is reproducible
    with open(path, "w", encoding="utf-8") as f:
        for setting in ACTIVITIES:
            for subject in PEOPLE:
                for prompt in sentences(setting, subject, rng):
                    f.write(json.dumps({"setting": setting, "subject": subject, "prompt": prompt}) + "\n")
    print(path)


if __name__ == "__main__":
    main()
