"""Data: records from real benchmark files, country facts, tokenization and edit sets.

Building an edit set runs the model, so `build_edit_set` is in `salem_jax.edit_set_builder`."""

from salem_jax.data.countries import country_records
from salem_jax.data.edit_set import EditSet, edit_set_batches, load_edit_set, save_edit_set
from salem_jax.data.paths import data_dir, fetch_public_data, find_data_file
from salem_jax.data.readers import (
    read_classification,
    read_counterfact,
    read_fever,
    read_knowns,
    read_nli,
    read_records,
    read_text,
    read_zsre,
    text_records,
)
from salem_jax.data.records import EditRecord, RecordError, RecordList, Skipped

__all__ = [
    "EditRecord", "EditSet", "RecordError", "RecordList", "Skipped",
    "country_records", "data_dir", "edit_set_batches", "fetch_public_data", "find_data_file", "load_edit_set",
    "read_classification", "read_counterfact", "read_fever", "read_knowns", "read_nli", "read_records",
    "read_text", "read_zsre", "save_edit_set", "text_records",
]
