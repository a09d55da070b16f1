"""Errors for people: every bad record is reported with its file, line (or row), field, what was expected
and what was found; skip mode keeps the good records and accounts for every bad one.

Each case writes a real file holding one valid record followed by the bad one, so the bad one is always
on line 2 (or row 1, rows counting from 0 as in ``dataset[1]``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chat_fixtures import assistant, system, user
from posttrain.cli import app
from posttrain.data.formats import DataError, ReadReport, read_records, write_rejects


def write_lines(path: Path, lines: list) -> Path:
    """Each item a JSON record, or raw bytes/str written as the line itself."""
    out = b""
    for line in lines:
        if isinstance(line, bytes):
            out += line
        elif isinstance(line, str):
            out += line.encode("utf-8")
        else:
            out += json.dumps(line, ensure_ascii=False).encode("utf-8")
        out += b"\n"
    path.write_bytes(out)
    return path


def error_of(path: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_records(path, **kwargs)
    return info.value


GOOD_CHAT = {"messages": [user("Capital of France?"), assistant("Paris.")]}
GOOD_ALPACA = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
GOOD_SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
GOOD_PREFERENCE_TEXT = {"prompt": "Five as a digit?", "chosen": "5", "rejected": "five"}
GOOD_PREFERENCE_CHAT = {"prompt": [user("Grass color?")], "chosen": [assistant("Green.")], "rejected": [assistant("Purple.")]}
GOOD_IFEVAL = {"key": 1, "prompt": "Write a poem without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}

# id: (valid record, bad record, field path, pieces of what was expected and found)
CASES = {
    "alpaca missing output": (
        GOOD_ALPACA,
        {"instruction": "Add 2 and 3.", "input": ""},
        "output",
        ["expected a value (the field is missing)", "found only ['input', 'instruction']"],
    ),
    "alpaca number output": (
        GOOD_ALPACA,
        {"instruction": "Add 2 and 3.", "input": "", "output": 5},
        "output",
        ["expected a string", "found number 5"],
    ),
    "message missing content": (
        GOOD_CHAT,
        {"messages": [user("Hi"), {"role": "assistant"}]},
        "messages[1].content",
        ["expected a value (the field is missing)", "found only ['role']"],
    ),
    "message missing role": (
        GOOD_CHAT,
        {"messages": [{"content": "Hi"}, assistant("Hello.")]},
        "messages[0].role",
        ["expected a value (the field is missing)", "found only ['content']"],
    ),
    "content is a number": (
        GOOD_CHAT,
        {"messages": [{"role": "user", "content": 42}, assistant("Hello.")]},
        "messages[0].content",
        ["expected a string", "found number 42"],
    ),
    "content is an object": (
        GOOD_CHAT,
        {"messages": [user("Hi"), {"role": "assistant", "content": {"text": "Hello."}}]},
        "messages[1].content",
        ["expected a string", "found object with keys ['text']"],
    ),
    "unknown role": (
        GOOD_CHAT,
        {"messages": [user("Hi"), {"role": "bot", "content": "Hello."}]},
        "messages[1].role",
        ["expected one of system, user, assistant, tool", 'found string "bot"'],
    ),
    "empty assistant content": (
        GOOD_CHAT,
        {"messages": [user("Hi"), assistant("")]},
        "messages[1].content",
        ["expected non-empty", "found empty string"],
    ),
    "messages not a list": (
        GOOD_CHAT,
        {"messages": "Hi there"},
        "messages",
        ["expected a non-empty list of messages", 'found string "Hi there"'],
    ),
    "no assistant turn": (
        GOOD_CHAT,
        {"messages": [system("Be brief."), user("Hi")]},
        "messages",
        ["expected at least one assistant turn", "found roles ['system', 'user']"],
    ),
    "user after user": (
        GOOD_CHAT,
        {"messages": [user("Hi"), user("Hello?"), assistant("Hello.")]},
        "messages[1].role",
        ["expected assistant after a user turn (roles out of order)", 'found string "user"'],
    ),
    "assistant first": (
        GOOD_CHAT,
        {"messages": [assistant("Hello."), user("Hi"), assistant("Yes?")]},
        "messages[0].role",
        ["expected system or user at the start (roles out of order)", 'found string "assistant"'],
    ),
    "system not first": (
        GOOD_CHAT,
        {"messages": [user("Hi"), assistant("Hello."), system("Be brief."), user("Bye"), assistant("Bye.")]},
        "messages[2].role",
        ["expected tool or user after a", "(roles out of order)", 'found string "system"'],
    ),
    "tool turn after assistant without tool_calls": (
        GOOD_CHAT,
        {"messages": [user("Weather?"), assistant("Let me look."), {"role": "tool", "content": "21 °C"}, assistant("21 °C.")]},
        "messages[2].role",
        ["expected a tool result only after an assistant turn with tool_calls", "found a tool turn after an assistant turn without tool_calls"],
    ),
    "user right after a tool result": (
        GOOD_CHAT,
        {
            "messages": [
                user("Weather?"),
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
                {"role": "tool", "content": "21 °C"},
                user("Well?"),
                assistant("21 °C."),
            ]
        },
        "messages[3].role",
        ["expected assistant or tool after a tool turn (roles out of order)", 'found string "user"'],
    ),
    "assistant right after system": (
        GOOD_CHAT,
        {"messages": [system("Be brief."), assistant("Hello."), user("Hi"), assistant("Yes?")]},
        "messages[1].role",
        ["expected user after a system turn (roles out of order)", 'found string "assistant"'],
    ),
    "tool call arguments not JSON": (
        GOOD_CHAT,
        {
            "messages": [
                user("Weather?"),
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{city: Lisbon"}}]},
                {"role": "tool", "content": "21 °C"},
                assistant("21 °C."),
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
        ["expected a JSON object (or a string holding one)", 'found string "{city: Lisbon"'],
    ),
    "tool call without a name": (
        GOOD_CHAT,
        {"messages": [user("Weather?"), {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}]},
        "messages[1].tool_calls[0].function.name",
        ["expected the tool's name as a string", "found null"],
    ),
    "sharegpt unknown speaker": (
        GOOD_SHAREGPT,
        {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        "conversations[0].from",
        ["expected one of human, user, gpt", 'found string "robot"'],
    ),
    "sharegpt order, with a top-level system": (
        GOOD_SHAREGPT,
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello."}]},
        "conversations[1].from",
        ["(roles out of order)"],
    ),
    "sharegpt number value": (
        GOOD_SHAREGPT,
        {"conversations": [{"from": "human", "value": 7}, {"from": "gpt", "value": "Seven."}]},
        "conversations[0].value",
        ["expected a string", "found number 7"],
    ),
    "preference identical text": (
        GOOD_PREFERENCE_TEXT,
        {"prompt": "Ten as a digit?", "chosen": "10", "rejected": "10"},
        "chosen",
        ["expected a response different from 'rejected'", "found identical chosen and rejected responses"],
    ),
    "preference identical messages": (
        GOOD_PREFERENCE_CHAT,
        {"prompt": [user("Sky color?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Blue.")]},
        "chosen",
        ["expected a response different from 'rejected'", "found identical chosen and rejected responses"],
    ),
    "openai preference identical": (
        {"input": {"messages": [user("Q")]}, "preferred_output": [assistant("good")], "non_preferred_output": [assistant("bad")]},
        {"input": {"messages": [user("Q")]}, "preferred_output": [assistant("same")], "non_preferred_output": [assistant("same")]},
        "preferred_output",
        ["expected a response different from 'non_preferred_output'", "found identical chosen and rejected responses"],
    ),
    "preference empty chosen text": (
        GOOD_PREFERENCE_TEXT,
        {"prompt": "Ten as a digit?", "chosen": "", "rejected": "ten"},
        "chosen",
        ["expected non-empty text", "found empty string"],
    ),
    "preference rejected out of order": (
        GOOD_PREFERENCE_CHAT,
        {"prompt": [user("Sky color?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Red."), assistant("Really red.")]},
        "rejected[1].role",
        ["expected tool or user after a", "(roles out of order)", 'found string "assistant"'],
    ),
    "ifeval kwargs length mismatch": (
        GOOD_IFEVAL,
        {"key": 2, "prompt": "Write in lowercase without commas.", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"], "kwargs": [{}]},
        "kwargs",
        ["expected 2 objects, one per instruction id", "found 1"],
    ),
    "ifeval bad instruction id": (
        GOOD_IFEVAL,
        {"key": 2, "prompt": "Write.", "instruction_id_list": ["no_comma"], "kwargs": [{}]},
        "instruction_id_list",
        ["expected a list of instruction ids such as 'punctuation:no_comma'", "found list of 1 items"],
    ),
    "prompt_completion empty completion": (
        {"prompt": "2 + 2 =", "completion": "4"},
        {"prompt": "3 + 3 =", "completion": ""},
        "completion",
        ["expected non-empty text", "found empty string"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_record_is_named_with_line_field_expected_and_found(tmp_path, case):
    good, bad, field, pieces = CASES[case]
    path = write_lines(tmp_path / "data.jsonl", [good, bad])
    err = error_of(path)
    message = str(err)
    assert message.startswith(f"{path}: 1 problem found:\n")
    line = next(line for line in message.splitlines() if line.startswith(f"  {path}:"))
    assert line.startswith(f"  {path}:2: field '{field}': expected ")
    for piece in pieces:
        assert piece in line
    assert err.total == 1 and err.problems[0].location.line == 2 and err.problems[0].field == field


def test_invalid_json_line(tmp_path):
    bad = '{"messages": [{"role": "user", "content": "Hi"},]}'
    assert bad.index(",]") + 2 == 49  # the column of the stray "]"
    path = write_lines(tmp_path / "data.jsonl", [GOOD_CHAT, bad])
    message = str(error_of(path))
    assert f"  {path}:2: expected one JSON object per line, found invalid JSON (Expecting value at column 49)" in message
    assert "field '" not in message  # nothing was parsed, so no field is claimed


def test_non_object_record(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD_CHAT, ["Hi", "Hello."]])
    assert f"  {path}:2: expected a JSON object (one record), found list of 2 items" in str(error_of(path))


def test_latin1_byte_in_jsonl(tmp_path):
    bad_line = json.dumps({"instruction": "Describe a café.", "output": "Small."}, ensure_ascii=False).encode("latin-1")
    path = write_lines(tmp_path / "data.jsonl", [GOOD_ALPACA, bad_line])
    column = bad_line.index(b"\xe9") + 1
    assert column == 32
    message = str(error_of(path))
    assert f"  {path}:2: expected UTF-8 text, found byte 0xe9 at column 32, which is not valid UTF-8 (re-save the file as UTF-8)" in message
    assert "field '" not in message


def test_latin1_byte_in_json_array(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps([GOOD_ALPACA, {"instruction": "Describe a café.", "output": "Small."}], indent=2, ensure_ascii=False).encode("latin-1"))
    lines = path.read_bytes().split(b"\n")
    assert lines[7] == '    "instruction": "Describe a café.",'.encode("latin-1") and lines[7].index(b"\xe9") + 1 == 35
    message = str(error_of(path))
    assert f"  {path}:8: expected UTF-8 text, found byte 0xe9 at column 35, which is not valid UTF-8" in message


def test_unknown_first_record_asks_for_format(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [{"question": "Q", "answer": "A"}])
    message = str(error_of(path))
    assert f"  {path}:1: expected the keys of a known format" in message
    assert "pass --format to force one, found keys ['answer', 'question']" in message


def _parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def test_parquet_bad_row(tmp_path):
    bad = {"messages": [user("Hi"), {"role": "bot", "content": "Hello."}]}
    path = _parquet(tmp_path / "data.parquet", [GOOD_CHAT, GOOD_CHAT, bad])
    message = str(error_of(path))
    assert f"  {path} row 2: field 'messages[1].role': expected one of system, user, assistant, tool, found string \"bot\"" in message


def test_dataset_directories_bad_row(tmp_path):
    import datasets

    bad = {"messages": [user("Hi"), assistant("")]}
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD_CHAT, bad]).save_to_disk(str(saved))
    assert f"  {saved} row 1: field 'messages[1].content': expected non-empty" in str(error_of(saved))

    folder = tmp_path / "folder"
    folder.mkdir()
    write_lines(folder / "train.jsonl", [GOOD_CHAT, bad])
    assert f"  {folder}[train] row 1: field 'messages[1].content': expected non-empty" in str(error_of(folder))


def test_every_problem_of_a_record_is_listed(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD_ALPACA, {"instruction": 3, "input": ["x"], "output": ""}])
    err = error_of(path)
    assert [(p.field, p.found) for p in err.problems] == [
        ("instruction", "number 3"),
        ("output", "empty string"),
        ("input", "list of 1 items"),
    ]
    assert str(err).startswith(f"{path}: 3 problems found:\n")


def test_stop_mode_lists_twenty_problems_and_the_total(tmp_path):
    bad = [{"messages": [user(f"Question {i}"), {"role": "bot", "content": "Answer."}]} for i in range(25)]
    path = write_lines(tmp_path / "data.jsonl", bad)
    err = error_of(path)
    message = str(err)
    assert err.total == 25 and len(err.problems) == 25
    assert message.startswith(f"{path}: 25 problems found, first 20 listed:\n")
    listed = [line for line in message.splitlines() if line.startswith(f"  {path}:")]
    assert [line.split(":")[1] for line in listed] == [str(n) for n in range(1, 21)]
    assert "\n  ... and 5 more\n" in message
    assert message.endswith("(fix them, or pass --on-error skip to skip bad records and write them to a rejects file)")


VALID = [
    GOOD_CHAT,
    {"messages": [system("Be brief."), user("2 + 2?"), assistant("4")]},
    {"messages": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye.")]},
    {
        "messages": [
            user("Weather?"),
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lisbon"}}}]},
            {"role": "tool", "content": "21 °C"},
            assistant("21 °C."),
        ]
    },
    {"messages": [user("Say yes."), assistant("Yes.")]},
    {"messages": [user("Say no."), assistant("No.")]},
    {"messages": [user("Count to 2."), assistant("1 2")]},
]
INVALID = [
    {"messages": [user("Hi"), {"role": "bot", "content": "Hello."}]},  # unknown role
    {"messages": [user("Hi"), {"role": "assistant"}]},  # missing content
    {"messages": [assistant("Hello."), user("Hi"), assistant("Yes?")]},  # out of order
    {"messages": [user("Hi"), assistant("   ")]},  # empty assistant
    ["not", "a", "record"],  # not an object
]


def test_skip_mode_accounts_for_every_record(tmp_path):
    order = [VALID[0], INVALID[0], VALID[1], VALID[2], INVALID[1], INVALID[2], VALID[3], VALID[4], INVALID[3], VALID[5], INVALID[4], VALID[6]]
    path = write_lines(tmp_path / "mixed.jsonl", order)
    report = ReadReport(str(path))
    records = read_records(path, on_error="skip", report=report)

    assert records == VALID  # canonical records of the valid ones, in order (these are already canonical)
    assert (report.read, report.kept, len(report.rejected)) == (12, 7, 5)
    assert report.read == report.kept + len(report.rejected)
    assert [str(item.location) for item, _ in report.rejected] == [f"{path}:{n}" for n in (2, 5, 6, 9, 11)]
    assert [p.field for p in report.problems] == ["messages[1].role", "messages[1].content", "messages[0].role", "messages[1].content", None]

    rejects = tmp_path / "out" / "rejects.jsonl"
    assert write_rejects(rejects, report) == 5
    lines = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 5
    assert [entry["record"] for entry in lines] == INVALID
    assert [entry["location"] for entry in lines] == [f"{path}:{n}" for n in (2, 5, 6, 9, 11)]
    first = lines[0]["problems"]
    assert first == [
        {
            "source": str(path),
            "line": 2,
            "row": None,
            "field": "messages[1].role",
            "expected": "one of system, user, assistant, tool",
            "found": 'string "bot"',
            "message": f"{path}:2: field 'messages[1].role': expected one of system, user, assistant, tool, found string \"bot\"",
        }
    ]
    assert lines[4]["problems"][0]["expected"] == "a JSON object (one record)"


def test_skip_mode_rejects_unreadable_lines_with_their_place(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD_CHAT, b'{"messages": "caf\xe9"}', "{not json", GOOD_CHAT])
    report = ReadReport(str(path))
    assert read_records(path, on_error="skip", report=report) == [GOOD_CHAT, GOOD_CHAT]
    assert (report.read, report.kept, len(report.rejected)) == (4, 2, 2)
    rejects = tmp_path / "rejects.jsonl"
    assert write_rejects(rejects, report) == 2
    lines = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [(e["location"], e["record"], e["problems"][0]["expected"]) for e in lines] == [
        (f"{path}:2", None, "UTF-8 text"),
        (f"{path}:3", None, "one JSON object per line"),
    ]


@pytest.mark.parametrize(
    "good, bad",
    [
        ({"prompt": "2 + 2 =", "completion": "4"}, {"prompt": "3 + 3 =", "completion": "6", "tools": "{not json"}),
        (GOOD_PREFERENCE_TEXT, {"prompt": "Ten?", "chosen": "10", "rejected": "ten", "tools": 5}),
    ],
    ids=["prompt_completion", "preference"],
)
def test_bad_tools_are_reported(tmp_path, good, bad):
    path = write_lines(tmp_path / "data.jsonl", [good, bad])
    assert f"  {path}:2: field 'tools': expected a list of tool schemas" in str(error_of(path))


def test_bad_tools_are_reported_for_messages(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD_CHAT, {**GOOD_CHAT, "tools": "{not json"}])
    assert f"  {path}:2: field 'tools': expected a list of tool schemas (or a JSON string of one), found string \"{{not json\"" in str(error_of(path))


# ---------------------------------------------------------------------------------------------------
# The command line


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result, " ".join(result.output.split())  # rich may wrap long lines; compare with whitespace folded


BAD_FILE = [GOOD_CHAT, {"messages": [user("Hi"), {"role": "bot", "content": "Hello."}]}, VALID[1], {"messages": [user("Hi"), assistant("")]}, VALID[2]]


def test_cli_validate_reports_problems_and_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "BAD.jsonl", BAD_FILE)
    result, output = invoke("data", "validate", "BAD.jsonl")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert "error: BAD.jsonl: 2 problems found:" in output
    assert "BAD.jsonl:2: field 'messages[1].role': expected one of system, user, assistant, tool, found string \"bot\"" in output
    assert "BAD.jsonl:4: field 'messages[1].content': expected non-empty" in output
    assert "found empty string" in output


def test_cli_validate_good_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "good.jsonl", VALID)
    result, output = invoke("data", "validate", "good.jsonl")
    assert result.exit_code == 0, output
    assert "good.jsonl: 7 records read, format messages, 7 valid, 0 rejected" in output


def test_cli_validate_skip_writes_rejects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "BAD.jsonl", BAD_FILE)
    result, output = invoke("data", "validate", "BAD.jsonl", "--on-error", "skip", "--rejects", "R.jsonl")
    assert result.exit_code == 0, output
    assert "skipped 2 bad record(s) of 5; they and their reasons are in R.jsonl" in output
    assert "BAD.jsonl: 5 records read, format messages, 3 valid, 2 rejected" in output
    lines = (tmp_path / "R.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["location"] for line in lines] == ["BAD.jsonl:2", "BAD.jsonl:4"]


def test_cli_validate_skip_default_rejects_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    write_lines(tmp_path / "in" / "BAD.jsonl", BAD_FILE)
    result, output = invoke("data", "validate", "in/BAD.jsonl", "--on-error", "skip")
    assert result.exit_code == 0, output
    assert len((tmp_path / "BAD.jsonl.rejects.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_cli_validate_forced_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "good.jsonl", VALID)
    result, output = invoke("data", "validate", "good.jsonl", "--format", "alpaca")
    assert result.exit_code == 1
    assert "14 problems found" in output and "good.jsonl:1: field 'instruction': expected a value (the field is missing)" in output


def test_cli_convert_writes_the_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sharegpt = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]},
    ]
    write_lines(tmp_path / "in.jsonl", sharegpt)
    result, output = invoke("data", "convert", "in.jsonl", "--to", "messages", "-o", "out/messages.jsonl")
    assert result.exit_code == 0, output
    assert "wrote 2 messages records to out/messages.jsonl (read 2 sharegpt records, rejected 0)" in output
    written = [json.loads(line) for line in (tmp_path / "out" / "messages.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written == [
        {"messages": [system("Be brief."), user("Hi"), assistant("Hello.")]},
        {"messages": [user("2 + 2?"), assistant("4")]},
    ]

    result, output = invoke("data", "convert", "out/messages.jsonl", "--to", "alpaca", "-o", "alpaca.jsonl")
    assert result.exit_code == 0, output
    written = [json.loads(line) for line in (tmp_path / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    assert written == [
        {"instruction": "Hi", "input": "", "output": "Hello.", "system": "Be brief."},
        {"instruction": "2 + 2?", "input": "", "output": "4"},
    ]


def test_cli_convert_impossible_target_fails_without_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "chat.jsonl", [VALID[2]])
    result, output = invoke("data", "convert", "chat.jsonl", "--to", "alpaca", "-o", "out.jsonl")
    assert result.exit_code == 1
    assert "error: only a single user→assistant exchange converts to alpaca" in output
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_convert_skip_writes_good_records_and_rejects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "BAD.jsonl", BAD_FILE)
    result, output = invoke("data", "convert", "BAD.jsonl", "--to", "sharegpt", "-o", "out.jsonl", "--on-error", "skip", "--rejects", "R.jsonl")
    assert result.exit_code == 0, output
    assert "wrote 3 sharegpt records to out.jsonl (read 5 messages records, rejected 2)" in output
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 3
    assert len((tmp_path / "R.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_cli_error_text_with_brackets_is_printed_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "BAD.jsonl", [GOOD_CHAT, {"messages": [user("Hi"), {"role": "[/INST]", "content": "Hello."}]}])
    result, output = invoke("data", "validate", "BAD.jsonl")
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "BAD.jsonl:2: field 'messages[1].role': expected one of system, user, assistant, tool, found string \"[/INST]\"" in output


def test_cli_file_name_with_brackets_is_printed_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "data[train].jsonl", [GOOD_CHAT, {"messages": [user("Hi"), {"role": "bot", "content": "Hello."}]}])
    result, output = invoke("data", "validate", "data[train].jsonl")
    assert result.exit_code == 1
    assert "data[train].jsonl:2: field 'messages[1].role'" in output
