"""mergejax's ZipIt! digits protocol against a plain torch reference of ZipIt!'s algorithm.

Two ResNet-20 (width 1) endpoints are trained briefly in mergejax on the digits32 tasks 0-4 and
5-9 and converted to torch state_dicts (`mergejax.converters.to_torch`), so both sides merge the
same weights. The protocol: endpoint BatchNorm reset, statistics, matching, merge and merged
BatchNorm reset all on the same training images in a fixed order, in batches of 128 with the
last partial batch kept, every reset torch's `momentum=None` (mergejax: estimator="per_batch").
mergejax runs through the facade (`mj.merge`, `mj.predict`, `mj.evaluate`); the reference is
`tests/zipit_reference.py` (torch + scipy loops, no mergejax code). Predictions must agree on
every test image, accuracies exactly, matching matrices exactly; the intermediate stages are
compared too, so a failure says which stage differs first.

To stay well under a minute on a 2-core CPU the protocol images are the first `N_IMAGES`
training images (both tasks, dataset order); `tests/test_digits32_protocol.py` runs the full
config.
"""

import json
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

import mergejax as mj  # noqa: E402
from mergejax import data, repair, specs, statistics, train  # noqa: E402
from mergejax.converters import to_torch  # noqa: E402
from mergejax.methods import get as get_method  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import zipit_reference as ref  # noqa: E402

pytestmark = pytest.mark.slow

TASKS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
BATCH = 128
N_IMAGES = 300  # -> batches of 128, 128, 44: a ragged last batch, kept
METHODS = {"zipit": dict(alpha=0.5, beta=1.0), "permute": {}, "average": {}}
DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def setup():
    ds = data.load("digits32")
    model = mj.model("resnet20", width=1, num_classes=5)
    settings = train.TrainSettings(epochs=2, batch_size=64, lr=0.05, warmup_epochs=0.5)
    endpoints = []
    for i, task in enumerate(TASKS):
        x, y = data.select(*ds.splits["train"], task)
        endpoints.append(train.train(model, x[:192], y[:192], settings, seed=i)[0])
    images = ds.splits["train"][0][:N_IMAGES]
    batches = [images[i:i + BATCH] for i in range(0, len(images), BATCH)]
    state_dicts = [to_torch(v, "resnet20", width=1, num_classes=5) for v in endpoints]
    return dict(model=model, endpoints=endpoints, images=images, batches=batches,
                state_dicts=state_dicts, test=ds.splits["test"], cache={})


def _reference(setup, method):
    """The reference pipeline's stages for `method` (computed once per module)."""
    runs = setup["cache"].setdefault("runs", {})
    if method not in runs:
        runs[method] = ref.run(setup["state_dicts"], method, setup["batches"],
                               reset_endpoints=True, cache=setup["cache"], **METHODS[method])
    return runs[method]


@pytest.fixture(scope="module")
def stages(setup):
    """mergejax's intermediate stages, from the functions the facade calls."""
    model, batches = setup["model"], setup["batches"]
    spec = specs.for_model(model)
    reset = [repair.reset_batch_stats(model, v, batches, estimator="per_batch")
             for v in setup["endpoints"]]
    moments = statistics.collect(model, spec, reset, batches)
    return dict(spec=spec, reset=reset, moments=moments)


def _torch_leaf(tree, key):
    return np.asarray(to_torch(tree, "resnet20", width=1, num_classes=5)[key])


def test_endpoint_reset_matches_torch_momentum_none(setup, stages):
    want = [m.state_dict() for m in _reference(setup, "zipit")["endpoints"]]
    for got, w in zip(stages["reset"], want):
        got_sd = to_torch(got, "resnet20", width=1, num_classes=5)
        for key in w:
            if key.endswith(("running_mean", "running_var")):
                np.testing.assert_allclose(got_sd[key], w[key].numpy(), rtol=2e-5, atol=1e-6,
                                           err_msg=key)


def test_statistics_match_reference(setup, stages):
    want = _reference(setup, "zipit")["stats"]
    assert set(want) == set(stages["moments"])
    for point, w in want.items():
        got = stages["moments"][point]
        np.testing.assert_allclose(np.asarray(got.mean), w["mean"].numpy(), rtol=1e-5,
                                   atol=1e-5, err_msg=point)
        np.testing.assert_allclose(np.asarray(got.cov), w["cov"].numpy(), rtol=1e-4,
                                   atol=1e-5, err_msg=point)
        np.testing.assert_allclose(np.asarray(got.corr), w["corr"].numpy(), rtol=0, atol=2e-5,
                                   err_msg=point)


@pytest.mark.parametrize("method", ["zipit", "permute"])
def test_matching_matrices_agree(setup, stages, method):
    want = _reference(setup, method)["transforms"]
    spec = stages["spec"]
    got = get_method(method).fn("matching")(spec, stages["reset"], stages["moments"],
                                            key=jax.random.key(0), spaces=spec.space_names,
                                            **METHODS[method])
    assert set(got) == set(want)
    for point, (w_merge, w_unmerge) in want.items():
        np.testing.assert_array_equal(np.asarray(got[point][1]), w_unmerge.numpy(),
                                      err_msg=point)
        np.testing.assert_allclose(np.asarray(got[point][0]), w_merge.numpy(), rtol=0,
                                   atol=1e-7, err_msg=point)


@pytest.mark.parametrize("method", list(METHODS))
def test_merged_predictions_identical_image_for_image(setup, method):
    model, (test_x, test_y) = setup["model"], setup["test"]
    merged = mj.merge(method, model, setup["endpoints"], data=setup["images"], repair=True,
                      estimator="per_batch", reset_endpoints=True, batch_size=BATCH,
                      **METHODS[method])
    want_run = _reference(setup, method)
    # stage by stage first, so a failure names the first stage that differs
    want_sd = want_run["model"].trunk.state_dict()
    for key, w in want_sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        got = _torch_leaf(merged[0], key)
        scale = max(float(np.abs(w.numpy()).max()), 1e-3)
        np.testing.assert_allclose(got, w.numpy(), rtol=0, atol=2e-5 * scale, err_msg=key)
    for i, head in enumerate(want_run["heads"]):
        np.testing.assert_allclose(_torch_leaf(merged[i], "linear.weight"),
                                   head["weight"].numpy(), rtol=0, atol=1e-5)
    want = ref.evaluate(ref.head_logits(want_run["model"], test_x), TASKS, test_y)
    got_pred = mj.predict(model, merged, test_x, tasks=TASKS)
    mismatched = np.flatnonzero(got_pred != want["joint_pred"])
    assert mismatched.size == 0, f"{method}: joint predictions differ on images {mismatched}"
    got = mj.evaluate(model, merged, test_x, test_y, tasks=TASKS)
    assert got["joint_acc"] == want["joint_acc"]
    assert got["per_task_acc"] == want["per_task_acc"]
    assert got["task_avg_acc"] == want["task_avg_acc"]


def test_estimator_matters_on_a_ragged_last_batch(setup):
    """per_batch (torch's momentum=None) and population differ on batches of 128, 128, 44;
    torch's reset agrees with per_batch only."""
    model, batches = setup["model"], setup["batches"]
    v = setup["endpoints"][0]
    per_batch = repair.reset_batch_stats(model, v, batches, estimator="per_batch")
    population = repair.reset_batch_stats(model, v, batches, estimator="population")
    key = "layer3.2.bn2.running_var"
    torch_var = ref.reset_bn(ref.endpoint(setup["state_dicts"][0], 20, 1, 5), batches
                             ).state_dict()[key].numpy()
    got_pb, got_pop = _torch_leaf(per_batch, key), _torch_leaf(population, key)
    np.testing.assert_allclose(got_pb, torch_var, rtol=2e-5, atol=1e-6)
    assert np.max(np.abs(got_pop - torch_var) / torch_var) > 1e-3


def test_reference_matcher_reproduces_zipits_own_outputs():
    """The reference's greedy loop and permutation give ZipIt!'s golden matrices (2 models,
    alpha > 0: the cases it implements)."""
    cases = json.loads((DATA / "zipit_matching.json").read_text())
    with np.load(DATA / "zipit_matching.npz") as z:
        golden = {k: z[k] for k in z.files}
    checked = 0
    for c in cases:
        if c["num_models"] != 2:
            continue
        corr = torch.from_numpy(golden[f"{c['key']}/correlation"])
        pairs = [(ref.permute_match(corr), "permute")]
        if c["alpha"] > 0:
            pairs.append((ref.zipit_match(corr, c["alpha"], c["beta"]), "zip"))
        for (merge, unmerge), name in pairs:
            np.testing.assert_array_equal(unmerge.numpy(), golden[f"{c['key']}/{name}_unmerge"])
            np.testing.assert_allclose(merge.numpy(), golden[f"{c['key']}/{name}_merge"],
                                       rtol=0, atol=1e-7)
            checked += 1
    assert checked >= 50
