"""Option groups: the rarer options also come grouped, with one value each."""

from __future__ import annotations

import inspect
import re

import pytest

import zarrdali
from storefactory import VarSpec
from zarrdali.options import OPTION_GROUPS, grouped_option_names, merge_option_groups


@pytest.fixture
def store(make_store):
    return make_store(VarSpec("a", shape=(6, 16, 16), chunks=(1, 8, 8)))


def test_every_group_field_is_a_constructor_argument_with_the_same_default():
    params = inspect.signature(zarrdali.ZarrLoader).parameters
    for cls in OPTION_GROUPS.values():
        for name, field in cls.__dataclass_fields__.items():
            assert name in params, name
            assert params[name].default == field.default, name
    for group in OPTION_GROUPS:
        assert params[group].default is None


def test_a_group_sets_what_the_flat_arguments_leave_at_their_defaults(store):
    loading = zarrdali.LoadingOptions(workers=0, prefetch=3, partial_decode=False)
    remote = zarrdali.RemoteOptions(max_in_flight=8, request_timeout=7.0)
    gpu = zarrdali.GpuOptions(dali_threads=3)
    with zarrdali.ZarrLoader(
        store, ["a"], tile=8, device="cpu", loading=loading, remote=remote, gpu=gpu
    ) as loader:
        assert loader.workers == 0 and loader.prefetch == 3 and loader.partial_decode is False
        assert loader.store_ref.max_in_flight == 8 and loader.store_ref.request_timeout == 7.0
        assert loader.dali_threads == 3
        assert sum(1 for _ in loader) == len(loader)


def test_flat_and_grouped_give_the_same_loader(store):
    with zarrdali.ZarrLoader(store, ["a"], tile=8, device="cpu", workers=0, prefetch=4) as flat:
        want = [b["input"].numpy().copy() for b in flat]
    grouped_options = zarrdali.LoadingOptions(workers=0, prefetch=4)
    with zarrdali.ZarrLoader(store, ["a"], tile=8, device="cpu", loading=grouped_options) as g:
        got = [b["input"].numpy().copy() for b in g]
        assert g.prefetch == 4
    assert len(got) == len(want) and all((x == y).all() for x, y in zip(got, want, strict=True))


def test_the_same_value_twice_is_fine_and_two_values_are_an_error(store):
    with zarrdali.ZarrLoader(
        store, ["a"], tile=8, device="cpu", workers=0, loading=zarrdali.LoadingOptions(workers=0)
    ) as loader:
        assert loader.workers == 0
    with pytest.raises(zarrdali.ConfigError, match=r"prefetch=3 and loading\.prefetch=5"):
        zarrdali.ZarrLoader(
            store, ["a"], tile=8, prefetch=3, loading=zarrdali.LoadingOptions(prefetch=5)
        )


def test_a_group_of_the_wrong_kind_is_named(store):
    with pytest.raises(zarrdali.ConfigError, match=r"remote= takes a zarrdali\.RemoteOptions"):
        zarrdali.ZarrLoader(store, ["a"], tile=8, remote=zarrdali.GpuOptions())


def test_grouped_values_are_checked_as_flat_ones(store):
    with pytest.raises(zarrdali.ConfigError, match="max_in_flight must be >= 1"):
        zarrdali.ZarrLoader(store, ["a"], tile=8, remote=zarrdali.RemoteOptions(max_in_flight=0))


def test_merge_keeps_flat_values_without_groups():
    flat = {name: object() for name in grouped_option_names()}
    assert merge_option_groups({"loading": None, "remote": None, "gpu": None}, flat) == flat


def test_option_groups_are_documented_in_the_constructor():
    doc = zarrdali.ZarrLoader.__doc__  # Python 3.13 strips its indentation
    for group, cls in OPTION_GROUPS.items():
        assert re.search(rf"^\s+{group}: ", doc, re.MULTILINE) and cls.__name__ in doc
