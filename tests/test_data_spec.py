"""One way to name records: `DataSpec` and `read_records(spec)` give what the readers give directly."""

from __future__ import annotations

import json

import pytest
from test_dataset_command import zsre_rows

from salem_jax.data import readers
from salem_jax.data.countries import country_records
from salem_jax.data.spec import DataSpec, read_records, resolve


def _same(a, b):
    assert [r.id for r in a] == [r.id for r in b] and list(a) == list(b)


def test_countries_known_names_and_paths_read_as_the_readers_do(tmp_path):
    fmt, recs = read_records(DataSpec(data="countries", relation="region", limit=5, seed=3))
    assert fmt == "countries"
    _same(recs, country_records("region", seed=3)[:5])
    (tmp_path / "zsre").mkdir()
    f = tmp_path / "zsre" / "zsre_mend_eval_2200.json"
    f.write_text(json.dumps(zsre_rows(6)))
    fmt, recs = read_records(DataSpec(data="zsre", data_dir=str(tmp_path), limit=4))  # format from the known name
    assert fmt == "zsre" and resolve(DataSpec(data="zsre", data_dir=str(tmp_path))) == ("zsre", str(f))
    _same(recs, readers.read_zsre(f, limit=4))
    _same(read_records(DataSpec(data=str(f), format="zsre"))[1], readers.read_zsre(f))


def test_classifier_and_text_fields_reach_the_reader(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"t": f"claim {i}", "y": ["a", "b", "c"][i % 3]}) + "\n" for i in range(6)))
    spec = DataSpec(data=str(f), format="classification", labels=("a", "b"), exclude_labels=("c",), text_field="t",
                    label_field="y")
    direct = readers.read_classification(f, labels=("a", "b"), exclude_labels=("c",), text_field="t", label_field="y")
    _same(read_records(spec)[1], direct)
    t = tmp_path / "t.txt"
    t.write_text(" ".join(f"w{i}" for i in range(40)) + "\n")
    _same(read_records(DataSpec(data=str(t), format="text", prompt_words=6, target_words=2))[1],
          readers.text_records(readers.read_text(t), source=str(t), prompt_words=6, target_words=2))


def test_bad_specs_are_clear_errors(tmp_path):
    f = tmp_path / "f.json"
    f.write_text("[]")
    with pytest.raises(ValueError, match="--format is needed for the file"):
        read_records(DataSpec(data=str(f)))
    with pytest.raises(ValueError, match="unknown format 'zsrE'"):
        read_records(DataSpec(data=str(f), format="zsrE"))
    with pytest.raises(ValueError, match="takes no data file"):
        read_records(DataSpec(data=str(f), format="countries"))
    with pytest.raises(ValueError, match="needs --labels"):
        read_records(DataSpec(data=str(f), format="classification"))
