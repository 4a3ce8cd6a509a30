"""minillm.instructions: records, the built-in stdlib pairs, the split by module, JSONL in and out."""

from __future__ import annotations

import ast
import json
import pickle
import re
import textwrap
import time
from pathlib import Path

import pytest

from minillm.corpus import Corpus, Document, split_of, stdlib_corpus
from minillm.files import OutputError
from minillm.instructions import (
    Conversation,
    DataError,
    Message,
    Meta,
    describe,
    first_sentence,
    load_jsonl,
    request_from_sentence,
    save_jsonl,
    split_of_module,
    split_pairs,
    stdlib_pairs,
)


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(progress=False)


@pytest.fixture(scope="module")
def pairs(corpus):
    t = time.perf_counter()
    out = stdlib_pairs(corpus)
    print(f"\nstdlib_pairs: {len(out)} pairs in {time.perf_counter() - t:.1f} s")
    return out


@pytest.fixture(scope="module")
def splits(pairs):
    return split_pairs(pairs)


def conv(*turns: tuple[str, str], source: str = "s", meta=None) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in turns), source, meta or {})


# --------------------------------------------------------------------------------------------
# Records


def test_conversation_is_a_frozen_hashable_picklable_value():
    c = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), meta={"k": "v"})
    assert isinstance(c.messages, tuple) and isinstance(c.meta, Meta)
    assert c.meta == {"k": "v"} and c.meta["k"] == "v"
    assert c == conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), meta={"k": "v"})
    assert c != conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), meta={"k": "w"})
    assert len({c, pickle.loads(pickle.dumps(c))}) == 1
    assert c.answer == "Hello." and c.user == "Hi" and [m.role for m in c.prompt] == ["system", "user"]
    with pytest.raises(AttributeError):
        c.source = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        c.meta._items = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.meta["k"] = "w"  # type: ignore[index]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Message("bot", "x"), "unknown role 'bot'"),
        (lambda: Message("user", 3), "must be a string"),
        (lambda: Conversation((), "s"), "needs messages"),
        (lambda: Conversation(("user",), "s"), "not a Message"),
        (lambda: Conversation("user", "s"), "sequence of Message"),
        (lambda: conv(("assistant", "x")), "no user message"),
        (lambda: conv(("system", "a"), ("assistant", "x")), "no user message"),
        (lambda: conv(("user", "a")), "must end with the assistant's answer"),
        (lambda: conv(("user", "a"), ("assistant", "b"), ("user", "c")), "must end with the assistant's answer"),
        (lambda: conv(("user", "a"), ("assistant", " \n")), "answer (the last message) is empty"),
        (lambda: conv(("user", "a"), ("system", "s"), ("assistant", "b")), "may only come first"),
        (lambda: conv(("system", "s"), ("system", "t"), ("user", "a"), ("assistant", "b")), "may only come first"),
        (lambda: conv(("user", "a"), ("assistant", "b"), meta={"n": 1}), "strings to strings"),
        (lambda: Conversation((Message("user", "a"), Message("assistant", "b")), 5), "source must be a string"),
    ],
)
def test_invalid_conversations_raise_data_error(make, expected):
    with pytest.raises(DataError, match=re.escape(expected)):
        make()
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------------------
# The request template


@pytest.mark.parametrize(
    "docstring, expected",
    [
        ("Return the sum.", "Return the sum."),
        ("Close the file.\n\nMore text.", "Close the file."),
        ("Return the x of a\n    long line.  Then more.", "Return the x of a long line."),
        ("Use e.g. Foo for this.  Then more.", "Use e.g. Foo for this."),
        ("Join os.path.join parts. Rest.", "Join os.path.join parts."),
        ("return the lowercase thing.", "return the lowercase thing."),
        ("Close it.", None),  # two words
        ("Return the sum", None),  # no period
        ("Return the sum:", None),
        ("   ", None),
        (">>> f(1)\n2", None),
        ("D.get(k[,d]) -> D[k] if k in D, else d.", None),  # a signature line, not prose
        ("'quoted' text is not a sentence.", None),
        ("Wait for it...", None),
    ],
)
def test_first_sentence(docstring, expected):
    assert first_sentence(docstring) == expected


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("Return the sum of a and b.", "returns the sum of a and b."),
        ("Get the value.", "gets the value."),
        ("Do the work now.", "does the work now."),
        ("Push a line to the interpreter.", "pushes a line to the interpreter."),
        ("Copy the source location.", "copies the source location."),
        ("Returns the root of the tree.", "returns the root of the tree."),
        ("Copies the source location.", "copies the source location."),
        ("Finalizes the options now.", "finalizes the options now."),
        ("True if file supports random-access.", "returns True if file supports random-access."),
        ("Whether there is input.", "returns whether there is input."),
        ("Internal: read lines until EOF.", "reads lines until EOF."),
        ("The count of elements is zero.", "does the following: The count of elements is zero."),
        ("Helper for writing string literals.", "does the following: Helper for writing string literals."),
    ],
)
def test_request_from_sentence(sentence, expected):
    assert request_from_sentence(sentence) == expected


# --------------------------------------------------------------------------------------------
# Pair extraction, on a small corpus with every case

_MODULE = '''
import abc

def good(a, b=1):
    """Return the sum of a and b, twice.

    >>> good(1, 2)
    6
    """

    # a comment right after the docstring stays
    total = a + b
    return 2 * total

def one_liner(x):
    """Return the square of x."""
    return x * x

def getter(self):
    """Return the stored value of it."""
    return self._value

def stub(x):
    """Compute something useful here."""
    raise NotImplementedError

def no_sentence(x):
    """returns stuff without period"""
    y = x + 1
    return y

def boiler(a, b):
    """Same as a + b, but slower."""
    c = a + b
    return c

def nodoc(x):
    y = x + 1
    return y

def outer(x):
    """Return a closure that adds x."""
    def inner(y):
        """Add x to y and return it."""
        return x + y
    return inner

if True:
    async def fetch(url: str) -> bytes:
        """Fetch the url and return its body."""
        data = await get(url)
        return data

class Box:
    """A box."""

    def __init__(self, value):
        """Initialize the box with a value."""
        self.value = value
        self.count = 0

    @property
    def label(self):
        """Return the label of the box, as text."""
        text = f"box {self.value}"
        return text

    def help(self):
        """Return the help text of the box."""
        msg = """first line
  second line, indented less than the method
"""
        return msg.strip()

    @abc.abstractmethod
    def area(self):
        """Return the area of the box."""
        raise NotImplementedError("subclasses")

    class Inner:
        def twice(self, x):
            """Return x doubled for the caller."""
            y = 2 * x
            return y
'''


@pytest.fixture(scope="module")
def small():
    docs = [
        Document("pkg/__init__.py", "X = 1\n"),
        Document("pkg/mod.py", _MODULE),
        Document("pkg/again.py", _MODULE),  # identical code: every pair is a duplicate, none kept
        Document("broken.py", "def f(:\n    pass\n"),
        Document("notes.txt", "def g():\n    '''Return one and more.'''\n    return 1\n"),
    ]
    return stdlib_pairs(Corpus("small", docs))


def test_small_corpus_keeps_the_right_functions(small):
    assert [c.source for c in small] == [
        "pkg.mod:good", "pkg.mod:one_liner", "pkg.mod:outer", "pkg.mod:fetch", "pkg.mod:Box.label",
        "pkg.mod:Box.help", "pkg.mod:Box.Inner.twice",
    ]


def test_small_corpus_code_and_request(small):
    by = {c.meta["qualname"]: c for c in small}
    good = by["good"]
    assert good.answer == (
        "def good(a, b=1):\n    # a comment right after the docstring stays\n    total = a + b\n    return 2 * total"
    )
    assert good.user == "Write a Python function that returns the sum of a and b, twice.\n\nSignature: def good(a, b=1):"
    assert good.meta["has_doctest"] == "1" and good.meta["docstring"].startswith("Return the sum of a and b, twice.\n\n>>>")
    assert good.meta["module"] == "pkg.mod" and good.meta["document"] == "pkg/mod.py" and good.meta["class"] == ""
    assert good.meta["lineno"] == "4" and good.meta["pretrain_split"] == split_of("pkg/mod.py")
    # the nested function stays inside its parent and is not a pair of its own
    assert "def inner(y):" in by["outer"].answer and "inner" not in by
    fetch = by["fetch"]
    assert fetch.meta["signature"] == "async def fetch(url: str) -> bytes:"
    assert fetch.answer.startswith("async def fetch(url: str) -> bytes:\n    data = await get(url)")
    label = by["Box.label"]
    assert label.answer.startswith("@property\ndef label(self):\n    text = ")
    assert label.user.startswith("Write a method of the Python class `Box` that returns the label of the box")
    assert label.user.endswith("Signature: def label(self):\nDecorators: @property")
    assert by["Box.Inner.twice"].meta["class"] == "Box.Inner"


def test_dedent_keeps_multiline_strings_exact(small):
    """A method is moved to column 0, but the text inside its string literals is not touched."""
    help_ = next(c for c in small if c.meta["qualname"] == "Box.help")
    ns: dict = {}
    exec(help_.answer, ns)
    assert ns["help"](None) == "first line\n  second line, indented less than the method"


def test_describe(small):
    d = describe(small)
    assert d["pairs"] == 7 and d["modules"] == 1 and d["methods"] == 3 and d["with_doctest"] == 1
    assert d["median_answer_lines"] == 4
    assert describe([])["pairs"] == 0


# --------------------------------------------------------------------------------------------
# The built-in set


def test_stdlib_pair_count(pairs, splits):
    sizes = {k: len(v) for k, v in splits.items()}
    print(f"\n{describe(pairs)}\nsplit sizes: {sizes}")
    assert 3_000 <= len(pairs) <= 8_000
    d = describe(pairs)
    assert d["modules"] >= 200 and d["methods"] > 0 and d["with_doctest"] > 50


def test_every_answer_is_its_function_without_docstring(pairs):
    for c in pairs:
        tree = ast.parse(c.answer)
        assert len(tree.body) == 1, c.source
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)), c.source
        assert fn.name == c.meta["qualname"].rsplit(".", 1)[-1], c.source
        assert ast.get_docstring(fn) is None, c.source
        assert not c.answer[0].isspace() and not c.answer.endswith("\n"), c.source
        assert len(c.messages) == 2 and c.messages[0].role == "user", c.source


def test_every_request_holds_the_signature_and_a_sentence(pairs):
    for c in pairs:
        sig = c.meta["signature"]
        assert f"\n\nSignature: {sig}" in c.user, c.source
        assert c.user.startswith(("Write a Python function that ", "Write a method of the Python class ")), c.source
        ast.parse(sig + " pass")  # the signature is valid Python
        assert c.meta["has_doctest"] == ("1" if ">>>" in c.meta["docstring"] else "0")
        assert c.source == f"{c.meta['module']}:{c.meta['qualname']}"
    assert len({c.answer for c in pairs}) == len(pairs)  # no answer twice


def test_no_dunder_methods(pairs):
    assert not any(c.meta["qualname"].rsplit(".", 1)[-1].startswith("__") and c.meta["qualname"].endswith("__")
                   for c in pairs)


def test_split_is_by_module(pairs, splits):
    assert sum(len(v) for v in splits.values()) == len(pairs)
    modules = {k: {c.meta["module"] for c in v} for k, v in splits.items()}
    assert all(modules.values())
    assert not modules["train"] & modules["val"]
    assert not modules["train"] & modules["test"]
    assert not modules["val"] & modules["test"]


def test_pretraining_val_modules_never_train(corpus, pairs, splits):
    held = {c.meta["module"] for c in pairs if split_of(c.meta["document"], corpus.val_fraction) == "val"}
    assert held, "the check would be empty: no pair comes from a pretraining validation file"
    assert not held & {c.meta["module"] for c in splits["train"]}
    assert held <= {c.meta["module"] for c in splits["val"] + splits["test"]}


def test_stdlib_pairs_are_deterministic(corpus, pairs):
    assert stdlib_pairs(corpus) == pairs


def test_split_is_a_pure_function_of_the_module(pairs, splits):
    again = split_pairs(list(reversed(pairs)))
    for k in splits:
        assert again[k] == list(reversed(splits[k]))
    # dropping modules moves no other module
    fewer = split_pairs([c for c in pairs if not c.meta["module"].startswith(("a", "e"))])
    for k in splits:
        assert fewer[k] == [c for c in splits[k] if not c.meta["module"].startswith(("a", "e"))]


def test_split_of_module_fractions_and_arguments():
    names = [f"module{i}" for i in range(4000)]
    counts = {"train": 0, "val": 0, "test": 0}
    for n in names:
        counts[split_of_module(n, 0.1, 0.2)] += 1
    assert abs(counts["val"] / 4000 - 0.1) < 0.02 and abs(counts["test"] / 4000 - 0.2) < 0.02
    assert all(split_of_module(n, 0.0, 0.0) == "train" for n in names[:100])
    assert all(split_of_module(n, 0.1, 0.2, pretrain_split="val") != "train" for n in names)
    assert all(split_of_module(n, 0.0, 0.0, pretrain_split="val") == "val" for n in names[:100])
    assert split_of_module("json.decoder") == split_of_module("json.decoder")
    for bad in (dict(val_fraction=-0.1), dict(test_fraction=1.0), dict(val_fraction=0.6, test_fraction=0.5),
                dict(val_fraction=True), dict(test_fraction="0.1")):
        with pytest.raises(DataError):
            split_of_module("m", **bad)


def test_doctested_modules_go_to_test(pairs, splits):
    counts: dict[str, int] = {}
    for c in pairs:
        if c.meta["has_doctest"] == "1" and not c.meta["class"]:
            counts[c.meta["module"]] = counts.get(c.meta["module"], 0) + 1
    held = {m for m, n in counts.items() if n >= 2}
    assert held, "no module has two doctested functions: the rule would be untested"
    test_modules = {c.meta["module"] for c in splits["test"]}
    assert held <= test_modules
    assert not held & {c.meta["module"] for c in splits["train"] + splits["val"]}
    # turned off, those modules follow the hash like any other
    plain = split_pairs(pairs, doctest_modules=0)
    assert {split_of_module(m, 0.05, 0.05, "train") for m in held} != {"test"}
    assert {c.meta["module"] for c in plain["test"]} != test_modules
    with pytest.raises(DataError, match="doctest_modules"):
        split_pairs(pairs, doctest_modules=-1)


def test_conversations_without_module_split_one_by_one():
    items = [conv(("user", f"q{i}"), ("assistant", "a"), source=f"data.jsonl:{i}") for i in range(400)]
    out = split_pairs(items, 0.25, 0.25)
    assert all(len(v) > 50 for v in out.values())


# --------------------------------------------------------------------------------------------
# JSONL


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_load_alpaca_and_chat_styles(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [
        json.dumps({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}),
        "",
        "   ",
        json.dumps({"instruction": "Say hi.", "input": "", "output": "hi", "extra": 1}),
        json.dumps({"instruction": "Say yo.", "output": "yo"}),
        json.dumps({"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}]}),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                 {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
                    "source": "mine", "meta": {"k": "v"}}),
    ])
    got = load_jsonl(path)
    assert [c.source for c in got] == ["data.jsonl:1", "data.jsonl:4", "data.jsonl:5", "data.jsonl:6", "mine"]
    assert got[0].messages == (Message("user", "Add the numbers.\n\n2 and 3"), Message("assistant", "5"))
    assert got[1].user == "Say hi." and got[2].user == "Say yo."
    assert [m.role for m in got[3].messages] == ["system", "user", "assistant"]
    assert got[4].answer == "d" and got[4].user == "c" and got[4].meta == {"k": "v"}


def test_load_accepts_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "a", "output": "b"}).encode() + b"\n")
    assert load_jsonl(path)[0].answer == "b"


def test_round_trip(tmp_path, pairs):
    path = save_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert load_jsonl(path) == pairs
    with pytest.raises(OutputError, match="exists"):
        save_jsonl(path, pairs[:1])
    save_jsonl(path, pairs[:2], overwrite=True)
    assert load_jsonl(path) == pairs[:2]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "pairs.jsonl"]  # no temporary file left
    other = [conv(("system", "é ✓"), ("user", "q"), ("assistant", "ü"), source="x:1", meta={"a": "b"})]
    assert load_jsonl(save_jsonl(tmp_path / "u.jsonl", other)) == other


def test_save_refuses_bad_items(tmp_path):
    with pytest.raises(DataError, match="not a Conversation"):
        save_jsonl(tmp_path / "x.jsonl", [{"messages": []}])  # type: ignore[list-item]
    with pytest.raises(DataError, match="surrogate"):
        save_jsonl(tmp_path / "y.jsonl", [conv(("user", "a"), ("assistant", "\ud800"))])
    assert not list(tmp_path.iterdir())


_GOOD = json.dumps({"instruction": "Say hi.", "output": "hi"})


def _msgs(*turns):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"instruction": "x",', "invalid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('"text"', "must be a JSON object, got str"),
        ("null", "must be a JSON object, got NoneType"),
        ('{"prompt": "a", "completion": "b"}', "neither style"),
        ('{"instruction": "a", "output": "b", "messages": []}', "both"),
        ('{"instruction": "a"}', "missing 'output'"),
        ('{"output": "a"}', "missing 'instruction'"),
        ('{"instruction": "a", "output": ""}', "\"output\" is empty"),
        ('{"instruction": "a", "output": "  \\n"}', "\"output\" is empty"),
        ('{"instruction": "", "output": "b"}', "\"instruction\" is empty"),
        ('{"instruction": 5, "output": "b"}', "'instruction' is int"),
        ('{"instruction": "a", "output": ["b"]}', "'output' is list"),
        ('{"instruction": "a", "input": 3, "output": "b"}', "'input' is int"),
        ('{"messages": "hi"}', "non-empty list"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": ["hi"]}', "message 0 must be an object"),
        ('{"messages": [{"role": "user"}]}', "message 0 must be an object"),
        ('{"messages": [{"role": 1, "content": "a"}]}', "message 0 must be an object"),
        ('{"messages": [{"role": "user", "content": 3}]}', "message 0: \"content\" is int"),
        (_msgs(("user", "a"), ("bot", "b")), "unknown role 'bot'"),
        (_msgs(("user", "a"), ("assistant", "")), "is empty"),
        (_msgs(("user", "a")), "must end with the assistant's answer"),
        (_msgs(("user", "a"), ("assistant", "b"), ("user", "c")), "must end with the assistant's answer"),
        (_msgs(("system", "s"), ("assistant", "b")), "no user message"),
        (_msgs(("user", "a"), ("system", "s"), ("assistant", "b")), "may only come first"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "source": 1}',
         "\"source\" is int"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "meta": []}',
         "\"meta\" is list"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "meta": {"n": 1}}',
         "strings to strings"),
        (b'{"instruction": "caf\xe9", "output": "b"}', "not valid UTF-8"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, expected):
    path = write_lines(tmp_path / "bad.jsonl", [_GOOD, "", line, _GOOD])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert expected in msg, msg
    assert msg.count(f"{path}:3") == 1, msg


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="folder"):
        load_jsonl(tmp_path)
    with pytest.raises(DataError, match="no conversations"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    array = tmp_path / "array.json"
    array.write_text(textwrap.dedent("""\
        [
          {"instruction": "a", "output": "b"}
        ]
    """))
    with pytest.raises(DataError, match=r"array.json:1: invalid JSON .*one JSON array"):
        load_jsonl(array)
