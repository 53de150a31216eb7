"""Generate the bundled synthetic healthcare sample (deterministic: same files on every run).

    python trainer-image/finetune_trainer/data/make_sample.py [--check]

Writes `healthcare_train.jsonl`, `healthcare_test.jsonl`, `healthcare_glossary.txt` and the retrieval corpus
`healthcare_corpus.jsonl` (a small clinical handbook: one document per drug, lab, code, abbreviation and
admission type, in prose of its own, with `title` and `text`) next to this script from the fact tables below
and a fixed seed. `--check` regenerates in memory and exits 1 if the committed
files differ.

The rows use the instruction format (`instruction`, `input`, `output`). Every task answers with one fixed
template whose numbers and terms come from the fact tables, so a tiny model can learn the mapping and a
fine-tune shows a clear evaluation gain. The data is SYNTHETIC and NOT medical advice: the values are
typical textbook figures chosen for a demo, not dosing guidance.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 20240611
TEST_ROWS = 50
HERE = Path(__file__).parent

# name: (dose, route, frequency, maximum per day)
DRUGS: dict[str, tuple[str, str, str, str]] = {
    "metformin": ("500 mg", "by mouth", "twice daily", "2550 mg"),
    "lisinopril": ("10 mg", "by mouth", "once daily", "80 mg"),
    "atorvastatin": ("20 mg", "by mouth", "once daily", "80 mg"),
    "amlodipine": ("5 mg", "by mouth", "once daily", "10 mg"),
    "metoprolol tartrate": ("50 mg", "by mouth", "twice daily", "450 mg"),
    "omeprazole": ("20 mg", "by mouth", "once daily", "40 mg"),
    "pantoprazole": ("40 mg", "by mouth", "once daily", "80 mg"),
    "amoxicillin": ("500 mg", "by mouth", "every 8 hours", "3000 mg"),
    "acetaminophen": ("650 mg", "by mouth", "every 6 hours", "3000 mg"),
    "ibuprofen": ("400 mg", "by mouth", "every 6 hours", "3200 mg"),
    "furosemide": ("40 mg", "by mouth", "once daily", "600 mg"),
    "hydrochlorothiazide": ("25 mg", "by mouth", "once daily", "50 mg"),
    "losartan": ("50 mg", "by mouth", "once daily", "100 mg"),
    "sertraline": ("50 mg", "by mouth", "once daily", "200 mg"),
    "gabapentin": ("300 mg", "by mouth", "three times daily", "3600 mg"),
    "ceftriaxone": ("1 g", "intravenously", "once daily", "4 g"),
    "clopidogrel": ("75 mg", "by mouth", "once daily", "75 mg"),
    "simvastatin": ("20 mg", "by mouth", "once daily", "40 mg"),
    "rosuvastatin": ("10 mg", "by mouth", "once daily", "40 mg"),
    "ondansetron": ("8 mg", "by mouth", "every 8 hours", "24 mg"),
    "doxycycline": ("100 mg", "by mouth", "twice daily", "200 mg"),
    "ciprofloxacin": ("500 mg", "by mouth", "twice daily", "1500 mg"),
    "cephalexin": ("500 mg", "by mouth", "every 6 hours", "4000 mg"),
    "tramadol": ("50 mg", "by mouth", "every 6 hours", "400 mg"),
    "spironolactone": ("25 mg", "by mouth", "once daily", "100 mg"),
    "carvedilol": ("6.25 mg", "by mouth", "twice daily", "50 mg"),
    "allopurinol": ("100 mg", "by mouth", "once daily", "800 mg"),
    "montelukast": ("10 mg", "by mouth", "once daily", "10 mg"),
    "citalopram": ("20 mg", "by mouth", "once daily", "40 mg"),
    "escitalopram": ("10 mg", "by mouth", "once daily", "20 mg"),
    "fluoxetine": ("20 mg", "by mouth", "once daily", "80 mg"),
    "enoxaparin": ("40 mg", "subcutaneously", "once daily", "40 mg"),
}

# name: (unit, low, high, decimals, meaning when low, meaning when high)
LABS: dict[str, tuple[str, float, float, int, str, str]] = {
    "sodium": ("mmol/L", 135, 145, 0, "hyponatremia", "hypernatremia"),
    "potassium": ("mmol/L", 3.5, 5.0, 1, "hypokalemia", "hyperkalemia"),
    "chloride": ("mmol/L", 98, 106, 0, "hypochloremia", "hyperchloremia"),
    "bicarbonate": ("mmol/L", 22, 29, 0, "metabolic acidosis", "metabolic alkalosis"),
    "fasting glucose": ("mg/dL", 70, 99, 0, "hypoglycemia", "hyperglycemia"),
    "creatinine": ("mg/dL", 0.6, 1.2, 1, "low muscle mass", "reduced kidney function"),
    "blood urea nitrogen": ("mg/dL", 7, 20, 0, "low protein intake", "azotemia"),
    "calcium": ("mg/dL", 8.5, 10.5, 1, "hypocalcemia", "hypercalcemia"),
    "magnesium": ("mg/dL", 1.7, 2.2, 1, "hypomagnesemia", "hypermagnesemia"),
    "hemoglobin": ("g/dL", 12.0, 17.5, 1, "anemia", "polycythemia"),
    "white blood cell count": ("x10^3/uL", 4.5, 11.0, 1, "leukopenia", "leukocytosis"),
    "platelet count": ("x10^3/uL", 150, 450, 0, "thrombocytopenia", "thrombocytosis"),
    "HbA1c": ("%", 4.0, 5.6, 1, "low average glucose", "diabetes-range average glucose"),
    "TSH": ("mIU/L", 0.4, 4.0, 1, "hyperthyroidism", "hypothyroidism"),
    "ALT": ("U/L", 7, 56, 0, "no clinical concern", "hepatocellular injury"),
    "INR": ("", 0.8, 1.1, 1, "no clinical concern", "impaired coagulation or anticoagulant effect"),
    "albumin": ("g/dL", 3.5, 5.0, 1, "hypoalbuminemia", "dehydration"),
    "lactate": ("mmol/L", 0.5, 2.2, 1, "no clinical concern", "hyperlactatemia"),
    "troponin I": ("ng/mL", 0.0, 0.04, 2, "no clinical concern", "myocardial injury"),
    "LDL cholesterol": ("mg/dL", 0, 99, 0, "no clinical concern", "hypercholesterolemia"),
}

ICD10: dict[str, str] = {
    "essential (primary) hypertension": "I10",
    "type 2 diabetes mellitus without complications": "E11.9",
    "type 1 diabetes mellitus without complications": "E10.9",
    "hyperlipidemia, unspecified": "E78.5",
    "acute myocardial infarction, unspecified": "I21.9",
    "heart failure, unspecified": "I50.9",
    "unspecified atrial fibrillation": "I48.91",
    "chronic obstructive pulmonary disease, unspecified": "J44.9",
    "unspecified asthma, uncomplicated": "J45.909",
    "pneumonia, unspecified organism": "J18.9",
    "urinary tract infection, site not specified": "N39.0",
    "acute kidney failure, unspecified": "N17.9",
    "chronic kidney disease, unspecified": "N18.9",
    "major depressive disorder, single episode, unspecified": "F32.9",
    "generalized anxiety disorder": "F41.1",
    "hypothyroidism, unspecified": "E03.9",
    "iron deficiency anemia, unspecified": "D50.9",
    "gastro-esophageal reflux disease without esophagitis": "K21.9",
    "sepsis, unspecified organism": "A41.9",
    "cerebral infarction, unspecified": "I63.9",
    "obesity, unspecified": "E66.9",
    "low back pain, unspecified": "M54.50",
    "gout, unspecified": "M10.9",
    "hypokalemia": "E87.6",
    "dehydration": "E86.0",
    "cellulitis, unspecified": "L03.90",
    "COVID-19": "U07.1",
    "acute bronchitis, unspecified": "J20.9",
    "obstructive sleep apnea": "G47.33",
    "nicotine dependence, cigarettes, uncomplicated": "F17.210",
}

ABBREVIATIONS: dict[str, str] = {
    "BID": "twice a day",
    "TID": "three times a day",
    "QID": "four times a day",
    "PRN": "as needed",
    "PO": "by mouth",
    "IV": "intravenous",
    "IM": "intramuscular",
    "SC": "subcutaneous",
    "NPO": "nothing by mouth",
    "QHS": "at bedtime",
    "HTN": "hypertension",
    "DM": "diabetes mellitus",
    "CHF": "congestive heart failure",
    "COPD": "chronic obstructive pulmonary disease",
    "MI": "myocardial infarction",
    "CKD": "chronic kidney disease",
    "AKI": "acute kidney injury",
    "UTI": "urinary tract infection",
    "SOB": "shortness of breath",
    "BP": "blood pressure",
    "HR": "heart rate",
    "CBC": "complete blood count",
    "BMP": "basic metabolic panel",
    "CMP": "comprehensive metabolic panel",
    "ECG": "electrocardiogram",
    "CXR": "chest X-ray",
    "DVT": "deep vein thrombosis",
    "PE": "pulmonary embolism",
    "GERD": "gastroesophageal reflux disease",
    "AF": "atrial fibrillation",
    "ICU": "intensive care unit",
    "ED": "emergency department",
    "INR": "international normalized ratio",
    "BMI": "body mass index",
    "NKDA": "no known drug allergies",
    "STAT": "immediately",
}

# admission diagnosis: (ICD-10 key, drugs started, discharge labs checked)
ADMISSIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "community-acquired pneumonia": ("pneumonia, unspecified organism", ("ceftriaxone", "doxycycline"),
                                     ("white blood cell count", "lactate")),
    "urinary tract infection": ("urinary tract infection, site not specified", ("ciprofloxacin", "cephalexin"),
                                ("creatinine", "white blood cell count")),
    "heart failure exacerbation": ("heart failure, unspecified", ("furosemide", "carvedilol", "spironolactone"),
                                   ("potassium", "creatinine", "sodium")),
    "hypertensive urgency": ("essential (primary) hypertension", ("amlodipine", "lisinopril", "losartan"),
                             ("potassium", "creatinine")),
    "uncontrolled type 2 diabetes": ("type 2 diabetes mellitus without complications", ("metformin",),
                                     ("fasting glucose", "HbA1c")),
    "atrial fibrillation with rapid ventricular response": ("unspecified atrial fibrillation",
                                                           ("metoprolol tartrate",), ("potassium", "magnesium")),
    "acute myocardial infarction": ("acute myocardial infarction, unspecified",
                                    ("clopidogrel", "atorvastatin", "metoprolol tartrate"), ("troponin I",)),
    "cellulitis of the leg": ("cellulitis, unspecified", ("cephalexin", "doxycycline"),
                              ("white blood cell count",)),
    "acute gout flare": ("gout, unspecified", ("allopurinol",), ("creatinine",)),
    "gastro-esophageal reflux": ("gastro-esophageal reflux disease without esophagitis",
                                 ("pantoprazole", "omeprazole"), ("hemoglobin",)),
}

FILLER = (
    "Vital signs remained stable.",
    "No complications occurred during the stay.",
    "The patient tolerated a regular diet.",
    "Pain was controlled with oral medication.",
    "Ambulating independently at discharge.",
    "Medication teaching was completed.",
)

DOSE_QUESTIONS = (
    ("What is the usual adult dose of this medication?", "{drug}"),
    ("Give the standard adult dosing, including the daily maximum.", "{drug}"),
    ("How is {drug} usually dosed in adults?", ""),
)
LAB_QUESTIONS = (
    ("Interpret this lab result for an adult patient.", "{lab}: {value}"),
    ("Is this lab value low, normal or high? Explain briefly.", "{lab} {value}"),
)
ICD_QUESTIONS = (
    ("Give the ICD-10-CM code for this diagnosis.", "{diagnosis}"),
    ("Which ICD-10-CM code is used for {diagnosis}?", ""),
)
ICD_REVERSE = ("What diagnosis does this ICD-10-CM code describe?", "{code}")
ABBR_QUESTIONS = (
    ("Expand this clinical abbreviation.", "{abbr}"),
    ("What does this abbreviation mean in a clinical note?", "{abbr}"),
)
SUMMARY_QUESTION = "Summarize this discharge note in one sentence."


def cap(text: str) -> str:
    """Upper-case the first letter only (`troponin I` -> `Troponin I`, not `Troponin i`)."""
    return text[:1].upper() + text[1:]


def fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def dosing_rows() -> list[dict[str, str]]:
    rows = []
    for drug, (dose, route, freq, maximum) in DRUGS.items():
        output = f"{cap(drug)} usual adult dose is {dose} {route} {freq}, with a maximum of {maximum} per day."
        for instruction, inp in DOSE_QUESTIONS:
            rows.append(row(instruction.format(drug=drug), inp.format(drug=drug), output))
    return rows


def lab_value_text(lab: str, value: str) -> str:
    unit = LABS[lab][0]
    return f"{value} {unit}".strip()


def lab_output(lab: str, value: float) -> str:
    unit, low, high, decimals, when_low, when_high = LABS[lab]
    shown = lab_value_text(lab, fmt(value, decimals))
    reference = f"{fmt(low, decimals)}-{fmt(high, decimals)} {unit}".strip()
    name = cap(lab)
    if value < low:
        return f"{name} {shown} is low (reference {reference}), consistent with {when_low}."
    if value > high:
        return f"{name} {shown} is high (reference {reference}), consistent with {when_high}."
    return f"{name} {shown} is normal (reference {reference}), with no abnormality."


def lab_values(rng: random.Random, lab: str) -> list[float]:
    _, low, high, decimals, when_low, _ = LABS[lab]
    span = high - low
    step = 10 ** -decimals
    values = {round(rng.uniform(low + step, high - step), decimals) for _ in range(2)}
    values |= {round(rng.uniform(high + step, high + span * 0.8 + step), decimals) for _ in range(2)}
    if when_low != "no clinical concern" and low - span * 0.5 > 0:
        values |= {round(rng.uniform(max(low - span * 0.5, step), low - step), decimals) for _ in range(2)}
    return sorted(values)


def lab_rows(rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for lab in LABS:
        for value in lab_values(rng, lab):
            instruction, inp = LAB_QUESTIONS[len(rows) % len(LAB_QUESTIONS)]
            shown = lab_value_text(lab, fmt(value, LABS[lab][3]))
            rows.append(row(instruction, inp.format(lab=lab, value=shown), lab_output(lab, value)))
    return rows


def icd_rows() -> list[dict[str, str]]:
    rows = []
    for diagnosis, code in ICD10.items():
        output = f"The ICD-10-CM code for {diagnosis} is {code}."
        for instruction, inp in ICD_QUESTIONS:
            rows.append(row(instruction.format(diagnosis=diagnosis), inp.format(diagnosis=diagnosis), output))
        rows.append(row(ICD_REVERSE[0], ICD_REVERSE[1].format(code=code),
                        f"ICD-10-CM code {code} describes {diagnosis}."))
    return rows


def abbreviation_rows() -> list[dict[str, str]]:
    rows = []
    for abbr, expansion in ABBREVIATIONS.items():
        output = f"In clinical notes, {abbr} is an abbreviation for {expansion}."
        for instruction, inp in ABBR_QUESTIONS:
            rows.append(row(instruction, inp.format(abbr=abbr), output))
    return rows


def discharge_rows(rng: random.Random, count: int) -> list[dict[str, str]]:
    rows = []
    admissions = sorted(ADMISSIONS)
    for _ in range(count):
        reason = rng.choice(admissions)
        diagnosis, drugs, labs = ADMISSIONS[reason]
        drug = rng.choice(drugs)
        lab = rng.choice(labs)
        age = rng.randint(24, 91)
        sex = rng.choice(("man", "woman"))
        days = rng.choice((3, 5, 7, 10, 14))
        dose, route, freq, _ = DRUGS[drug]
        _, low, high, decimals, _, _ = LABS[lab]
        value = lab_value_text(lab, fmt(rng.uniform(low, high), decimals))
        filler = " ".join(rng.sample(FILLER, 2))
        note = (
            f"{age}-year-old {sex} admitted with {reason}. {cap(drug)} {dose} {route} {freq} was "
            f"started. {filler} Discharge {lab} was {value}. Discharged home in stable condition with "
            f"follow-up in {days} days."
        )
        output = (
            f"{age}-year-old {sex} treated for {reason} ({ICD10[diagnosis]}) with {drug} {dose} {freq}; "
            f"discharge {lab} {value}; follow-up in {days} days."
        )
        rows.append(row(SUMMARY_QUESTION, note, output))
    return rows


def row(instruction: str, inp: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": inp, "output": output}


#: Phrases in the tables that are plain English rather than domain terms: not in the glossary.
NOT_TERMS = {
    "twice a day", "three times a day", "four times a day", "as needed", "by mouth", "at bedtime",
    "immediately", "nothing by mouth", "no clinical concern", "low muscle mass", "low protein intake",
    "low average glucose", "diabetes-range average glucose", "reduced kidney function",
    "impaired coagulation or anticoagulant effect",
}


def glossary() -> list[str]:
    terms = set(DRUGS) | set(ABBREVIATIONS) | set(ABBREVIATIONS.values()) | {"ICD-10-CM"}
    terms |= {lab for lab in LABS} | {m for lab in LABS.values() for m in lab[4:]}
    terms |= set(ADMISSIONS)
    terms |= {d.split(",")[0] for d in ICD10}
    return sorted(terms - NOT_TERMS, key=str.lower)


def _lab_meaning(meaning: str) -> str:
    return "is usually of no clinical concern" if meaning == "no clinical concern" else f"suggests {meaning}"


def corpus() -> list[dict[str, str]]:
    """The handbook behind `spec.retrieval` in the demo: the fact tables, written as reference prose (not as
    the answers' templates), plus a few general documents that answer no test question."""
    docs = []
    for drug, (dose, route, freq, maximum) in DRUGS.items():
        docs.append({"title": f"Medication: {drug}", "text": (
            f"{cap(drug)} is given to adults {route}. The usual adult dose is {dose} {freq}. "
            f"Do not exceed {maximum} of {drug} in 24 hours.")})
    for lab, (unit, low, high, decimals, when_low, when_high) in LABS.items():
        reference = f"{fmt(low, decimals)}-{fmt(high, decimals)} {unit}".strip()
        docs.append({"title": f"Laboratory: {lab}", "text": (
            f"The adult reference range for {lab} is {reference}. A result below the range "
            f"{_lab_meaning(when_low)}. A result above the range {_lab_meaning(when_high)}.")})
    for diagnosis, code in ICD10.items():
        docs.append({"title": f"ICD-10-CM {code}", "text": (
            f"ICD-10-CM code {code} is assigned for {diagnosis}. Use it when the record documents "
            f"{diagnosis.split(',')[0]}.")})
    for abbr, expansion in ABBREVIATIONS.items():
        docs.append({"title": f"Abbreviation {abbr}", "text": (
            f"In clinical documentation {abbr} stands for {expansion}.")})
    for reason, (diagnosis, drugs, labs) in ADMISSIONS.items():
        docs.append({"title": f"Admission: {reason}", "text": (
            f"An admission for {reason} is coded {ICD10[diagnosis]} ({diagnosis}). Medications often started: "
            f"{', '.join(drugs)}. Checked before discharge: {', '.join(labs)}.")})
    docs += [
        {"title": "Hand hygiene", "text": "Clean hands before and after every patient contact, with an "
         "alcohol-based rub or with soap and water when hands are visibly soiled."},
        {"title": "Medication reconciliation", "text": "At admission and at discharge, compare the medication "
         "list with what the patient actually takes, and record every change with its reason."},
        {"title": "Discharge summaries", "text": "A discharge summary states the reason for admission, the "
         "treatment given, the relevant results at discharge and the follow-up plan."},
    ]
    return docs


def generate() -> dict[str, str]:
    rng = random.Random(SEED)
    rows = dosing_rows() + lab_rows(rng) + icd_rows() + abbreviation_rows() + discharge_rows(rng, 90)
    unique = {(r["instruction"], r["input"]): r for r in rows}  # disjoint prompts across the split
    pool = list(unique.values())
    rng.shuffle(pool)
    test, train = pool[:TEST_ROWS], pool[TEST_ROWS:]

    def jsonl(items: list[dict[str, str]]) -> str:
        return "".join(json.dumps(item, ensure_ascii=True) + "\n" for item in items)

    return {
        "healthcare_train.jsonl": jsonl(train),
        "healthcare_test.jsonl": jsonl(test),
        "healthcare_glossary.txt": "".join(term + "\n" for term in glossary()),
        "healthcare_corpus.jsonl": jsonl(corpus()),
    }


def main(argv: list[str]) -> int:
    files = generate()
    if "--check" in argv:
        stale = [name for name, text in files.items() if (HERE / name).read_text() != text]
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
