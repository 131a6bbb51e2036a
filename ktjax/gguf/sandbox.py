"""A jinja2 sandbox that also bounds the work, time and memory of one render.

jinja2's ImmutableSandboxedEnvironment blocks escapes but not exhaustion: a few bytes of
template can loop 10^10 times, build a 13 GB string or nest a list into itself until printing it
takes forever. Chat templates come from model files, so every render runs under a Budget:

- work: each loop iteration, call, filter, intercepted operator and built value costs one
  operation, and the render stops past `max_operations` or `max_seconds` (checked at each);
- size: every value a template builds (operators, filters, calls, literals, `~`, block bodies)
  is measured -- characters of strings, elements of containers, shared parts counted each
  time they appear, so printing or comparing any value is bounded -- and refused past
  `max_chars`; operations that could build a huge value in one C call (repetition, powers,
  padding widths, replace, join, indent, json indent, batch fill) are checked before they run;
- output: the rendered text is collected as it streams and refused past `max_chars`.

Since every single operation is bounded by the size limit, the time check between operations
holds the whole render to about `max_seconds`. Exceeding a limit raises LimitExceeded.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import string
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable

from jinja2 import pass_environment
from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.filters import do_sum
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MAX_INT_BITS = 1 << 14  # about Python's own limit on printing an int (4300 digits)
WRITE_FACTOR = 8


class LimitExceeded(Exception):
    """A render went past one of its Budget's limits (the message says which)."""


@dataclass
class Budget:
    """Limits of one render and what it has used so far."""

    max_operations: int = 1_000_000
    max_seconds: float = 2.0
    max_chars: int = 1 << 20
    max_range: int = 100_000
    operations: int = 0
    written: int = 0  # characters written to the output and to block buffers
    deadline: float = 0.0

    def start(self) -> None:
        self.operations = self.written = 0
        self.deadline = time.monotonic() + self.max_seconds

    def write(self, n: int) -> None:
        """Text is written once to the output and to each enclosing block's buffer: a
        template nests a few blocks, not hundreds, so WRITE_FACTOR x max_chars is ample."""
        self.written += n
        if self.written > WRITE_FACTOR * self.max_chars:
            raise LimitExceeded(f"more than {WRITE_FACTOR} x {self.max_chars} characters "
                                "written to the output and block buffers")

    def charge(self) -> None:
        self.operations += 1
        if self.operations > self.max_operations:
            raise LimitExceeded(f"more than {self.max_operations} operations")
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"more than {self.max_seconds:g} s")


_active = threading.local()
_DEFAULT = Budget()


def _budget() -> Budget | None:
    return getattr(_active, "budget", None)


def _limit() -> int:
    return (_budget() or _DEFAULT).max_chars


def _charge() -> None:
    b = _budget()
    if b is not None:
        b.charge()


def _leaf_size(v: Any) -> int:
    if isinstance(v, (str, bytes)):
        return max(1, len(v))
    if isinstance(v, int):
        return 1 + v.bit_length() // 4
    return 1


def _children(v: Any) -> Iterator | None:
    if isinstance(v, dict):
        return chain(v.keys(), v.values())
    if isinstance(v, (list, tuple, set, frozenset)):
        return iter(v)
    if isinstance(v, Namespace):
        return iter((object.__getattribute__(v, "_Namespace__attrs"),))
    return None


def size_of(value: Any, limit: int) -> int:
    """What `value` expands to when printed, compared or serialized: characters of strings,
    one per container, element or other object, shared parts counted each time they appear
    (but measured once: a list holding the same list twice, 40 levels deep, takes 40 steps).
    Stops once past `limit`; a value that holds itself counts as past it."""
    children = _children(value)
    if children is None:
        return _leaf_size(value)
    measured: dict[int, int] = {}        # id -> size of containers measured so far
    stack = [(value, children, [1])]     # (container, children left, [its size so far])
    total = 1                            # everything counted so far
    while stack and total <= limit:
        container, rest, acc = stack[-1]
        child = next(rest, _DONE)
        if child is _DONE:
            stack.pop()
            measured[id(container)] = acc[0]
            if stack:
                stack[-1][2][0] += acc[0]
            continue
        if id(child) in measured:
            n = measured[id(child)]
        elif (grand := _children(child)) is None:
            n = _leaf_size(child)
        elif any(child is frame[0] for frame in stack):
            return limit + 1
        else:
            stack.append((child, grand, [1]))
            total += 1
            continue
        acc[0] += n
        total += n
    return total


_DONE = object()


def _require(n: int, what: str) -> None:
    limit = _limit()
    if n > limit:
        raise LimitExceeded(f"{what} would hold about {n} characters or elements "
                            f"(the limit is {limit})")


def checked(value: Any) -> Any:
    """`value`, a product of the template, if its size is within the limit."""
    limit = _limit()
    if isinstance(value, str):
        if len(value) > limit:
            _require(len(value), "a string")
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise LimitExceeded(f"an integer of more than {MAX_INT_BITS} bits")
    elif isinstance(value, (list, tuple, dict, set, frozenset, Namespace)):
        _require(size_of(value, limit), "a value")
    return value


class _TextBuffer(list):
    """A block's output ({% set %} blocks, macros, loops with `loop`, filter blocks), counted
    as it is written, so a loop cannot pile up text in it unseen."""

    def append(self, piece: str) -> None:
        _written(len(piece))
        super().append(piece)

    def extend(self, pieces) -> None:
        pieces = list(pieces)
        _written(sum(len(p) for p in pieces))
        super().extend(pieces)


def _written(n: int) -> None:
    b = _budget()
    if b is not None:
        b.write(n)
    _require(n, "a piece of text")


def _range(*args: int) -> range:
    """range(), refused past the budget's max_range items (jinja's sandbox raises a plain
    OverflowError past 100000)."""
    r = range(*args)
    limit = (_budget() or _DEFAULT).max_range
    try:
        n = len(r)
    except OverflowError:
        n = limit + 1
    if n > limit:
        raise LimitExceeded(f"range() of more than {limit} items")
    return r


def _counted(items: Any) -> Iterator:
    """Iterate `items`, one operation per item."""
    for item in items:
        _charge()
        yield item


def _width_total(spec: str) -> int:
    return sum(int(d) for d in re.findall(r"\d+", spec))


def _check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """str.format: widths and precisions build text without bound; nested fields in a
    format spec (`{:{w}}`) are refused, since their width is not known in advance."""
    total = len(fmt) + sum(size_of(a, _limit()) for a in chain(args, kwargs.values()))
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        if spec and "{" in spec:
            raise LimitExceeded("a format field whose spec holds another field")
        total += _width_total(spec or "")
    _require(total, "a formatted string")


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str, args: Any) -> None:
    """`fmt % args`: as _check_format, `*` widths refused."""
    total = len(fmt) + size_of(args, _limit())
    for width, precision in _PERCENT_SPEC.findall(fmt):
        if "*" in (width, precision):
            raise LimitExceeded("a '*' width in %-formatting")
        total += int(width or 0) + int(precision or 0)
    _require(total, "a formatted string")


def _check_replace(s: str, old: str, new: str, count: int | None = None) -> None:
    n = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        n = min(n, count)
    _require(len(s) + n * len(new), "a replaced string")


def _check_method(method: Any, args: tuple, kwargs: dict) -> list | None:
    """Checks before a builtin str/int method that can build a large value runs. Returns
    join's iterable materialized (to measure it), else None."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if isinstance(owner, (str, bytes)):
        if name in ("center", "ljust", "rjust", "zfill") and args:
            _require(int(args[0]), f"str.{name}()")
        elif name == "expandtabs":
            _require(len(owner) * int(args[0] if args else kwargs.get("tabsize", 8)),
                     "str.expandtabs()")
        elif name == "replace" and len(args) >= 2:
            _check_replace(owner, *args[:3])
        elif name == "join" and args:
            items = list(args[0])
            _require(sum(size_of(i, _limit()) for i in items) + len(owner) * len(items),
                     "str.join()")
            return items
        elif name in ("format", "format_map") and isinstance(owner, str):
            if name == "format_map":
                args, kwargs = (), dict(args[0]) if args else {}
            _check_format(owner, args, kwargs)
        elif name == "translate":
            table = args[0] if args else {}
            longest = max((size_of(v, _limit()) for v in getattr(table, "values", list)()),
                          default=1)
            _require(len(owner) * longest, "str.translate()")
    elif isinstance(owner, int) and name == "to_bytes":
        _require(int(args[0] if args else kwargs.get("length", 1)), "int.to_bytes()")
    return None


def _check_filter(name: str, a: dict) -> dict | None:
    """Checks before a builtin filter runs; `a` its bound arguments. May return replacements
    (an iterable already materialized to measure it)."""
    limit = _limit()
    if name == "center":
        _require(int(a["width"]), "center()")
    elif name == "indent":
        width = a["width"]
        per_line = len(width) if isinstance(width, str) else int(width)
        _require(len(str(a["s"])) + (str(a["s"]).count("\n") + 1) * per_line, "indent()")
    elif name == "format":
        _check_percent(str(a["value"]), a["kwargs"] or a["args"])
    elif name == "replace":
        _check_replace(str(a["s"]), str(a["old"]), str(a["new"]), a["count"])
    elif name == "join":
        items = list(a["value"])
        _require(sum(size_of(i, limit) for i in items) + len(str(a["d"])) * len(items), "join()")
        return {"value": items}
    elif name == "batch":
        _require(int(a["linecount"]), "batch()")
    elif name == "wordwrap":
        s, wrap = str(a["s"]), a["wrapstring"]
        _require(len(s) + (len(s) + 1) * (1 if wrap is None else len(wrap)), "wordwrap()")
    elif name == "sum" and not isinstance(a["start"], (int, float)):
        items = list(a["iterable"])
        _require(size_of(a["start"], limit) + sum(size_of(i, limit) for i in items), "sum()")
        return {"iterable": items}
    return None


@pass_environment
def _sum_sequences(environment, iterable, attribute=None, start=0):
    """jinja's sum, but lists and tuples are joined in one pass (repeated `+` is quadratic)."""
    if isinstance(start, (list, tuple)) and attribute is None:
        items = list(iterable)
        if all(isinstance(i, type(start)) for i in items):
            return start + type(start)(chain.from_iterable(items))
    return do_sum(environment, iterable, attribute=attribute, start=start)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's tojson: non-ASCII kept as is (jinja's built-in escapes it for HTML). Streamed, so
    a huge indent or separator stops at the size limit instead of building the whole text."""
    if isinstance(indent, int) and not isinstance(indent, bool):
        _require(indent, "the json indent")
    limit, out, n = _limit(), [], 0
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                               sort_keys=sort_keys)
    for chunk in encoder.iterencode(value):
        n += len(chunk)
        if n > limit:
            _require(n, "tojson()")
        out.append(chunk)
    return "".join(out)


_CHECKED_FILTERS = {"center", "indent", "format", "replace", "join", "batch", "wordwrap", "sum"}


def _wrap_filter(name: str, f: Callable) -> Callable:
    signature = inspect.signature(f) if name in _CHECKED_FILTERS else None

    @functools.wraps(f)
    def filter_(*args, **kwargs):
        _charge()
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            replaced = _check_filter(name, bound.arguments)
            if replaced:
                bound.arguments.update(replaced)
                args, kwargs = bound.args, bound.kwargs
        result = f(*args, **kwargs)
        return _counted(result) if isinstance(result, Iterator) else checked(result)
    return filter_


class _BudgetedCodeGenerator(CodeGenerator):
    """Emits the template with its loops counted and its literals and `~` joins measured."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop_iterables: set[int] = set()  # ids of for loops' iterable nodes

    def buffer(self, frame):  # as CodeGenerator.buffer, with a counted list
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.text_buffer()")

    def visit_For(self, node, frame):
        self._loop_iterables.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node, *args, **kwargs):
        if id(node) not in self._loop_iterables:
            return super().visit(node, *args, **kwargs)
        self.write("environment.loop_items(")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    def _measured(self, visit, node, frame):
        self.write("environment.checked_value(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self._measured(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._measured(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx == "load":
            self._measured(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    def visit_Concat(self, node, frame):
        self.write("environment.checked_concat(context.eval_ctx, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, with every render's work, time and sizes bounded by the
    Budget passed to `render`."""

    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, **options):
        super().__init__(optimized=False, extensions=[loopcontrols], **options)
        self.globals.pop("lipsum", None)  # n paragraphs of lorem ipsum, n unbounded
        self.globals["range"] = _range
        self.filters = {name: _wrap_filter(name, f) for name, f in self.filters.items()}
        self.filters["sum"] = _wrap_filter("sum", _sum_sequences)
        self.filters["tojson"] = _wrap_filter("tojson", _tojson)

    # ---- hooks the generated code calls ----------------------------------------------------
    text_buffer = _TextBuffer

    @staticmethod
    def loop_items(items: Any) -> Iterator:
        return _counted(items)

    @staticmethod
    def checked_value(value: Any) -> Any:
        _charge()
        return checked(value)

    @staticmethod
    def checked_concat(eval_ctx, parts: tuple) -> str:
        _charge()
        _require(sum(size_of(p, _limit()) for p in parts), "a '~' join")
        return checked((markup_join if eval_ctx.autoescape else str_join)(parts))

    def concat(self, pieces) -> str:  # block bodies ({% set %} blocks, macros, filter blocks)
        pieces = list(pieces)
        _require(sum(len(p) for p in pieces), "a block's text")
        return "".join(pieces)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's convention)
        _charge()
        items = _check_method(getattr(__obj, "__wrapped__", __obj), args, kwargs)
        if items is not None:
            args = (items, *args[1:])
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (_counted(args[0]), *args[1:])
        return checked(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _charge()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    _require(size_of(seq, _limit()) * n, "a repetition")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise LimitExceeded(f"an integer of more than {MAX_INT_BITS} bits")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and right > 0 and abs(left) > 1 \
                and (left.bit_length() - 1) * right > MAX_INT_BITS:
            raise LimitExceeded(f"an integer of more than {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        return checked(super().call_binop(context, operator, left, right))

    # ---- rendering -------------------------------------------------------------------------
    def render(self, template, budget: Budget, **variables) -> str:
        """Render `template` (from this environment) within `budget`: the text streams and
        stops at budget.max_chars."""
        outer, _active.budget = _budget(), budget
        budget.start()
        try:
            out, n = [], 0
            for piece in template.generate(**variables):
                n += len(piece)
                if n > budget.max_chars:
                    raise LimitExceeded(f"the rendered text passed {budget.max_chars} "
                                        "characters")
                out.append(piece)
                budget.charge()
                budget.write(len(piece))
            return "".join(out)
        finally:
            _active.budget = outer


