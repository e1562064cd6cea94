"""Real facts about ~250 countries from the `countryinfo` package, as zsRE-style EditRecords.

The package (MIT, on PyPI) ships one JSON file per country in `countryinfo/data/`; this module
reads those files directly (located with importlib, without importing the package). Four
relations, each with several phrasing templates:

    capital    "The capital of France is" -> "Paris"
    region     "France is located in" -> "Europe"    ("Americas" becomes "the Americas")
    currency   "The currency of France is the" -> "euro"
    languages  "The official language of France is" -> "French"

The data gives currency and language *codes* (ISO 4217, ISO 639-1); `CURRENCY_NAMES` and
`LANGUAGE_NAMES` below turn them into common English names. ISO 4217 fund codes (BOV, CLF,
CHE, CHW, USN, USS, UYI: accounting units, not money people pay with) are dropped. Where a
country lists several currencies or languages the first remaining one is the target and all of
them are in `extra["answers"]`. Facts are as the package states them (some are dated, e.g. the
Croatian kuna).

Record layout (deterministic for a given seed):
* prompt = the first template, rephrases = the other templates (the adapt rows);
* target_true = the country's answer; target_new = another country's different answer for the
  same relation (a CounterFact-style counterfactual, drawn with the seed);
* locality = the *same relation for other countries* (`n_loc` of them, drawn with the seed),
  with their true answers, like CounterFact's neighborhood prompts: an edit of France's capital
  must not move Germany's. (Other relations of the same country would test a different and
  weaker kind of locality, so they are not used.)

Countries missing a relation's field (Antarctica has no capital, Macau no capital, ...) are
skipped for that relation and reported in `RecordList.skipped` and `country_fact_counts`.
Duplicate entries of one ISO country (two Curaçao files, "Palestine" / "Palestine, State of")
are merged: the entry with the most of the four fields wins, ties by file name.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from typing import Callable, Sequence

import numpy as np

from salem_jax.data.records import EditRecord, RecordList, Skipped

SOURCE = "countryinfo"

# ISO 4217 code -> common English name (the name used after "... is the").
CURRENCY_NAMES = {
    "AED": "UAE dirham", "AFN": "Afghan afghani", "ALL": "Albanian lek", "AMD": "Armenian dram",
    "AOA": "Angolan kwanza", "ARS": "Argentine peso", "AUD": "Australian dollar", "AWG": "Aruban florin",
    "AZN": "Azerbaijani manat", "BAM": "convertible mark", "BBD": "Barbadian dollar", "BDT": "Bangladeshi taka",
    "BGN": "Bulgarian lev", "BHD": "Bahraini dinar", "BIF": "Burundian franc", "BMD": "Bermudian dollar",
    "BND": "Brunei dollar", "BOB": "boliviano", "BRL": "Brazilian real", "BSD": "Bahamian dollar",
    "BTN": "ngultrum", "BWP": "pula", "BYR": "Belarusian ruble", "BZD": "Belize dollar",
    "CAD": "Canadian dollar", "CDF": "Congolese franc", "CHF": "Swiss franc", "CLP": "Chilean peso",
    "CNY": "renminbi", "COP": "Colombian peso", "CRC": "Costa Rican colon", "CSD": "Serbian dinar",
    "CUC": "Cuban convertible peso", "CUP": "Cuban peso", "CVE": "Cape Verdean escudo", "CZK": "Czech koruna",
    "DJF": "Djiboutian franc", "DKK": "Danish krone", "DOP": "Dominican peso", "DZD": "Algerian dinar",
    "EGP": "Egyptian pound", "ERN": "Eritrean nakfa", "ETB": "Ethiopian birr", "EUR": "euro",
    "FJD": "Fijian dollar", "FKP": "Falkland Islands pound", "GBP": "pound sterling", "GEL": "Georgian lari",
    "GHS": "Ghanaian cedi", "GIP": "Gibraltar pound", "GMD": "Gambian dalasi", "GNF": "Guinean franc",
    "GTQ": "Guatemalan quetzal", "GYD": "Guyanese dollar", "HKD": "Hong Kong dollar", "HNL": "Honduran lempira",
    "HRK": "Croatian kuna", "HTG": "Haitian gourde", "HUF": "Hungarian forint", "IDR": "Indonesian rupiah",
    "ILS": "Israeli new shekel", "INR": "Indian rupee", "IQD": "Iraqi dinar", "IRR": "Iranian rial",
    "ISK": "Icelandic krona", "JMD": "Jamaican dollar", "JOD": "Jordanian dinar", "JPY": "Japanese yen",
    "KES": "Kenyan shilling", "KGS": "Kyrgyzstani som", "KHR": "Cambodian riel", "KMF": "Comorian franc",
    "KPW": "North Korean won", "KRW": "South Korean won", "KWD": "Kuwaiti dinar", "KYD": "Cayman Islands dollar",
    "KZT": "Kazakhstani tenge", "LAK": "Lao kip", "LBP": "Lebanese pound", "LKR": "Sri Lankan rupee",
    "LRD": "Liberian dollar", "LSL": "Lesotho loti", "LYD": "Libyan dinar", "MAD": "Moroccan dirham",
    "MDL": "Moldovan leu", "MGA": "Malagasy ariary", "MKD": "Macedonian denar", "MMK": "Burmese kyat",
    "MNT": "Mongolian tugrik", "MOP": "Macanese pataca", "MRO": "Mauritanian ouguiya", "MUR": "Mauritian rupee",
    "MVR": "Maldivian rufiyaa", "MWK": "Malawian kwacha", "MXN": "Mexican peso", "MYR": "Malaysian ringgit",
    "MZN": "Mozambican metical", "NAD": "Namibian dollar", "NGN": "Nigerian naira", "NIO": "Nicaraguan cordoba",
    "NOK": "Norwegian krone", "NPR": "Nepalese rupee", "NZD": "New Zealand dollar", "OMR": "Omani rial",
    "PAB": "Panamanian balboa", "PEN": "Peruvian sol", "PGK": "Papua New Guinean kina", "PHP": "Philippine peso",
    "PKR": "Pakistani rupee", "PLN": "Polish zloty", "PYG": "Paraguayan guarani", "QAR": "Qatari riyal",
    "RON": "Romanian leu", "RSD": "Serbian dinar", "RUB": "Russian ruble", "RWF": "Rwandan franc",
    "SAR": "Saudi riyal", "SBD": "Solomon Islands dollar", "SCR": "Seychellois rupee", "SDG": "Sudanese pound",
    "SEK": "Swedish krona", "SGD": "Singapore dollar", "SHP": "Saint Helena pound", "SLL": "Sierra Leonean leone",
    "SOS": "Somali shilling", "SRD": "Surinamese dollar", "SSP": "South Sudanese pound",
    "STD": "Sao Tome and Principe dobra", "SVC": "Salvadoran colon", "SYP": "Syrian pound",
    "SZL": "Swazi lilangeni", "THB": "Thai baht", "TJS": "Tajikistani somoni", "TMT": "Turkmenistan manat",
    "TND": "Tunisian dinar", "TOP": "Tongan paanga", "TRY": "Turkish lira", "TTD": "Trinidad and Tobago dollar",
    "TWD": "New Taiwan dollar", "TZS": "Tanzanian shilling", "UAH": "Ukrainian hryvnia", "UGX": "Ugandan shilling",
    "USD": "United States dollar", "UYU": "Uruguayan peso", "UZS": "Uzbekistani sum", "VEF": "Venezuelan bolivar",
    "VND": "Vietnamese dong", "VUV": "Vanuatu vatu", "WST": "Samoan tala", "XAF": "Central African CFA franc",
    "XCD": "Eastern Caribbean dollar", "XOF": "West African CFA franc", "XPF": "CFP franc", "YER": "Yemeni rial",
    "ZAR": "South African rand", "ZMK": "Zambian kwacha",
}
# ISO 4217 fund codes: units of account, not a country's money.
CURRENCY_FUNDS = frozenset({"BOV", "CLF", "CHE", "CHW", "USN", "USS", "UYI", "MXV", "COU", "XSU", "XUA"})

# ISO 639-1 code (plus "cnr" and countryinfo's "rs" for Serbian) -> English name.
LANGUAGE_NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "ay": "Aymara", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bi": "Bislama", "bn": "Bengali", "bs": "Bosnian", "ca": "Catalan", "ch": "Chamorro",
    "cnr": "Montenegrin", "cs": "Czech", "da": "Danish", "de": "German", "dv": "Dhivehi", "dz": "Dzongkha",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "ff": "Fula",
    "fi": "Finnish", "fj": "Fijian", "fo": "Faroese", "fr": "French", "ga": "Irish", "gn": "Guarani",
    "gv": "Manx", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian",
    "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ka": "Georgian",
    "kg": "Kongo", "kk": "Kazakh", "kl": "Greenlandic", "km": "Khmer", "ko": "Korean", "ku": "Kurdish",
    "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish", "ln": "Lingala", "lo": "Lao", "lt": "Lithuanian",
    "lu": "Luba-Katanga", "lv": "Latvian", "mg": "Malagasy", "mh": "Marshallese", "mi": "Maori",
    "mk": "Macedonian", "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "na": "Nauruan",
    "nb": "Norwegian Bokmal", "nd": "Northern Ndebele", "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian Nynorsk",
    "no": "Norwegian", "nr": "Southern Ndebele", "ny": "Chichewa", "oc": "Occitan", "pa": "Punjabi",
    "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "rn": "Kirundi", "ro": "Romanian",
    "rs": "Serbian", "ru": "Russian", "rw": "Kinyarwanda", "sg": "Sango", "si": "Sinhala", "sk": "Slovak",
    "sl": "Slovene", "sm": "Samoan", "sn": "Shona", "so": "Somali", "sq": "Albanian", "sr": "Serbian",
    "ss": "Swazi", "st": "Sotho", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "tg": "Tajik", "th": "Thai",
    "ti": "Tigrinya", "tk": "Turkmen", "tn": "Tswana", "to": "Tongan", "tr": "Turkish", "ts": "Tsonga",
    "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "ve": "Venda", "vi": "Vietnamese", "xh": "Xhosa",
    "zh": "Chinese", "zu": "Zulu",
}

# Names that read badly inside a sentence, as they should appear there.
DISPLAY_NAMES = {
    "Virgin Islands, British": "the British Virgin Islands",
    "Virgin Islands, U.S.": "the United States Virgin Islands",
    "Palestine, State of": "the State of Palestine",
    "Holy See (Vatican City State)": "the Holy See",
    "Vatican City State": "Vatican City",
    "Saint Martin (French part)": "Saint Martin",
    "Sint Maarten (Dutch part)": "Sint Maarten",
    "Antilles néerlandaises": "the Netherlands Antilles",
    "Bonaire, Sint Eustatius and Saba": "the Caribbean Netherlands",
}
_THE_WORDS = ("Republic", "Islands", "United", "States", "Kingdom", "Territory", "Lands", "Antilles")
_THE_NAMES = frozenset({"Netherlands", "Philippines", "Maldives", "Comoros", "Seychelles", "Isle of Man"})


def subject_phrase(name: str) -> str:
    """How a country name reads inside a sentence: "France", "the United Kingdom", "the Bahamas"."""
    if name in DISPLAY_NAMES:
        return DISPLAY_NAMES[name]
    if name.startswith("The "):
        return "the " + name[4:]
    if name in _THE_NAMES or any(w in name.split() for w in _THE_WORDS):
        return "the " + name
    return name


def _possessive(phrase: str) -> str:
    return phrase + ("'" if phrase.endswith("s") else "'s")


def _sentence(template: str, subject: str) -> str:
    if template.startswith("{'s}"):
        text = _possessive(subject) + template[4:]
    else:
        text = template.replace("{}", subject)
    return text[0].upper() + text[1:]


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation: its phrasing templates ("{}" = subject, "{'s}" = its possessive) and how to
    read the answers from a country's JSON (returns (answers, reason if none))."""

    name: str
    templates: tuple[str, ...]
    answers: Callable[[dict], tuple[list[str], str]]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def _capital(d: dict):
    caps = _strings(d.get("capital"))
    return caps, "" if caps else f"no capital (field 'capital' = {d.get('capital')!r})"


def _region(d: dict):
    r = _strings(d.get("region"))
    r = ["the Americas" if x == "Americas" else x for x in r]
    return r, "" if r else f"no region (field 'region' = {d.get('region')!r})"


def _coded(field: str, table: dict, drop=frozenset()):
    def read(d: dict):
        codes = _strings(d.get(field))
        if not codes:
            return [], f"no {field} (field {field!r} = {d.get(field)!r})"
        kept = [c for c in codes if c not in drop]
        unknown = [c for c in kept if c not in table]
        if unknown:
            return [], f"no English name for {field} code(s) {unknown}"
        names = list(dict.fromkeys(table[c] for c in kept))
        return names, "" if names else f"only fund codes in {field}: {codes}"

    return read


RELATIONS: dict[str, Relation] = {
    "capital": Relation(
        "capital",
        ("The capital of {} is", "{'s} capital is", "The capital city of {} is", "{'s} capital city is",
         "The city that serves as the capital of {} is"),
        _capital,
    ),
    "region": Relation(
        "region",
        ("{} is located in", "{} lies in", "{} is situated in", "Geographically, {} is part of",
         "On a world map, {} can be found in"),
        _region,
    ),
    "currency": Relation(
        "currency",
        ("The currency of {} is the", "The official currency of {} is the", "{'s} currency is the",
         "In {}, people pay with the", "The money used in {} is the"),
        _coded("currencies", CURRENCY_NAMES, CURRENCY_FUNDS),
    ),
    "languages": Relation(
        "languages",
        ("The official language of {} is", "{'s} official language is", "In {}, the official language is",
         "The language officially spoken in {} is", "The main official language of {} is"),
        _coded("languages", LANGUAGE_NAMES),
    ),
}


def parse_country_relations(spec: str, where: str) -> tuple[str, ...]:
    """The relations of a 'countries:REL,REL' spec (each a key of RELATIONS, each once), checked: a
    ValueError naming `where` otherwise. Shared by the specs that take country facts
    (config.editor.null_facts, config.locate_edit.alpha_preserve_facts)."""
    text = spec if isinstance(spec, str) else ""
    rels = [r.strip() for r in text[len("countries:"):].split(",") if r.strip()] if text.startswith("countries:") else []
    if not rels:
        raise ValueError(f"{where}={spec!r}: give 'countries:REL,REL' (e.g. countries:region,currency,languages; "
                         f"relations: {', '.join(RELATIONS)}) or '' for none")
    bad = [r for r in rels if r not in RELATIONS]
    if bad:
        raise ValueError(f"{where}={spec!r}: unknown relation(s) {', '.join(bad)}; choose from {', '.join(RELATIONS)}")
    twice = sorted({r for r in rels if rels.count(r) > 1})
    if twice:
        raise ValueError(f"{where}={spec!r}: relation(s) listed twice: {', '.join(twice)}")
    return tuple(rels)


def countryinfo_data_dir() -> str:
    """`countryinfo/data` of the installed package (found without importing it)."""
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the country facts need the `countryinfo` package: pip install --no-deps countryinfo==1.0.1"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"countryinfo is installed but has no data folder at {path}")
    return path


def load_countries(data_dir: str | None = None) -> list[dict]:
    """The countries' raw JSON, one per ISO country, sorted by name (deterministic)."""
    data_dir = data_dir or countryinfo_data_dir()
    files = sorted(glob.glob(os.path.join(data_dir, "*.json")))
    if not files:
        raise FileNotFoundError(f"no country JSON files in {data_dir}")
    best: dict[str, tuple[int, dict]] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"].strip():
            raise ValueError(f"{path}: record 0: field 'name': missing or not a string")
        d = dict(d, _file=os.path.basename(path))
        key = (d.get("ISO") or {}).get("alpha3") or d["name"]
        score = sum(bool(rel.answers(d)[0]) for rel in RELATIONS.values())
        if key not in best or score > best[key][0]:
            best[key] = (score, d)
    return sorted((d for _, d in best.values()), key=lambda d: d["name"])


def country_records(
    relations: str | Sequence[str] = "capital",
    *,
    seed: int = 0,
    n_loc: int = 3,
    countries: Sequence[str] | None = None,
    data_dir: str | None = None,
) -> RecordList:
    """EditRecords for the given relation(s) ("capital", "region", "currency", "languages" or
    "all"), optionally only for the named `countries`. Deterministic for a given `seed`.

    `.skipped` on the result lists (country, relation, reason) for every country left out of a
    relation; `country_fact_counts(result)` summarises both.
    """
    if isinstance(relations, str):
        relations = tuple(RELATIONS) if relations == "all" else (relations,)
    for r in relations:
        if r not in RELATIONS:
            raise ValueError(f"unknown relation {r!r}; choose from {', '.join(RELATIONS)} or 'all'")
    data = load_countries(data_dir)
    if countries is not None:
        known = {d["name"]: d for d in data}
        missing = [c for c in countries if c not in known]
        if missing:
            raise KeyError(f"unknown countries {missing}; names are as in countryinfo, e.g. {list(known)[:5]}")
    source = f"{SOURCE}:{data_dir or countryinfo_data_dir()}"
    out, skipped = [], []
    for rel_name in relations:
        rel = RELATIONS[rel_name]
        facts = []  # (country json, answers)
        for d in data:
            answers, why = rel.answers(d)
            if answers:
                facts.append((d, answers))
            else:
                skipped.append(Skipped(SOURCE, d["name"], rel_name, why))
        if len(facts) < n_loc + 2:
            raise ValueError(f"relation {rel_name!r}: only {len(facts)} countries have it, need at least {n_loc + 2}")
        # One generator per relation, seeded by (seed, relation), so adding a relation does not
        # change the records of another.
        rng = np.random.default_rng([seed, sorted(RELATIONS).index(rel_name)])
        values = sorted({a[0] for _, a in facts})
        wanted = set(countries) if countries is not None else None
        for i, (d, answers) in enumerate(facts):
            others = [j for j in range(len(facts)) if j != i]
            loc_idx = rng.choice(others, size=n_loc, replace=False)
            choices = [v for v in values if v not in answers]
            new = choices[int(rng.integers(len(choices)))] if choices else ""
            if wanted is not None and d["name"] not in wanted:
                continue  # drawn anyway, so a country's record does not depend on `countries`
            subject = subject_phrase(d["name"])
            phrased = [_sentence(t, subject) for t in rel.templates]
            loc_prompts = [_sentence(rel.templates[0], subject_phrase(facts[j][0]["name"])) for j in loc_idx]
            out.append(
                EditRecord(
                    id=f"{SOURCE}:{rel_name}:{d['name']}",
                    prompt=phrased[0],
                    target_true=answers[0],
                    target_new=new,
                    rephrases=tuple(phrased[1:]),
                    loc_prompts=tuple(loc_prompts),
                    loc_targets=tuple(facts[j][1][0] for j in loc_idx),
                    subject=subject,
                    extra={
                        "format": "countries",
                        "source": source,
                        "relation": rel_name,
                        "country": d["name"],
                        "iso3": (d.get("ISO") or {}).get("alpha3", ""),
                        "answers": list(answers),
                        "file": d["_file"],
                    },
                )
            )
    if countries is not None:
        skipped = [s for s in skipped if s.record in set(countries)]
    return RecordList(out, skipped=skipped, sources=[source])


def country_fact_counts(records: RecordList) -> dict[str, dict[str, int]]:
    """{relation: {"records": n, "skipped": m}} for a `country_records` result."""
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        counts.setdefault(r.extra["relation"], {"records": 0, "skipped": 0})["records"] += 1
    for s in records.skipped:
        counts.setdefault(s.field, {"records": 0, "skipped": 0})["skipped"] += 1
    return counts
