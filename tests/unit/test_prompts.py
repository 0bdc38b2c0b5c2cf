"""Prompt loaders, the resumable prompt stream and GenEval prompt generation."""
import json
from pathlib import Path

import pytest

from common.prompts import (
    COCO_CLASSES, GENEVAL_TAGS, PromptFileError, PromptRecord, PromptStream, generate_geneval_prompts,
    geneval_prompt, load_prompts, resolve_prompt_path,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "prompts"


def test_text_loader_reads_one_prompt_a_line_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a dog  \n   \n")
    assert load_prompts(path, "text") == [PromptRecord("a cat"), PromptRecord("a dog")]
    assert [r.prompt for r in load_prompts(FIXTURES / "pickscore.txt", "text")] == \
        (FIXTURES / "pickscore.txt").read_text().splitlines()


def test_ocr_loader_extracts_the_quoted_target():
    records = load_prompts(FIXTURES / "ocr.txt", "ocr")
    assert len(records) == 6
    assert records[0].metadata == {"target": "Spring Collection 2024"}
    assert records[4].metadata == {"target": "Lost City Near"}


def test_geneval_loader_keeps_the_whole_object_as_metadata():
    records = load_prompts(FIXTURES / "geneval_metadata.jsonl", "geneval")
    lines = (FIXTURES / "geneval_metadata.jsonl").read_text().splitlines()
    assert len(records) == len(lines) == 20
    assert [r.metadata for r in records] == [json.loads(line) for line in lines]
    assert records[4].prompt == "a photo of two wine glasses"
    assert records[4].metadata["exclude"] == [{"class": "wine glass", "count": 3}]


@pytest.mark.parametrize("format, lines, message", [
    ("geneval", ['{"tag": "colors", "include": [{"class": "cup", "count": 1}], "prompt": "a cup"}', '{"tag": '],
     "not valid JSON"),
    ("geneval", ['{"tag": "colors", "include": [{"class": "cup", "count": 1}]}'], 'missing "prompt"'),
    ("geneval", ['{"tag": "colors", "include": {"class": "cup"}, "prompt": "a cup"}'], '"include" must be a non-empty list'),
    ("geneval", ['{"tag": "colors", "include": [{"class": "cup", "count": "one"}], "prompt": "a cup"}'], '"count" must be'),
    ("geneval", ['[1, 2]'], "expected a JSON object"),
    ("ocr", ['a sign that reads "OPEN"', "", "a sign without quotes"], "no text between double quotes"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, format, lines, message):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptFileError, match=message) as err:
        load_prompts(path, format)
    assert f"{path}:{len(lines)}:" in str(err.value)


def test_empty_file_and_unknown_format_are_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    with pytest.raises(PromptFileError, match="contains no prompts"):
        load_prompts(path, "text")
    with pytest.raises(ValueError, match="text, ocr, geneval"):
        load_prompts(path, "csv")


def test_relative_paths_fall_back_to_the_datasets_directory(tmp_path, monkeypatch):
    (tmp_path / "data" / "ocr").mkdir(parents=True)
    (tmp_path / "data" / "ocr" / "test.txt").write_text('a "sign"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="FLOWGRPO_DATASETS"):
        resolve_prompt_path("ocr/test.txt")
    monkeypatch.setenv("FLOWGRPO_DATASETS", str(tmp_path / "data"))
    assert resolve_prompt_path("ocr/test.txt") == tmp_path / "data" / "ocr" / "test.txt"
    assert load_prompts("ocr/test.txt", "ocr")[0].metadata == {"target": "sign"}
    (tmp_path / "ocr").mkdir()
    (tmp_path / "ocr" / "test.txt").write_text('a "local"\n')
    assert load_prompts("ocr/test.txt", "ocr")[0].metadata == {"target": "local"}


def _records(n):
    return [PromptRecord(f"prompt {i}") for i in range(n)]


def test_stream_visits_every_prompt_once_per_epoch_across_batch_boundaries():
    stream = PromptStream(_records(5), seed=3)
    draws = stream.next_batch(3) + stream.next_batch(4) + stream.next_batch(3)
    assert [index for index, _ in draws] == list(range(10))
    epoch0, epoch1 = draws[:5], draws[5:]
    assert sorted(r.prompt for _, r in epoch0) == sorted(r.prompt for _, r in epoch1) == [f"prompt {i}" for i in range(5)]
    assert [r.prompt for _, r in epoch0] != [r.prompt for _, r in epoch1]  # a fresh permutation each epoch
    assert stream.state() == {"epoch": 1, "position": 5}  # the next draw starts epoch 2
    assert len(stream) == 5


def test_stream_is_deterministic_and_resumes_exactly():
    first = PromptStream(_records(7), seed=11)
    first.next_batch(9)
    state = first.state()
    expected = first.next_batch(12)

    resumed = PromptStream(_records(7), seed=11)
    resumed.restore(json.loads(json.dumps(state)))
    assert resumed.next_batch(12) == expected
    assert PromptStream(_records(7), seed=12).next_batch(7) != PromptStream(_records(7), seed=11).next_batch(7)
    with pytest.raises(ValueError, match="another prompt file"):
        PromptStream(_records(3), seed=11).restore({"epoch": 0, "position": 5})


def test_geneval_prompt_reproduces_every_fixture_prompt():
    for record in load_prompts(FIXTURES / "geneval_metadata.jsonl", "geneval"):
        assert geneval_prompt(record.metadata["tag"], record.metadata["include"]) == record.prompt


def test_generated_geneval_prompts_are_valid_deterministic_metadata(tmp_path):
    records = generate_geneval_prompts(300, seed=5)
    assert records == generate_geneval_prompts(300, seed=5)
    assert records != generate_geneval_prompts(300, seed=6)
    assert {r.metadata["tag"] for r in records} == set(GENEVAL_TAGS)
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80
    path = tmp_path / "train_metadata.jsonl"
    path.write_text("".join(json.dumps(r.metadata) + "\n" for r in records))
    assert load_prompts(path, "geneval") == records
    for r in records:
        m = r.metadata
        assert m["prompt"] == r.prompt == geneval_prompt(m["tag"], m["include"])
        assert all(item["class"] in COCO_CLASSES for item in m["include"])
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": m["include"][0]["class"], "count": m["include"][0]["count"] + 1}]
        if len(m["include"]) == 2:
            assert m["include"][0]["class"] != m["include"][1]["class"]


def test_generation_avoids_given_prompts():
    avoid = {r.prompt for r in load_prompts(FIXTURES / "geneval_metadata.jsonl", "geneval")}
    assert not avoid & {r.prompt for r in generate_geneval_prompts(2000, seed=0, avoid=avoid)}
    single = {f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}" for c in COCO_CLASSES}
    records = generate_geneval_prompts(50, seed=0, avoid=single)
    assert "single_object" not in {r.metadata["tag"] for r in records}
