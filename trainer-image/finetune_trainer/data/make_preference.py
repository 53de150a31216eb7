"""Generate the demo's preference pairs from the bundled healthcare sample (deterministic: same files every run).

    python trainer-image/finetune_trainer/data/make_preference.py [--check]

Reads `healthcare_train.jsonl` and `healthcare_test.jsonl` (written by `make_sample.py`) and writes
`healthcare_preference_train.jsonl` and `healthcare_preference_test.jsonl` next to this script in the
instruction form of `dataset.format: preference`: `prompt` (the row's instruction), `input`, `chosen` and
`rejected`. `--check` regenerates in memory and exits 1 if the committed files differ.

The test file has one pair per test row (50, the held-out pairs for preference accuracy). The training file
has one pair per second training row (199 of 398; the rows are already shuffled, so every task keeps its
share): a DPO step runs two sequences per pair plus the reference's pass over them, so half the rows keep
the CPU demo's DPO stage short, and the bundled data under the 300 kB that `tests/trainer/test_sample_data.py`
allows it (all 398 pairs would be 143 kB on their own).

chosen is the row's reference answer. rejected is a plausible answer with invented facts, in the same
sentence template, so the only thing that tells the two apart is whether the facts are right (what DPO
after SFT is for in a domain model: preferring grounded answers to hallucinated ones):

- dosing: a multiplied dose and daily maximum, and half the time another frequency;
- lab interpretation: the reference range moved past the value, so the verdict (low/normal/high) is wrong
  but consistent with the invented range;
- ICD-10-CM code lookup: the code of a neighbouring diagnosis (same chapter letter where there is one);
  reverse lookup: that diagnosis's name;
- abbreviations: the expansion of another abbreviation, preferably one starting with the same letter (the
  confusion a reader could make), always a domain term;
- discharge summaries: another drug (with its own usual dose and frequency), and a wrong follow-up
  interval or discharge value.

No claim is appended: a rejected answer one clause longer than its chosen one lets DPO learn "prefer the
shorter answer" instead of the facts (with an invented indication on half the dosing answers and "the same
code used for <diagnosis>" on the code lookups, the rejected answers were 7.4 tokens longer on average on the
tiny model's tokenizer; `preference_data.PairStats.length_bias`). Every rejected answer differs from the
chosen one and contains a term (word, number or code) that occurs in neither the prompt nor the chosen
answer (the generator checks both); all but the wrong codes of the code lookups are domain terms or numbers
the evaluation's hallucination score counts (it does not read ICD-10-CM codes as numbers).
The randomness is a `random.Random` seeded per row from SEED and the row's text (a string
seed hashes the same in every process), so one row's pair does not depend on the rows before it. The data
is SYNTHETIC and NOT medical advice.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path
from types import ModuleType

SEED = 20240611
HERE = Path(__file__).parent
#: output file: (source file, every how many source rows one becomes a pair)
SOURCES = {
    "healthcare_preference_train.jsonl": ("healthcare_train.jsonl", 2),
    "healthcare_preference_test.jsonl": ("healthcare_test.jsonl", 1),
}


def _sample() -> ModuleType:
    """make_sample.py beside this script: its fact tables are what the answers are made of (loaded by path, as
    data/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_sample", HERE / "make_sample.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


S = _sample()

FREQUENCIES = sorted({freq for _, _, freq, _ in S.DRUGS.values()})
#: Abbreviation expansions that are domain terms (the glossary leaves out plain English like "as needed").
TERM_EXPANSIONS = {abbr: exp for abbr, exp in S.ABBREVIATIONS.items() if exp not in S.NOT_TERMS}

_AMOUNT = re.compile(r"^(\d+(?:\.\d+)?) (\S+)$")
_LAB = re.compile(r"^(?P<name>.+?) (?P<value>-?\d+(?:\.\d+)?)(?P<unit> \S+)? is (?:low|normal|high) "
                  r"\(reference [^)]*\), (?:consistent with .+|with no abnormality)\.$")
_DISCHARGE = re.compile(r"; discharge (?P<lab>.+?) (?P<value>\d+(?:\.\d+)?)(?P<unit> \S+)?; follow-up in "
                        r"(?P<days>\d+) days\.$")


def _number(value: float) -> str:
    """A number as the sample writes doses: no trailing zeros (12.5, 1000)."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _scaled(amount: str, factor: float) -> str:
    """"500 mg" times `factor`, in the same unit."""
    match = _AMOUNT.match(amount)
    assert match, amount
    return f"{_number(float(match[1]) * factor)} {match[2]}"


def _lab_key(name: str) -> str:
    """The LABS key of a capitalized lab name in an answer ("Troponin I" -> "troponin I")."""
    keys = [lab for lab in S.LABS if S.cap(lab) == name]
    assert len(keys) == 1, name
    return keys[0]


def _lab_sentence(lab: str, value: str, low: int, high: int, verdict: str) -> str:
    """An interpretation in make_sample's template, against the range low..high (in steps of the lab's
    decimals: integers keep the arithmetic exact)."""
    unit, _, _, decimals, when_low, when_high = S.LABS[lab]
    step = 10 ** -decimals
    reference = f"{S.fmt(low * step, decimals)}-{S.fmt(high * step, decimals)} {unit}".strip()
    shown = S.lab_value_text(lab, value)
    tail = {"low": f"consistent with {when_low}", "high": f"consistent with {when_high}",
            "normal": "with no abnormality"}[verdict]
    return f"{S.cap(lab)} {shown} is {verdict} (reference {reference}), {tail}."


def reject_lab(chosen: str, rng: random.Random) -> str:
    """Move the reference range past the value so the verdict is wrong but fits the range: high -> normal,
    low -> normal, normal -> high (range below the value) or low (range above it)."""
    match = _LAB.match(chosen)
    assert match, chosen
    lab = _lab_key(match["name"])
    _, low, high, decimals, when_low, _ = S.LABS[lab]
    step = 10 ** -decimals
    value, lo, hi = (round(x / step) for x in (float(match["value"]), low, high))
    span = hi - lo
    shift = max(1, round(span * rng.choice((0.2, 0.3, 0.4))))
    if value > hi:
        return _lab_sentence(lab, match["value"], lo, value + shift, "normal")
    if value < lo:
        # Keep the invented lower bound above 0 where the value allows: "0.0-11.0" reads as made up.
        return _lab_sentence(lab, match["value"], max(value // 2, value - shift), hi, "normal")
    below = (max(0, lo - shift - span // 2), value - shift)
    # "High" needs a range that ends above 0 and below the value; labs whose low values mean nothing
    # ("no clinical concern") use it whenever it fits, the others half the time.
    if below[0] < below[1] and (when_low == "no clinical concern" or rng.random() < 0.5):
        return _lab_sentence(lab, match["value"], *below, "high")
    return _lab_sentence(lab, match["value"], value + shift, hi + shift + span // 2, "low")


def reject_dose(drug: str, rng: random.Random) -> str:
    """A multiplied dose and daily maximum, and half the time another frequency."""
    dose, route, freq, maximum = S.DRUGS[drug]
    wrong_freq = rng.choice([f for f in FREQUENCIES if f != freq]) if rng.random() < 0.5 else freq
    return (f"{S.cap(drug)} usual adult dose is {_scaled(dose, rng.choice((2, 3, 4)))} {route} {wrong_freq}, with a "
            f"maximum of {_scaled(maximum, rng.choice((2, 3)))} per day.")


def _neighbour(diagnosis: str, rng: random.Random) -> str:
    """Another ICD-10-CM diagnosis, from the same chapter (first letter of the code) when there is one."""
    code = S.ICD10[diagnosis]
    others = [d for d in S.ICD10 if d != diagnosis and d.split(",")[0] not in diagnosis]
    same = [d for d in others if S.ICD10[d][0] == code[0]]
    return rng.choice(same or others)


def reject_abbreviation(abbr: str, rng: random.Random) -> str:
    expansion = S.ABBREVIATIONS[abbr]
    others = {a: e for a, e in TERM_EXPANSIONS.items() if a != abbr and e != expansion}
    alike = [e for a, e in others.items() if a[0] == abbr[0]]
    return f"In clinical notes, {abbr} is an abbreviation for {rng.choice(alike or sorted(others.values()))}."


def reject_discharge(chosen: str, rng: random.Random) -> str:
    """Another drug (with its own usual dose and frequency), and a wrong follow-up or discharge value."""
    used = [d for d in S.DRUGS if f" with {d} " in chosen]
    assert len(used) == 1, chosen
    drug = used[0]
    dose, _, freq, _ = S.DRUGS[drug]
    other = rng.choice([d for d in S.DRUGS if d not in chosen])
    other_dose, _, other_freq, _ = S.DRUGS[other]
    text = chosen.replace(f" with {drug} {dose} {freq};", f" with {other} {other_dose} {other_freq};")
    match = _DISCHARGE.search(text)
    assert match, chosen
    if rng.random() < 0.5:
        days = rng.choice([d for d in (3, 5, 7, 10, 14) if d != int(match["days"])])
        return text[:match.start("days")] + str(days) + text[match.end("days"):]
    lab = match["lab"]
    decimals = S.LABS[lab][3]
    value = float(match["value"]) * rng.choice((0.75, 1.25))
    return text[:match.start("value")] + S.fmt(value, decimals) + text[match.end("value"):]


def reject(row: dict[str, str]) -> str:
    """The rejected answer of one instruction row of the sample (dispatch on the answer's template)."""
    chosen = row["output"]
    rng = random.Random(f"{SEED}:{row['instruction']}:{row['input']}")
    if (match := re.match(r"^(.+) usual adult dose is ", chosen)) is not None:
        return reject_dose(match[1][0].lower() + match[1][1:], rng)
    if (match := re.match(r"^The ICD-10-CM code for (.+) is (\S+)\.$", chosen)) is not None:
        return f"The ICD-10-CM code for {match[1]} is {S.ICD10[_neighbour(match[1], rng)]}."
    if (match := re.match(r"^ICD-10-CM code (\S+) describes (.+)\.$", chosen)) is not None:
        return f"ICD-10-CM code {match[1]} describes {_neighbour(match[2], rng)}."
    if (match := re.match(r"^In clinical notes, (\S+) is an abbreviation for ", chosen)) is not None:
        return reject_abbreviation(match[1], rng)
    if " treated for " in chosen:
        return reject_discharge(chosen, rng)
    return reject_lab(chosen, rng)


def _words(text: str) -> set[str]:
    """Lower-cased words and numbers (decimals and codes kept whole), for the generator's own check."""
    return set(re.findall(r"[a-z0-9]+(?:[.-][a-z0-9]+)*", text.lower()))


def pair(row: dict[str, str]) -> dict[str, str]:
    rejected = reject(row)
    invented = _words(rejected) - _words(f"{row['instruction']} {row['input']} {row['output']}")
    # Guards on the generator itself: a pair that teaches nothing, or a rejected answer with nothing
    # invented, is a bug here, not data to ship.
    assert rejected.strip() != row["output"].strip(), row
    assert invented, (row, rejected)
    return {"prompt": row["instruction"], "input": row["input"], "chosen": row["output"], "rejected": rejected}


def generate() -> dict[str, str]:
    out = {}
    for name, (source, every) in SOURCES.items():
        rows = [json.loads(line) for line in (HERE / source).read_text().splitlines() if line.strip()]
        out[name] = "".join(json.dumps(pair(row), ensure_ascii=True) + "\n" for row in rows[::every])
    return out


def main(argv: list[str]) -> int:
    files = generate()
    if "--check" in argv:
        stale = [name for name, text in files.items()
                 if not (HERE / name).exists() or (HERE / name).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    for name, text in files.items():
        (HERE / name).write_text(text)
        print(f"wrote {name}: {text.count(chr(10))} lines, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
