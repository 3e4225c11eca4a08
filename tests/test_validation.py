"""Settings that used to break quietly now fail where they are parsed, naming the setting and its
allowed range; and "SparQ at 1/N" is built by one function everywhere (issue 10, item 4)."""

from __future__ import annotations

import math

import pytest

from sparq import SparQConfig
from sparq.tools.generation import make_method
from sparq.methods import H2O, Quest, SparQ, SparQSketch, Streaming, TopK, budget_label, build_method, parse_budget


@pytest.mark.parametrize("spec, match", [
    ("sparq-sketch:bits=0", r"sparq-sketch option bits must be an integer in \[1, 8\], got 0"),
    ("sparq-sketch:bits=9", r"bits must be an integer in \[1, 8\]"),
    ("sparq-sketch:bits=x", r"sparq-sketch option bits must be an integer in \[1, 8\], got 'x'"),
    ("sparq-sketch:block=0", r"sparq-sketch option block must be an integer >= 1, got 0"),
    ("sparq-sketch:local=2", r"sparq-sketch option local must be a number in \[0, 1\], got '2'"),
    ("sparq-sketch:realloc=maybe", r"sparq-sketch option realloc must be a boolean"),
    ("quest:page=-3", r"quest option page .*must be an integer >= 0, got -3"),
    ("quest:page=1.5", r"quest option page .*must be an integer"),
    ("streaming:sinks=-1", r"streaming option sinks must be an integer >= 0, got -1"),
    ("h2o:recent=5", r"h2o option recent must be a number in \[0, 1\], got '5'"),
    ("h2o:recent=nan", r"h2o option recent must be a number in \[0, 1\]"),
    ("topk:min_k=0", r"topk option min_k must be an integer >= 1, got 0"),
    ("sparq:r=0", r"sparq option r must be an integer >= 1, got 0"),
    ("sparq:min_k=-5", r"sparq option min_k must be an integer >= 1"),
    ("sparq:local=1.5", r"sparq option local must be a number in \[0, 1\]"),
    ("sparq:bits=2", r"unknown option\(s\) for sparq: bits \(it takes: r, min_k, local, realloc\)"),
    ("magic", r"unknown method 'magic'"),
    ("sparq-skech", r"did you mean sparq-sketch"),
])
def test_bad_method_options_name_the_option(spec, match):
    with pytest.raises(ValueError, match=match):
        build_method(spec, "1/8", 64)


@pytest.mark.parametrize("make, match", [
    (lambda: SparQSketch(0.125, bits=0), "bits"),
    (lambda: SparQSketch(0.125, block=0), "block"),
    (lambda: SparQSketch(0.125, local_fraction=2.0), "local_fraction"),
    (lambda: SparQSketch(0.0), "fraction"),
    (lambda: Streaming(0.125, sinks=-1), "sinks"),
    (lambda: H2O(0.125, recent_fraction=5), "recent_fraction"),
    (lambda: Quest(0.125, page_size=-3), "page_size"),
    (lambda: TopK(1.5), "fraction"),
    (lambda: TopK(0.125, min_k=0), "min_k"),
])
def test_method_classes_check_their_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_quest_page_option_still_works():
    assert build_method("quest:page=32", "1/8", 64).page == 32
    assert build_method("quest:page=0", "1/8", 64).page == 16  # 0 = automatic


@pytest.mark.parametrize("field, value", [("k_fraction", "0.1"), ("local_fraction", "0.5"), ("k_fraction", None),
                                          ("local_fraction", True)])
def test_config_float_fields_raise_type_error_naming_the_field(field, value):
    with pytest.raises(TypeError, match=f"SparQConfig.{field} must be a number"):
        SparQConfig(r=2, k=4, **{field: value})


@pytest.mark.parametrize("kwargs, match", [
    (dict(r="2", k=4), "SparQConfig.r must be an int"),
    (dict(r=2, k=4.0), "SparQConfig.k must be an int"),
    (dict(r=2, k=4, head_dim=0), "SparQConfig.head_dim must be >= 1"),
    (dict(r=2, k=4, head_dim=64.0), "SparQConfig.head_dim must be an int"),
])
def test_config_fields(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SparQConfig(**kwargs)


@pytest.mark.parametrize("args, kwargs, match", [
    ((True, 64), {}, "compression"),
    ((math.inf, 64), {}, "compression"),
    ((-math.inf, 64), {}, "compression"),
    ((math.nan, 64), {}, "compression"),
    ((0.99, 64), {}, "compression"),
    (("8", 64), {}, "compression"),
    ((8, 64), dict(min_k=-5), "min_k"),
    ((8, 64), dict(min_k=0), "min_k"),
    ((8, 64), dict(min_k=16.0), "min_k"),
    ((8, 64), dict(local_fraction="0.25"), "local_fraction"),
    ((8, 64), dict(local_fraction=1.5), "local_fraction"),
    ((8, 64), dict(r=0), "r must be"),
    ((8, True), {}, "head_dim"),
])
def test_from_compression_rejects(args, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SparQConfig.from_compression(*args, **kwargs)


def test_from_compression_rule():
    c = SparQConfig.from_compression(8, 128)
    assert (c.r, c.k, c.k_fraction, c.local_fraction, c.reallocate, c.head_dim) == (16, 64, 1 / 16, 0.25, False, 128)
    dense = SparQConfig.from_compression(1, 64)  # the whole budget is every position: dense attention
    assert dense.k_for(10_000) == 10_000 and dense.data_fraction(10_000, 64) == 1.0
    explicit = SparQConfig.from_compression(8, 64, r=16)  # k takes what r leaves: 1/8 - 16/128 = 0
    assert explicit.r == 16 and explicit.k_fraction == 0.0
    r4 = SparQConfig.from_compression(4, 64, r=8)
    assert r4.data_fraction(1 << 16, 64) == pytest.approx(1 / 4, abs=1e-3)


@pytest.mark.parametrize("text, value, label", [
    ("1/8", 0.125, "1/8"), ("8", 0.125, "1/8"), (8, 0.125, "1/8"), ("0.125", 0.125, "1/8"), (0.125, 0.125, "1/8"),
    ("1", 1.0, "1"), ("16", 1 / 16, "1/16"), ("2", 0.5, "1/2"),
])
def test_budget_accepts_fraction_or_ratio(text, value, label):
    assert parse_budget(text) == value
    assert budget_label(text) == label


@pytest.mark.parametrize("bad", ["0", "-8", "3/2", "x", "1/0", "", True])
def test_bad_budgets(bad):
    with pytest.raises(ValueError, match="budget must be"):
        parse_budget(bad)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_budget_rule(d, n):
    """`sparq generate --compression N` (make_method), `sparq eval --budgets 1/N` (build_method) and
    the Python API (SparQConfig.from_compression) build the identical config."""
    want = SparQConfig.from_compression(n, head_dim=d)
    for compression in (n, float(n), str(n), f"1/{n}"):
        assert make_method("sparq", d, compression=compression) == SparQ(want)
    for budget in (f"1/{n}", 1 / n, str(n)):
        assert build_method("sparq", budget, d) == SparQ(want)
    # options are passed through to the same function
    assert build_method("sparq:realloc=1:min_k=16", f"1/{n}", d).config == SparQConfig.from_compression(
        n, d, reallocate=True, min_k=16)
    assert make_method("sparq", d, compression=n, reallocate=True, r=4).config == SparQConfig.from_compression(
        n, d, reallocate=True, r=4)


def test_make_method_explicit_settings_are_sparq_only():
    with pytest.raises(ValueError, match="r applies to the sparq method only, not h2o"):
        make_method("h2o", 64, r=4)
    with pytest.raises(ValueError, match="k, reallocate apply to the sparq method only"):
        make_method("dense", 64, k=4, reallocate=False)
    with pytest.raises(ValueError, match="either in the spec"):
        make_method("sparq:r=4", 64, r=4)
    fixed = make_method("sparq", 64, compression=8, k=32, local_window=4).config
    assert (fixed.k, fixed.k_fraction, fixed.local_window, fixed.local_fraction, fixed.r) == (32, 0.0, 4, 0.0, 8)


def test_config_fractions_accept_any_real_number_and_store_floats():
    from fractions import Fraction

    import numpy as np

    c = SparQConfig(r=2, k=4, k_fraction=Fraction(1, 8), local_fraction=np.float32(0.25))
    assert type(c.k_fraction) is float and type(c.local_fraction) is float
    assert (c.k_fraction, c.local_fraction) == (0.125, 0.25)
