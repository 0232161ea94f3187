"""The strict checker behind every YAML file the exporter reads (config, portal files, web config).

A file becomes frozen dataclasses declared with `section`. Each field names its YAML key, its
checker and its default once, in `setting`; the known keys of a mapping, the "is required"
lines and the unknown-key lines all come from those declarations::

    @section
    class ImSettings:
        enabled: bool = setting(boolean, default=True)
        webhooks: tuple[WebhookAuth, ...] = setting(im_webhooks, default=())

A checker takes a `Node` (a value, where it sits, and the file's context) and returns the
field's type, so mypy checks every checker against the field it fills; on a bad value it calls
`Node.fail`, which records one line and abandons that value. `build` walks a mapping, checks
every field, and reports every problem at once, each as one line with file and key path::

    config.yaml: portals[1].tasks.users[0]: must be a positive integer, got 'abc'

Lines come out in document order whatever order they were found in. Values are shown with
`show`, which never echoes a URL's secret; secrets are described with `kind` instead.

`read_yaml` is the one loader: duplicate keys are errors (a `<<` merge may still be
overridden), and nesting too deep, integers too long and characters YAML forbids give one line
with file, line and column instead of a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    NoReturn,
    Protocol,
    TypeVar,
    dataclass_transform,
    overload,
)

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

from exporter.typenames import TypeWords, type_word

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "BAD",
    "Check",
    "ConfigError",
    "Context",
    "Invalid",
    "Loc",
    "Node",
    "Problems",
    "Section",
    "boolean",
    "build",
    "check_document",
    "each",
    "either",
    "kind",
    "known_keys",
    "nested",
    "one_of",
    "read_yaml",
    "reason",
    "redact_url",
    "resolve_path",
    "run",
    "section",
    "setting",
    "show",
]

T = TypeVar("T")
C = TypeVar("C")
S = TypeVar("S", bound=str)
D = TypeVar("D", bound="DataclassInstance")


class ConfigError(Exception):
    """A file is invalid; `problems` holds one complete line per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- showing values

_SCHEME_HOST_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/]*)")
_REST_USER_RE = re.compile(r"/rest/\d+/")


def redact_url(url: str) -> str:
    """`url` with everything that may be secret removed, for messages and logs.

    After ``/rest/<user id>/`` comes the webhook secret, which becomes ``<secret>``; a URL
    without that part shows only ``scheme://host[:port]/...``. Credentials in the host part,
    the query and the fragment are always dropped.
    """
    text = re.split(r"[?#]", url.strip(), maxsplit=1)[0]
    head, path = "", text
    scheme_host = _SCHEME_HOST_RE.match(text)
    if scheme_host is not None:
        head = scheme_host[1] + scheme_host[2].rpartition("@")[2]
        path = text[scheme_host.end() :]
    rest_user = _REST_USER_RE.search(path)
    if rest_user is not None:
        tail = path[rest_user.end() :]
        hidden = ("<secret>/" if tail.endswith("/") else "<secret>") if tail else ""
        return head + path[: rest_user.end()] + hidden
    if head:
        return head + ("/..." if path.strip("/") else path)
    return "<redacted>"


def show(value: object) -> str:
    """`value` as a message shows it: YAML-like scalars, strings quoted, URLs redacted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 200:
        return "a very large integer"  # repr() of one over 4300 digits raises
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        if "://" in value or "/rest/" in value:
            value = redact_url(value)
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, list):
        if not value:
            return "[]"
        if len(value) <= 5 and not any(isinstance(item, list | dict) for item in value):
            return "[" + ", ".join(show(item) for item in value) + "]"
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return "{}" if not value else "a mapping"
    return repr(str(value))


_YAML_WORDS: Final[TypeWords] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "a list"),
    (dict, "a mapping"),
    (type(None), "null"),
)


def kind(value: object) -> str:
    """What sort of value `value` is, for secrets whose content must not be echoed."""
    if isinstance(value, str) and not value.strip():
        return "an empty string"
    return type_word(value, _YAML_WORDS)


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Loc:
    """Where a value sits: file, dotted key path, and a sort key in document order."""

    source: str
    path: str = ""
    order: tuple[int, ...] = ()

    def key(self, name: object, index: int = 0) -> Loc:
        shown = str(name)
        if not shown.isprintable():
            shown = repr(shown)  # a key with a newline must not split its problem's line
        path = f"{self.path}.{shown}" if self.path else shown
        return Loc(self.source, path, (*self.order, index))

    def item(self, index: int) -> Loc:
        return Loc(self.source, f"{self.path}[{index}]", (*self.order, index))

    def missing(self, name: str) -> Loc:
        # -1 sorts a missing key after its parent's own problems and before its siblings.
        return self.key(name, -1)


class Problems:
    """Every problem found so far, each one finished line, listed in document order."""

    def __init__(self) -> None:
        self._items: list[tuple[tuple[int, ...], int, str]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, loc: Loc, problem: str, shown: str | None = None) -> None:
        """Record `problem` at `loc`, with ``, got <shown>`` when something is shown."""
        where = f"{loc.source}: {loc.path}: " if loc.path else f"{loc.source}: "
        self.add_line(loc, where + problem + ("" if shown is None else f", got {shown}"))

    def add_line(self, loc: Loc, line: str) -> None:
        """Record a finished line (a YAML error already names file, line and column)."""
        self._items.append((loc.order, len(self._items), line))

    def lines(self) -> list[str]:
        return [line for _, _, line in sorted(self._items)]


class _Bad(enum.Enum):
    BAD = "BAD"


class _Show(enum.Enum):
    SHOW = "SHOW"


# Stands in for a value whose problem is already reported (an unset ${VAR}, a bad entry), so
# later checks stay quiet about it instead of piling on follow-up errors.
BAD: Final = _Bad.BAD
# `Node.fail`'s default: show the value itself.
_SHOW: Final = _Show.SHOW


class Invalid(Exception):
    """A value is abandoned; its problems are already recorded."""


@dataclass(frozen=True)
class Context:
    """What checkers of one file share: the problems found, and where its relative paths start."""

    problems: Problems
    base_dir: Path


@dataclass(frozen=True)
class Node:
    """A value of the document, where it sits, and its file's context."""

    value: object
    loc: Loc
    context: Context

    @property
    def base_dir(self) -> Path:
        return self.context.base_dir

    def report(self, problem: str, *, shown: str | _Show | None = _SHOW) -> None:
        """Record `problem` here; `shown` defaults to the value as `show` shows it."""
        self.context.problems.add(self.loc, problem, show(self.value) if shown is _SHOW else shown)

    def fail(self, problem: str, *, shown: str | _Show | None = _SHOW) -> NoReturn:
        """Record `problem` here and abandon the value."""
        self.report(problem, shown=shown)
        raise Invalid

    def items(self, form: str) -> list[Node]:
        """The items of a list, each with its place; `form` is the problem if not a list."""
        if not isinstance(self.value, list):
            self.fail(form)
        return [Node(v, self.loc.item(i), self.context) for i, v in enumerate(self.value)]

    def entries(self, form: str) -> list[tuple[Hashable, Node]]:
        """The keys and values of a mapping; `form` is the problem if not a mapping."""
        if not isinstance(self.value, dict):
            self.fail(form)
        return [
            (key, Node(value, self.loc.key(key, index), self.context))
            for index, (key, value) in enumerate(self.value.items())
        ]

    def child(self, key: str) -> Node | None:
        """The value under `key` of a mapping, or None when it is not a mapping or not set."""
        if isinstance(self.value, dict):
            for index, (name, value) in enumerate(self.value.items()):
                if name == key and value is not None:
                    return Node(value, self.loc.key(name, index), self.context)
        return None


T_co = TypeVar("T_co", covariant=True)


class Check(Protocol[T_co]):
    """Reads a node into a field's type; on a bad value it calls `Node.fail`.

    A protocol rather than a Callable, so that mypy infers a `setting`'s type from its
    checker and its default together and holds the field to it.
    """

    def __call__(self, node: Node, /) -> T_co: ...


def run(check: Check[T], node: Node) -> T | _Bad:
    """`check(node)`, or BAD when the value was already bad or the check failed."""
    if node.value is BAD:
        return BAD
    try:
        return check(node)
    except Invalid:
        return BAD


def boolean(node: Node) -> bool:
    if not isinstance(node.value, bool):
        node.fail("must be true or false")
    return node.value


def one_of(allowed: Iterable[S]) -> Check[S]:
    """A checker for a string from `allowed` (typed as they are, Literal ones included)."""
    names = tuple(allowed)

    def check(node: Node) -> S:
        for name in names:
            if node.value == name:
                return name
        node.fail(f"must be one of {', '.join(names)}")

    return check


def each(node: Node, check: Check[T], *, form: str, unique: bool = True) -> tuple[T, ...]:
    """Every item of a list checked; with `unique`, an item equal to an earlier one is a
    problem. Fails after reporting every bad item."""
    values: list[T] = []
    ok = True
    for item in node.items(form):
        value = run(check, item)
        if value is BAD:
            ok = False
        elif unique and value in values:
            item.report("is listed twice")
            ok = False
        else:
            values.append(value)
    if not ok:
        raise Invalid
    return tuple(values)


def resolve_path(value: str, base_dir: Path) -> Path:
    """`value` as a path, relative to the file that names it, not to the working directory."""
    path = Path(value)
    # ~user of a user that does not exist stays as written (and is then not found).
    with contextlib.suppress(RuntimeError):
        path = path.expanduser()
    return base_dir / path


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class _Setting:
    """How one field is read: from `key` (None: the field's name) or one of `alternatives`."""

    check: Check[Any] | None
    key: str | None
    alternatives: tuple[tuple[str, Check[Any]], ...]
    required: bool


_METADATA: Final = "yamlcheck"


@overload
def setting(
    check: Check[T] | Mapping[str, Check[T]],
    *,
    key: str | None = None,
    default: T,
    repr: bool = True,
) -> T: ...
@overload
def setting(
    check: Check[T] | Mapping[str, Check[T]],
    *,
    key: str | None = None,
    default_factory: Callable[[], T],
    repr: bool = True,
) -> T: ...
@overload
def setting(
    check: Check[T] | Mapping[str, Check[T]], *, key: str | None = None, repr: bool = True
) -> T: ...
def setting(
    check: Check[Any] | Mapping[str, Check[Any]],
    *,
    key: str | None = None,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    repr: bool = True,
) -> Any:
    """A field read from the YAML key `key` (default: the field's name) by `check`.

    `check` may instead map several keys to checkers, of which at most one may be set
    (``webhook``, ``webhook_file`` or ``oauth``). Without a default the key is required.
    """
    required = default is dataclasses.MISSING and default_factory is dataclasses.MISSING
    if isinstance(check, Mapping):
        spec = _Setting(None, None, tuple(check.items()), required)
    else:
        spec = _Setting(check, key, (), required)
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        repr=repr,
        metadata={_METADATA: spec},
    )


@dataclass_transform(frozen_default=True, field_specifiers=(setting, dataclasses.field))
def section(cls: type[C]) -> type[C]:
    """A frozen dataclass that a YAML mapping becomes; its `setting` fields are its keys."""
    return dataclasses.dataclass(frozen=True)(cls)


@dataclass(frozen=True)
class _Read:
    """A field read from YAML: its name, its (key, checker) pairs, whether it is required."""

    name: str
    keys: tuple[tuple[str, Check[Any]], ...]
    required: bool


def _reads(cls: type[DataclassInstance]) -> list[_Read]:
    found = []
    for item in dataclasses.fields(cls):
        spec = item.metadata.get(_METADATA)
        if isinstance(spec, _Setting):
            keys = spec.alternatives
            if spec.check is not None:
                keys = ((spec.key or item.name, spec.check),)
            found.append(_Read(item.name, keys, spec.required))
    return found


def known_keys(cls: type[DataclassInstance]) -> list[str]:
    """The YAML keys of section `cls`, in declaration order."""
    return [key for read in _reads(cls) for key, _ in read.keys]


def either(keys: Iterable[str]) -> str:
    """``a, b or c``."""
    names = list(keys)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class Section:
    """A checked mapping, for checks across its keys (`build`'s `then`).

    `given` holds the keys that are set (null counts as not set); `failed` those among them
    whose value was bad, so that a check does not compare against a default standing in.
    """

    node: Node
    given: Mapping[str, Node]
    failed: frozenset[str]

    def has(self, key: str) -> bool:
        return key in self.given

    def ok(self, key: str) -> bool:
        """`key` is set and its value is good."""
        return key in self.given and key not in self.failed

    def usable(self, key: str) -> bool:
        """`key` is not set (its default applies) or its value is good."""
        return key not in self.failed

    def report(self, key: str, problem: str, *, shown: str | _Show | None = _SHOW) -> None:
        """Record `problem` at `key`, showing its value when set; at where it belongs if not."""
        if key in self.given:
            self.given[key].report(problem, shown=shown)
        else:
            loc = self.node.loc.missing(key)
            self.node.context.problems.add(loc, problem, None if shown is _SHOW else shown)


def build(
    cls: type[D],
    node: Node,
    *,
    form: str = "must be a mapping",
    then: Callable[[D, Section], D] | None = None,
) -> D:
    """`cls` from the mapping in `node`, or Invalid after reporting every problem.

    Each field is checked by its `setting`; a key no field declares is reported with the
    known ones. When every required field is good, `then` gets the instance (bad optional
    fields hold their defaults) and the `Section`, to check keys against each other and to
    return the final instance.
    """
    problems = node.context.problems
    before = len(problems)
    reads = _reads(cls)
    known = [key for read in reads for key, _ in read.keys]
    given: dict[str, Node] = {}
    for key, child in node.entries(form):
        if key not in known:
            problems.add(child.loc, f"unknown key (known: {', '.join(known)})")
        elif child.value is not None:
            given[str(key)] = child
    values: dict[str, object] = {}
    failed: set[str] = set()
    complete = True
    for read in reads:
        name, keys, required = read.name, read.keys, read.required
        # In the file's order, so the key written second is the one "combined with" the first.
        checks = dict(keys)
        present = [(key, checks[key]) for key in given if key in checks]
        if not present:
            if required and len(keys) == 1:
                problems.add(node.loc.missing(keys[0][0]), "is required")
            elif required:
                problems.add(node.loc, f"one of {either(k for k, _ in keys)} is required")
            complete = complete and not required
            continue
        for key, _ in present[1:]:
            rule = "exactly" if required else "at most"
            given[key].report(
                f"cannot be combined with {present[0][0]}; use {rule} one of "
                f"{either(k for k, _ in keys)}",
                shown=None,
            )
        results = [(key, run(check, given[key])) for key, check in present]
        failed.update(key for key, value in results if value is BAD)
        if len(results) == 1 and results[0][1] is not BAD:
            # The one place a dataclass is built from names: each value comes from the
            # checker its own field declares, and mypy checks that checker against the field.
            values[name] = results[0][1]
        else:
            complete = complete and not required
    if not complete:
        raise Invalid
    instance = cls(**values)
    if then is not None:
        instance = then(instance, Section(node, given, frozenset(failed)))
    if failed or len(problems) > before:
        raise Invalid
    return instance


def nested(
    cls: type[D],
    *,
    form: str = "must be a mapping",
    then: Callable[[D, Section], D] | None = None,
) -> Check[D]:
    """A checker for a field whose value is the section `cls`."""

    def check(node: Node) -> D:
        return build(cls, node, form=form, then=then)

    return check


def check_document(
    cls: type[D],
    data: object,
    *,
    source: str,
    base_dir: Path,
    form: str,
    then: Callable[[D, Section], D] | None = None,
    expand: Callable[[Loc, object, Problems], object] | None = None,
) -> D:
    """`cls` from the whole document `data` of file `source`, or ConfigError listing every
    problem in document order. `expand` may rewrite the data first (and report problems)."""
    problems = Problems()
    root = Loc(source, "", (0,))
    try:
        if expand is not None:
            data = expand(root, data, problems)
        result = run(
            nested(cls, form=form, then=then), Node(data, root, Context(problems, base_dir))
        )
    except RecursionError:
        # A YAML alias inside its own anchor (`a: &x [*x]`) makes the data contain itself.
        raise ConfigError(
            [f"{source}: nested too deeply, or an alias (*name) refers to its own anchor"]
        ) from None
    if result is BAD or len(problems):
        raise ConfigError(problems.lines())
    return result


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (which PyYAML lets the last one win) and turns
    integers too long for Python's int() into a YAML error with a line and column."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            # Keys from a `<<` merge may legitimately be overridden.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue
            if key in seen:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # int() refuses more than 4300 digits
            raise ConstructorError(
                None, None, "integer with too many digits", node.start_mark
            ) from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


def reason(err: OSError | ValueError) -> str:
    """Why a file could not be read, as a message says it (``No such file or directory``).

    ValueError is what a NUL byte in a path raises, and a file that is not UTF-8 text.
    """
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    return str(err.strerror if isinstance(err, OSError) and err.strerror else err)


def read_yaml(path: Path, shown: str) -> object:
    """The document in file `path`, named `shown` in messages; ConfigError with one line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as err:
        raise ConfigError([f"{shown}: cannot read file ({reason(err)})"]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except RecursionError:
        line = f"{shown}: invalid YAML: nested too deeply"
    except yaml.reader.ReaderError as err:
        # A character YAML does not allow (a NUL byte, say); the reader counts characters.
        before = text[: err.position]
        where = f"{shown}:{before.count(chr(10)) + 1}:{len(before) - before.rfind(chr(10))}"
        code = err.character if isinstance(err.character, int) else ord(err.character)
        line = f"{where}: invalid YAML: character {code:#06x} is not allowed"
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        what = err.problem or err.context or "cannot parse"
        if err.problem and err.context:
            what += f" ({err.context})"
        line = f"{where}: invalid YAML: {what}"
    except yaml.YAMLError as err:
        line = f"{shown}: invalid YAML: {' '.join(str(err).split())}"
    raise ConfigError([line])
