import json
import os
import sys

import datasets
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import write_jsonl  # noqa: E402

from jaxalign.data.loading import load_dataset_rows, parse_spec, sample_rows, split_rows  # noqa: E402
from jaxalign.errors import ConfigError, DataError  # noqa: E402

ROWS = [
    {"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}], "solution": str(i + 1)}
    for i in range(10)
]


def test_jsonl_keeps_line_numbers_and_skips_blank_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    rows = load_dataset_rows(str(path))
    assert [r.data for r in rows] == ROWS[:2]
    assert [r.line for r in rows] == [1, 3]
    assert rows[1].where == f"{path} line 3"


def test_jsonl_bad_json_names_line(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [ROWS[0], '{"messages": [', ROWS[1]])
    with pytest.raises(DataError) as e:
        load_dataset_rows(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} line 2: bad JSON (")
    assert msg.endswith("; fix the line or pass --ignore_bad_rows")
    assert "\n" not in msg


def test_jsonl_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"a\.jsonl line 2: expected a JSON object, got list"):
        load_dataset_rows(path)


def test_jsonl_bad_rows_kept_for_counting(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], "not json", ROWS[1]])
    rows = load_dataset_rows(path, ignore_bad_rows=True)
    assert [r.error is None for r in rows] == [True, False, True]
    assert rows[1].line == 2 and rows[1].error.startswith("bad JSON")


def test_json_csv_parquet_and_saved_folder(tmp_path):
    json_path = tmp_path / "a.json"
    json_path.write_text(json.dumps(ROWS[:3]))
    rows = load_dataset_rows(str(json_path))
    assert [r.data for r in rows] == ROWS[:3]
    assert [r.where for r in rows] == [f"{json_path} row {i}" for i in range(3)]

    csv_path = tmp_path / "a.csv"
    csv_path.write_text("query,response,label\n1+1=,2,true\nhi,yo,false\n")
    rows = load_dataset_rows(str(csv_path))
    assert [r.data for r in rows] == [{"query": "1+1=", "response": "2", "label": True},
                                      {"query": "hi", "response": "yo", "label": False}]
    csv_path.write_text("query,response\n1+1=,2\n")
    assert load_dataset_rows(str(csv_path))[0].data == {"query": "1+1=", "response": 2}  # normalised later

    ds = datasets.Dataset.from_list(ROWS[:4])
    pq_path = tmp_path / "a.parquet"
    ds.to_parquet(str(pq_path))
    assert [r.data for r in load_dataset_rows(str(pq_path))] == ROWS[:4]

    ds.save_to_disk(str(tmp_path / "saved"))
    rows = load_dataset_rows(str(tmp_path / "saved"))
    assert [r.data for r in rows] == ROWS[:4] and rows[2].where == f"{tmp_path / 'saved'} row 2"

    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_dataset_rows(str(tmp_path / "dict"))) == 4


def test_several_files_comma_separated(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = tmp_path / "b.json"
    b.write_text(json.dumps(ROWS[2:5]))
    rows = load_dataset_rows(f"{a}, {b}")
    assert [r.data for r in rows] == ROWS[:5]
    assert [r.source for r in rows] == [a] * 2 + [str(b)] * 3


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=r"^nope\.jsonl: no such file or folder; check the --dataset path$"):
        load_dataset_rows("nope.jsonl")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a\.txt: unsupported dataset format \.txt; use \.jsonl"):
        load_dataset_rows(str(tmp_path / "a.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not one saved by datasets.save_to_disk"):
        load_dataset_rows(str(tmp_path / "empty_dir"))


def test_bad_json_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"messages": 1},\n{"messages": ]\n')
    with pytest.raises(DataError, match=r"bad\.json: cannot read as json \(bad JSON at line 3 column"):
        load_dataset_rows(str(path))


def test_spec_parsing():
    assert parse_spec("a.jsonl#500, b.parquet") == [("a.jsonl", 500), ("b.parquet", None)]
    with pytest.raises(ConfigError, match="row count"):
        parse_spec("a.jsonl#many")
    with pytest.raises(ConfigError, match="positive"):
        parse_spec("a.jsonl#0")
    with pytest.raises(ConfigError, match="empty"):
        parse_spec(" , ")


def test_sample_suffix(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    s1 = load_dataset_rows(f"{path}#4", seed=1)
    assert len(s1) == 4 and len({r.line for r in s1}) == 4
    assert [r.line for r in s1] == [r.line for r in load_dataset_rows(f"{path}#4", seed=1)]
    assert [r.line for r in s1] != [r.line for r in load_dataset_rows(f"{path}#4", seed=2)]
    big = load_dataset_rows(f"{path}#25", seed=1)  # two whole copies plus 5 sampled
    assert len(big) == 25
    assert sorted(r.line for r in big[:20]) == sorted(list(range(1, 11)) * 2)
    assert len({r.line for r in big[20:]}) == 5
    assert sample_rows([], 3, seed=0) == []


def test_split_rows():
    rows = list(range(100))
    train, val = split_rows(rows, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == rows and train == sorted(train) and val == sorted(val)
    assert split_rows(rows, 0.1, seed=0) == (train, val)
    assert split_rows(rows, 0.1, seed=1)[1] != val
    assert split_rows(rows, 0.001, seed=0)[1].__len__() == 1  # ceil, as datasets' train_test_split
    assert split_rows(rows, 0.0, seed=0) == (rows, [])
    with pytest.raises(ConfigError, match=r"split_dataset_ratio 1\.0"):
        split_rows(rows, 1.0)
    with pytest.raises(ConfigError, match="no training rows"):
        split_rows([1], 0.5)
