"""A VLM recipe trained on the user's own LLaVA conversation JSON (``vlkit train --recipe llava_shapes --train-data
data.json [--skip-bad]``): the conversations' images and turns become samples tokenized with the model's template
(answers trained on, several images or none per sample, as many turns as fit), and bad entries are one-line errors
naming the item or, with ``--skip-bad``, skipped and counted in ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlkit
from vlkit.data.conversations import read_conversations
from vlkit.data.images import BadSampleError
from vlkit.recipes import get_recipe
from vlkit.recipes.run import run_recipe
from vlkit.tasks.vlm import ConversationDataset, _collate, _step
from vlkit.text.chat import IGNORE_INDEX, Conversation, Turn, tokenize_conversation

# The tiny llava_shapes of tests/test_vlm.py, with its own tiny tower run.
TINY = {
    "model.vision.image_size": 32, "train.steps": 2, "train.batch_size": 4, "train.eval_every": None,
    "data.eval_size": 2, "task.tokenizer_scenes": 20, "task.vocab_size": 300, "task.max_new_tokens": 6,
    "stages.text.data.train_size": 20,
    "stages.align.init": {"encoder": {"kind": "init_from", "source": "recipe:siglip_shapes", "part": "image_encoder",
                                      "share": ["vision"],
                                      "overrides": {"train.steps": 2, "train.batch_size": 8, "data.train_size": 16,
                                                    "data.eval_size": 8, "train.eval_every": None,
                                                    "model.text.dim": 32, "model.text.depth": 1,
                                                    "model.text.num_heads": 2, "model.text.mlp_dim": 64,
                                                    "model.embed_dim": 16}}},
}  # fmt: skip


def _ask(question: str, answer: str, images: int = 1) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\n" * images + question}, {"from": "gpt", "value": answer}]


def _data(folder: Path) -> Path:
    """Five entries: one image and two turns, text only, two images, a missing image, a corrupt image."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in (("red.png", (200, 30, 30)), ("blue.png", (30, 30, 200))):
        Image.new("RGB", (40, 40), colour).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    entries = [
        {"id": "one", "image": "red.png",
         "conversations": [*_ask("what colour is the square?", "red"),
                           {"from": "human", "value": "how many objects are there?"}, {"from": "gpt", "value": "1"}]},
        {"id": "text", "conversations": [{"from": "human", "value": "what colour is a red circle?"},
                                         {"from": "gpt", "value": "red"}]},
        {"id": "two", "image": ["red.png", "blue.png"], "conversations": _ask("which is blue?", "the second", 2)},
        {"id": "missing", "image": "nowhere.png", "conversations": _ask("what colour?", "red")},
        {"id": "broken", "image": "broken.png", "conversations": _ask("what colour?", "blue")},
    ]  # fmt: skip
    path = folder / "data.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny llava_shapes whose instruct stage trained on the conversations, skipping the bad ones."""
    folder = tmp_path_factory.mktemp("own")
    data = _data(folder / "data")
    run_recipe(get_recipe("llava_shapes").with_overrides(TINY), folder / "run", train_data=str(data), skip_bad=True,
               progress=False, report=False)  # fmt: skip
    return folder / "run", data


def test_conversations_train_the_stages_that_use_the_recipes_data_and_bad_entries_are_counted(
    trained: tuple[Path, Path],
) -> None:
    run, _ = trained
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["stages"]) == {"text", "align", "instruct"}
    # The instruct stage read the conversations: the missing image was skipped when the file was read, and counted
    # before the first step; the corrupt one is counted when a step draws it.
    (stage,) = (run / "stages").glob("*-instruct")
    log = [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    counts = [record["skipped"] for record in log if "skipped" in record]
    assert counts and counts[0] >= 1 and counts == sorted(counts)
    assert metrics["stages"]["instruct"]["skipped"] == counts[-1] >= 1
    # The text and align stages train on their own data: nothing skipped there.
    assert metrics["stages"]["align"]["skipped"] == 0


def test_samples_hold_the_images_they_show_and_train_on_the_answers_only(trained: tuple[Path, Path]) -> None:
    run, data = trained
    model = vlkit.from_pretrained(run / "model")
    read = read_conversations(data, skip_bad=True)
    assert [c.id for c in read.conversations] == ["one", "text", "two", "broken"] and len(read.skipped) == 1
    dataset = ConversationDataset(read.conversations, model, skip_bad=True)
    m, image_token, template = model.tokens_per_image(), model.config.image_token_id, model.config.chat_template
    for index, images in ((0, 1), (1, 0), (2, 2)):
        sample = dataset[index]
        assert sample is not None and sample["pixel_values"].shape == (images, 3, 32, 32)
        assert int((sample["input_ids"] == image_token).sum()) == images * m
        conversation = dataset.conversations[index]
        ids, labels = tokenize_conversation(conversation, template, model.tokenizer, image_token, m)
        assert torch.equal(sample["input_ids"], ids) and torch.equal(sample["labels"], labels)
    # LLaVA's "<image>\n" is the image and the template's separator (none for the shapes BPE), as evaluation and
    # chat prompt the model.
    assert read.conversations[0].turns[0].content.startswith("<image>\nwhat")
    assert dataset.conversations[0].turns[0].content.startswith("<image>what")
    # Labels on the answers (and their end of turn) only.
    first = dataset[0]
    trained_ids = first["input_ids"][first["labels"] != IGNORE_INDEX].tolist()
    answers = model.tokenizer.decode(trained_ids, skip_special_tokens=True)
    assert "red" in answers and "1" in answers and "colour" not in answers
    # The corrupt image: None with skip_bad (the collate drops and counts it), an error naming the file without.
    assert dataset[3] is None
    with pytest.raises(BadSampleError, match=r"broken\.png"):
        ConversationDataset(read.conversations, model)[3]
    # A batch with text-only and two-image samples: the images in order, one batch row per kept sample.
    batch = _collate(model.tokenizer.pad_token_id)([dataset[0], dataset[1], dataset[2], dataset[3]])
    assert batch["skipped"] == 1 and batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape[0] == 3
    assert torch.equal(batch["pixel_values"][1:], dataset[2]["pixel_values"])
    output = _step(model.train(), batch)
    assert torch.isfinite(output.loss) and output.weight > 0
    # Every sample skipped: a zero-row batch gives a zero loss that backward accepts.
    empty = _collate(model.tokenizer.pad_token_id)([None, None])
    assert empty["skipped"] == 2
    nothing = _step(model, empty)
    nothing.loss.backward()
    assert nothing.loss.item() == 0.0 and nothing.weight == 0.0


def test_a_conversation_longer_than_the_context_keeps_the_turns_that_fit(trained: tuple[Path, Path]) -> None:
    run, _ = trained
    model = vlkit.from_pretrained(run / "model")
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    turns = [Turn("user", "<image>what colour is the square?"), Turn("assistant", "red")]
    for _ in range(40):
        turns += [Turn("user", "how many objects are there?"), Turn("assistant", "1")]
    long = Conversation(turns=turns, images=[image], item="long.json[0]")
    sample = ConversationDataset([long], model)[0]
    assert sample is not None and len(sample["input_ids"]) <= model.config.lm.max_seq_len
    assert sample["pixel_values"].shape[0] == 1
    # Cut after an answer: the last trained token is the template's end of turn.
    assert sample["labels"][sample["labels"] != IGNORE_INDEX][-1] == model.tokenizer.eos_token_id
    first_turn_too_long = Conversation(turns=[Turn("user", "<image>" + "what colour " * 200), Turn("assistant", "red")],
                                       images=[image], item="long.json[1]")  # fmt: skip
    with pytest.raises(BadSampleError, match=r"long.json\[1\]: \d+ tokens for its first exchange"):
        ConversationDataset([first_turn_too_long], model)[0]
    # What the template cannot lay out (the shapes template has no system prompt) names the entry too, and with
    # skip_bad is a counted skip, not the end of the run.
    system = Conversation(turns=[Turn("system", "be brief"), *turns[:2]], images=[image], item="sys.json[0]")
    with pytest.raises(BadSampleError, match=r"sys.json\[0\]: .*system"):
        ConversationDataset([system], model)[0]
    assert ConversationDataset([first_turn_too_long, system], model, skip_bad=True)[1] is None


def test_without_skip_bad_the_first_bad_entry_stops_the_run_naming_it(tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    with pytest.raises(BadSampleError, match=r"data.json\[3\] \(id 'missing'\)"):
        run_recipe(get_recipe("llava_shapes").with_overrides(TINY), tmp_path / "run", train_data=str(data),
                   progress=False, report=False)  # fmt: skip


def test_a_micro_batch_without_images_still_gives_a_trained_bridge_a_gradient(trained: tuple[Path, Path]) -> None:
    """A stage that trains the bridge alone (BLIP-2's instruct stage) on a text-only micro-batch: the loss reaches the
    bridge through one blank image at weight 0, so backward runs and every bridge parameter gets a (zero) gradient,
    as DDP needs from each process every step; the loss itself is the text's."""
    run, _ = trained
    model = vlkit.from_pretrained(run / "model").train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("bridge."))
    text_only = Conversation([Turn("user", "what colour is a red circle?"), Turn("assistant", "red")])
    batch = _collate(model.tokenizer.pad_token_id)([ConversationDataset([text_only], model)[0]])
    assert "pixel_values" not in batch
    output = _step(model, batch)
    plain = model(batch["input_ids"], batch["attention_mask"], None, batch["labels"], return_logits=False).loss
    assert torch.equal(output.loss.detach(), plain.detach())
    output.loss.backward()
    grads = [parameter.grad for parameter in model.bridge.parameters()]
    assert grads and all(grad is not None and not grad.any() for grad in grads)
    # A stage whose bridge is frozen (the text stage) runs no image at all.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.lm.token_embed.weight.requires_grad_(True)
    assert torch.equal(_step(model, batch).loss.detach(), plain.detach())
