"""Instruction data: conversations for supervised fine-tuning, built in or read from JSONL.

A `Conversation` is a tuple of `Message` turns (roles ``system``, ``user``, ``assistant``) with a
`source` (where it came from: ``json.decoder:py_scanstring``, ``data.jsonl:12``) and `meta`, string
facts that evaluation needs (the docstring, the signature, the module). The last turn is the
assistant's answer, the only text that fine-tuning learns to write.

The built-in set, `stdlib_pairs`, is found with `ast` in the standard-library corpus of chapter 00:
every module-level function, and every method of a module-level class, whose docstring opens with a
full sentence and whose code (without the docstring) is a few lines long and more than a stub. The
user turn asks for the function in a fixed template built from that sentence and the signature; the
assistant turn is the function's code without its docstring, dedented to column 0::

    user:      Write a Python function that returns the number of items in the queue.

               Signature: def qsize(self):
    assistant: def qsize(self):
                   with self.mutex:
                       return self._qsize()

`split_pairs` splits by module, never by pair, with a stable hash of the module name, and keeps the
modules of the pretraining validation split (`minillm.corpus.split_of`) out of SFT training. Modules
with several doctested functions are held out for test, so that the test split has doctests to run.

`load_jsonl` reads the two common file styles, Alpaca (``{"instruction", "input"?, "output"}``) and
chat (``{"messages": [{"role", "content"}, ...]}``); `save_jsonl` writes the chat style (with the
source and meta, so a file it wrote reads back equal). Every bad line raises `DataError` naming the
file and its line number.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import re
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from minillm import data as _data
from minillm.corpus import Corpus, split_of, stdlib_corpus
from minillm.files import atomic_write, check_output

__all__ = [
    "ROLES",
    "DataError",
    "Meta",
    "Message",
    "Conversation",
    "stdlib_pairs",
    "request_from_sentence",
    "first_sentence",
    "split_pairs",
    "split_of_module",
    "load_jsonl",
    "save_jsonl",
    "describe",
]

ROLES = ("system", "user", "assistant")


class DataError(_data.DataError):
    """Bad instruction data: an invalid conversation or a bad line of a JSONL file. A kind of
    `minillm.DataError` (a ValueError), so that one `except` catches bad data of either kind.

    The message names the problem (and, for a file, the file and its 1-based line number) and the fix.
    """


# --------------------------------------------------------------------------------------------
# Records


class Meta(Mapping[str, str]):
    """A read-only mapping of strings to strings: the `meta` of a `Conversation`.

    Unlike a dict or a `types.MappingProxyType` it is hashable and picklable, so a `Conversation`
    stays a frozen value (usable in sets, sent to worker processes). It compares equal to any
    mapping with the same items, a plain dict included.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        d = dict(items)
        self._check(d)
        object.__setattr__(self, "_items", d)

    @classmethod
    def _check(cls, d: dict) -> None:
        """Refuse what this mapping may not hold (a subclass widens or narrows the values)."""
        for k, v in d.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise DataError(
                    f"meta must map strings to strings, got {k!r}: {type(v).__name__}; convert the value with str()"
                )

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other.items())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"

    def __reduce__(self) -> tuple[type, tuple[dict]]:
        return (type(self), (dict(self._items),))


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: a role (``system``, ``user`` or ``assistant``) and its text."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if not isinstance(self.role, str) or self.role not in ROLES:
            raise DataError(f"unknown role {self.role!r}; a message's role must be one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise DataError(f"the content of a {self.role} message is {type(self.content).__name__}; it must be a string")


@dataclass(frozen=True)
class Conversation:
    """A training example: messages that end with the assistant's answer.

    Rules, checked on construction: at least one user message; a system message only as the first
    message; the last message is the assistant's and is not blank. `messages` is stored as a tuple
    and `meta` as a `Meta` (read-only, hashable), whatever sequence and mapping were passed.
    """

    messages: tuple[Message, ...]
    source: str = ""
    meta: Mapping[str, str] = field(default_factory=Meta)

    def __post_init__(self) -> None:
        if isinstance(self.messages, (str, bytes)) or not isinstance(self.messages, Iterable):
            raise DataError(f"messages must be a sequence of Message, got {type(self.messages).__name__}")
        messages = tuple(self.messages)
        for i, m in enumerate(messages):
            if not isinstance(m, Message):
                raise DataError(f"message {i} is {type(m).__name__}, not a Message; build it with Message(role, content)")
        if not isinstance(self.source, str):
            raise DataError(f"source must be a string, got {type(self.source).__name__}")
        object.__setattr__(self, "messages", messages)
        object.__setattr__(self, "meta", self.meta if isinstance(self.meta, Meta) else Meta(self.meta))
        if not messages:
            raise DataError("a conversation needs messages: at least a user message and the assistant's answer")
        for i, m in enumerate(messages):
            if m.role == "system" and i != 0:
                raise DataError(f"message {i} is a system message; a system message may only come first")
        if not any(m.role == "user" for m in messages):
            raise DataError("the conversation has no user message; add the user's request before the answer")
        last = messages[-1]
        if last.role != "assistant":
            raise DataError(f"the last message is the {last.role}'s; a conversation must end with the assistant's answer")
        if not last.content.strip():
            raise DataError("the assistant's answer (the last message) is empty; give the response to learn")

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Every message before the answer."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        """The assistant's final answer."""
        return self.messages[-1].content

    @property
    def user(self) -> str:
        """The last user message (the request the answer replies to)."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")


# --------------------------------------------------------------------------------------------
# The built-in set: docstring -> function pairs from the standard library

# Imperative verbs that open standard-library docstrings ("Return the ...", "Set the ...").
# A sentence that opens with one becomes "... that returns the ...": the verb is put in the third
# person. A sentence that already opens in the third person ("Returns the ...") is only lowercased.
_VERBS = frozenset("""
    abort accept acquire activate add adjust advance allow alter append apply arrange ask
    assemble assert assign assume attach attempt authenticate become begin bind block bring
    build calculate call cancel chain change check checkpoint choose clean clear clone close
    coerce collapse collect combine compare compile compress compute configure connect construct
    control convert copy count create customize decide declare decode decompress decrement
    dedent define deiconify delegate delete dequeue descend deserialize destroy detect determine
    disable disassemble discard dismiss dispatch display divide do draw drive drop dump
    duplicate edit emit enable encode enqueue ensure enter escape estimate evaluate execute exit
    expand expect extend extract fail feed fetch fill filter finalize find finish flush fold
    follow force format free generate get go grep guess handle hide highlight honour identify
    imitate implement import include increment indent indicate inhibit initialize initiate
    inquire insert inspect install instantiate instruct interact interleave interpret invalidate
    invert invoke isolate iterate join keep link list load locate lock log look make manage map
    mark match merge modify monitor move normalize omit open optimize pack parse pause perform
    pickle place pop populate prepare preserve print process produce prompt provide prune pull
    push put query quit quote raise read recalculate receive recognize reconfigure reconstruct
    record redirect reduce refactor register reinitialize release reload remember remove rename
    render reopen repeat replace report reposition represent request reschedule reset resize
    resolve restore resume retrieve return reveal reverse rewind rotate round run save scale
    scan schedule scroll search seed seek select send separate serialize serve set shift show
    shuffle shut skip sort spawn specify split squeeze start steal stop store strip submit
    subscribe subtract summarize supplement swap switch take tally tell terminate test throw
    tidy toggle tokenize transform translate traverse truncate try turn typecheck unbind
    uncomment undefine undo unescape uninstall unlink unlock unmap unmark unpack unregister
    unset unsubscribe update upgrade use validate verify visit wait wake walk warn withdraw wrap
    write yield
""".split())

# Sentences that say nothing a function can be written from: references to another function,
# deprecation notes, stubs for subclasses, internal markers.
_BOILERPLATE = re.compile(
    r"""^(?:
        same\s+as | like\s | similar\s+to | equivalent\s+to | alias | see\s | synonym | abstract\b |
        (?:for\s+)?backwards?[\s-]compat | compatibility | \W*deprecated | obsolete | override | overridden |
        subclasses\s+(?:must|should|may) | (?:this\s+is\s+)?(?:a\s+)?dummy | (?:a\s+)?placeholder | stub |
        not\s+(?:yet\s+)?implemented | undocumented | for\s+internal\s+use | constructor\b |
        initializer\b | xxx | todo | fixme | used\s+by\s+pickle
    )""",
    re.IGNORECASE | re.VERBOSE,
)

# A label before the sentence proper ("Internal: read lines until EOF."), dropped from the request.
_LABEL = re.compile(r"^(?:internal|private|helper|hook|utility)\s*:\s*", re.IGNORECASE)

_MIN_WORDS = 3  # in the first sentence
_MAX_WORDS = 80
_MIN_LINES = 1  # lines of code in the body without the docstring (blank and comment lines not counted)
_MAX_LINES = 40

# The end of a sentence inside a paragraph: a period, then space, then a capital letter or a quote.
# "e.g. the" and "os.path.join" do not end one.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"`*_])\.\s+(?=[A-Z(\"'`])")


# Periods that end an abbreviation, not a sentence.
_ABBREVIATIONS = (" e.g.", " i.e.", " cf.", " vs.", " approx.", " resp.")


def first_sentence(docstring: str) -> str | None:
    """The first sentence of a docstring's first paragraph, or None if it has no full sentence.

    A full sentence starts with a letter (not with a call, as the signature lines of builtins'
    docstrings do), ends with a period, and has 3 to 80 words. The paragraph's lines are joined
    with single spaces; "e.g." and "i.e." do not end a sentence.
    """
    doc = inspect.cleandoc(docstring)
    para = " ".join(doc.split("\n\n", 1)[0].split())
    if not para or not para[0].isalpha() or ">>>" in para or "(" in para.split()[0]:
        return None  # not prose: a doctest, or a signature line ("D.get(k[,d]) -> D[k] ...")
    sentence = para
    for m in _SENTENCE_END.finditer(para):
        if not para[: m.start() + 1].lower().endswith(_ABBREVIATIONS):
            sentence = para[: m.start() + 1]
            break
    if not sentence.endswith(".") or sentence.endswith(".."):
        return None
    words = sentence.split()
    if not _MIN_WORDS <= len(words) <= _MAX_WORDS:
        return None
    return sentence


def _third_person(verb: str) -> str:
    if verb == "do":
        return "does"
    if re.search(r"(?:s|sh|ch|x|z|o)$", verb):
        return verb + "es"
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    return verb + "s"


def _base_form(word: str) -> str | None:
    """The verb of `_VERBS` that `word` is the third person of ("returns" -> "return"), if any."""
    for base in (word[:-3] + "y" if word.endswith("ies") else None, word[:-2] if word.endswith("es") else None,
                 word[:-1] if word.endswith("s") else None):
        if base and base in _VERBS and _third_person(base) == word:
            return base
    return None


def request_from_sentence(sentence: str) -> str:
    """Turn a docstring's first sentence into the end of "Write a Python function that ...".

    The patterns, tried in order (the first word compared in lower case):

    * an imperative verb: put in the third person ("Return the x." -> "returns the x.");
    * a verb already in the third person: lowercased ("Returns the x." -> "returns the x.");
    * "True if ..." or "False if ...": "returns True if ...";
    * "Whether ...": "returns whether ...";
    * anything else: "does the following: <the sentence as written>".
    """
    sentence = _LABEL.sub("", sentence)
    first, _, rest = sentence.partition(" ")
    word = first.lower()
    if word in _VERBS:
        return f"{_third_person(word)} {rest}"
    if _base_form(word) is not None:
        return f"{word} {rest}"
    if first in ("True", "False") and rest.startswith(("if ", "when ", "iff ")):
        return f"returns {sentence}"
    if word == "whether":
        return f"returns {sentence[0].lower()}{sentence[1:]}"
    return f"does the following: {sentence}"


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


def _module_name(doc_name: str) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = doc_name[: -len(".py")].split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _functions(body: list[ast.stmt], classes: tuple[str, ...]) -> Iterator[tuple[_Function, tuple[str, ...]]]:
    """Functions defined at module level (also under if/try/with) and methods of classes (nested
    classes too), never functions nested in functions: those depend on their enclosing scope."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, classes
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node.body, (*classes, node.name))
        elif isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.AsyncWith)):
            yield from _functions(node.body, classes)
            yield from _functions(node.orelse if not isinstance(node, (ast.With, ast.AsyncWith)) else [], classes)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):  # type: ignore[attr-defined]
                yield from _functions(part, classes)


def _is_trivial(stmts: list[ast.stmt]) -> bool:
    """Whether a body is one statement that only returns or stores a name, an attribute or a
    constant (``return self._x``): nothing to learn from the docstring."""
    if len(stmts) != 1:
        return False
    s = stmts[0]
    if isinstance(s, ast.Raise):  # raise SomeError, with no message
        return isinstance(s.exc, (ast.Name, ast.Attribute))
    value = s.value if isinstance(s, (ast.Return, ast.Expr, ast.Assign, ast.AnnAssign)) else False
    return value is None or isinstance(value, (ast.Name, ast.Attribute, ast.Constant))


def _is_stub(stmts: list[ast.stmt]) -> bool:
    """Whether a body does nothing: pass, ..., a bare string, raise NotImplementedError, return None."""
    for s in stmts:
        if isinstance(s, ast.Pass):
            continue
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            continue
        if isinstance(s, ast.Return) and (s.value is None or (isinstance(s.value, ast.Constant) and s.value.value is None)):
            continue
        if isinstance(s, ast.Raise) and s.exc is not None:
            exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
            if isinstance(exc, ast.Name) and exc.id == "NotImplementedError":
                continue
        return False
    return True


def _string_lines(node: ast.AST) -> set[int]:
    """Line numbers (1-based) that continue a multi-line string literal: their indentation is text."""
    lines: set[int] = set()
    for n in ast.walk(node):
        if isinstance(n, (ast.Constant, ast.JoinedStr)) and getattr(n, "end_lineno", None):
            if isinstance(n, ast.JoinedStr) or isinstance(n.value, (str, bytes)):
                lines.update(range(n.lineno + 1, n.end_lineno + 1))  # type: ignore[operator]
    return lines


def _code_without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str | None:
    """The function's source (decorators, def line(s), body) without its docstring, dedented to
    column 0; None when the docstring shares a line with other code (rare, and not worth the risk)."""
    doc = node.body[0]
    nxt = node.body[1]
    first_line = lines[doc.lineno - 1]
    last_line = lines[doc.end_lineno - 1]  # type: ignore[index]
    if first_line[: doc.col_offset].strip() or nxt.lineno <= doc.end_lineno:  # type: ignore[operator]
        return None
    after = last_line[doc.end_col_offset:].strip()  # type: ignore[index]
    if after and not after.startswith("#"):
        return None
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    indent = lines[start - 1][: node.col_offset]
    if indent.strip():
        return None
    # Only a triple quote or a backslash at the end of a line can start a multi-line string.
    rest = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]  # type: ignore[misc]
    if any('"""' in line or "'''" in line or line.endswith("\\") for line in rest):
        strings = _string_lines(node)
    else:
        strings = set()
    out = []
    skipping_blank = False
    for no in range(start, node.end_lineno + 1):  # type: ignore[operator]
        if doc.lineno <= no <= doc.end_lineno:  # type: ignore[operator]
            skipping_blank = True  # the blank lines after the docstring go with it
            continue
        line = lines[no - 1]
        if skipping_blank and not line.strip():
            continue
        skipping_blank = False
        if no in strings:
            out.append(line)  # inside a string literal: its text, left exactly as it was
        elif not line.strip():
            out.append("")
        elif line.startswith(indent):
            out.append(line[len(indent):])
        else:
            return None
    return "\n".join(out)


def _count_code_lines(stmts: list[ast.stmt], lines: list[str]) -> int:
    start, end = stmts[0].lineno, max(s.end_lineno or s.lineno for s in stmts)
    return sum(1 for line in lines[start - 1 : end] if line.strip() and not line.lstrip().startswith("#"))


def _pair(
    node: ast.FunctionDef | ast.AsyncFunctionDef, classes: tuple[str, ...], module: str, doc_name: str,
    pretrain_split: str, lines: list[str],
) -> Conversation | None:
    """The pair for one function, or None if it does not pass every filter (see `stdlib_pairs`)."""
    name = node.name
    if name.startswith("__") and name.endswith("__"):
        return None
    decorators = [d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list]
    if any(d.startswith("abstract") for d in decorators):
        return None  # an abstract method's body is a placeholder
    docstring = ast.get_docstring(node, clean=True)
    if not docstring or len(node.body) < 2:
        return None
    sentence = first_sentence(docstring)
    if sentence is None or _BOILERPLATE.match(sentence):
        return None
    body = node.body[1:]
    if _is_stub(body) or _is_trivial(body) or not _MIN_LINES <= _count_code_lines(body, lines) <= _MAX_LINES:
        return None
    code = _code_without_docstring(node, lines)
    if code is None:
        return None
    try:  # the answer must be a definition that parses alone, the same function without a docstring
        tree = ast.parse(code)
    except SyntaxError:
        return None
    if (len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
            or tree.body[0].name != name or ast.get_docstring(tree.body[0]) is not None):
        return None
    signature = _signature(node)
    qualname = ".".join((*classes, name))
    if classes:
        what = f"Write a method of the Python class `{'.'.join(classes)}` that"
    else:
        what = "Write a Python function that"
    user = f"{what} {request_from_sentence(sentence)}\n\nSignature: {signature}"
    if node.decorator_list:
        user += "\nDecorators: " + " ".join("@" + ast.unparse(d) for d in node.decorator_list)
    meta = {
        "module": module,
        "qualname": qualname,
        "class": ".".join(classes),
        "signature": signature,
        "docstring": docstring,
        "has_doctest": "1" if ">>>" in docstring else "0",
        "document": doc_name,
        "lineno": str(node.lineno),
        "pretrain_split": pretrain_split,
    }
    return Conversation((Message("user", user), Message("assistant", code)), f"{module}:{qualname}", meta)


def stdlib_pairs(corpus: Corpus | None = None) -> list[Conversation]:
    """The built-in instruction set: docstring -> function pairs from a corpus of Python modules.

    `corpus` defaults to `stdlib_corpus()`; only its documents named ``*.py`` are read, and one that
    does not parse is skipped. Kept: every function at module level (under if/try/with blocks too)
    and every method of a class, except

    * dunder methods (``__init__``, ``__repr__``...: their meaning is a protocol, not their docstring)
      and functions nested in other functions (they depend on the enclosing scope);
    * a docstring without a full first sentence (`first_sentence`), or whose sentence is
      boilerplate ("Same as ...", "Deprecated", "Override ...", "Internal ...", "Constructor.");
    * a body, without the docstring, under 2 or over 40 lines of code (blank and comment lines not
      counted), or that only passes, returns None or raises NotImplementedError;
    * code that shares the docstring's lines, or that does not parse on its own once dedented;
    * an answer already taken from an earlier module (identical code): every answer is unique, so
      that no answer can sit in two splits.

    Decorators are kept in the code and listed in the request. The pairs come in corpus order
    (modules sorted by path, functions in source order): two builds are equal. The default build
    is made once per process (parsing the standard library takes seconds) and copied to each caller.
    """
    if corpus is None:
        return list(_default_pairs())
    pairs: list[Conversation] = []
    seen: set[str] = set()
    for doc in corpus.documents:
        if not doc.name.endswith(".py"):
            continue
        text = doc.text.replace("\r\n", "\n").replace("\r", "\n")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):  # ValueError: a NUL byte
            continue
        lines = text.split("\n")
        module = _module_name(doc.name)
        pretrain = split_of(doc.name, corpus.val_fraction)
        for node, classes in _functions(tree.body, ()):
            pair = _pair(node, classes, module, doc.name, pretrain, lines)
            if pair is not None and pair.answer not in seen:
                seen.add(pair.answer)
                pairs.append(pair)
    return pairs



@functools.cache
def _default_pairs() -> tuple[Conversation, ...]:
    return tuple(stdlib_pairs(stdlib_corpus()))  # Conversations are frozen: sharing them is safe


# --------------------------------------------------------------------------------------------
# Splits


def _unit(data: bytes) -> float:
    return int.from_bytes(data, "big") / 2**64


def split_of_module(module: str, val_fraction: float = 0.05, test_fraction: float = 0.05,
                    pretrain_split: str = "train") -> str:
    """The SFT split ("train", "val" or "test") of a module, a pure function of its name.

    SHA-256 of ``"minillm-sft:" + module``: the first 8 bytes as a number u in [0, 1) give val
    (u < val_fraction), test (u < val_fraction + test_fraction) or train. The prefix keeps this
    hash independent of the pretraining split's. A module of the pretraining validation split
    (`pretrain_split` == "val") is never train: it goes to test or val, in the ratio of the two
    fractions, by the next 8 bytes (to val if both fractions are 0).
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
            raise DataError(f"{name} must be a number in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"val_fraction + test_fraction must be below 1 (got {val_fraction + test_fraction}), "
                        "or nothing is left to train on")
    digest = hashlib.sha256(f"minillm-sft:{module}".encode()).digest()
    u = _unit(digest[:8])
    split = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
    if split == "train" and pretrain_split == "val":
        held = val_fraction + test_fraction
        split = "test" if held and _unit(digest[8:16]) < test_fraction / held else "val"
    return split


def _group(c: Conversation) -> str:
    """What a split keeps together: the module; a conversation without one goes alone, by its source."""
    return c.meta.get("module") or c.source


def split_pairs(
    pairs: Iterable[Conversation], val_fraction: float = 0.05, test_fraction: float = 0.05,
    doctest_modules: int = 2,
) -> dict[str, list[Conversation]]:
    """Split conversations into "train", "val" and "test" by module, never by pair.

    Every pair of a module (``meta["module"]``) goes to the split `split_of_module` gives, and a
    module whose ``meta["pretrain_split"]`` is "val" never lands in train. The fractions are of
    modules, not pairs. A conversation without a module (a line of a user's JSONL file) is split
    on its own, by its source (``data.jsonl:12``). Order inside each split is the input order.

    A module with at least `doctest_modules` functions (not methods) whose docstrings hold doctest
    examples goes to test whole (0 turns this off): few modules have any, and the hash alone leaves
    the test split with almost no doctests to run (none on the CPython 3.11 of our tests), while the held-out doctest
    rate of chapter 08 needs them. It still goes by module, and a module's own pairs decide it.
    """
    pairs = list(pairs)
    if isinstance(doctest_modules, bool) or not isinstance(doctest_modules, int) or doctest_modules < 0:
        raise DataError(f"doctest_modules must be an int >= 0 (0: off), got {doctest_modules!r}")
    doctested: dict[str, int] = {}
    for c in pairs:
        if not isinstance(c, Conversation):
            raise DataError(f"split_pairs takes Conversations, got {type(c).__name__}")
        if c.meta.get("has_doctest") == "1" and not c.meta.get("class") and c.meta.get("module"):
            doctested[c.meta["module"]] = doctested.get(c.meta["module"], 0) + 1
    out: dict[str, list[Conversation]] = {"train": [], "val": [], "test": []}
    cache: dict[tuple[str, str], str] = {}
    for c in pairs:
        key = (_group(c), c.meta.get("pretrain_split", "train"))
        if key not in cache:
            if doctest_modules and doctested.get(key[0], 0) >= doctest_modules:
                cache[key] = "test"
            else:
                cache[key] = split_of_module(key[0], val_fraction, test_fraction, key[1])
        out[cache[key]].append(c)
    return out


# --------------------------------------------------------------------------------------------
# JSONL files


def _require_str(where: str, record: Mapping[str, object], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{where}: missing {key!r}; every Alpaca-style line needs \"instruction\" and \"output\"")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is {type(value).__name__}, expected a string")
    return value


def _parse_record(record: object, where: str, default_source: str) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a line must be a JSON object, got {type(record).__name__}")
    chat = "messages" in record
    alpaca = "instruction" in record or "output" in record
    if chat and alpaca:
        raise DataError(f"{where}: the line has both \"messages\" and \"instruction\"/\"output\"; use one style per line")
    if not chat and not alpaca:
        raise DataError(
            f"{where}: neither style: expected {{\"instruction\", \"input\"?, \"output\"}} or "
            f"{{\"messages\": [{{\"role\", \"content\"}}, ...]}}, found keys {sorted(record)}"
        )
    try:
        if alpaca:
            instruction = _require_str(where, record, "instruction")
            extra = _require_str(where, record, "input", required=False)
            output = _require_str(where, record, "output")
            if not instruction.strip():
                raise DataError(f"{where}: \"instruction\" is empty; give the request")
            if not output.strip():
                raise DataError(f"{where}: \"output\" is empty; give the response to learn")
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            return Conversation((Message("user", user), Message("assistant", output)), default_source)
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise DataError(f"{where}: message {i} must be an object with a string \"role\" and a \"content\"")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: message {i}: \"content\" is {type(m['content']).__name__}, expected a string")
            turns.append(Message(m["role"], m["content"]))
        source = record.get("source", default_source)
        if not isinstance(source, str):
            raise DataError(f"{where}: \"source\" is {type(source).__name__}, expected a string")
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"{where}: \"meta\" is {type(meta).__name__}, expected an object of strings")
        return Conversation(tuple(turns), source, meta)
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def load_jsonl(path: str | os.PathLike[str]) -> list[Conversation]:
    """Read conversations from a JSON Lines file, one per line, blank lines skipped.

    Each line is either Alpaca style, ``{"instruction": ..., "input": ..., "output": ...}``
    ("input" optional; the user message is the instruction, then a blank line and the input when
    there is one), or chat style, ``{"messages": [{"role": ..., "content": ...}, ...]}`` with an
    optional system message first, and optional "source" (a string) and "meta" (strings) as
    `save_jsonl` writes them. Other keys are ignored. A conversation's source is ``FILE:LINE``
    unless the line names one. Any bad line raises `DataError` with the file and line number.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" + ("; it is a folder, give a .jsonl file" if path.is_dir() else ""))
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                                "convert the file to UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                hint = ("; the file looks like one JSON array: write one object per line (JSON Lines)"
                        if lineno == 1 and line.lstrip().startswith("[") else "; each line must be one JSON object")
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}){hint}") from None
            out.append(_parse_record(record, where, f"{path.name}:{lineno}"))
    if not out:
        raise DataError(f"{path}: no conversations in the file (it is empty or only blank lines)")
    return out


def save_jsonl(
    path: str | os.PathLike[str], conversations: Iterable[Conversation], *, overwrite: bool = False
) -> Path:
    """Write conversations as chat-style JSON Lines, with their source and meta; atomically.

    `load_jsonl` reads the file back into equal conversations. An existing file is kept unless
    `overwrite`.
    """
    out = check_output(path, overwrite=overwrite, what="JSONL file")
    lines = []
    for i, c in enumerate(conversations):
        if not isinstance(c, Conversation):
            raise DataError(f"item {i} is {type(c).__name__}, not a Conversation")
        record = {
            "messages": [{"role": m.role, "content": m.content} for m in c.messages],
            "source": c.source,
            "meta": dict(c.meta),
        }
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"conversation {i} ({c.source}) holds a lone surrogate {line[e.start:e.end]!r}, "
                            "which UTF-8 cannot encode; remove it") from None
        lines.append(line + "\n")
    return atomic_write(out, "".join(lines), overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# A summary for the chapter


def describe(pairs: Sequence[Conversation]) -> dict[str, int | float]:
    """Counts and medians: pairs, modules, methods, pairs with doctests, median lengths of the
    request and the answer in characters, and of the answer in lines."""
    pairs = list(pairs)
    if not pairs:
        return {"pairs": 0, "modules": 0, "methods": 0, "with_doctest": 0,
                "median_user_chars": 0, "median_answer_chars": 0, "median_answer_lines": 0}
    return {
        "pairs": len(pairs),
        "modules": len({c.meta["module"] for c in pairs if c.meta.get("module")}),
        "methods": sum(1 for c in pairs if c.meta.get("class")),
        "with_doctest": sum(1 for c in pairs if c.meta.get("has_doctest") == "1"),
        "median_user_chars": statistics.median(len(c.user) for c in pairs),
        "median_answer_chars": statistics.median(len(c.answer) for c in pairs),
        "median_answer_lines": statistics.median(c.answer.count("\n") + 1 for c in pairs),
    }
