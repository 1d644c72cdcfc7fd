import pytest

from qbert.nn import FORMATS, LinearFormat, linear_format

W4A16 = {"name": "w4a16", "weight_bits": 4, "activation_bits": None, "symmetric": False, "group_size": 128,
         "row_groups": None}


def test_every_named_format_passes_its_own_checks():
    assert all(LinearFormat.from_dict(fmt.to_dict()) == fmt for fmt in FORMATS.values())


@pytest.mark.parametrize("fields,error,match", [
    ({"name": b"w4a16"}, TypeError, "name must be str, got bytes"),
    ({"weight_bits": 4.0}, TypeError, "weight_bits must be int, got float 4.0"),
    ({"activation_bits": False}, TypeError, "activation_bits must be int or None, got bool False"),
    ({"symmetric": None}, TypeError, "symmetric must be bool, got NoneType None"),
    ({"group_size": 128.0}, TypeError, "group_size must be int or None, got float 128.0"),
    ({"row_groups": "4", "group_size": None}, TypeError, "row_groups must be int or None, got str '4'"),
    ({"activation_bits": 4}, ValueError, r"activation_bits must be 8 \(int8 per token\) or None"),
    ({"weight_bits": 3}, ValueError, r"weight_bits=3, activation_bits=None \(a w3a16 format\) contradicts the "
                                     r"mode 'w4a16'"),
    ({"name": "w8a8", "weight_bits": 8, "activation_bits": 8}, ValueError,
     "w8a8 is per-channel symmetric int8 and takes no group_size"),
], ids=["name", "bits", "act-bool", "symmetric", "group", "rows", "a4", "contradiction", "packed-w8a8"])
def test_a_format_no_op_serves_is_refused(fields, error, match):
    with pytest.raises(error, match=f"^LinearFormat: {match}"):
        LinearFormat(**{**W4A16, **fields})
