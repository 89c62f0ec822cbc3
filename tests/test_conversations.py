"""LLaVA conversation JSON reader: good entries (several images, text-only, system turns), bad entries named with
what is wrong (or counted skips), and ShapesWorld's `--format llava` export read back."""

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from vlkit.data.conversations import read_conversations
from vlkit.data.images import BadSampleError
from vlkit.data.shapes import ShapesConfig, generate, shapes_main
from vlkit.data.shapes_vqa import instruction_items
from vlkit.text.chat import Turn, tokenize_conversation
from vlkit.text.tokenizer import train_tokenizer


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    return tmp_path


GOOD = [
    {
        "id": "one",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Black."},
        ],
    },
    {
        "id": 2,
        "image": ["a.png", "b.png"],
        "source": "mine",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image> and <image>: same?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello."}]},
]


def _check_good(conversations: list, folder: Path) -> None:
    assert len(conversations) == 3
    first, second, third = conversations
    assert first.id == "one" and first.images == [str(folder / "a.png")]
    assert first.turns == [
        Turn("user", "<image>\nWhat is it?"),
        Turn("assistant", "A square."),
        Turn("user", "Colour?"),
        Turn("assistant", "Black."),
    ]
    assert second.id == "2" and second.images == [str(folder / "a.png"), str(folder / "b.png")]
    assert second.turns[0] == Turn("system", "Be brief.") and second.meta == {"source": "mine"}
    assert third.id is None and third.images == [] and [t.role for t in third.turns] == ["user", "assistant"]


def test_reads_a_json_list_and_jsonl(folder: Path) -> None:
    (folder / "data.json").write_text(json.dumps(GOOD, indent=2))
    (folder / "data.jsonl").write_text("\n".join(json.dumps(entry) for entry in GOOD) + "\n\n")
    for name in ("data.json", "data.jsonl"):
        result = read_conversations(folder / name)
        assert result.skipped == []
        _check_good(result.conversations, folder)
    assert read_conversations(folder / "data.json").conversations[0].item == f"{folder / 'data.json'}[0] (id 'one')"


def test_image_folder_and_unchecked_images(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("manifests")
    (elsewhere / "data.json").write_text(json.dumps(GOOD))
    with pytest.raises(BadSampleError, match="image file not found"):
        read_conversations(elsewhere / "data.json")
    _check_good(read_conversations(elsewhere / "data.json", image_folder=folder).conversations, folder)
    unchecked = read_conversations(elsewhere / "data.json", check_images=False).conversations
    assert unchecked[0].images == [str(elsewhere / "a.png")]


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": role, "value": value} for role, value in pairs]


BAD = [
    ({"id": "m", "image": "missing.png", "conversations": _turns(("human", "<image>"), ("gpt", "x"))}, "not found"),
    ({"id": "c", "image": "a.png", "conversations": _turns(("human", "hi"), ("gpt", "x"))}, "0 <image> placeholder"),
    ({"id": "t", "conversations": _turns(("human", "<image>"), ("gpt", "x"))}, "1 <image> placeholder.s. but 0"),
    ({"id": "r", "conversations": _turns(("human", "a"), ("human", "b"), ("gpt", "c"))}, "roles do not alternate"),
    ({"id": "g", "conversations": _turns(("gpt", "a"), ("human", "b"))}, "turn 0 is assistant, expected user"),
    ({"id": "e", "conversations": _turns(("human", "a"), ("gpt", " "))}, r"turn 1 \(assistant\) is empty"),
    ({"id": "u", "conversations": _turns(("human", "a"), ("bot", "b"))}, "turn 1 has unknown role 'bot'"),
    ({"id": "q", "conversations": _turns(("human", "a"))}, "has no assistant turn"),
    ({"id": "l", "conversations": _turns(("human", "a"), ("gpt", "b"), ("human", "c"))}, "ends with a user turn"),
    ({"id": "s", "conversations": _turns(("human", "a"), ("system", "b"))}, "only the first turn"),
    ({"id": "i", "image": 3, "conversations": _turns(("human", "a"), ("gpt", "b"))}, "'image' must be a path"),
    ({"id": "j", "image": ["a.png", ""], "conversations": []}, r"'image'\[1\] must be a non-empty path"),
    ({"id": "k", "conversations": "hello"}, "'conversations' must be a list"),
    ({"id": "n"}, "missing 'conversations'"),
    ({"id": "v", "conversations": [{"from": "human", "value": 5}]}, "'value' must be a string"),
    ({"id": "w", "conversations": [{"from": "human"}]}, "needs 'from' and 'value'"),
    ({"id": "x", "image": "a.png", "conversations": _turns(("human", "<image>"), ("gpt", "<image>"))}, "images belong"),
    (["not", "an", "object"], "expected a JSON object, got array"),
]


@pytest.mark.parametrize(("entry", "reason"), BAD)
def test_bad_entries_name_the_item_and_the_problem(folder: Path, entry: object, reason: str) -> None:
    path = folder / "data.json"
    path.write_text(json.dumps([GOOD[0], entry]))
    with pytest.raises(BadSampleError, match=reason) as caught:
        read_conversations(path)
    ident = f" (id {entry['id']!r})" if isinstance(entry, dict) else ""
    assert caught.value.item == f"{path}[1]{ident}"
    assert str(caught.value).startswith(f"{path}[1]")


def test_skip_bad_counts_every_bad_entry(folder: Path) -> None:
    path = folder / "data.jsonl"
    lines = [json.dumps(GOOD[0]), *(json.dumps(entry) for entry, _ in BAD), "{not json", json.dumps(GOOD[2])]
    path.write_text("\n".join(lines) + "\n")
    result = read_conversations(path, skip_bad=True)
    assert [c.id for c in result.conversations] == ["one", None]
    assert len(result.skipped) == len(BAD) + 1
    assert result.skipped[-1].item == f"{path}:{len(BAD) + 2}" and "malformed JSON" in result.skipped[-1].reason
    with pytest.raises(BadSampleError, match=rf"{path}:2 \(id 'm'\): image file not found"):
        read_conversations(path)


def test_an_image_path_the_system_refuses_is_a_bad_item_not_a_crash(folder: Path) -> None:
    path = folder / "long.json"
    entry = {"image": "x" * 300 + ".png", "conversations": [{"from": "human", "value": "<image>"},
                                                           {"from": "gpt", "value": "a"}]}  # fmt: skip
    path.write_text(json.dumps([entry]))
    assert len(read_conversations(path, skip_bad=True).skipped) == 1
    with pytest.raises(BadSampleError, match=rf"{path}\[0\]: image .*xxx.png: File name too long"):
        read_conversations(path)


def test_a_broken_json_list_is_one_error_even_when_skipping(folder: Path) -> None:
    path = folder / "data.json"
    path.write_text('[{"conversations": []},\n {"id": ')
    with pytest.raises(BadSampleError, match=r"malformed JSON list .* line 2"):
        read_conversations(path, skip_bad=True)


def test_shapes_llava_export_round_trips(tmp_path: Path) -> None:
    args = ["--train", "4", "--val", "0", "--test", "2", "--test-heldout", "0", "--seed", "3", "--quiet"]
    assert shapes_main(["--out", str(tmp_path / "a"), "--format", "llava", *args]) == 0
    assert shapes_main(["--out", str(tmp_path / "b"), "--format", "llava", *args]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files if f.suffix == ".json"] == [
        "llava_test.json",
        "llava_train.json",
        "shapes_config.json",
    ]
    for file in files:  # byte-identical on a second run
        digest = [hashlib.sha256((tmp_path / run / file).read_bytes()).hexdigest() for run in ("a", "b")]
        assert digest[0] == digest[1], file

    config = ShapesConfig(seed=3)
    tokenizer = train_tokenizer(["a red circle"], vocab_size=300)
    tokenizer.backend.add_special_tokens(["<image>"])
    for split, count in (("train", 4), ("test", 2)):
        result = read_conversations(tmp_path / "a" / f"llava_{split}.json")
        assert result.skipped == [] and len(result.conversations) == count
        for index, conversation in enumerate(result.conversations):
            sample = generate(config, split, index)
            items = instruction_items(sample, config, split)
            assert conversation.id == f"{split}-{index:06d}"
            assert Path(conversation.images[0]) == tmp_path / "a" / "images" / split / f"{index:06d}.png"
            assert Image.open(conversation.images[0]).tobytes() == sample.image.tobytes()
            assert [t.content for t in conversation.turns[1::2]] == [item.answer for item in items]
            assert conversation.turns[0].content == "<image>\n" + items[0].question
            assert conversation.meta["kinds"] == [item.kind for item in items]
            assert conversation.meta["objects"] == [o.to_record() for o in sample.objects]
            ids, labels = tokenize_conversation(conversation, "shapes", tokenizer, "<image>", 16)
            assert int((ids == tokenizer.backend.token_to_id("<image>")).sum()) == 16
            assert int((labels != -100).sum()) > len(items)


def test_default_format_still_writes_manifests(tmp_path: Path) -> None:
    args = ["--train", "2", "--val", "0", "--test", "0", "--test-heldout", "0", "--quiet"]
    assert shapes_main(["--out", str(tmp_path), *args]) == 0
    assert (tmp_path / "train.jsonl").exists() and not (tmp_path / "llava_train.json").exists()
    with pytest.raises(SystemExit):
        shapes_main(["--out", str(tmp_path), "--format", "coco", *args])


def test_a_conversation_file_the_os_refuses_is_one_line_naming_it(tmp_path: Path) -> None:
    loop = tmp_path / "loop.json"
    loop.symlink_to(loop)
    for path in (loop, tmp_path / "missing.json", tmp_path):
        with pytest.raises(BadSampleError, match="cannot open the file") as caught:
            read_conversations(path)
        assert caught.value.item == str(path) and "\n" not in str(caught.value)
