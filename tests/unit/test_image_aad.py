"""The hot path's cached associated data must be byte-identical to `image_aad` (which `reveal` uses)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from guard.protect.aad import ImageAad, image_aad

text = st.text(max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(text, text, st.binary(max_size=20), st.sampled_from(["before", "after"]), text,
                          st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=8))
def test_cached_aad_equals_the_reference(calls):
    field_lists = [["a"], ["a", "b"], ["name", "id_number"], []]
    aad = ImageAad()
    for topic, table, row_key, image, subject, which, version in calls + calls:
        fields = field_lists[which]
        assert aad(topic, table, row_key, image, subject, fields, version) == \
            image_aad(topic, table, row_key, image, subject, fields, version)
