"""Reading prompts, and the small helpers: stop strings, shards, reasoning replies, JSONL rows."""

import re

import pytest

from distill.errors import DataError
from distill.generate.api import OpenAITeacher
from distill.generate.outputs import Appender, read_rows
from distill.generate.prompts import parse_shard, read_prompts
from distill.generate.settings import cut_at_stop


def test_prompts_reader_and_helpers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}], "id": 7}\n')
    rows = read_prompts(path)
    assert [(r.index, r.id) for r in rows] == [(0, 0), (1, 7)]
    assert rows[1].text() == '[{"role": "user", "content": "b"}]'
    bad_rows = (('{"prompt": 3}', "non-empty string"), ('{"messages": [{"role": "user"}]}', "{role, content}"),
                ('{"prompt": "a", "messages": []}', "not both"), ("[1]", "found list"), ("{", "not valid JSON"))
    for line, message in bad_rows:
        path.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(DataError, match=rf"p.jsonl:2: .*{re.escape(message)}"):
            read_prompts(path)
    assert cut_at_stop("abc\nde###f", ["###", "\n"]) == "abc" and cut_at_stop("abc", ["x", ""]) == "abc"
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(Exception, match="INDEX/COUNT"):
        parse_shard("4/4")
    # A reasoning model's chat reply keeps its reasoning, in think tags, ahead of the answer.
    reply = {"message": {"role": "assistant", "content": "4", "reasoning_content": "2+2 is 4"}}
    assert OpenAITeacher._choice_text(reply, chat=True) == "<think>\n2+2 is 4\n</think>\n\n4"
    assert OpenAITeacher._choice_text({"text": "x"}, chat=False) == "x"
    # A completion may hold line breaks other than "\n" that JSON does not escape; a row stays one row.
    rows = [{"prompt": "p", "completion": "a\u2028b\x85c", "sample": 0}]
    writer = Appender(tmp_path / "out.jsonl")
    writer.write(rows)
    writer.close()
    assert read_rows(tmp_path / "out.jsonl") == rows
