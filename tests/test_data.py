"""Tests for lifealign_lite.data: loading, validating, hashing and writing preference pairs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lifealign_lite.data import (
    DataError,
    Pair,
    file_sha256,
    load_pairs,
    pairs_hash,
    validate_domain_name,
    write_pairs,
)

from conftest import require_path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"


# ---------------------------------------------------------------------------
# helpers


def plain(prompt="What is 2+2?", chosen="4", rejected="5", **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def conv(prompt=None, chosen=None, rejected=None, **extra):
    return {
        "prompt": prompt if prompt is not None else [{"role": "user", "content": "Hi, how do I reset my password?"}],
        "chosen": chosen if chosen is not None else [{"role": "assistant", "content": "Use the 'Forgot password' link."}],
        "rejected": rejected if rejected is not None else [{"role": "assistant", "content": "No idea."}],
        **extra,
    }


def write_lines(tmp_path: Path, lines, name="data.jsonl") -> Path:
    """Write JSONL; dict items are json-encoded, str items written verbatim."""
    p = tmp_path / name
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    p.write_text(text, encoding="utf-8")
    return p


def problems_of(path, **kw) -> list[str]:
    with pytest.raises(DataError) as ei:
        load_pairs(path, **kw)
    assert isinstance(ei.value, ValueError)
    assert ei.value.problems, "DataError without problems"
    for prob in ei.value.problems:
        assert "\n" not in prob, f"problem spans several lines: {prob!r}"
    return ei.value.problems


def single_problem(path, line: int, phrase: str) -> str:
    """Assert that there is exactly one problem, on `line`, containing `phrase`."""
    probs = problems_of(path)
    assert len(probs) == 1, probs
    prefix = f"{path}:{line}: "
    assert probs[0].startswith(prefix), probs
    assert phrase.lower() in probs[0].lower(), probs
    return probs[0]


# ---------------------------------------------------------------------------
# valid files


def test_valid_plain_file(tmp_path):
    p = write_lines(tmp_path, [plain(), plain("Capital of France?", "Paris", "Lyon", domain="geo")])
    pairs = load_pairs(p)
    assert len(pairs) == 2
    a, b = pairs
    assert a.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert a.chosen == [{"role": "assistant", "content": "4"}]
    assert a.rejected == [{"role": "assistant", "content": "5"}]
    assert a.domain is None
    assert a.source == f"{p}:1"
    assert b.domain == "geo"
    assert b.source == f"{p}:2"


def test_valid_conversational_file(tmp_path):
    multi = conv(
        prompt=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Where is my order?"},
        ],
        domain="support",
    )
    p = write_lines(tmp_path, [conv(), multi])
    pairs = load_pairs(p)
    assert len(pairs) == 2
    assert pairs[0].prompt == [{"role": "user", "content": "Hi, how do I reset my password?"}]
    assert pairs[1].prompt == multi["prompt"]
    assert pairs[1].chosen == multi["chosen"]
    assert pairs[1].domain == "support"


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n" + json.dumps(plain()) + "\n   \n\t\n" + json.dumps(plain(chosen="four")) + "\n\n", encoding="utf-8")
    pairs = load_pairs(p)
    assert [x.source for x in pairs] == [f"{p}:2", f"{p}:5"]


def test_crlf_bom_and_unknown_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    body = json.dumps(plain(id=7, meta={"x": 1}, domain=None)) + "\r\n" + json.dumps(conv(score=0.5)) + "\r\n"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    pairs = load_pairs(p)
    assert len(pairs) == 2
    assert pairs[0].domain is None


def test_extra_message_keys_dropped(tmp_path):
    d = conv(prompt=[{"role": "user", "content": "Hi", "name": "bob"}])
    pairs = load_pairs(write_lines(tmp_path, [d]))
    assert pairs[0].prompt == [{"role": "user", "content": "Hi"}]


def test_pair_is_frozen(tmp_path):
    pair = load_pairs(write_lines(tmp_path, [plain()]))[0]
    with pytest.raises(Exception):
        pair.domain = "x"  # type: ignore[misc]


def test_accepts_str_path(tmp_path):
    p = write_lines(tmp_path, [plain()])
    assert load_pairs(str(p))[0].source == f"{p}:1"


@pytest.mark.parametrize("folder", ["truthfulqa", "hh-helpful"])
def test_real_shared_dev_files(folder):
    path = SHARED_DATA / folder / "dev.jsonl"
    require_path(path, "shared data file")
    pairs = load_pairs(path)
    assert len(pairs) > 10
    for pair in pairs:
        assert pair.prompt[-1]["role"] == "user"
        assert all(m["role"] == "assistant" for m in pair.chosen + pair.rejected)
        assert pair.chosen != pair.rejected
    if folder == "hh-helpful":
        assert any(len(pair.prompt) > 1 for pair in pairs)


@pytest.mark.parametrize("name,n_domain", [("medical.jsonl", "medical"), ("support.jsonl", "support")])
def test_example_files_load(name, n_domain):
    path = EXAMPLES / name
    pairs = load_pairs(path)
    assert len(pairs) == 40
    assert {p.domain for p in pairs} == {n_domain}
    assert len({pairs_hash([p]) for p in pairs}) == 40  # no duplicates


def test_example_formats():
    med = [json.loads(l) for l in (EXAMPLES / "medical.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    sup = [json.loads(l) for l in (EXAMPLES / "support.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()]
    assert all(isinstance(r["prompt"], str) and isinstance(r["chosen"], str) for r in med)
    assert all(isinstance(r["prompt"], list) and isinstance(r["chosen"], list) for r in sup)
    assert any(len(r["prompt"]) == 1 for r in sup)
    assert any(len(r["prompt"]) >= 3 for r in sup)


# ---------------------------------------------------------------------------
# whole-file problems


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    probs = problems_of(p)
    assert len(probs) == 1
    assert probs[0].startswith(f"{p}: no such file")


def test_directory(tmp_path):
    probs = problems_of(tmp_path)
    assert probs[0].startswith(f"{tmp_path}: ")
    assert "directory" in probs[0]


def test_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_bytes(b"")
    probs = problems_of(p)
    assert probs == [probs[0]] and probs[0].startswith(f"{p}: no preference pairs found; ")


def test_only_blank_lines(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n   \n\t\n\n", encoding="utf-8")
    probs = problems_of(p)
    assert len(probs) == 1 and probs[0].startswith(f"{p}: no preference pairs found; ")


def test_invalid_utf8_reports_line(tmp_path):
    p = tmp_path / "u.jsonl"
    good = json.dumps(plain()).encode()
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'
    p.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n" + good + b"\n")
    msg = single_problem(p, 3, "not valid UTF-8")
    assert "0xe9" in msg and "UTF-8" in msg


# ---------------------------------------------------------------------------
# per-line problems


def test_invalid_json(tmp_path):
    p = write_lines(tmp_path, [plain(), '{"prompt": "x", "chosen": "y", "rejected": }'])
    msg = single_problem(p, 2, "invalid JSON")
    assert "Expecting value" in msg


@pytest.mark.parametrize("line,kind", [("[1, 2]", "list"), ('"just a string"', "string"), ("42", "number"), ("null", "null")])
def test_json_not_object(tmp_path, line, kind):
    p = write_lines(tmp_path, [plain(), line])
    msg = single_problem(p, 2, "not a JSON object")
    assert kind in msg


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_missing_field(tmp_path, field):
    d = plain()
    del d[field]
    p = write_lines(tmp_path, [d])
    msg = single_problem(p, 1, "missing field")
    assert f"'{field}'" in msg


def test_missing_several_fields_one_problem(tmp_path):
    p = write_lines(tmp_path, [{"prompt": "x"}])
    msg = single_problem(p, 1, "missing fields")
    assert "'chosen'" in msg and "'rejected'" in msg


@pytest.mark.parametrize("value,kind", [(3, "number"), (None, "null"), (True, "boolean"), ({"a": 1}, "object")])
@pytest.mark.parametrize("field", ["prompt", "chosen"])
def test_wrong_type(tmp_path, field, value, kind):
    d = plain()
    d[field] = value
    p = write_lines(tmp_path, [d])
    msg = single_problem(p, 1, f"'{field}' is")
    assert kind in msg and "string" in msg


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_empty_plain_string(tmp_path, field, value):
    d = plain()
    d[field] = value
    p = write_lines(tmp_path, [d])
    single_problem(p, 1, f"'{field}' is empty or whitespace-only")


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_empty_list(tmp_path, field):
    d = conv()
    d[field] = []
    p = write_lines(tmp_path, [d])
    single_problem(p, 1, f"'{field}' is an empty list")


def test_mixed_formats_plain_prompt_list_answer(tmp_path):
    d = plain(chosen=[{"role": "assistant", "content": "4"}])
    p = write_lines(tmp_path, [d])
    msg = single_problem(p, 1, "formats mixed")
    assert "'chosen'" in msg


def test_mixed_formats_list_prompt_plain_answer(tmp_path):
    d = conv(rejected="nope")
    p = write_lines(tmp_path, [d])
    msg = single_problem(p, 1, "formats mixed")
    assert "'rejected'" in msg


def test_message_not_object(tmp_path):
    p = write_lines(tmp_path, [conv(prompt=["hello"])])
    single_problem(p, 1, "'prompt'[0] is a string, not a message object")


def test_message_bad_role(tmp_path):
    p = write_lines(tmp_path, [conv(prompt=[{"role": "human", "content": "hi"}])])
    msg = single_problem(p, 1, "'prompt'[0] has role 'human'")
    assert "system" in msg and "user" in msg and "assistant" in msg


def test_message_missing_role(tmp_path):
    p = write_lines(tmp_path, [conv(prompt=[{"content": "hi"}])])
    single_problem(p, 1, "'prompt'[0] has no 'role'")


def test_message_missing_content(tmp_path):
    p = write_lines(tmp_path, [conv(chosen=[{"role": "assistant"}])])
    single_problem(p, 1, "'chosen'[0] has no 'content'")


@pytest.mark.parametrize("content,phrase", [(None, "is null"), (5, "is a number"), ("  ", "empty or whitespace-only")])
def test_message_bad_content(tmp_path, content, phrase):
    p = write_lines(tmp_path, [conv(rejected=[{"role": "assistant", "content": content}])])
    msg = single_problem(p, 1, "'rejected'[0] 'content'")
    assert phrase in msg


def test_prompt_must_end_with_user(tmp_path):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    p = write_lines(tmp_path, [conv(prompt=prompt)])
    single_problem(p, 1, "must end with a user turn")


def test_prompt_only_system_is_refused(tmp_path):
    p = write_lines(tmp_path, [conv(prompt=[{"role": "system", "content": "Be nice"}])])
    single_problem(p, 1, "must end with a user turn")


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_answers_must_be_assistant(tmp_path, field):
    d = conv()
    d[field] = [{"role": "user", "content": "something"}]
    p = write_lines(tmp_path, [d])
    single_problem(p, 1, f"'{field}'[0] has role 'user'; '{field}' must contain only assistant")


def test_multiple_assistant_messages_in_answer_ok(tmp_path):
    d = conv(chosen=[{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert len(load_pairs(write_lines(tmp_path, [d]))[0].chosen) == 2


def test_identical_plain(tmp_path):
    p = write_lines(tmp_path, [plain(chosen="Paris", rejected="  Paris\n")])
    single_problem(p, 1, "identical")


def test_identical_conversational(tmp_path):
    ans = [{"role": "assistant", "content": "Same"}]
    p = write_lines(tmp_path, [conv(chosen=ans, rejected=[{"role": "assistant", "content": " Same "}])])
    single_problem(p, 1, "identical")


@pytest.mark.parametrize("domain,phrase", [
    ("", "empty"),
    ("../x", "'domain'"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    (".hidden", "starts with '.'"),
    ("x" * 65, "65 characters"),
    ("has space", "outside [A-Za-z0-9._-]"),
    (5, "not a string"),
    (["medical"], "not a string"),
])
def test_bad_domain_field(tmp_path, domain, phrase):
    p = write_lines(tmp_path, [plain(domain=domain)])
    msg = single_problem(p, 1, "'domain'")
    assert phrase in msg


def test_all_bad_lines_reported(tmp_path):
    lines = [
        plain(),                                  # 1 ok
        "not json",                               # 2
        "",                                       # 3 blank, fine
        {"prompt": "x", "chosen": "y"},           # 4 missing rejected
        plain(chosen=None),                       # 5 wrong type
        plain(),                                  # 6 ok
        plain(chosen="same", rejected="same"),    # 7 identical
        conv(prompt=[{"role": "assistant", "content": "hi"}]),  # 8 prompt ends w/ assistant
        plain(domain="a/b"),                      # 9 bad domain
    ]
    p = write_lines(tmp_path, lines)
    probs = problems_of(p)
    lines_reported = [int(x[len(str(p)) + 1:].split(":", 1)[0]) for x in probs]
    assert lines_reported == [2, 4, 5, 7, 8, 9]


def test_several_problems_on_one_line(tmp_path):
    p = write_lines(tmp_path, [{"prompt": "", "chosen": 3, "domain": "a/b"}])
    probs = problems_of(p)
    assert all(x.startswith(f"{p}:1: ") for x in probs)
    text = "\n".join(probs)
    assert "missing field 'rejected'" in text
    assert "'prompt' is empty" in text
    assert "'chosen' is a number" in text
    assert "'domain'" in text


def test_error_message_truncated_after_20(tmp_path):
    p = write_lines(tmp_path, ["garbage"] * 25)
    with pytest.raises(DataError) as ei:
        load_pairs(p)
    err = ei.value
    assert len(err.problems) == 25
    shown = str(err).splitlines()
    assert len(shown) == 21
    assert shown[:20] == err.problems[:20]
    assert shown[-1] == "... and 5 more problems"


def test_error_message_not_truncated_at_20(tmp_path):
    err = DataError([f"f:{i}: bad; fix" for i in range(20)])
    assert str(err).splitlines() == err.problems


def test_problem_format_has_advice(tmp_path):
    p = write_lines(tmp_path, ["{bad", plain(chosen=[]), plain(chosen="x", rejected="x")])
    for prob in problems_of(p):
        head, _, rest = prob.partition(": ")
        assert head.startswith(f"{p}:")
        assert "; " in rest, f"no advice in {prob!r}"


def test_nothing_returned_if_any_line_bad(tmp_path):
    p = write_lines(tmp_path, [plain()] * 10 + ["{"])
    with pytest.raises(DataError):
        load_pairs(p)


# ---------------------------------------------------------------------------
# max_pairs


def many_pairs(tmp_path, n=50):
    return write_lines(tmp_path, [plain(prompt=f"Question {i}?", chosen=f"good {i}", rejected=f"bad {i}") for i in range(n)])


def test_max_pairs_deterministic(tmp_path):
    p = many_pairs(tmp_path)
    a = load_pairs(p, max_pairs=10, seed=3)
    b = load_pairs(p, max_pairs=10, seed=3)
    assert len(a) == 10
    assert a == b
    assert pairs_hash(a) == pairs_hash(b)


def test_max_pairs_seeds_differ(tmp_path):
    p = many_pairs(tmp_path)
    subsets = {tuple(x.source for x in load_pairs(p, max_pairs=10, seed=s)) for s in range(5)}
    assert len(subsets) > 1


def test_max_pairs_is_subset_of_file(tmp_path):
    p = many_pairs(tmp_path)
    full = load_pairs(p)
    sub = load_pairs(p, max_pairs=7, seed=1)
    assert all(x in full for x in sub)
    assert len({x.source for x in sub}) == 7


def test_max_pairs_larger_than_count_returns_all_in_order(tmp_path):
    p = many_pairs(tmp_path, n=5)
    assert load_pairs(p, max_pairs=5) == load_pairs(p)
    assert load_pairs(p, max_pairs=100, seed=9) == load_pairs(p)


@pytest.mark.parametrize("bad", [0, -1])
def test_max_pairs_must_be_positive(tmp_path, bad):
    p = many_pairs(tmp_path, n=3)
    with pytest.raises(ValueError, match="max_pairs"):
        load_pairs(p, max_pairs=bad)


def test_max_pairs_still_validates_every_line(tmp_path):
    p = write_lines(tmp_path, [plain()] * 5 + ["oops"])
    with pytest.raises(DataError):
        load_pairs(p, max_pairs=1)


# ---------------------------------------------------------------------------
# hashing, writing


def test_pairs_hash_stable_and_order_sensitive(tmp_path):
    p = many_pairs(tmp_path, n=5)
    pairs = load_pairs(p)
    h = pairs_hash(pairs)
    assert len(h) == 64 and all(c in "0123456789abcdef" for c in h)
    assert pairs_hash(load_pairs(p)) == h
    assert pairs_hash(list(reversed(pairs))) != h
    assert pairs_hash(pairs[:4]) != h


def test_pairs_hash_independent_of_source_path_and_format(tmp_path):
    a = write_lines(tmp_path, [plain()], name="a.jsonl")
    d = plain()
    b = write_lines(tmp_path, [{
        "prompt": [{"role": "user", "content": d["prompt"]}],
        "chosen": [{"role": "assistant", "content": d["chosen"]}],
        "rejected": [{"role": "assistant", "content": d["rejected"]}],
    }], name="b.jsonl")
    assert pairs_hash(load_pairs(a)) == pairs_hash(load_pairs(b))


def test_pairs_hash_known_value():
    pair = Pair(
        prompt=[{"role": "user", "content": "q"}],
        chosen=[{"role": "assistant", "content": "a"}],
        rejected=[{"role": "assistant", "content": "b"}],
        domain="d",
        source="x:1",
    )
    import hashlib
    canon = json.dumps([pair.to_json()], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert pairs_hash([pair]) == hashlib.sha256(canon.encode("utf-8")).hexdigest()
    # domain is part of the content
    other = Pair(pair.prompt, pair.chosen, pair.rejected, None, "x:1")
    assert pairs_hash([other]) != pairs_hash([pair])


def test_to_json_shape():
    pair = Pair(
        prompt=[{"role": "user", "content": "q"}],
        chosen=[{"role": "assistant", "content": "a"}],
        rejected=[{"role": "assistant", "content": "b"}],
        domain=None,
        source="x:1",
    )
    assert pair.to_json() == {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    assert Pair(pair.prompt, pair.chosen, pair.rejected, "med", "x:1").to_json()["domain"] == "med"


def test_file_sha256(tmp_path):
    import hashlib
    p = tmp_path / "f.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(p)) == hashlib.sha256(data).hexdigest()


def test_write_pairs_round_trip(tmp_path):
    src = write_lines(tmp_path, [plain(domain="medical"), conv(), plain(prompt="Ünïcödé ✓?", chosen="ja", rejected="nein")])
    pairs = load_pairs(src)
    out = tmp_path / "sub" / "replay.jsonl"
    write_pairs(out, pairs)
    back = load_pairs(out)
    assert pairs_hash(back) == pairs_hash(pairs)
    assert [x.domain for x in back] == ["medical", None, None]
    assert "Ünïcödé" in out.read_text(encoding="utf-8")
    # no temp files left behind
    assert sorted(x.name for x in out.parent.iterdir()) == ["replay.jsonl"]


def test_write_pairs_replaces_atomically(tmp_path, monkeypatch):
    pairs = load_pairs(many_pairs(tmp_path, n=3))
    out = tmp_path / "replay.jsonl"
    write_pairs(out, pairs)
    before = out.read_bytes()

    import lifealign_lite.data as data_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(data_mod.os, "replace", boom)
    with pytest.raises(OSError):
        write_pairs(out, pairs[:1])
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["data.jsonl", "replay.jsonl"]


def test_write_pairs_rejects_non_pairs(tmp_path):
    with pytest.raises(TypeError):
        write_pairs(tmp_path / "x.jsonl", [{"prompt": "a"}])
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------------------
# domain names


@pytest.mark.parametrize("name", ["medical", "customer-support", "a", "v1.2_x", "x" * 64])
def test_domain_name_ok(name):
    assert validate_domain_name(name) == name


@pytest.mark.parametrize("name,phrase", [
    ("", "empty"),
    ("../x", "invalid domain name"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("x" * 65, "65 characters"),
    ("..", "'..'"),
    (".", "starts with '.'"),
    (".git", "starts with '.'"),
    ("héllo", "outside [A-Za-z0-9._-]"),
    ("a b", "outside"),
    ("a\nb", "outside"),
    ("core", "reserved"),
    ("base", "reserved"),
    ("auto", "reserved"),
])
def test_domain_name_refused(name, phrase):
    with pytest.raises(ValueError) as ei:
        validate_domain_name(name)
    msg = str(ei.value)
    assert phrase in msg
    assert "\n" not in msg
    assert "A-Z a-z 0-9" in msg  # says what to do


# -- other sources and formats: HH-RLHF transcripts, implicit prompts, datasets folders, parquet, JSON arrays ----

HH = {"chosen": "\n\nHuman: Is tea healthy?\n\nAssistant: In moderation, yes.\n\nHuman: How much?\n\nAssistant: Two to three cups a day.",
      "rejected": "\n\nHuman: Is tea healthy?\n\nAssistant: In moderation, yes.\n\nHuman: How much?\n\nAssistant: Drink ten liters."}


def test_raw_hh_rlhf_transcripts_get_their_prompt_extracted(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(HH) + "\n", encoding="utf-8")
    (pair,) = load_pairs(path)
    assert pair.prompt == [{"role": "user", "content": "Is tea healthy?"}, {"role": "assistant", "content": "In moderation, yes."},
                           {"role": "user", "content": "How much?"}]
    assert pair.chosen == [{"role": "assistant", "content": "Two to three cups a day."}]
    assert pair.rejected == [{"role": "assistant", "content": "Drink ten liters."}]


def test_implicit_prompt_conversations_are_split_by_trl(tmp_path):
    q = {"role": "user", "content": "What color is the sky?"}
    record = {"chosen": [q, {"role": "assistant", "content": "Blue."}], "rejected": [q, {"role": "assistant", "content": "Green."}]}
    path = tmp_path / "implicit.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    (pair,) = load_pairs(path)
    assert pair.prompt == [q] and pair.chosen == [{"role": "assistant", "content": "Blue."}]


def test_plain_text_without_prompt_is_still_an_error_on_its_line(tmp_path):
    path = tmp_path / "noprompt.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError) as exc:
        load_pairs(path)
    assert exc.value.problems == [f"{path}:2: missing field 'prompt'; each line needs 'prompt', 'chosen' and 'rejected'"]


FIRST_ROW = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "domain": "math"}


@pytest.mark.parametrize("kind", ["folder", "parquet", "json-array"])
def test_datasets_sources_load_with_row_level_errors(tmp_path, kind):
    from datasets import Dataset

    good = Dataset.from_list([FIRST_ROW, {"prompt": "Hi", "chosen": "Hello", "rejected": "Go", "domain": "math"}])
    bad = Dataset.from_list([FIRST_ROW, {"prompt": "Hi", "chosen": "Same", "rejected": "Same", "domain": "math"}])
    paths = []
    for name, ds in (("good", good), ("bad", bad)):
        if kind == "folder":
            path = tmp_path / name
            ds.save_to_disk(str(path))
        elif kind == "parquet":
            path = tmp_path / f"{name}.parquet"
            ds.to_parquet(str(path))
        else:
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(ds.to_list()), encoding="utf-8")
        paths.append(path)
    pairs = load_pairs(paths[0])
    assert [p.prompt[0]["content"] for p in pairs] == ["What is 2+2?", "Hi"] and pairs[0].domain == "math"
    with pytest.raises(DataError) as exc:
        load_pairs(paths[1])
    assert len(exc.value.problems) == 1 and exc.value.problems[0].startswith(f"{paths[1]}: row 2: 'chosen' and 'rejected' are identical")


def test_hub_dataset_id_offline_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as exc:
        load_pairs("some-org/some-preferences")
    assert len(exc.value.problems) == 1 and "HF_HUB_OFFLINE" in exc.value.problems[0]
