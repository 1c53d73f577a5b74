"""Calculator tool: GSM8K-style arithmetic and str.count are computed; everything else is rejected (None), never run."""
import builtins

import pytest
from hypothesis import given, settings, strategies as st

VALID = [
    ("48/2", "24"), ("12*0.5+3", "9"), ("12/60", "0.2"), ("0.2*50", "10"), ("2/3", "0.666667"), ("0.1+0.2", "0.3"),
    ("7", "7"), ("-5+2", "-3"), ("-(3-10)", "7"), ("+4", "4"), ("(2+3)*(4-1)", "15"), ("2+3*4", "14"),
    ("17%5", "2"), ("-17%5", "3"), ("17//5", "3"), ("-17//5", "-4"), ("7.5//2", "3"), ("5.5%2", "1.5"),
    ("2**10", "1024"), ("2**-2", "0.25"), ("2**0.5", "1.414214"), ("10**15", "1000000000000000"),
    ("1,200*3", "3600"), ("1,000,000/4", "250000"), (" 3 * 4 ", "12"), ("100*1.07", "107"),
    ("-1e-9", "0"), ("1e-9*1", "0"), ("0.000001*1", "0.000001"), ("3-3.5", "-0.5"),
    ("'strawberry'.count('r')", "3"), ('"banana".count("an")', "2"), ("'abc'.count('z')", "0"),
    ("'abc'.count('')", "4"), ("'strawberry'.count('r')*2+1", "7"),
]

HOSTILE = [
    # attribute access other than str.count, dunders
    "().__class__", "'a'.__class__", "(1).real", "'a'.upper()", "'a'.count", "'abc'.__len__()",
    "().__class__.__bases__[0].__subclasses__()", "'a'.count.__self__", "(1).__add__(2)",
    # names, calls to anything else, imports
    "x", "x+1", "__import__('os')", "__import__('os').system('true')", "print(1)", "open('x')", "len('abc')",
    "abs(-1)", "import os", "from os import path",
    # count with the wrong shape
    "'abc'.count('a', 1)", "'abc'.count(x='a')", "'abc'.count('a', x=1)", "'abc'.count(1)", "'abc'.count('a','b')",
    "('a'+'b').count('a')", "'abc'.count(*'a')", "'abc'.count()", "x.count('a')", "b'abc'.count(b'a')",
    # lambdas, comprehensions, containers, subscripts, f-strings, walrus, conditionals
    "lambda: 1", "(lambda: 1)()", "[x for x in (1,2)]", "{x for x in (1,)}", "(x for x in (1,))", "[1, 2]",
    "(1, 2)", "1,2", "{1: 2}", "'abc'[0]", "(1,2)[0]", "f'{1+1}'", "f'{().__class__}'", "(y := 3)", "1 if 1 else 2",
    # huge powers and results
    "9**9**9", "2**1000000", "10**400", "2**65", "10**16", "1e400", "1e308*10", "99999999*99999999", "(10**15)**64.0",
    "10**15+1", "-(10**15)-1",
    # deep nesting and long input
    "(" * 500 + "1" + ")" * 500, "-" * 500 + "1", "1+" * 150 + "1", "+".join(["1"] * 60),
    # strings: no operator accepts one, and a bare string is not a number
    "'a'*10**9", "('a'*10**9).count('a')", "'a'+'b'", "'abc'", "-'a'", "'%d' % 5",
    # other literal kinds
    "b'abc'", "1j", "2+1j", "True", "False+1", "None", "...",
    # boolean ops, comparisons, bit ops
    "1 and 2", "1 or 0", "not 1", "1 < 2", "1 == 1", "1 is 1", "1 in (1,)", "1 & 3", "1 | 2", "1 ^ 3", "1 << 3",
    "~1", "1 @ 2",
    # arithmetic failures
    "1/0", "1//0", "1%0", "0**-1", "1.5/0", "(-8)**0.5", "1e308**2",
    # not expressions at all
    "", "   ", "1 +", "1\x00", "x = 1", "1; 2", "\n1\n2", "*a", "await x", "yield 1",
]


@pytest.mark.parametrize("expr,expected", VALID)
def test_valid_expressions(stack, expr, expected):
    assert stack.calculate(expr) == expected


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_expressions_are_rejected(stack, expr):
    assert stack.calculate(expr) is None


def test_never_executes_the_string(stack, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the calculator must not execute its input")
    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    for expr, expected in VALID:
        assert stack.calculate(expr) == expected
    for expr in HOSTILE:
        assert stack.calculate(expr) is None


def test_limits_are_at_the_documented_bounds(stack):
    assert stack.calculate("2**64") is None and stack.calculate("1**64") == "1" and stack.calculate("1**65") is None
    assert stack.calculate(f"{stack.CALC_MAX_MAGNITUDE}") is not None
    assert stack.calculate(f"{stack.CALC_MAX_MAGNITUDE + 1}") is None
    long_ok = "1+" * 20 + "1"
    assert stack.calculate(long_ok) == "21"
    n = stack.CALC_MAX_CHARS - len("''.count('r')")
    assert stack.calculate("'" + "r" * n + "'.count('r')") == str(n)  # exactly CALC_MAX_CHARS characters
    assert stack.calculate("'" + "r" * (n + 1) + "'.count('r')") is None
    assert stack.calculate("+".join(["1"] * 60)) is None  # 60 literals: within CALC_MAX_CHARS, over CALC_MAX_NODES


TOKENS = ["1", "2", "0", "9", "48", "0.5", "1e308", "1e-9", "10**15", "+", "-", "*", "/", "//", "%", "**", "(", ")",
          " ", ",", ".", "'a'", "'strawberry'", ".count(", "'r')", "j", "x", "_", "__class__", "[", "]", "lambda",
          ":", "=", ":=", "not", "and", "<", "~", "f'", "{", "}", "\\", "\n", "#", "\x00", "é"]
SOUP = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), SOUP))
def test_fuzz_never_raises(stack, expr):
    out = stack.calculate(expr)
    assert out is None or isinstance(out, str)
    if out is not None:  # any answer is a plain number
        float(out)


def test_digit_group_commas_are_dropped_outside_string_literals_only(stack):
    assert stack.calculate("'1,234'.count(',')") == "1"  # before: the literal lost its comma, giving 0
    assert stack.calculate('"a,b,c".count(",")') == "2"
    assert stack.calculate("1,234*2") == "2468"


def test_overlong_input_is_refused_before_any_other_work(stack, monkeypatch):
    class Untouchable:
        def sub(self, *args):
            raise AssertionError("the comma regex ran on an input already too long")

        split = sub

    monkeypatch.setattr(stack, "DIGIT_GROUP_COMMA", Untouchable())
    monkeypatch.setattr(stack, "STRING_LITERAL", Untouchable())
    assert stack.calculate("1," * 5_000_000) is None  # 10 MB: 442 ms of regex before
