"""Readers and conversion: every input format to its canonical record, every source kind, and back out.

Real files in ``tmp_path`` throughout; expected records are written out in full so a change to any
field of the canonical shape fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_fixtures import assistant, system, user
from posttrain.data.convert import ConvertError, convert_records, to_format
from posttrain.data.formats import DataError, ReadReport, detect_format, read_records
from posttrain.records import kind_of

EXAMPLES = Path(__file__).parents[1] / "examples" / "data"


def shared_file(name: str) -> Path:
    """A file of the shared data folder beside the checkout (or /work/shared/data); skip when absent."""
    for folder in (Path(__file__).parents[2] / "shared" / "data", Path("/work/shared/data")):
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"shared data file {name} is not available")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read(tmp_path: Path, raw: list, name: str = "data.jsonl", **kwargs) -> tuple[list[dict], ReadReport]:
    report = ReadReport(name)
    records = read_records(write_jsonl(tmp_path / name, raw), report=report, **kwargs)
    return records, report


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lisbon"}}}


# ---------------------------------------------------------------------------------------------------
# Each format -> canonical record

CASES = {
    "alpaca": (
        [
            {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."},
            {"instruction": "Summarize in five words.", "input": "The vote was postponed to Tuesday.", "output": "Vote moved to Tuesday."},
            {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "You are a translator."},
            {"instruction": "Say hi.", "output": "Hi."},
        ],
        [
            {"messages": [user("Name three primary colors."), assistant("Red, blue and yellow.")]},
            {"messages": [user("Summarize in five words.\n\nThe vote was postponed to Tuesday."), assistant("Vote moved to Tuesday.")]},
            {"messages": [system("You are a translator."), user("Translate to French.\n\ncat"), assistant("chat")]},
            {"messages": [user("Say hi."), assistant("Hi.")]},
        ],
    ),
    "sharegpt": (
        [
            {
                "conversations": [
                    {"from": "system", "value": "You are a friendly tutor."},
                    {"from": "human", "value": "What is 7 times 8?"},
                    {"from": "gpt", "value": "56."},
                    {"from": "human", "value": "And 56 divided by 4?"},
                    {"from": "gpt", "value": "14."},
                ]
            },
            {  # LLaMA-Factory tool use: function_call's value is a JSON string, tools a JSON string, system top-level
                "conversations": [
                    {"from": "human", "value": "Weather in Lisbon?"},
                    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Lisbon"}}'},
                    {"from": "observation", "value": '{"temperature": 21}'},
                    {"from": "gpt", "value": "It is 21 °C."},
                ],
                "system": "You can call tools.",
                "tools": json.dumps([WEATHER_TOOL]),
            },
            {  # user/assistant spellings, a "function" result, arguments themselves a JSON string
                "conversations": [
                    {"from": "user", "value": "Add 1 and 2."},
                    {"from": "function_call", "value": json.dumps({"name": "add", "arguments": json.dumps({"a": 1, "b": 2})})},
                    {"from": "function", "value": "3"},
                    {"from": "assistant", "value": "1 + 2 = 3."},
                ]
            },
            {
                "conversations": [
                    {"from": "human", "value": "Ping the server."},
                    {"from": "function_call", "value": '{"name": "ping", "arguments": {}}'},
                    {"from": "tool", "value": "pong"},
                    {"from": "gpt", "value": "It answered."},
                ]
            },
        ],
        [
            {
                "messages": [
                    system("You are a friendly tutor."),
                    user("What is 7 times 8?"),
                    assistant("56."),
                    user("And 56 divided by 4?"),
                    assistant("14."),
                ]
            },
            {
                "messages": [
                    system("You can call tools."),
                    user("Weather in Lisbon?"),
                    {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
                    {"role": "tool", "content": '{"temperature": 21}'},
                    assistant("It is 21 °C."),
                ],
                "tools": [WEATHER_TOOL],
            },
            {
                "messages": [
                    user("Add 1 and 2."),
                    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
                    {"role": "tool", "content": "3"},
                    assistant("1 + 2 = 3."),
                ]
            },
            {
                "messages": [
                    user("Ping the server."),
                    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "ping", "arguments": {}}}]},
                    {"role": "tool", "content": "pong"},
                    assistant("It answered."),
                ]
            },
        ],
    ),
    "messages": (
        [
            {
                "messages": [
                    system("Be brief."),
                    user("Weather in Lisbon?"),
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'}}],
                    },
                    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "21 °C, clear"},
                    assistant("It is 21 °C and clear."),
                ],
                "tools": [WEATHER_TOOL],
            },
            {  # list-of-text-parts content, and a tool call without the OpenAI "function" wrapper
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there."}]},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [{"name": "lookup", "arguments": {"q": "hello"}}]},
                    {"role": "tool", "content": "found"},
                    assistant("Hi!"),
                ]
            },
        ],
        [
            {
                "messages": [
                    system("Be brief."),
                    user("Weather in Lisbon?"),
                    {"role": "assistant", "content": "", "tool_calls": [{**WEATHER_CALL, "id": "call_1"}]},
                    {"role": "tool", "content": "21 °C, clear", "tool_call_id": "call_1", "name": "get_weather"},
                    assistant("It is 21 °C and clear."),
                ],
                "tools": [WEATHER_TOOL],
            },
            {
                "messages": [
                    user("Hello there."),
                    {"role": "assistant", "content": "Checking.", "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {"q": "hello"}}}]},
                    {"role": "tool", "content": "found"},
                    assistant("Hi!"),
                ]
            },
        ],
    ),
    "prompt_completion": (
        [
            {"prompt": "2 + 2 =", "completion": " 4"},
            {"prompt": [system("Answer with a number."), user("2 + 3?")], "completion": [assistant("5")]},
            {"prompt": "Write a haiku about rain.", "response": "Rain taps the window"},  # IFEval response files
            {"prompt": [user("Capital of Peru?")], "completion": "Lima."},  # text completion after a message prompt
            {"prompt": [user("And of Chile?")], "completion": {"role": "assistant", "content": "Santiago."}},  # one message
        ],
        [
            {"prompt": "2 + 2 =", "completion": " 4"},
            {"prompt": [system("Answer with a number."), user("2 + 3?")], "completion": [assistant("5")]},
            {"prompt": "Write a haiku about rain.", "completion": "Rain taps the window"},
            {"prompt": [user("Capital of Peru?")], "completion": [assistant("Lima.")]},
            {"prompt": [user("And of Chile?")], "completion": [assistant("Santiago.")]},
        ],
    ),
    "preference": (
        [
            {"prompt": "Write the number five as a digit.", "chosen": "5", "rejected": "five"},
            {"prompt": [user("What color is grass?")], "chosen": [assistant("Green.")], "rejected": [assistant("Purple.")]},
            {"prompt": [user("Sky color?")], "chosen": "Blue.", "rejected": "Red."},
            {  # implicit prompt: whole conversations sharing a prefix
                "chosen": [system("Be terse."), user("Hi"), assistant("Hello."), user("Name a fruit."), assistant("Apple.")],
                "rejected": [system("Be terse."), user("Hi"), assistant("Hello."), user("Name a fruit."), assistant("A carrot is a fruit.")],
            },
            {  # OpenAI preference fine-tuning format
                "input": {"messages": [user("Weather in Lisbon?")], "tools": [WEATHER_TOOL]},
                "preferred_output": [assistant("Let me check the forecast.")],
                "non_preferred_output": [assistant("It is always sunny.")],
            },
        ],
        [
            {"prompt": "Write the number five as a digit.", "chosen": "5", "rejected": "five"},
            {"prompt": [user("What color is grass?")], "chosen": [assistant("Green.")], "rejected": [assistant("Purple.")]},
            {"prompt": [user("Sky color?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Red.")]},
            {
                "prompt": [system("Be terse."), user("Hi"), assistant("Hello."), user("Name a fruit.")],
                "chosen": [assistant("Apple.")],
                "rejected": [assistant("A carrot is a fruit.")],
            },
            {
                "prompt": [user("Weather in Lisbon?")],
                "chosen": [assistant("Let me check the forecast.")],
                "rejected": [assistant("It is always sunny.")],
                "tools": [WEATHER_TOOL],
            },
        ],
    ),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_format_converts_to_canonical_records(tmp_path, fmt):
    raw, expected = CASES[fmt]
    records, report = read(tmp_path, raw)
    assert report.format == fmt
    assert records == expected
    assert (report.read, report.kept, report.rejected) == (len(raw), len(raw), [])


def test_examples_read_as_documented():
    alpaca = read_records(EXAMPLES / "alpaca.json")
    assert len(alpaca) == 3
    assert alpaca[0] == {"messages": [user("Name three primary colors."), assistant("Red, blue and yellow.")]}
    assert alpaca[2] == {"messages": [user("Convert the temperature to Fahrenheit.\n\n25 °C"), assistant("77 °F.")]}

    chat = read_records(EXAMPLES / "chat.jsonl")
    assert len(chat) == 6
    assert chat[1] == {
        "messages": [
            user("What's the weather in Lisbon right now?"),
            {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
            {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}'},
            assistant("It is 21 °C and clear in Lisbon."),
        ],
        "tools": [WEATHER_TOOL],
    }

    assert read_records(EXAMPLES / "sharegpt.jsonl") == [
        {
            "messages": [
                system("You are a friendly tutor."),
                user("What is 7 times 8?"),
                assistant("7 × 8 = 56."),
                user("And 56 divided by 4?"),
                assistant("56 ÷ 4 = 14."),
            ]
        }
    ]
    assert read_records(EXAMPLES / "preference.jsonl")[1] == {"prompt": "Write the number five as a digit.", "chosen": "5", "rejected": "five"}


def test_ifeval_first_lines(tmp_path):
    lines = shared_file("ifeval_input_data.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    path = tmp_path / "ifeval3.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = ReadReport(str(path))
    records = read_records(path, report=report)
    assert report.format == "ifeval"
    assert records == [json.loads(line) for line in lines]
    assert [r["key"] for r in records] == [1000, 1001, 1005]
    assert records[0]["instruction_id_list"] == ["punctuation:no_comma", "detectable_format:number_highlighted_sections", "length_constraints:number_words"]
    assert records[0]["kwargs"] == [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 300}]
    assert records[1] == {
        "key": 1001,
        "prompt": "I am planning a trip to Japan, and I would like thee to write an itinerary for my journey in a Shakespearean style. "
        "You are not allowed to use any commas in your response.",
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
    }
    assert {kind_of(r) for r in records} == {"verifiable"}


def test_ifeval_whole_file():
    path = shared_file("ifeval_input_data.jsonl")
    report = ReadReport(str(path))
    records = read_records(path, report=report)
    assert (len(records), report.read, report.kept, len(report.rejected), report.format) == (541, 541, 541, 0, "ifeval")
    assert len({r["key"] for r in records}) == 541
    assert all(len(r["kwargs"]) == len(r["instruction_id_list"]) > 0 for r in records)


def test_orca_dpo_pairs_all_read_as_preference():
    path = shared_file("orca_dpo_pairs_validation.jsonl")
    report = ReadReport(str(path))
    records = read_records(path, on_error="skip", report=report)
    assert (len(records), report.read, report.kept, len(report.rejected), report.format) == (284, 284, 284, 0, "preference")
    assert {kind_of(r) for r in records} == {"preference"}
    for r in records:
        assert r["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in r["chosen"]] == ["assistant"] == [m["role"] for m in r["rejected"]]
        assert r["chosen"] != r["rejected"]
    first = json.loads(path.open(encoding="utf-8").readline())
    assert records[0] == {"prompt": first["input"]["messages"], "chosen": first["preferred_output"], "rejected": first["non_preferred_output"]}


# ---------------------------------------------------------------------------------------------------
# Detection and forcing


@pytest.mark.parametrize(
    "name, fmt",
    [("alpaca.json", "alpaca"), ("chat.jsonl", "messages"), ("preference.jsonl", "preference"), ("sharegpt.jsonl", "sharegpt")],
)
def test_detects_example_files(name, fmt):
    report = ReadReport(name)
    read_records(EXAMPLES / name, report=report)
    assert report.format == fmt


@pytest.mark.parametrize(
    "raw, fmt",
    [
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"prompt": "a", "response": "b"}, "prompt_completion"),
        ({"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "ifeval"),
        ({"input": {"messages": [user("q")]}, "preferred_output": [assistant("a")], "non_preferred_output": [assistant("b")]}, "preference"),
        ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}, "preference"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"instruction": "q", "output": "a"}, "alpaca"),
        ({"messages": [user("q"), assistant("a")]}, "messages"),
    ],
)
def test_detects_written_files(tmp_path, raw, fmt):
    assert detect_format(raw) == fmt
    records, report = read(tmp_path, [raw])
    assert report.format == fmt
    assert len(records) == 1


def test_detect_format_returns_none_for_unknown_shapes():
    assert detect_format({"question": "q", "answer": "a"}) is None
    assert detect_format(["not", "a", "record"]) is None
    assert detect_format({"prompt": "only a prompt"}) is None


def test_format_argument_forces_a_format(tmp_path):
    raw = [{"instruction": "Say A.", "output": "A", "prompt": "Say B.", "completion": "B"}]
    records, report = read(tmp_path, raw)
    assert report.format == "prompt_completion"
    assert records == [{"prompt": "Say B.", "completion": "B"}]

    records, report = read(tmp_path, raw, format="alpaca")
    assert report.format == "alpaca"
    assert records == [{"messages": [user("Say A."), assistant("A")]}]


def test_forcing_the_wrong_format_names_the_missing_fields():
    with pytest.raises(DataError) as info:
        read_records(EXAMPLES / "chat.jsonl", format="alpaca")
    message = str(info.value)
    assert "12 problems found" in message  # 6 records, each without instruction and output
    assert f"{EXAMPLES / 'chat.jsonl'}:1: field 'instruction': expected a value (the field is missing)" in message
    assert f"{EXAMPLES / 'chat.jsonl'}:6: field 'output': expected a value (the field is missing)" in message


def test_unknown_format_and_on_error_values_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        read_records(path, format="csv")
    with pytest.raises(ValueError, match="on_error must be 'stop' or 'skip', not 'ignore'"):
        read_records(path, on_error="ignore")


# ---------------------------------------------------------------------------------------------------
# The same records from every kind of source

SOURCE_SETS = {
    "messages": [
        {"messages": [system("Be brief."), user("Capital of France?"), assistant("Paris.")]},
        {
            "messages": [
                user("Weather in Lisbon?"),
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'}}]},
                {"role": "tool", "content": "21 °C", "name": "get_weather"},
                assistant("It is 21 °C."),
            ],
            "tools": [WEATHER_TOOL],
        },
        {"messages": [user("2 + 2?"), assistant("4")]},
    ],
    "preference": [
        {"prompt": "Five as a digit?", "chosen": "5", "rejected": "five"},
        {"prompt": "Ten as a digit?", "chosen": "10", "rejected": "ten"},
    ],
}

SOURCE_EXPECTED = {
    "messages": [
        {"messages": [system("Be brief."), user("Capital of France?"), assistant("Paris.")]},
        {
            "messages": [
                user("Weather in Lisbon?"),
                {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
                {"role": "tool", "content": "21 °C", "name": "get_weather"},
                assistant("It is 21 °C."),
            ],
            "tools": [WEATHER_TOOL],
        },
        {"messages": [user("2 + 2?"), assistant("4")]},
    ],
    "preference": SOURCE_SETS["preference"],
}


def _columns(records: list[dict]) -> dict[str, list]:
    """Column-wise data with every key of every record (pyarrow's from_pylist looks at the first row only)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def write_sources(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {}
    paths["json array"] = tmp_path / "array.json"
    paths["json array"].write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["json object"] = tmp_path / "wrapped.json"
    paths["json object"].write_text(json.dumps({"version": 1, "data": records}, indent=2, ensure_ascii=False), encoding="utf-8")
    paths["jsonl"] = write_jsonl(tmp_path / "lines.jsonl", records)
    paths["jsonl with BOM"] = tmp_path / "bom.jsonl"
    paths["jsonl with BOM"].write_bytes(b"\xef\xbb\xbf" + paths["jsonl"].read_bytes())
    paths["parquet"] = tmp_path / "table.parquet"
    pq.write_table(pa.Table.from_pydict(_columns(records)), paths["parquet"])
    paths["save_to_disk"] = tmp_path / "saved"
    datasets.Dataset.from_dict(_columns(records)).save_to_disk(str(paths["save_to_disk"]))
    paths["data folder"] = tmp_path / "folder"
    paths["data folder"].mkdir()
    write_jsonl(paths["data folder"] / "train.jsonl", records)
    return paths


@pytest.mark.parametrize("kind", sorted(SOURCE_SETS))
def test_every_source_gives_identical_records(tmp_path, kind):
    paths = write_sources(tmp_path, SOURCE_SETS[kind])
    expected = SOURCE_EXPECTED[kind]
    results = {}
    for name, path in paths.items():
        report = ReadReport(str(path))
        results[name] = read_records(path, report=report)
        assert (report.format, report.read, report.kept) == (kind, len(expected), len(expected)), name
    assert results == {name: expected for name in paths}


def test_data_folder_split_is_chosen(tmp_path):
    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"prompt": "train q", "completion": "train a"}])
    write_jsonl(folder / "test.jsonl", [{"prompt": "test q", "completion": "test a"}, {"prompt": "test q2", "completion": "test a2"}])
    assert read_records(folder) == [{"prompt": "train q", "completion": "train a"}]
    assert read_records(folder, split="test") == [{"prompt": "test q", "completion": "test a"}, {"prompt": "test q2", "completion": "test a2"}]


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        read_records(tmp_path / "nope.jsonl")
    other = tmp_path / "data.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.csv'"):
        read_records(other)


ALPACA_GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
ALPACA_BAD = {"instruction": "Add two and three.", "input": "2 and 3", "output": 5}


def test_json_array_errors_point_at_the_record_line(tmp_path):
    path = tmp_path / "pretty.json"
    text = json.dumps([ALPACA_GOOD, ALPACA_GOOD, ALPACA_BAD, ALPACA_GOOD], indent=2)
    path.write_text(text, encoding="utf-8")
    starts = [n for n, line in enumerate(text.splitlines(), start=1) if line == "  {"]
    assert starts == [2, 7, 12, 17]
    with pytest.raises(DataError) as info:
        read_records(path)
    assert f"{path}:12: field 'output': expected a string, found number 5" in str(info.value)

    report = ReadReport(str(path))
    kept = read_records(path, on_error="skip", report=report)
    assert len(kept) == 3
    assert [str(item.location) for item, _ in report.rejected] == [f"{path}:12"]


def test_wrapped_json_array_errors_point_at_the_record_line(tmp_path):
    path = tmp_path / "wrapped.json"
    text = json.dumps({"source": "test", "data": [ALPACA_GOOD, ALPACA_BAD]}, indent=2)
    path.write_text(text, encoding="utf-8")
    bad_line = text.splitlines().index('      "output": 5') + 1 - 3  # the record's "{" is three lines above
    assert text.splitlines()[bad_line - 1] == "    {"
    with pytest.raises(DataError) as info:
        read_records(path)
    assert f"{path}:{bad_line}: field 'output'" in str(info.value)


def test_json_file_holding_one_record(tmp_path):
    record = {"messages": [user("Hi"), assistant("Hello.")]}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    assert read_records(path) == [record]


# ---------------------------------------------------------------------------------------------------
# Converting back out

TOOL_CONVERSATION = {
    "messages": [
        system("You can call tools."),
        user("Weather in Lisbon?"),
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "21 °C"},
        assistant("It is 21 °C."),
    ],
    "tools": [WEATHER_TOOL],
}


def test_messages_to_sharegpt_and_back(tmp_path):
    sharegpt = to_format(TOOL_CONVERSATION, "sharegpt")
    assert sharegpt == {
        "conversations": [
            {"from": "system", "value": "You can call tools."},
            {"from": "human", "value": "Weather in Lisbon?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Lisbon"}}'},
            {"from": "observation", "value": "21 °C"},
            {"from": "gpt", "value": "It is 21 °C."},
        ],
        "tools": json.dumps([WEATHER_TOOL]),
    }
    records, report = read(tmp_path, [sharegpt])
    assert report.format == "sharegpt"
    assert records == [TOOL_CONVERSATION]


def test_messages_to_prompt_completion():
    chat = {"messages": [system("Be terse."), user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye.")]}
    assert to_format(chat, "prompt_completion") == {
        "prompt": [system("Be terse."), user("Hi"), assistant("Hello."), user("Bye")],
        "completion": [assistant("Bye.")],
    }
    assert to_format(TOOL_CONVERSATION, "prompt_completion") == {
        "prompt": TOOL_CONVERSATION["messages"][:4],
        "completion": [assistant("It is 21 °C.")],
        "tools": [WEATHER_TOOL],
    }


def test_prompt_completion_to_messages_and_back():
    text = {"prompt": "2 + 2 =", "completion": "4"}
    assert to_format(text, "messages") == {"messages": [user("2 + 2 ="), assistant("4")]}
    assert to_format(text, "prompt_completion") == text
    chat = {"prompt": [user("Hi")], "completion": [assistant("Hello.")]}
    assert to_format(chat, "messages") == {"messages": [user("Hi"), assistant("Hello.")]}
    assert to_format(to_format(chat, "messages"), "prompt_completion") == chat


def test_single_turn_to_alpaca_and_back(tmp_path):
    chat = {"messages": [system("You are a translator."), user("Translate 'cat' to French."), assistant("chat")]}
    alpaca = to_format(chat, "alpaca")
    assert alpaca == {"instruction": "Translate 'cat' to French.", "input": "", "output": "chat", "system": "You are a translator."}
    records, report = read(tmp_path, [alpaca])
    assert report.format == "alpaca"
    assert records == [chat]
    assert to_format({"prompt": "Say hi.", "completion": "Hi."}, "alpaca") == {"instruction": "Say hi.", "input": "", "output": "Hi."}


def test_convert_records_converts_each(tmp_path):
    records = read_records(EXAMPLES / "sharegpt.jsonl")
    out = list(convert_records(records, "sharegpt"))
    assert out == [json.loads((EXAMPLES / "sharegpt.jsonl").read_text(encoding="utf-8"))]


PREFERENCE = {"prompt": [user("Q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}
VERIFIABLE = {"key": 1, "prompt": "Say hi without commas.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize(
    "record, target, message",
    [
        (
            {"messages": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye.")]},
            "alpaca",
            "only a single user→assistant exchange converts to alpaca; this conversation has roles ['user', 'assistant', 'user', 'assistant']",
        ),
        (TOOL_CONVERSATION, "alpaca", "only a single user→assistant exchange converts to alpaca"),
        (PREFERENCE, "messages", "a preference record converts only to preference"),
        (PREFERENCE, "sharegpt", "a preference record converts only to preference"),
        (VERIFIABLE, "messages", "a verifiable record converts only to ifeval"),
        ({"messages": [user("Hi"), assistant("Hello.")]}, "preference", "a conversation record has no rejected response"),
        ({"messages": [user("Hi"), assistant("Hello.")]}, "ifeval", "a conversation record has no instructions to check"),
        ({"messages": [user("Hi"), assistant("Hello.")]}, "csv", "unknown target format 'csv'"),
    ],
)
def test_impossible_conversions_raise(record, target, message):
    with pytest.raises(ConvertError) as info:
        to_format(record, target)
    assert message in str(info.value)


def test_same_kind_conversions_are_identity():
    assert to_format(PREFERENCE, "preference") == PREFERENCE
    assert to_format(VERIFIABLE, "ifeval") == VERIFIABLE
    assert to_format(TOOL_CONVERSATION, "messages") == TOOL_CONVERSATION


def test_prompt_completion_output_is_always_readable(tmp_path):
    chat = {"messages": [user("Hi"), assistant("Hello."), user("Anything else?")]}
    assert read_records(write_jsonl(tmp_path / "chat.jsonl", [chat])) == [chat]  # a valid conversation
    try:
        out = to_format(chat, "prompt_completion")
    except ConvertError:
        return
    records, _ = read(tmp_path, [out], name="pc.jsonl")
    assert len(records) == 1


def test_parallel_tool_calls_round_trip_through_sharegpt(tmp_path):
    chat = {
        "messages": [
            user("Weather in Lisbon and Porto?"),
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [WEATHER_CALL, {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Porto"}}}],
            },
            {"role": "tool", "content": "21 °C"},
            {"role": "tool", "content": "18 °C"},
            assistant("Lisbon 21 °C, Porto 18 °C."),
        ]
    }
    records, _ = read(tmp_path, [to_format(chat, "sharegpt")])
    assert records == [chat]


def test_llama_factory_parallel_function_call(tmp_path):
    raw = {
        "conversations": [
            {"from": "human", "value": "Weather in Lisbon and Porto?"},
            {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Lisbon"}}, {"name": "get_weather", "arguments": {"city": "Porto"}}])},
            {"from": "observation", "value": json.dumps(["21 °C", "18 °C"])},
            {"from": "gpt", "value": "Lisbon 21 °C, Porto 18 °C."},
        ]
    }
    records, _ = read(tmp_path, [raw])
    assert [c["function"]["arguments"] for c in records[0]["messages"][1]["tool_calls"]] == [{"city": "Lisbon"}, {"city": "Porto"}]


def test_sharegpt_conversion_keeps_assistant_text_beside_tool_calls():
    chat = {
        "messages": [
            user("Weather in Lisbon?"),
            {"role": "assistant", "content": "Let me check the forecast.", "tool_calls": [WEATHER_CALL]},
            {"role": "tool", "content": "21 °C"},
            assistant("It is 21 °C."),
        ]
    }
    try:
        out = to_format(chat, "sharegpt")
    except ConvertError:
        return
    assert "Let me check the forecast." in json.dumps(out, ensure_ascii=False)
