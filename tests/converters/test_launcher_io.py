"""The launcher takes torch endpoints from the config and exports merged models to torch."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_models import ZipItResNet, randomize  # noqa: E402

from mergejax import converters, data, evaluation, experiment  # noqa: E402
from mergejax.config_lib import load_config_file  # noqa: E402
from mergejax.io import checkpoint  # noqa: E402
from mergejax.models import create  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _config():
    return load_config_file(ROOT / "configs" / "digits_resnet20.py", "quick")


@pytest.mark.slow
def test_torch_endpoints_in_merged_models_out(tmp_path):
    paths = []
    for seed, suffix in ((0, ".pt"), (1, ".safetensors")):
        net = randomize(ZipItResNet(depth=20, w=1, num_classes=5), seed=seed)
        # digits are 1-channel: replace the stem by a 1-channel conv
        net.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=False)
        torch.nn.init.normal_(net.conv1.weight, std=0.5)
        path = tmp_path / f"model_{seed}{suffix}"
        converters.save_state_dict({k: v.numpy() for k, v in net.state_dict().items()}, path)
        paths.append(path)
    config = _config()
    with config.unlocked():
        config.endpoints.checkpoints = tuple(map(str, paths))
        config.merge.methods = ("zipit",)
        config.export.formats = ("torch", "safetensors", "orbax")
    work = tmp_path / "work"
    rows = experiment.run(config, work)
    assert not (work / "endpoints").exists()  # nothing was trained
    # model_a's row is the imported checkpoint's accuracy
    ds = data.load("digits")
    tasks = data.split_classes(10, 2, seed=config.seed)
    model = create("resnet20", width=1, num_classes=5)
    va = converters.from_torch(converters.load_state_dict(paths[0]), "resnet20", width=1,
                               num_classes=5, input_shape=(8, 8, 1))
    expected = evaluation.evaluate(model, [(va, tasks[0])], *ds.splits["test"], tasks)
    assert rows[0]["joint_acc"] == expected["joint_acc"]
    # the exported merged heads give the same logits in torch as in flax
    out = work / "export" / "zipit"
    x = ds.splits["test"][0][:6]
    for head in (0, 1):
        flax_vars = checkpoint.load(out / f"head_{head}")
        flax_logits = np.asarray(model.apply(flax_vars, x))
        for ext in ("pt", "safetensors"):
            net = ZipItResNet(depth=20, w=1, num_classes=5)
            net.conv1 = torch.nn.Conv2d(1, 16, 3, padding=1, bias=False)
            sd = converters.load_state_dict(out / f"head_{head}.{ext}")
            net.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()})
            torch_logits = net.eval()(torch.as_tensor(x.transpose(0, 3, 1, 2))).detach().numpy()
            np.testing.assert_allclose(torch_logits, flax_logits, atol=1e-4)


def test_wrong_number_of_checkpoints_is_refused(tmp_path):
    config = _config()
    with config.unlocked():
        config.endpoints.checkpoints = (str(tmp_path / "only_one.pt"),)
    with pytest.raises(ValueError, match="one per task"):
        experiment.run(config, tmp_path / "w")


def test_unknown_export_format_is_refused_before_work(tmp_path):
    config = _config()
    with config.unlocked():
        config.export.formats = ("onnx",)
    with pytest.raises(ValueError, match="safetensors"):
        experiment.run(config, tmp_path / "w")
    assert not (tmp_path / "w" / "endpoints").exists()
