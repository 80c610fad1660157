"""The embedded demo model: runs anywhere, downloads nothing, and says nothing sensible.

A small Llama-shaped model with seeded random weights and a word tokenizer built
here; built once into the cache folder, then loaded like any local model. Its
output is random text: it exists to show the service working, Chat included (it
ships a small chat template). Random weights pick tokens at random, so the
tokenizer has only whole English words and single characters (never a part of a
UTF-8 character): the text reads as random words, not as a wall of U+FFFD.

Building takes a few seconds on the first start with a cache folder; the log says
where it goes and how long it took, so a first start does not look hung.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from modelserve.models.random_init import build_random_model, build_word_tokenizer

log = logging.getLogger(__name__)

DEMO_MODEL_ID = "modelserve-demo"
# Bump when the recipe changes, so old caches are not reused. 2: the word tokenizer (1 was byte-level BPE);
# 3: the chat template.
DEMO_VERSION = 3
# Each message as `role: content`, ended by EOS (the model's end of a turn), then `assistant:` for the reply.
# Only spaces, ASCII and EOS: the word tokenizer encodes anything else (a newline too) as <unk>.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# The demo vocabulary: common English words, lower case, one piece each.
_WORD_LIST = """
a about above across act add after again against age ago agree air all almost alone along already also always am
amber among an and animal another answer any appear apple are area arm around arrive art as ask at autumn away
baby back bad badger bag ball banana bank barley base basket be bean bear beat beautiful because become bed been
before begin behind believe bell below best better between big birch bird bit black blood blossom blue board
boat body bone book born both bottom boulder box boy branch bread break breeze bright bring broad brother brown
build burn busy but butter buy by cabbage cake call came camp can candle canyon capital captain car card care
carrot carry case cat catch cause cedar cell center century chair chance change character charge chart check
cheese cherry chief child children choose church circle city class clean clear climb clock close cloth cloud
coast coat coffee cold collect colony color column come common company compare complete condition consider
contain continue control cook cookie cool copper copy corn corner correct cost cotton could count country course
cover cow crease create crop cross crowd cry current cut dad dance danger dark day dead deal dear death decide
deep deer degree depend describe desert design determine develop dictionary did die differ difficult direct
discuss distant divide do doctor does dog dollar dolphin done door double down draw dream dress drink drive drop
dry duck during each ear early earth ease east eat edge effect egg eight either electric element else end enemy
energy engine enough enter equal even evening event ever every exact example except excite exercise expect
experience experiment eye face fact fair falcon fall family famous far farm fast fat father favor fear feather
feed feel feet fell fern few field fig fight figure fill final find fine finger finish fire first fish fit five
flat floor flow flower fly follow food foot for force forest form forward found four fox fraction free fresh
friend from front fruit full fun game garden garlic gas gather gave general gentle get girl give glacier glad
glass go gold gone good got govern grand grape grass gray great green grew ground group grow guess guide gun had
hair half hall hand happen happy harbor hard harvest has hat have he head hear heard heart heat heavy held help
her here heron high hill him his history hit hold hole home honey hope horse hot hotel hour house how huge human
hundred hunt hurry ice idea if imagine in inch include indicate industry insect instant instrument interest into
invent iron is island it ivy jam job join joy jump just keep kept key kill kind king kitchen knew know lady
lagoon lake land language lantern large last late laugh law lay lead learn least leave led left leg lemon length
less let letter level lie life lift light like line liquid list listen little live locate log lone long look
lost lot loud love low machine made magnet main major make man many map maple marble mark market mass master
match material matter may me meadow mean meant measure meat meet melody melon men metal method middle might mile
milk million mind mine minute miss modern moment money month moon moose more morning moss most mother motion
mountain mouth move much music must my name nation natural nature near necessary neck need neighbor never new
next night nine no noise noodle noon nor north nose note nothing notice noun now number numeral oak oat object
observe occur ocean of off offer office often oh oil old on once one onion only open operate opposite or orchard
order organ original other otter our out over own oxygen page paint pair paper paragraph parent part particular
party pass past path pattern pay peach pebble people pepper perhaps period person phrase pick picture pie piece
pine pitch place plain plan plane planet plant play please plum plural poem point poor populate port pose
position possible post potato pound power practice prairie prepare present press pretty print probable problem
process produce product proper property protect prove provide pull push put quart question quick quiet quite
quotient rabbit race radio rail rain raise ran range rather reach read ready real reason receive record red
region remember repeat reply represent require rest result rice rich ride right ring rise river road rock roll
room root rope rose round row rub rule run safe said sail salmon salt same sand sat save saw say scale school
science score sea search season seat second section see seed seem segment select self sell send sense sentence
separate serve set settle seven several shall shape share sharp she sheet shell shine ship shoe shop shore short
should shoulder shout show side sight sign silent silver similar simple since sing single sister sit six size
skill skin sky sleep slip slow small smell smile snow so soft soil soldier solution solve some son song soon
sound soup south space sparrow speak special speech speed spell spend spoke spot spread spring square squirrel
stand star start state station stay steam steel step stick still stone stood stop store story straight strange
stream street stretch string strong student study subject substance success such sudden suffix sugar suggest
suit summer sun supply support sure surface surprise swim syllable symbol system table tail take talk tall tea
teach team teeth tell temperature ten term test than thank that the their them then there these they thick thin
thing think third this those though thought thousand three through throw thunder thus tie time tiny tire to
together told tomato tone too took tool top total touch toward town track trade train travel tree triangle trip
trouble trout truck true try tube tundra turn turtle twenty two type under unit until up upon us use usual
valley value vary velvet verb very view village visit voice volcano vowel wait walk wall want war warm was wash
watch water wave way we wear weather week weight well went were west whale what wheat wheel when where whether
which while whisper white who whole whose why wide wife wild will willow win wind window wing winter wire wise
wish with wolf woman women wonder wood word work world would write written wrong wrote yard year yellow yes yet
you young your zero zone
"""
DEMO_WORDS = tuple(_WORD_LIST.split())


def demo_model_dir(cache_dir: Path) -> Path:
    """The demo model's directory, built on first use."""
    target = cache_dir / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        log.info("demo model: reusing %s", target)
        return target
    log.info("building the demo model into %s (once: later starts with this --cache-dir reuse it)", target)
    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache_dir))
    try:
        build_random_model(
            staging,
            "llama",
            seed=1234,
            hidden=128,
            layers=4,
            heads=4,
            tokenizer=build_word_tokenizer(DEMO_WORDS),
            chat_template=DEMO_CHAT_TEMPLATE,
        )
        try:
            os.replace(staging, target)  # atomic: two servers starting together both end well
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built the demo model in %.1fs", time.monotonic() - started)
    return target
