"""Answer scorers for text: numeric, multiple choice, exact and regular-expression match.

Each scorer is a plain function ``(response, reference, **options) -> bool`` and carries an
``extract`` attribute, ``(response, **options) -> str | None``, giving the normalised answer it
read (the key majority voting groups rollouts by). A reference that cannot be read is the
data's fault and raises ``ScoringError``; a response without a readable answer scores False.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction
from numbers import Rational
from typing import Any

import numpy as np

from canopy_entropy.errors import CanopyError


class ScoringError(CanopyError):
    """A reference, scorer option or scorer result that cannot be used."""


def _with_extractor(extract: Callable[..., str | None]):
    def attach(fn):
        fn.extract = extract
        return fn

    return attach


# ---------------------------------------------------------------------------------------
# numeric answers
# ---------------------------------------------------------------------------------------
_NUMBER = re.compile(
    r"""
    (?:(?<![\w)\]}])(?P<sign>[-+]))?      # a sign, unless it is a binary minus ("3-5")
    [$€£¥]?                               # a currency symbol
    (?<![\d.])                            # never start inside another number
    (?P<num>
        \d{1,3}(?:,\d{3})+(?![\d])(?:\.\d+)?   # thousands separators: 1,234,567.5
      | \d+(?:\.\d+)?(?:/\d+(?![.\d]))?        # 42, 3.14, 3/4
      | \.\d+                                  # .5
    )
    """,
    re.VERBOSE,
)
_GSM8K_MARK = "####"
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_THIN = re.compile(r"(?<=\d)(?:\{,\}|\\[,!])(?=\d{3})")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2012": "-"})


def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _numbers(text: str) -> list[Fraction]:
    """Every number written in ``text``, in order, as exact fractions."""
    text = _LATEX_THIN.sub(",", _LATEX_FRAC.sub(r"\1/\2", text.translate(_MINUS)))
    text = text.replace("\\$", "$").replace("\\%", "%")
    out = []
    for m in _NUMBER.finditer(text):
        num = m["num"].replace(",", "")
        try:
            value = Fraction(num)
        except ZeroDivisionError:  # "3/0": read the numerator alone
            value = Fraction(num.split("/")[0])
        out.append(-value if m["sign"] == "-" else value)
    return out


def extract_number(response: str) -> Fraction | None:
    """The final numeric answer of ``response``, exactly, or None when it states none.

    Read from, in order: the first number after the first ``####`` (GSM8K), the last number in
    the last ``\\boxed{}``, the first number after the last "answer is"/"answer:", else the last
    number in the text. Thousands commas, currency symbols, unit words, a trailing period,
    ``%`` and ``\\frac{a}{b}`` are tolerated; words ("twelve") and ``1.234,5`` are not read.
    """
    text = str(response)
    if _GSM8K_MARK in text:
        found = _numbers(text.split(_GSM8K_MARK, 1)[1])
        return found[0] if found else None
    boxed = _boxed(text)
    if boxed is not None:
        found = _numbers(boxed)
        return found[-1] if found else None
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        found = _numbers(text[phrases[-1].end() :].split("\n", 1)[0])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def _reference_number(reference: Any) -> Fraction:
    if isinstance(reference, (bool, np.bool_)):
        raise ScoringError(f"numeric reference {reference!r} is a boolean; give the number")
    if isinstance(reference, (int, np.integer)):
        return Fraction(int(reference))
    if isinstance(reference, Rational):
        return Fraction(reference)
    if isinstance(reference, (float, np.floating, Decimal)):
        if not np.isfinite(float(reference)):
            raise ScoringError(f"numeric reference {reference!r} is not a finite number")
        return Fraction(str(reference))  # 0.1 means one tenth, not its binary approximation
    if isinstance(reference, str):
        value = extract_number(reference)
        if value is not None:
            return value
    raise ScoringError(
        f"numeric reference {reference!r} holds no number; give a number, or a solution "
        "ending in '#### <number>'"
    )


def _number_key(response: str) -> str | None:
    value = extract_number(response)
    return None if value is None else str(value)


@_with_extractor(_number_key)
def numeric_match(response: str, reference: Any) -> bool:
    """Whether the final number of ``response`` (see ``extract_number``) equals ``reference``
    exactly (as fractions: ``18.00`` equals ``18``, ``0.5`` equals ``1/2``).

    ``reference`` is a number or a text read the same way (a GSM8K solution with ``####``).
    """
    expected = _reference_number(reference)
    value = extract_number(response)
    return value is not None and value == expected


# ---------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# "answer is (B)", "Answer: B", "correct option is [c]", "answer: b."; a lower-case letter
# counts only bracketed or closing the sentence, so "the answer is a dog" names no option
_CHOICE_PHRASE = re.compile(
    r"(?i:\banswer\b(?:\s+is)?|\b(?:correct|right|best)\s+(?:option|choice)(?:\s+is)?)"
    r"\s*[:=]?\s*(?i:(?:option|choice)\s+)?"
    r"(?:[(\[]\s*([A-Za-z])\s*[)\]]|([A-Z])(?![\w'])|([a-z])(?=\s*(?:$|[.,;!\n])))"
)
_LEADING_LETTER = re.compile(r"^\W*?[(\[]?([A-Z])(?:[)\].:]|\s*$|\s+[-–:])")
_PAREN_LETTER = re.compile(r"[(\[]([A-Z])[)\]]")


def _letters(options: Sequence[str] | None) -> str:
    if options is None:
        return _LETTERS
    if not 1 <= len(options) <= len(_LETTERS):
        raise ScoringError(f"{len(options)} options given; a multiple choice needs 1 to 26")
    return _LETTERS[: len(options)]


def normalise_text(text: str, *, ignore_case: bool = True, ignore_punctuation: bool = False):
    """Unicode-normalised (NFKC) text with runs of whitespace collapsed and ends stripped,
    case-folded and punctuation removed on request."""
    text = unicodedata.normalize("NFKC", str(text))
    if ignore_punctuation:
        text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    text = " ".join(text.split())
    return text.casefold() if ignore_case else text


def extract_choice(response: str, options: Sequence[str] | None = None) -> str | None:
    """The option letter ``response`` chooses, or None when it names none or several.

    Read from, in order: the last "answer is (B)"/"Answer: B"/"option B"; a letter opening the
    response ("B", "(B)", "B.", "B) Paris"); the one distinct letter in parentheses; else, with
    ``options``, the one option whose text appears (the longest when one contains another).
    Letters outside the options are ignored; a hedge naming two options reads as None.
    """
    text = str(response)
    allowed = _letters(options)
    phrases = [
        letter.upper()
        for m in _CHOICE_PHRASE.finditer(text)
        if (letter := m[1] or m[2] or m[3]).upper() in allowed
    ]
    if phrases:
        return phrases[-1]
    lead = _LEADING_LETTER.match(text.strip())
    if lead and lead[1] in allowed:
        return lead[1]
    paren = {m[1] for m in _PAREN_LETTER.finditer(text)} & set(allowed)
    if len(paren) == 1:
        return paren.pop()
    if paren or options is None:
        return None
    said = f" {normalise_text(text, ignore_punctuation=True)} "
    named = [
        (len(opt), i)
        for i, opt in enumerate(normalise_text(o, ignore_punctuation=True) for o in options)
        if opt and f" {opt} " in said
    ]
    if not named:
        return None
    named.sort(reverse=True)
    longest = options[named[0][1]]
    rest = [options[i] for _, i in named[1:]]
    inner = normalise_text(longest, ignore_punctuation=True)
    if all(normalise_text(o, ignore_punctuation=True) in inner for o in rest):
        return allowed[named[0][1]]
    return None


def _reference_letter(reference: Any, options: Sequence[str] | None) -> str:
    allowed = _letters(options)
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, (bool, np.bool_)):
        if 0 <= int(reference) < len(allowed):
            return allowed[int(reference)]
    elif isinstance(reference, str):
        ref = reference.strip()
        bare = ref.strip("()[]. ")
        if len(bare) == 1 and bare.upper() in allowed:
            return bare.upper()
        if options is not None:
            wanted = normalise_text(ref)
            for i, opt in enumerate(options):
                if normalise_text(opt) == wanted:
                    return allowed[i]
            if ref.isdigit() and int(ref) < len(options):  # HellaSwag stores labels as "2"
                return allowed[int(ref)]
    raise ScoringError(
        f"multiple-choice reference {reference!r} is not an option letter "
        f"{allowed[0]}-{allowed[-1]}, a 0-based option index or one of the option texts"
    )


@_with_extractor(extract_choice)
def choice_match(response: str, reference: Any, options: Sequence[str] | None = None) -> bool:
    """Whether ``response`` chooses the reference option (see ``extract_choice``).

    ``reference`` is a letter ("B", "(B)"), a 0-based index (2 or "2") or, with ``options``,
    the option's text.
    """
    expected = _reference_letter(reference, options)
    return extract_choice(response, options) == expected


# ---------------------------------------------------------------------------------------
# exact and regular-expression match
# ---------------------------------------------------------------------------------------
def _references(reference: Any) -> list[str]:
    if isinstance(reference, str):
        return [reference]
    if isinstance(reference, (Sequence, np.ndarray)) and len(reference) > 0:
        if all(isinstance(r, str) for r in reference):
            return list(reference)
    raise ScoringError(
        f"reference {reference!r} is not a text or a non-empty list of accepted texts"
    )


def _exact_key(
    response: str, *, ignore_case: bool = True, ignore_punctuation: bool = False
) -> str | None:
    return normalise_text(response, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)


@_with_extractor(_exact_key)
def exact_match(
    response: str,
    reference: str | Sequence[str],
    *,
    ignore_case: bool = True,
    ignore_punctuation: bool = False,
) -> bool:
    """Whether ``response`` equals the reference (or one of a list of accepted answers) after
    ``normalise_text``: whitespace always collapsed, case ignored unless ``ignore_case=False``,
    punctuation only with ``ignore_punctuation=True``."""
    said = _exact_key(response, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)
    return any(
        said == normalise_text(r, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)
        for r in _references(reference)
    )


def _compile(pattern: Any, flags: int) -> re.Pattern[str]:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ScoringError(f"regular expression {pattern!r} is not a text")
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ScoringError(f"invalid regular expression {pattern!r}: {exc}") from None


def _regex_key(response: str, *, pattern: str | None = None, flags: int = 0) -> str | None:
    if pattern is None:
        return None  # the reference is the pattern: there is no answer to vote on
    found = list(_compile(pattern, flags).finditer(str(response)))
    if not found:
        return None
    last = found[-1]
    return normalise_text(last[1] if last.re.groups else last[0])


@_with_extractor(_regex_key)
def regex_match(
    response: str, reference: Any, *, pattern: str | None = None, flags: int = 0
) -> bool:
    """Regular-expression scoring, in one of two modes.

    Without ``pattern`` the reference is a regular expression that must occur in the response
    (``re.search``). With ``pattern`` its last match in the response (group 1 if it has groups)
    is the answer, compared with the reference text(s) like ``exact_match``.
    """
    if pattern is None:
        return _compile(reference, flags).search(str(response)) is not None
    said = _regex_key(response, pattern=pattern, flags=flags)
    return said is not None and any(said == normalise_text(r) for r in _references(reference))
