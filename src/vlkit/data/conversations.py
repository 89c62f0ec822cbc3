"""Reader for LLaVA's conversation JSON (Liu et al., 2023, "Visual Instruction Tuning"): users' own instruction data.

A JSON list (``llava_v1_5_mix665k.json``) or JSONL, one sample per entry:

    {"id": "000123",                                   optional
     "image": "coco/000123.jpg" | ["a.jpg", "b.jpg"],  absent, null or [] for a text-only sample
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

-> ``ConversationReadResult(conversations: [Conversation], skipped: [BadSampleError])``. Roles: ``human``/``user``
-> user, ``gpt``/``assistant`` -> assistant, ``system`` (first turn only). Image paths are resolved against
``image_folder`` (LLaVA's ``--image_folder``; default: the file's folder). Other keys of an entry go to
``Conversation.meta``.

Bad input follows the readers' rule: a ``BadSampleError`` naming the item ("data.json[17] (id '000123')",
"data.jsonl:18") and what is wrong (a missing image file, ``<image>`` placeholders that do not match the images,
roles that do not alternate, an empty turn, an unknown role, no answer to train on), or with ``skip_bad=True``
a counted, logged skip. A JSON list that does not parse at all is one error for the whole file.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlkit.data.images import BadSampleError
from vlkit.data.readers import _json_type, _log_skipped, _raise_or_collect, _resolve_image_path
from vlkit.text.chat import Conversation, Turn, conversation_problem

logger = logging.getLogger(__name__)

ROLE_NAMES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class ConversationReadResult:
    """The good conversations and the errors of the entries that were skipped."""

    conversations: list[Conversation]
    skipped: list[BadSampleError]


def read_conversations(
    path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
) -> ConversationReadResult:
    """Read a LLaVA conversation file (JSON list or JSONL, told apart by the first character).

    ``check_images`` checks that every image file exists (a stat per image; the files are not opened here, a
    corrupt image is reported when a dataset loads it).
    """
    folder = Path(image_folder) if image_folder is not None else Path(path).absolute().parent
    try:
        data = Path(path).read_bytes()
    except OSError as error:  # missing, a directory, no permission, a symlink loop: one line naming the file
        raise BadSampleError(str(path), f"cannot open the file ({error.strerror or error})") from None
    conversations: list[Conversation] = []
    skipped: list[BadSampleError] = []
    for item, parse in _entries(path, data):
        try:
            entry = parse()
            conversations.append(_conversation(entry, item, folder, check_images))
        except BadSampleError as error:
            _raise_or_collect(error, skip_bad, skipped)
    _log_skipped(path, skipped)
    return ConversationReadResult(conversations=conversations, skipped=skipped)


def _entries(path: str | os.PathLike[str], data: bytes) -> list[tuple[str, Any]]:
    """(item name, a function returning the parsed entry or raising BadSampleError) per sample."""
    text_start = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if text_start == b"[":
        try:
            entries = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as error:
            raise BadSampleError(str(path), f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
        except json.JSONDecodeError as error:
            where = f"line {error.lineno} column {error.colno}"
            raise BadSampleError(str(path), f"malformed JSON list ({error.msg} at {where})") from None
        except (ValueError, RecursionError) as error:
            raise BadSampleError(str(path), f"malformed JSON list ({type(error).__name__}: {error})") from None
        return [(f"{path}[{index}]", lambda entry=entry: entry) for index, entry in enumerate(entries)]
    if text_start == b"{":
        # One pretty-printed object is a one-sample file; JSONL fails this parse at its second line.
        try:
            whole = json.loads(data.decode("utf-8-sig"))
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            return [(str(path), lambda: whole)]
    lines = []
    for line_number, raw_line in enumerate(data.split(b"\n"), start=1):
        if raw_line.strip():
            item = f"{path}:{line_number}"
            lines.append((item, lambda raw=raw_line, item=item: _parse_line(raw, item)))
    return lines


def _parse_line(raw_line: bytes, item: str) -> Any:
    try:
        return json.loads(raw_line.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise BadSampleError(item, "line is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise BadSampleError(item, f"malformed JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:
        raise BadSampleError(item, f"malformed JSON ({type(error).__name__}: {error})") from None


def _conversation(entry: Any, item: str, folder: Path, check_images: bool) -> Conversation:
    if not isinstance(entry, dict):
        raise BadSampleError(item, f"expected a JSON object, got {_json_type(entry)}")
    sample_id = entry.get("id")
    if sample_id is not None:
        if not isinstance(sample_id, str | int) or isinstance(sample_id, bool):
            raise BadSampleError(item, f"'id' must be a string or an integer, got {sample_id!r:.40}")
        sample_id = str(sample_id)
        item = f"{item} (id {sample_id!r})"
    images = [_resolve_image_path(image, folder) for image in _image_list(entry.get("image"), item)]
    if check_images:
        for image in images:
            try:
                found = Path(image).is_file()
            except OSError as error:  # a name too long, a folder that may not be read: the item's fault, named
                raise BadSampleError(item, f"image {image}: {error.strerror or error}") from error
            if not found:
                raise BadSampleError(item, f"image file not found: {image}")
    turns = _turns(entry, item)
    meta = {key: value for key, value in entry.items() if key not in ("id", "image", "conversations")}
    conversation = Conversation(turns=turns, images=list(images), id=sample_id, item=item, meta=meta)
    problem = conversation_problem(conversation, expect="answer")
    if problem is not None:
        raise BadSampleError(item, problem)
    return conversation


def _image_list(image: Any, item: str) -> list[str]:
    if image is None:
        return []
    listed = [image] if isinstance(image, str) else image
    if not isinstance(listed, list):
        raise BadSampleError(item, f"'image' must be a path or a list of paths, got {_json_type(image)}")
    for position, path in enumerate(listed):
        if not isinstance(path, str) or not path.strip():
            where = "'image'" if isinstance(image, str) else f"'image'[{position}]"
            raise BadSampleError(item, f"{where} must be a non-empty path, got {_json_type(path)} {path!r}")
    return [path.strip() for path in listed]


def _turns(entry: dict[str, Any], item: str) -> list[Turn]:
    if "conversations" not in entry:
        raise BadSampleError(item, "missing 'conversations' key")
    listed = entry["conversations"]
    if not isinstance(listed, list):
        raise BadSampleError(item, f"'conversations' must be a list of turns, got {_json_type(listed)}")
    turns = []
    for number, turn in enumerate(listed):
        if not isinstance(turn, dict):
            raise BadSampleError(item, f"turn {number} must be an object, got {_json_type(turn)}")
        if "from" not in turn or "value" not in turn:
            raise BadSampleError(item, f"turn {number} needs 'from' and 'value' keys, has {sorted(turn)}")
        role, value = turn["from"], turn["value"]
        if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
            raise BadSampleError(item, f"turn {number} has unknown role {role!r}; expected one of {list(ROLE_NAMES)}")
        if not isinstance(value, str):
            raise BadSampleError(item, f"turn {number} 'value' must be a string, got {_json_type(value)}")
        turns.append(Turn(ROLE_NAMES[role.lower()], value))  # type: ignore[arg-type]
    return turns
