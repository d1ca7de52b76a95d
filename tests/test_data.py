"""Readers, preprocessing, splits and batches of diffrec_ext.data, and the synthetic dataset."""

import gzip
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffrec_ext import data
from diffrec_ext.data import (
    DataFormatError,
    SequenceDataset,
    evaluation_batch,
    item_popularity,
    iterate_batches,
    load_dataset,
    popularity_ranking_metrics,
    preprocess,
    read_interactions,
    training_sequences,
    training_target_count,
)
from conftest import shared_file
from diffrec_ext.synthetic import SyntheticConfig, synthetic_dataset, synthetic_interactions, write_synthetic

def write(path: Path, text: str, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(text.encode()) if compress else text.encode())
    return path


def columns(table: pd.DataFrame) -> dict:
    return {name: table[name].tolist() for name in table.columns}


def dataset_of(sequences: list[list[int]], num_items: int | None = None) -> SequenceDataset:
    """A dataset whose dense sequences are given directly (user originals = 100 + index)."""
    lengths = [len(s) for s in sequences]
    num_items = num_items or max(max(s) for s in sequences)
    return SequenceDataset(
        name="hand-made",
        items=np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]),
        offsets=np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
        user_original_ids=np.arange(100, 100 + len(sequences)),
        item_original_ids=np.arange(-1, num_items) * 10,
    )


# --------------------------------------------------------------------------------------------------
# Readers


SEQUENCE_TEXT = "1 5 3 9\n2 3 3\n10 7 5 3 1\n"
SEQUENCE_TABLE = {
    "user": [1, 1, 1, 2, 2, 10, 10, 10, 10],
    "item": [5, 3, 9, 3, 3, 7, 5, 3, 1],
    "timestamp": [0, 1, 2, 0, 1, 0, 1, 2, 3],
}


@pytest.mark.parametrize("name, compress", [("seq.txt", False), ("seq.txt.gz", True), ("seq.txt", True),
                                            ("noext", False)])
def test_sequence_file_plain_and_gzipped_by_suffix_or_magic(tmp_path, name, compress):
    path = write(tmp_path / name, SEQUENCE_TEXT, compress)
    assert columns(read_interactions(path)) == SEQUENCE_TABLE
    assert columns(data.read_sequence_file(path)) == SEQUENCE_TABLE


def test_sequence_file_tolerates_crlf_extra_spaces_and_trailing_blank_lines(tmp_path):
    path = write(tmp_path / "seq.txt", "1  5 3 9 \r\n2 3 3\r\n10 7 5 3 1\r\n\r\n\n")
    assert columns(read_interactions(path, "sequence")) == SEQUENCE_TABLE


def test_sequence_file_without_final_newline(tmp_path):
    path = write(tmp_path / "seq.txt", SEQUENCE_TEXT.rstrip("\n"))
    assert columns(read_interactions(path)) == SEQUENCE_TABLE


RATINGS_TABLE = {
    "user": [1, 1, 2],
    "item": [1193, 661, 914],
    "timestamp": [978300760, 978302109, 978301968],
    "rating": [5.0, 3.5, 3.0],
}


@pytest.mark.parametrize("name, text", [
    ("ratings.dat", "1::1193::5::978300760\n1::661::3.5::978302109\n2::914::3::978301968\n"),
    ("ratings.dat.gz", "1::1193::5::978300760\n1::661::3.5::978302109\n2::914::3::978301968\n"),
    ("u.data", "1\t1193\t5\t978300760\n1\t661\t3.5\t978302109\n2\t914\t3\t978301968\n"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,1193,5.0,978300760\n1,661,3.5,978302109\n"
                    "2,914,3.0,978301968\n"),
    ("any-name", "1::1193::5::978300760\n1::661::3.5::978302109\n2::914::3::978301968\n"),
])
def test_movielens_formats(tmp_path, name, text):
    path = write(tmp_path / name, text, compress=name.endswith(".gz"))
    assert data.detect_format(path) == "movielens"
    table = read_interactions(path)
    assert columns(table) == RATINGS_TABLE
    assert table["user"].dtype == np.int64 and table["timestamp"].dtype == np.int64


def test_partial_raw_movielens_file():
    table = read_interactions(shared_file("ml-1m/partial_raw/ratings.dat.gz"))
    assert len(table) == 487_650
    assert (table["user"].min(), table["user"].max(), table["user"].nunique()) == (1, 2999, 2999)
    assert set(table["rating"].unique()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert table.iloc[0].tolist() == [1, 1193, 978300760, 5.0]


def test_raw_ratings_order_agrees_with_the_sequence_file():
    """Sorting the raw ratings by time gives each user the same items as ml-1m.txt.gz, in an order
    whose timestamps never decrease (ties may differ, see the data README)."""
    ratings = read_interactions(shared_file("ml-1m/partial_raw/ratings.dat.gz"))
    raw = preprocess(ratings, k_core=1)
    sequences = preprocess(read_interactions(shared_file("ml-1m/ml-1m.txt.gz")), item_k_core=0)
    time_of = ratings.set_index(["user", "item"])["timestamp"]
    for user in (1, 2, 1500, 2999):
        raw_items = raw.original_items(raw.sequence(int(raw.dense_users([user])[0])))
        file_items = sequences.original_items(sequences.sequence(int(sequences.dense_users([user])[0])))
        assert sorted(raw_items) == sorted(file_items)
        times = time_of.loc[[(user, item) for item in file_items]].to_numpy()
        assert (np.diff(times) >= 0).all()
        assert (np.diff(time_of.loc[[(user, item) for item in raw_items]].to_numpy()) >= 0).all()


def test_recbole_inter_any_column_order_extra_columns_and_string_tokens(tmp_path):
    path = write(tmp_path / "ml.inter", "timestamp:float\titem_id:token\tuser_id:token\treview:token_seq\t"
                                        "rating:float\n"
                                        "100.5\tB07\tu1\tgreat stuff\t4\n"
                                        "99\tA01\tu1\t\t5\n"
                                        "7\tA01\t002\tmeh\t1\n")
    table = read_interactions(path)
    assert columns(table) == {"user": ["u1", "u1", "002"], "item": ["B07", "A01", "A01"],
                              "timestamp": [100.5, 99.0, 7.0], "rating": [4.0, 5.0, 1.0]}


def test_recbole_inter_without_timestamp_uses_file_order(tmp_path):
    path = write(tmp_path / "x.inter", "user_id:token\titem_id:token\nu\ta\nv\tb\nu\tc\n")
    assert columns(read_interactions(path)) == {"user": ["u", "v", "u"], "item": ["a", "b", "c"],
                                                "timestamp": [0, 0, 1]}


def test_recbole_custom_field_names(tmp_path):
    path = write(tmp_path / "x.inter", "session:token\tproduct:token\twhen:float\ns\tp\t1\ns\tq\t2\n")
    table = data.read_recbole_inter(path, user_field="session", item_field="product", time_field="when")
    assert columns(table) == {"user": ["s", "s"], "item": ["p", "q"], "timestamp": [1.0, 2.0]}


def test_generic_csv_with_configured_columns_and_dates(tmp_path):
    path = write(tmp_path / "log.csv", "when,who,what,stars\n2014-02-03T10:00:00,7,x,4\n"
                                       "2014-02-03T09:00:00,7,\"y,z\",5\n")
    table = read_interactions(path, user_col="who", item_col="what", time_col="when", rating_col="stars")
    assert table["user"].tolist() == [7, 7] and table["item"].tolist() == ["x", "y,z"]
    assert table["timestamp"].tolist() == [1391421600e6, 1391418000e6]  # microseconds since 1970
    assert table["rating"].tolist() == [4.0, 5.0]


def test_generic_csv_without_time_column(tmp_path):
    path = write(tmp_path / "log.csv", "user,item\n1,10\n2,10\n1,11\n")
    assert columns(read_interactions(path, time_col=None)) == {"user": [1, 2, 1], "item": [10, 10, 11],
                                                               "timestamp": [0, 0, 1]}


def test_parquet(tmp_path):
    frame = pd.DataFrame({"u": [1, 1, 2], "i": [5, 6, 5], "t": [3.0, 1.0, 2.0]})
    path = tmp_path / "log.parquet"
    try:
        frame.to_parquet(path)
    except ImportError:
        path.write_bytes(b"PAR1 not really parquet")
        with pytest.raises(ImportError, match="needs a Parquet engine"):
            read_interactions(path, user_col="u", item_col="i", time_col="t")
        pytest.skip("no Parquet engine (pyarrow or fastparquet) installed; checked the error instead")
    table = read_interactions(path, user_col="u", item_col="i", time_col="t")
    assert columns(table) == {"user": [1, 1, 2], "item": [5, 6, 5], "timestamp": [3.0, 1.0, 2.0]}


def test_unknown_format_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        read_interactions(write(tmp_path / "a.txt", "1 2 3\n"), fmt="xml")


MALFORMED = [
    # (file name, content, expected message after "line 3: ")
    ("seq.txt", "1 2 3\n2 4 5\n3 4 x7\n", "non-numeric item id 'x7'"),
    ("seq.txt", "1 2 3\n2 4 5\nu3 4 6\n", "non-numeric user id 'u3'"),
    ("seq.txt", "1 2 3\n2 4 5\n3,4,6\n", "wrong delimiter in '3,4,6'"),
    ("seq.txt", "1 2 3\n2 4 5\n3\t4 6\n", "wrong delimiter: found a tab"),
    ("seq.txt", "1 2 3\n2 4 5\n3\n4 5 6\n", "truncated line: user 3 has no items"),
    ("seq.txt", "1 2 3\n2 4 5\n\n4 5 6\n", "blank line"),
    ("seq.txt", "1 2 3\n2 4 5\n1 6 7\n", "user 1 already has a sequence on line 1"),
    ("seq.txt", "1 2 3\n2 4 5\n3 4 99999999999999999999\n", "id 99999999999999999999 does not fit in 64 bits"),
    ("ratings.dat", "1::2::5::10\n1::3::4::11\n1::4::4\n", "truncated line: 3 of 4 '::'-separated fields"),
    ("ratings.dat", "1::2::5::10\n1::3::4::11\n1\t4\t4\t12\n", "wrong delimiter: found '\\\\t'"),
    ("ratings.dat", "1::2::5::10\n1::3::4::11\n1::4::4::12::0\n", "wrong number of fields: 5 instead of 4"),
    ("ratings.dat", "1::2::5::10\n1::3::4::11\n1::M4::4::12\n", "non-numeric item id 'M4'"),
    ("ratings.dat", "1::2::5::10\n1::3::4::11\n1::4::four::12\n", "non-numeric rating 'four'"),
    ("ratings.dat", "1::2::5::10\n1::3::4::11\n1::4::nan::12\n", "rating 'nan' is not a finite number"),
    ("ratings.dat", "1::2::5::10\n1::3::4::11\n1::4::4::12.5\n", "non-numeric timestamp '12.5'"),
    ("u.data", "1\t2\t5\t10\n1\t3\t4\t11\n1\t4\t4\n", "truncated line: 3 of 4"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,5,10\n1,3,4\n", "truncated line: 3 of 4"),
    ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\n", "truncated line: 2 of 3"),
    ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\t\t2\n", "empty item id"),
    ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\tlate\n",
     "non-numeric timestamp 'late'"),
    ("x.inter", "user_id:token\titem_id:token\nu\ta\nu\tb\tc\n", "wrong number of fields: 3 instead of 2"),
    ("log.csv", "user,item,timestamp\n1,2,3\n1,3\n", "wrong number of fields: 2 instead of 3"),
    ("log.csv", "user,item,timestamp\n1,2,3\n1,3,4,5\n", "wrong number of fields: 4 instead of 3"),
    ("log.csv", "user,item,timestamp\n1,2,3\n1,3,soon\n", "column 'timestamp' is not a number or ISO date"),
    ("log.csv", "user,item,timestamp\n1,2,3\n,3,4\n", "column 'user' is missing"),
]


@pytest.mark.parametrize("name, text, problem", MALFORMED)
def test_malformed_lines_are_reported_with_their_number(tmp_path, name, text, problem):
    path = write(tmp_path / name, text)
    with pytest.raises(DataFormatError, match="line 3: " + problem) as error:
        read_interactions(path)
    assert str(error.value).startswith(str(path)) and error.value.line == 3


def test_malformed_gzipped_file_reports_the_line(tmp_path):
    path = write(tmp_path / "ratings.dat.gz", "1::2::5::10\n1::3::4::11\n1::4::4\n", compress=True)
    with pytest.raises(DataFormatError, match="line 3: truncated line"):
        read_interactions(path)


def test_truncated_gzip_stream_reports_where_it_ends(tmp_path):
    lines = "".join(f"{user} {user + 1} {user + 2} {user + 3}\n" for user in range(1, 2000))
    compressed = gzip.compress(lines.encode())
    path = tmp_path / "seq.txt.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataFormatError, match=r"line \d+: gzip stream is truncated"):
        read_interactions(path)


@pytest.mark.parametrize("name, text, problem", [
    ("seq.txt", "", "file is empty"),
    ("seq.txt", "\n \n", "file is empty"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n", "has a header but no interactions"),
    ("x.inter", "user_id:token\titem_id:token\n", "has a header but no interactions"),
    ("x.inter", "user_id\titem_id:token\nu\ta\n", "line 1: header field 'user_id' is not 'name:type'"),
    ("x.inter", "user:token\titem_id:token\nu\ta\n", "line 1: header has no 'user_id' field"),
    ("log.csv", "who,item,timestamp\n1,2,3\n", "line 1: no column \\['user'\\]"),
    ("ratings.dat", "1;2;5;10\n", "line 1: not a MovieLens ratings line"),
])
def test_files_without_interactions_or_with_bad_headers(tmp_path, name, text, problem):
    fmt = "movielens" if name == "ratings.dat" else "auto"
    with pytest.raises(DataFormatError, match=problem):
        read_interactions(write(tmp_path / name, text), fmt)


def test_not_gzip_despite_the_suffix(tmp_path):
    with pytest.raises(DataFormatError, match="is not valid gzip data"):
        read_interactions(write(tmp_path / "seq.txt.gz", "1 2 3\n"))


# --------------------------------------------------------------------------------------------------
# Preprocessing


def table_of(rows, with_rating=False) -> pd.DataFrame:
    names = ["user", "item", "timestamp"] + (["rating"] if with_rating else [])
    return pd.DataFrame(rows, columns=names)


# Users 10..40, items 100..500. With k = 3: items 400 (2 interactions) and 500 (1) go in round 1,
# which leaves user 40 with one interaction, removed in round 2; then all counts are >= 3.
K_CORE_ROWS = [
    (10, 100, 1), (10, 200, 2), (10, 300, 3),
    (20, 300, 1), (20, 200, 2), (20, 100, 3),
    (30, 400, 1), (30, 200, 2), (30, 100, 3), (30, 300, 4),
    (40, 400, 1), (40, 500, 2), (40, 100, 3),
]


def test_iterative_k_core_reaches_the_fixed_point():
    dataset = preprocess(table_of(K_CORE_ROWS), "k", k_core=3)
    assert dataset.user_original_ids.tolist() == [10, 20, 30]
    assert dataset.item_original_ids.tolist() == [-1, 100, 200, 300]
    assert [dataset.sequence(u).tolist() for u in range(3)] == [[1, 2, 3], [3, 2, 1], [2, 1, 3]]
    assert (dataset.num_users, dataset.num_items, dataset.num_actions) == (3, 3, 9)
    assert "2 removal rounds; removed 1 users, 2 items, 4 interactions" in dataset.describe()


def test_k_core_of_one_keeps_everything_and_item_threshold_is_separate():
    rows = [(u, i, t) for u, i, t in K_CORE_ROWS if u != 40]  # every user keeps >= 3 items
    assert preprocess(table_of(rows), k_core=1).num_actions == 10
    assert preprocess(table_of(rows), k_core=3, item_k_core=0).num_items == 4
    assert preprocess(table_of(rows), k_core=3, item_k_core=2).num_items == 3  # item 400 has 1


def naive_k_core(rows, user_k, item_k):
    rows = list(rows)
    while True:
        users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
        kept = [r for r in rows if users[r[0]] >= user_k and items[r[1]] >= item_k]
        if len(kept) == len(rows):
            return rows
        rows = kept


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 9)), min_size=1, max_size=60),
       st.integers(0, 4), st.integers(0, 4))
def test_k_core_matches_a_naive_loop(pairs, user_k, item_k):
    users, items = np.array(pairs).T
    keep, _ = data._k_core(users, items, user_k, item_k)
    expected = naive_k_core([(u, i, n) for n, (u, i) in enumerate(pairs)], user_k, item_k)
    assert np.flatnonzero(keep).tolist() == [n for _, _, n in expected]


def test_chronological_order_with_stable_tie_break():
    rows = [(7, "a", 5), (7, "b", 3), (7, "c", 5), (7, "d", 3), (7, "e", 1), (8, "b", 2), (8, "a", 2),
            (8, "c", 2)]
    dataset = preprocess(table_of(rows), k_core=1)
    assert dataset.original_items(dataset.sequence(0)).tolist() == ["e", "b", "d", "a", "c"]
    assert dataset.original_items(dataset.sequence(1)).tolist() == ["b", "a", "c"]  # all tied: file order


def test_dense_ids_and_maps_both_ways():
    rows = [(30, 900, 1), (30, 50, 2), (30, 700, 3), (5, 700, 1), (5, 900, 2), (5, 700, 3)]
    dataset = preprocess(table_of(rows), k_core=1)
    assert dataset.user_original_ids.tolist() == [5, 30]  # sorted original order
    assert dataset.item_original_ids.tolist() == [-1, 50, 700, 900]  # index 0 = padding
    assert dataset.dense_items([900, 50]).tolist() == [3, 1]
    assert dataset.original_items([3, 1]).tolist() == [900, 50]
    assert dataset.dense_users([30]).tolist() == [1]
    assert [dataset.sequence(u).tolist() for u in range(2)] == [[2, 3, 2], [3, 1, 2]]
    with pytest.raises(KeyError, match="unknown item ids: \\[123\\]"):
        dataset.dense_items([123])
    with pytest.raises(KeyError, match="1..3"):
        dataset.original_items([0])
    assert columns(dataset.interactions()) == {"user": [0, 0, 0, 1, 1, 1], "item": [2, 3, 2, 3, 1, 2],
                                               "timestamp": [0, 1, 2, 0, 1, 2]}


def test_min_rating_filter():
    rows = [(1, 10, 1, 5.0), (1, 11, 2, 2.0), (1, 12, 3, 4.0), (1, 13, 4, 4.5), (2, 10, 1, 1.0)]
    dataset = preprocess(table_of(rows, with_rating=True), k_core=1, min_rating=4)
    assert dataset.original_items(dataset.sequence(0)).tolist() == [10, 12, 13]
    assert dataset.num_users == 1
    assert "rating >= 4: kept 3 of 5 interactions" in dataset.describe()
    with pytest.raises(ValueError, match="needs a 'rating' column"):
        preprocess(table_of([row[:3] for row in rows]), min_rating=4)


def test_users_too_short_for_leave_one_out_are_an_error_not_a_silent_drop():
    rows = [(1, 10, 1), (1, 11, 2), (1, 12, 3), (2, 10, 1), (2, 11, 2)]
    with pytest.raises(ValueError, match="1 users have fewer than 3 interactions .*\\[2\\].*k_core >= 3"):
        preprocess(table_of(rows), k_core=1)
    dataset = preprocess(table_of(rows), k_core=3, item_k_core=0)
    assert dataset.user_original_ids.tolist() == [1]
    assert "removed 1 users, 0 items, 2 interactions" in dataset.describe()


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="no 'timestamp' column"):
        preprocess(pd.DataFrame({"user": [1], "item": [2]}))
    with pytest.raises(ValueError, match="missing values in column 'item'"):
        preprocess(pd.DataFrame({"user": [1], "item": [None], "timestamp": [0]}))
    with pytest.raises(ValueError, match="removed everything"):
        preprocess(table_of([(1, 2, 3)]))


def test_dataset_checks_its_arrays():
    with pytest.raises(ValueError, match="fewer than 3 items"):
        dataset_of([[1, 2]])
    with pytest.raises(ValueError, match="1..2"):
        dataset_of([[1, 2, 3]], num_items=2)


def test_stats_and_describe():
    dataset = dataset_of([[1, 2, 3], [3, 2, 1, 2, 3]])
    stats = dataset.stats
    assert (stats.num_users, stats.num_items, stats.num_actions) == (2, 3, 8)
    assert (stats.avg_length, stats.min_length, stats.median_length, stats.max_length) == (4.0, 3, 4.0, 5)
    assert stats.density == pytest.approx(8 / 6)
    assert dataset.describe().startswith("hand-made: 2 users, 3 items, 8 actions\n  sequence length: avg 4.00")


# --------------------------------------------------------------------------------------------------
# Training rows, evaluation rows, batches


def test_prefix_training_rows_with_padding_and_truncation():
    dataset = dataset_of([[1, 2, 3, 4, 5, 6], [7, 8, 9]])  # training parts: [1, 2, 3, 4] and [7]
    rows = training_sequences(dataset, max_len=3, mode="prefix")
    assert len(rows) == 3
    assert rows.histories().tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3]]
    assert rows.targets.tolist() == [2, 3, 4]
    assert rows.users.tolist() == [0, 0, 0]
    assert rows.histories().dtype == np.int64


def test_user_training_rows_supervise_every_position():
    dataset = dataset_of([[1, 2, 3, 4, 5, 6], [7, 8, 9], [5, 4, 3, 2]])
    rows = training_sequences(dataset, max_len=5, mode="user")
    assert rows.users.tolist() == [0, 2]  # user 1's training part [7] has no (history, target) pair
    assert rows.histories().tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 5, 4]]
    assert rows.supervised().tolist() == [[False, False, True, True, True], [False, False, False, False, True]]
    assert rows.targets.tolist() == [2, 3, 4, 4] and rows.num_targets == 4
    short = training_sequences(dataset, max_len=2, mode="user")  # keeps the most recent items
    assert short.histories().tolist() == [[3, 4], [5, 4]]
    assert short.supervised().tolist() == [[False, True], [False, True]]


def test_window_rows_cover_every_target_once_with_context():
    dataset = dataset_of([list(range(1, 13)), [7, 8, 9, 1, 2]])  # training parts: 1..10 and [7, 8, 9]
    rows = training_sequences(dataset, max_len=4, mode="window", stride=2)
    assert rows.users.tolist() == [0, 0, 0, 0, 1]
    assert rows.histories().tolist() == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10], [0, 7, 8, 9]]
    assert rows.supervised().tolist() == [[False, True, True, True], [False, False, True, True],
                                         [False, False, True, True], [False, False, True, True],
                                         [False, False, True, True]]
    assert rows.targets.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 8, 9]
    assert rows.num_targets == training_target_count(dataset) == 11
    batch = rows.batch(np.array([4, 0]))
    assert set(batch) == {"user", "window", "supervised"}
    assert batch["window"].tolist() == [[0, 7, 8, 9], [1, 2, 3, 4]] and batch["supervised"].dtype == torch.bool
    with pytest.raises(ValueError, match=r"stride must be an int in \[1, max_len - 1 = 3\], got 4"):
        training_sequences(dataset, max_len=4, mode="window", stride=4)
    with pytest.raises(ValueError, match="windows need max_len >= 2"):
        training_sequences(dataset, max_len=1, mode="window")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), min_size=3, max_size=40), min_size=1, max_size=6),
       st.integers(2, 12), st.data())
def test_window_rows_supervise_every_training_target_exactly_once(sequences, max_len, data):
    """Property: over random datasets, window lengths and strides, the supervised positions are the
    training targets (every item of a training part after its first), each exactly once, each
    holding its own item, with at least max_len - stride items of context (or all the user has)."""
    stride = data.draw(st.integers(1, max_len - 1))
    dataset = dataset_of(sequences, num_items=9)
    rows = training_sequences(dataset, max_len, "window", stride)
    windows, supervised = rows.histories(), rows.supervised()
    seen = []
    for r in range(len(rows)):
        for position in np.flatnonzero(supervised[r]):
            index = int(rows.ends[r]) - max_len + int(position)  # the item's place in dataset.items
            seen.append(index)
            assert windows[r, position] == dataset.items[index]
            context = int((windows[r, :position] != 0).sum())
            assert context >= min(max_len - stride, index - int(rows.starts[r]))
    starts = dataset.offsets[:-1]
    expected = [int(start) + t for start, length in zip(starts, dataset.lengths) for t in range(1, length - 2)]
    assert sorted(seen) == expected  # every training target, none twice
    assert rows.num_targets == len(expected) == training_target_count(dataset)


def test_evaluation_rows_for_valid_and_test():
    dataset = dataset_of([[1, 2, 3, 4, 5, 6], [7, 8, 9]])
    valid = evaluation_batch(dataset, "valid", max_len=3)
    assert valid.histories.tolist() == [[2, 3, 4], [0, 0, 7]]
    assert valid.targets.tolist() == [5, 8]
    assert valid.seen_offsets.tolist() == [0, 4, 5] and valid.seen_items.tolist() == [1, 2, 3, 4, 7]
    test = evaluation_batch(dataset, "test", max_len=3)
    assert test.histories.tolist() == [[3, 4, 5], [0, 7, 8]]
    assert test.targets.tolist() == [6, 9]
    assert test.seen_offsets.tolist() == [0, 5, 7] and test.seen_items.tolist() == [1, 2, 3, 4, 5, 7, 8]


def test_bad_batching_arguments():
    dataset = dataset_of([[1, 2, 3]])
    with pytest.raises(ValueError, match="mode must be one of"):
        training_sequences(dataset, mode="windows")
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        training_sequences(dataset, max_len=0)
    with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
        evaluation_batch(dataset, "train")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(iterate_batches(evaluation_batch(dataset), 0))


sequence_lists = st.lists(st.lists(st.integers(1, 9), min_size=3, max_size=14), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(sequence_lists, st.integers(1, 7))
def test_rows_match_a_naive_construction(sequences, max_len):
    def window(items):
        items = items[-max_len:]
        return [0] * (max_len - len(items)) + items

    dataset = dataset_of(sequences, num_items=9)
    prefix = training_sequences(dataset, max_len, "prefix")
    expected = [(window(s[:t]), s[t]) for s in sequences for t in range(1, len(s) - 2)]
    assert list(zip(prefix.histories().tolist(), prefix.targets.tolist())) == expected

    if max_len >= 2:
        user = training_sequences(dataset, max_len, "user")
        trains = [s[:-2] for s in sequences if len(s) >= 4]
        assert user.histories().tolist() == [window(t) for t in trains]
        assert user.supervised().tolist() == [[h != 0 and p > 0 and window(t)[p - 1] != 0
                                               for p, h in enumerate(window(t))] for t in trains]

    for split, cut in (("valid", 2), ("test", 1)):
        rows = evaluation_batch(dataset, split, max_len)
        assert rows.histories.tolist() == [window(s[:-cut]) for s in sequences]
        assert rows.targets.tolist() == [s[-cut] for s in sequences]
        assert rows.seen_items.tolist() == [i for s in sequences for i in s[:-cut]]


def test_batches_cover_every_row_once_as_long_tensors():
    dataset = dataset_of([[1, 2, 3, 4, 5, 6], [7, 8, 9, 1, 2], [2, 2, 2]])
    rows = training_sequences(dataset, max_len=4, mode="prefix")
    batches = list(iterate_batches(rows, batch_size=2))
    assert [len(b["target"]) for b in batches] == [2, 2, 1]  # the last, smaller batch is kept
    assert set(batches[0]) == {"user", "history", "target"}
    assert all(t.dtype == torch.int64 for b in batches for t in b.values())
    assert torch.cat([b["history"] for b in batches]).tolist() == rows.histories().tolist()

    user_rows = training_sequences(dataset, max_len=4, mode="user")
    batch = next(iterate_batches(user_rows, batch_size=8))
    assert batch["window"].tolist() == user_rows.histories().tolist()
    assert batch["supervised"].tolist() == user_rows.supervised().tolist()


def test_shuffle_is_seeded_and_advances_between_epochs():
    rows = training_sequences(synthetic_dataset(num_users=50, num_items=60, num_clusters=3), 10, "prefix")
    def epoch(generator):
        return torch.cat([b["target"] for b in iterate_batches(rows, 64, shuffle=True, generator=generator)])

    assert torch.equal(epoch(3), epoch(3))
    assert not torch.equal(epoch(3), epoch(4))
    generator = torch.Generator().manual_seed(3)
    first, second = epoch(generator), epoch(generator)
    assert torch.equal(first, epoch(3)) and not torch.equal(first, second)
    assert sorted(first.tolist()) == sorted(rows.targets.tolist())
    numpy_first = epoch(np.random.default_rng(5))
    assert torch.equal(numpy_first, epoch(np.random.default_rng(5)))
    assert sorted(numpy_first.tolist()) == sorted(rows.targets.tolist())


def test_evaluation_batches_rebase_the_seen_lists():
    dataset = dataset_of([[1, 2, 3, 4, 5, 6], [7, 8, 9], [3, 3, 1, 2]])
    rows = evaluation_batch(dataset, "test", max_len=3)
    batches = list(iterate_batches(rows, batch_size=2, shuffle=True, generator=0))
    for batch in batches:
        for row, user in enumerate(batch["user"].tolist()):
            seen = batch["seen_items"][batch["seen_offsets"][row]:batch["seen_offsets"][row + 1]]
            assert seen.tolist() == dataset.sequence(user)[:-1].tolist()
    assert sorted(u for b in batches for u in b["user"].tolist()) == [0, 1, 2]


def test_popularity_baseline_on_a_hand_made_case():
    dataset = dataset_of([[1, 2, 3, 1], [1, 2, 4, 2], [2, 3, 1, 3]])
    assert item_popularity(dataset, "test").tolist() == [0, 3, 3, 2, 1]
    assert item_popularity(dataset, "valid").tolist() == [0, 2, 3, 1, 0]
    # Test ranks (ties count against the target): 2, 2, 3.
    metrics = popularity_ranking_metrics(dataset, "test", ks=(1, 2, 3))
    assert metrics["HR@1"] == 0 and metrics["HR@2"] == pytest.approx(2 / 3) and metrics["HR@3"] == 1
    assert metrics["NDCG@2"] == pytest.approx(2 / math.log2(3) / 3)
    assert metrics["NDCG@3"] == pytest.approx((2 / math.log2(3) + 0.5) / 3)
    # Without the seen items other than the target, every target is first.
    assert popularity_ranking_metrics(dataset, "test", ks=(1,), exclude_seen=True) == {"HR@1": 1.0, "NDCG@1": 1.0}
    # Validation ranks: 3, 4, 2.
    assert popularity_ranking_metrics(dataset, "valid", ks=(2,))["HR@2"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------------
# The synthetic dataset


def test_synthetic_is_deterministic_for_a_seed():
    small = dict(num_users=300, num_items=120, num_clusters=4)
    assert synthetic_interactions(**small).equals(synthetic_interactions(**small))
    assert not synthetic_interactions(**small).equals(synthetic_interactions(**small, seed=1))
    first, second = synthetic_dataset(**small), synthetic_dataset(SyntheticConfig(**small))
    assert np.array_equal(first.items, second.items) and np.array_equal(first.offsets, second.offsets)


def test_synthetic_defaults_and_file_round_trip(tmp_path):
    dataset = synthetic_dataset()
    assert dataset.num_users == 2500 and 790 <= dataset.num_items <= 800
    assert 20 <= dataset.stats.min_length and dataset.stats.max_length <= 60
    assert 95_000 < dataset.num_actions < 105_000
    path = write_synthetic(tmp_path / "synthetic.txt.gz")
    assert path.read_bytes() == write_synthetic(tmp_path / "again.txt.gz").read_bytes()
    reloaded = load_dataset(path)
    assert np.array_equal(reloaded.items, dataset.items) and np.array_equal(reloaded.offsets, dataset.offsets)
    assert np.array_equal(reloaded.item_original_ids, dataset.item_original_ids)


def test_synthetic_structure_is_learnable_beyond_popularity():
    """A first-order Markov chain counted on the training rows, the simplest sequential model,
    beats the popularity ranking by a wide margin on the test targets."""
    dataset = synthetic_dataset()
    rows = training_sequences(dataset, max_len=1, mode="prefix")
    transitions = np.zeros((dataset.num_items + 1, dataset.num_items + 1))
    np.add.at(transitions, (rows.histories()[:, 0], rows.targets), 1)
    test = evaluation_batch(dataset, "test", max_len=1)
    scores = transitions[test.histories[:, 0]] + 1e-6 * item_popularity(dataset)  # popularity breaks ties
    scores[:, 0] = -np.inf
    ranks = (scores >= scores[np.arange(len(scores)), test.targets][:, None]).sum(axis=1)
    markov_ndcg = np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0).mean()
    popularity_ndcg = popularity_ranking_metrics(dataset)["NDCG@10"]
    assert markov_ndcg > 5 * popularity_ndcg


def test_synthetic_config_is_checked():
    with pytest.raises(ValueError, match="sum <= 1"):
        SyntheticConfig(transition_prob=0.9, taste_prob=0.2)
    with pytest.raises(ValueError, match="min_length"):
        SyntheticConfig(min_length=2)


# --------------------------------------------------------------------------------------------------
# The shared datasets


def test_beauty_statistics():
    dataset = load_dataset(shared_file("beauty/Beauty.txt"))
    assert (dataset.num_users, dataset.num_items, dataset.num_actions) == (22_363, 12_101, 198_502)
    assert dataset.stats.avg_length == pytest.approx(8.876, abs=1e-3)
    assert "removed 0 users, 0 items, 0 interactions" in dataset.describe()  # already 5-core
    assert np.array_equal(dataset.item_original_ids[1:], np.arange(1, 12_102))  # ids were dense already


def test_ml1m_statistics():
    path = shared_file("ml-1m/ml-1m.txt.gz")
    # The paper's counts (and its 3,953 = 3,952 + 1 items) keep every movie: users-only 5-core.
    dataset = load_dataset(path, item_k_core=0)
    assert (dataset.num_users, dataset.num_items, dataset.num_actions) == (6_040, 3_706, 1_000_209)
    assert dataset.item_original_ids.max() == 3952
    # A 5-core on items too drops the 290 movies with fewer than 5 ratings.
    five_core = load_dataset(path)
    assert (five_core.num_users, five_core.num_items, five_core.num_actions) == (6_040, 3_416, 999_611)
