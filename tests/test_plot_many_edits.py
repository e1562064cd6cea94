"""benchmarks/plot_many_edits.py: several many-edits runs read from both file forms, labelled, tabled with
issue 16's goal judged per row - against hand-written expectations on fixed numbers."""

import json

import pytest

from benchmarks import plot_many_edits as P


def _rows(first, keep_dd):
    return [dict(T=t, ea=0.9, ea_first=f, adapt_acc=0.3, keep_acc=1.0 - k, dd_keep_acc=k)
            for t, f, k in zip((10, 100), first, keep_dd)]


def _write(tmp_path):
    summary = tmp_path / "s.json"  # a many_edits.py --out summary
    summary.write_text(json.dumps(dict(experiment="zsre_smollm2", studies={
        "alphaedit": {"sequential:10": _rows((1.0, 0.8), (0.0, 0.05))},
        "emmet": {"sequential:10": _rows((0.9, 0.5), (0.0, 0.3))}})))
    per_method = tmp_path / "many_edits_ft.json"  # the pipeline's file, here cut short by an error
    per_method.write_text(json.dumps(dict(method="ft", results={"batch": _rows((0.7, 0.9), (0.0, 0.02))[:1]},
                                          error=dict(mode="batch", edit=3))))
    return summary, per_method


def test_runs_are_labelled_and_the_goal_is_judged_per_row(tmp_path):
    summary, per_method = _write(tmp_path)
    studies = P.gather([f"{summary}=order 3", str(per_method)])
    assert list(studies) == ["order 3 alphaedit", "order 3 emmet", "many_edits_ft ft"]
    assert studies["order 3 emmet"]["sequential:10"][1]["ea_first"] == 0.5
    assert studies["many_edits_ft ft"] == {"batch": _rows((0.7,), (0.0,))}

    lines = P.table(studies, first=0.8, keep_dd=0.05).splitlines()
    assert lines[0].endswith("| goal |") and lines[1].endswith("---|---|")
    # by hand: (first >= 0.8 and keep DD <= 0.05) per row, in the order of the studies
    want = ["met", "met", "met", "not met", "not met"]
    assert [line.rsplit("|", 2)[-2].strip() for line in lines[2:]] == want
    assert lines[3].startswith("| order 3 alphaedit | sequential:10 | 100 | 0.900 | 0.800 |")
    assert P.goal_met(dict(T=1, ea=1.0), 0.8, 0.05) == "-"  # no first-10 or keep figure: not judged

    P.main([f"{summary}=a", str(per_method), "--out", str(tmp_path / "o.png"), "--md", str(tmp_path / "o.md")])
    assert (tmp_path / "o.png").stat().st_size > 0
    assert (tmp_path / "o.md").read_text().strip() == P.table(P.gather([f"{summary}=a", str(per_method)]),
                                                              0.8, 0.05)


def test_bad_runs_are_refused_by_name(tmp_path):
    summary, _ = _write(tmp_path)
    with pytest.raises(SystemExit, match="given twice"):
        P.gather([f"{summary}=x", f"{summary}=x"])
    with pytest.raises(SystemExit, match="no such file"):
        P.gather([str(tmp_path / "missing.json")])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"seconds": 3}))
    with pytest.raises(SystemExit, match=r"other.json: neither .* 'studies'"):
        P.gather([str(other)])
    no_t = tmp_path / "no_t.json"
    no_t.write_text(json.dumps(dict(studies={"ft": {"sequential": [dict(ea=1.0)]}})))
    with pytest.raises(SystemExit, match="ft sequential row 0 has no field 'T'"):
        P.gather([str(no_t)])
