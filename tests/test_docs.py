"""help() documents every argument of the public ops, their output dtype and the non-finite rule
(issue: `matryoshka_infonce` lacked q_mask / c_mask / backend, the loss module's forward had no
docstring, `maxsim_grouped` said float32 for float64 inputs, NaN behaviour was nowhere)."""
import inspect

import pytest

import metaembed_kernels as mk

DOCUMENTED = [mk.maxsim_grouped, mk.matryoshka_infonce, mk.maxsim_paired_grouped,
              mk.MatryoshkaInfoNCELoss.forward]


@pytest.mark.parametrize("fn", DOCUMENTED, ids=lambda f: f.__qualname__)
def test_every_argument_is_documented(fn):
    doc = inspect.getdoc(fn) or ""
    names = [n for n in inspect.signature(fn).parameters if n != "self"]
    missing = [n for n in names if n not in doc]
    assert not missing, f"{fn.__qualname__}: undocumented arguments {missing}"


@pytest.mark.parametrize("fn", [mk.maxsim_grouped, mk.maxsim_paired_grouped], ids=lambda f: f.__qualname__)
def test_output_dtype_names_float64_inputs(fn):
    assert "float64" in inspect.getdoc(fn)


@pytest.mark.parametrize("fn", [mk.maxsim_grouped, mk.matryoshka_infonce], ids=lambda f: f.__qualname__)
def test_non_finite_rule_is_documented(fn):
    doc = inspect.getdoc(fn)
    assert "NaN" in doc and "mask" in doc


@pytest.mark.parametrize("fn", [mk.maxsim, mk.maxsim_paired], ids=lambda f: f.__qualname__)
def test_full_budget_shortcuts_point_to_their_grouped_op(fn):
    assert "_grouped(" in inspect.getdoc(fn)
