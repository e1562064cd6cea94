"""Country facts from the countryinfo package, checked against the package's own API."""

from __future__ import annotations

import pytest

from salem_jax.data.countries import (
    CURRENCY_NAMES,
    LANGUAGE_NAMES,
    RELATIONS,
    country_fact_counts,
    country_records,
    load_countries,
    subject_phrase,
)

countryinfo = pytest.importorskip("countryinfo", reason="the countryinfo package is not installed")


@pytest.fixture(scope="module")
def capitals():
    return country_records("capital")


def by_country(records):
    return {r.extra["country"]: r for r in records}


def test_france_capital_record(capitals):
    r = by_country(capitals)["France"]
    assert r.id == "countryinfo:capital:France"
    assert r.prompt == "The capital of France is"
    assert r.target_true == "Paris" and r.subject == "France"
    assert r.rephrases == (
        "France's capital is", "The capital city of France is", "France's capital city is",
        "The city that serves as the capital of France is",
    )
    assert r.extra["relation"] == "capital" and r.extra["answers"] == ["Paris"] and r.extra["iso3"] == "FRA"


def test_targets_match_the_package_api(capitals):
    """Every capital equals what countryinfo's own CountryInfo API says."""
    for r in capitals:
        cap = countryinfo.CountryInfo(r.extra["country"]).capital()
        assert r.target_true == (cap[0] if isinstance(cap, list) else cap), r.extra["country"]


def test_locality_and_counterfactual_targets(capitals):
    facts = {r.prompt: r.target_true for r in capitals}
    for r in capitals:
        assert len(r.loc_prompts) == 3 and len(set(r.loc_prompts)) == 3
        for p, t in zip(r.loc_prompts, r.loc_targets):
            # Same relation, other countries, their true answers.
            assert p != r.prompt and p.startswith("The capital of") and facts[p] == t
        assert r.target_new and r.target_new not in r.extra["answers"]
        assert r.target_new in facts.values()


def test_counts_and_skips(capitals):
    n = len(load_countries())
    assert 240 <= n <= 260
    counts = country_fact_counts(capitals)
    assert counts["capital"]["records"] + counts["capital"]["skipped"] == n
    assert counts["capital"]["records"] >= 240
    skipped = {s.record: s.reason for s in capitals.skipped}
    assert "Antarctica" in skipped and "no capital" in skipped["Antarctica"]


def test_deterministic_by_seed(capitals):
    again = country_records("capital")
    assert list(again) == list(capitals)
    other = country_records("capital", seed=1)
    assert [(r.prompt, r.target_true) for r in other] == [(r.prompt, r.target_true) for r in capitals]
    assert [r.loc_prompts for r in other] != [r.loc_prompts for r in capitals]
    # Asking for some countries gives exactly their records from the full build.
    some = country_records("capital", countries=["France", "Japan"])
    full = by_country(capitals)
    assert list(some) == [full["France"], full["Japan"]]
    with pytest.raises(KeyError, match="unknown countries"):
        country_records("capital", countries=["Atlantis"])


def test_other_relations():
    recs = country_records("all")
    counts = country_fact_counts(recs)
    assert set(counts) == set(RELATIONS)
    got = {(r.extra["relation"], r.extra["country"]): r for r in recs}
    assert got["region", "France"].prompt == "France is located in" and got["region", "France"].target_true == "Europe"
    assert got["region", "Peru"].target_true == "the Americas"
    assert got["currency", "France"].prompt == "The currency of France is the"
    assert got["currency", "France"].target_true == "euro"
    # Fund codes (USN, USS) are dropped; the first real currency is the target.
    assert got["currency", "United States"].extra["answers"] == ["United States dollar"]
    assert got["currency", "Switzerland"].target_true == "Swiss franc"
    sw = got["languages", "Switzerland"]
    assert sw.prompt == "The official language of Switzerland is" and sw.target_true == "German"
    assert sw.extra["answers"] == ["German", "French", "Italian"]
    assert got["languages", "United Kingdom"].prompt == "The official language of the United Kingdom is"
    for r in recs:
        if r.extra["relation"] == "languages":
            codes = countryinfo.CountryInfo(r.extra["country"]).languages()
            assert r.target_true == LANGUAGE_NAMES[codes[0]]
    assert all(len(r.rephrases) == 4 for r in recs)
    with pytest.raises(ValueError, match="unknown relation"):
        country_records("anthem")


def test_code_tables_cover_the_data():
    langs, curs = set(), set()
    for d in load_countries():
        langs.update(d.get("languages") or [])
        curs.update(d.get("currencies") or [])
    assert langs <= set(LANGUAGE_NAMES)
    from salem_jax.data.countries import CURRENCY_FUNDS

    assert curs - CURRENCY_FUNDS <= set(CURRENCY_NAMES)


def test_subject_phrase():
    assert subject_phrase("France") == "France"
    assert subject_phrase("United Kingdom") == "the United Kingdom"
    assert subject_phrase("The Bahamas") == "the Bahamas"
    assert subject_phrase("Philippines") == "the Philippines"
    assert subject_phrase("Virgin Islands, British") == "the British Virgin Islands"
    r = by_country(country_records("capital", countries=["Philippines"]))["Philippines"]
    assert r.prompt == "The capital of the Philippines is" and r.rephrases[0] == "The Philippines' capital is"
