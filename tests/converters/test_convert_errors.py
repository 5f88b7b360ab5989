"""A checkpoint that does not fit the model fails once, naming every offending key and shape."""

import numpy as np
import pytest
import torch
import torch_models as tm

from mergejax.converters import ConversionError, from_torch, to_torch


@pytest.fixture(scope="module")
def resnet8():
    """A ZipIt! ResNet-8 (w=1, 4 classes) state_dict as numpy arrays."""
    return {k: v.numpy() for k, v in tm.randomize(tm.ZipItResNet(8, 1, 4)).state_dict().items()}


def test_missing_and_unexpected_keys_are_listed_together(resnet8):
    sd = dict(resnet8)
    del sd["layer2.0.shortcut.0.weight"], sd["linear.bias"]
    sd["fc.weight"] = sd.pop("linear.weight")
    with pytest.raises(ConversionError) as e:
        from_torch(sd, "resnet", depth=8, width=1, num_classes=4)
    msg = str(e.value)
    assert "missing keys (3)" in msg and "unexpected keys (1)" in msg
    for key in ("layer2.0.shortcut.0.weight", "linear.bias", "linear.weight", "fc.weight"):
        assert key in msg


def test_num_batches_tracked_may_be_absent(resnet8):
    sd = {k: v for k, v in resnet8.items() if not k.endswith("num_batches_tracked")}
    from_torch(sd, "resnet", depth=8, width=1, num_classes=4)


def test_shape_mismatch_names_key_and_both_shapes(resnet8):
    with pytest.raises(ConversionError) as e:
        from_torch(resnet8, "resnet", depth=8, width=1, num_classes=10)
    msg = str(e.value)
    assert "linear.weight: checkpoint (4, 64), model expects (10, 64)" in msg
    assert "linear.bias: checkpoint (4,), model expects (10,)" in msg


def test_wrong_width_lists_every_mismatch(resnet8):
    with pytest.raises(ConversionError) as e:
        from_torch(resnet8, "resnet", depth=8, width=2, num_classes=4)
    msg = str(e.value)
    assert "conv1.weight: checkpoint (16, 3, 3, 3), model expects (32, 3, 3, 3)" in msg
    leaves = [k for k in resnet8 if not k.endswith("num_batches_tracked")]
    n = len(leaves) - 1  # all but linear.bias: num_classes is unchanged
    assert f"({n} tensors)" in msg and f"... and {n - 20} more" in msg  # listed up to 20


def test_wrapped_and_data_parallel_state_dicts_are_accepted(resnet8):
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v)
                                          for k, v in resnet8.items()}}
    got = from_torch(wrapped, "resnet", depth=8, width=1, num_classes=4)
    np.testing.assert_array_equal(got["params"]["linear"]["bias"], resnet8["linear.bias"])


def test_to_torch_reports_missing_and_unexpected_leaves(resnet8):
    variables = from_torch(resnet8, "resnet", depth=8, width=1, num_classes=4)
    del variables["batch_stats"]["bn1"]["var"]
    variables["params"]["extra"] = {"kernel": np.zeros(3)}
    with pytest.raises(ConversionError, match=r"missing \(1\): batch_stats/bn1/var.*"
                                              r"unexpected \(1\): params/extra/kernel"):
        to_torch(variables, "resnet", depth=8, width=1, num_classes=4)


def test_to_torch_shape_mismatch(resnet8):
    variables = from_torch(resnet8, "resnet", depth=8, width=1, num_classes=4)
    with pytest.raises(ConversionError, match=r"params/linear/kernel: variables \(64, 4\), "
                                              r"model expects \(64, 5\)"):
        to_torch(variables, "resnet", depth=8, width=1, num_classes=5)


def test_mlp_first_layer_needs_the_input_shape():
    sd = {k: v.numpy() for k, v in tm.randomize(tm.MLP(48, (8,), 3)).state_dict().items()}
    with pytest.raises(ConversionError, match=r"dense\.0\.weight: checkpoint \(8, 48\), "
                                              r"model expects \(8, 64\)"):
        from_torch(sd, "mlp", hidden=(8,), num_classes=3)  # default input (8, 8, 1)
    from_torch(sd, "mlp", hidden=(8,), num_classes=3, input_shape=(4, 4, 3))


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(KeyError, match="resnet20.*tv_vgg16"):
        from_torch({}, "vit_h14")
