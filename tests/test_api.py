"""The public API: the README snippet as written, and what each facade function promises."""

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mergejax as mj
from mergejax import evaluation, methods, repair, specs
from mergejax.statistics import StatisticsCache

README = Path(__file__).resolve().parents[1] / "README.md"
TASKS = [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]


def readme_snippet() -> str:
    """The first python block of the README's "In Python" section."""
    text = README.read_text()
    section = text[text.index("## In Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def endpoints():
    model = mj.model("resnet20", width=1, num_classes=5)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16, 16, 3)).astype(np.float32)
    eps = []
    for seed in (0, 1):
        v = jax.tree.map(np.asarray, model.init(jax.random.key(seed), x[:1]))
        # non-trivial BatchNorm statistics, so resets visibly change them
        v["batch_stats"] = jax.tree.map(
            lambda a, s=seed: (a + rng.uniform(0.5, 1.5, a.shape)).astype(np.float32),
            v["batch_stats"])
        eps.append(v)
    labels = np.arange(len(x)) % 10
    return model, eps, x, labels


def test_the_readme_snippet_runs_as_written_on_torch_checkpoints(endpoints, tmp_path):
    from mergejax import converters

    model, (va, vb), x, labels = endpoints
    for name, v in (("a.pt", va), ("b.pt", vb)):
        sd = converters.to_torch(v, "resnet20", width=1, num_classes=5)
        converters.save_state_dict(sd, tmp_path / name)
    np.save(tmp_path / "images.npy", x)
    np.save(tmp_path / "labels.npy", labels)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(readme_snippet(), "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    merged, partial = scope["merged"], scope["partial"]
    # the checkpoints went through torch and back unchanged
    jax.tree.map(np.testing.assert_array_equal, scope["a"], va)
    assert len(merged) == 2 and len(partial) == 2
    want = mj.merge("zipit", model, [va, vb], data=x, repair=True, estimator="per_batch",
                    alpha=0.5, beta=1.0)
    jax.tree.map(np.testing.assert_array_equal, merged, want)
    # the saved file loads back to the same model
    back = mj.load(tmp_path / "merged_head_a.safetensors", model)
    np.testing.assert_allclose(model.apply(back, x), model.apply(merged[0], x), rtol=1e-6,
                               atol=1e-6)
    # partial zip: a shared stem, per-model last stage
    pa, pb = (p["params"] for p in partial)
    np.testing.assert_array_equal(pa["conv1"]["kernel"], pb["conv1"]["kernel"])
    assert not np.allclose(pa["layer3_0"]["conv1"]["kernel"], pb["layer3_0"]["conv1"]["kernel"])


def test_merge_equals_the_library_steps_it_stands_for(endpoints):
    model, eps, x, _ = endpoints
    spec = specs.for_model(model)
    batches = [x[:16], x[16:32], x[32:]]  # the facade's cut of 40 images at batch_size 16
    got = mj.merge("permute", model, eps, data=x, batch_size=16, spaces="stream2",
                   repair="reset", estimator="per_batch")
    cache = StatisticsCache(model, spec, eps, lambda: batches)
    stats = cache.get(spec.prefix("stream2"))
    transforms = methods.get("permute").fn("matching")(spec, eps, stats, key=jax.random.key(0),
                                                         spaces=spec.prefix("stream2"))
    merged = specs.apply_merge(spec, eps, transforms)
    want = [repair.reset_batch_stats(model, m, batches, estimator="per_batch") for m in merged]
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # the same batches given as an iterable give the same model
    again = mj.merge("permute", model, eps, data=iter(batches), spaces="stream2",
                     repair="reset", estimator="per_batch")
    jax.tree.map(np.testing.assert_array_equal, again, want)


def test_a_full_zip_resets_the_shared_trunk_once(endpoints, monkeypatch):
    model, eps, x, _ = endpoints
    calls = []
    real = repair.reset_batch_stats
    monkeypatch.setattr(repair, "reset_batch_stats",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    full = mj.merge("zipit", model, eps, data=x, repair="reset")
    assert len(calls) == 1
    jax.tree.map(np.testing.assert_array_equal, full[0]["batch_stats"], full[1]["batch_stats"])
    calls.clear()
    mj.merge("zipit", model, eps, data=x, spaces="stream1", repair="reset")
    assert len(calls) == 2  # per-model tails: each tree has its own statistics


def test_per_batch_estimator_is_torch_momentum_none(endpoints):
    """Oracle: the first BatchNorm's input is conv1(x); per batch its mean and unbiased
    variance, averaged over batches with equal weight (torch momentum=None)."""
    model, (va, _), x, _ = endpoints
    batches = [x[:16], x[16:32], x[32:]]  # a ragged last batch of 8
    kernel = va["params"]["conv1"]["kernel"]
    means, vars_ = [], []
    for b in batches:
        h = np.asarray(jax.lax.conv_general_dilated(
            jnp.asarray(b), kernel, (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"), np.float64)
        h = h.reshape(-1, h.shape[-1])
        means.append(h.mean(0))
        vars_.append(h.var(0, ddof=1))
    got = repair.reset_batch_stats(model, va, batches, estimator="per_batch")["batch_stats"]
    np.testing.assert_allclose(got["bn1"]["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bn1"]["var"], np.mean(vars_, 0), rtol=1e-4, atol=1e-5)
    pop = repair.reset_batch_stats(model, va, batches, estimator="population")["batch_stats"]
    sizes = np.array([len(b) for b in batches], np.float64)
    biased = [v * (len(b) * 256 - 1) / (len(b) * 256) for v, b in zip(vars_, batches)]
    np.testing.assert_allclose(pop["bn1"]["mean"], sizes @ np.array(means) / sizes.sum(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pop["bn1"]["var"], sizes @ np.array(biased) / sizes.sum(),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(got["bn1"]["mean"], pop["bn1"]["mean"], rtol=1e-6, atol=0)


def test_reset_endpoints_resets_before_matching(endpoints):
    model, eps, x, _ = endpoints
    plain = mj.merge("average", model, eps, data=x)
    reset = mj.merge("average", model, eps, data=x, reset_endpoints=True)
    want = [repair.reset_batch_stats(model, v, [x[:128]]) for v in eps]
    jax.tree.map(np.testing.assert_array_equal, reset,
                 specs.apply_merge(specs.for_model(model), want,
                                   specs.identity_transforms(specs.for_model(model), 2)))
    assert not np.allclose(plain[0]["batch_stats"]["bn1"]["var"],
                           reset[0]["batch_stats"]["bn1"]["var"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(a=0.5), "ZipIt!'s name for 'alpha'"),
    (dict(b=1.0), "ZipIt!'s name for 'beta'"),
    (dict(data="NCHW"), "looks like NCHW"),
    (dict(data="list"), "list of single images"),
    (dict(data=None), "give data="),
    (dict(spaces="hidden9"), "not a feature space"),
    (dict(repair="fix"), "repair='fix'"),
    (dict(estimator="torch"), "estimator='torch'"),
])
def test_bad_input_says_what_was_expected(endpoints, kwargs, message):
    model, eps, x, _ = endpoints
    data = {"NCHW": x.transpose(0, 3, 1, 2), "list": list(x), None: None}.get(
        kwargs.get("data", "x"), x)
    kwargs = {**kwargs, "data": data}
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        mj.merge("zipit", model, eps, **kwargs)


def test_methods_of_the_wrong_family_point_to_the_right_function(endpoints):
    model, eps, x, _ = endpoints
    with pytest.raises(ValueError, match="merge_weights"):
        mj.merge("ties", model, eps, data=x)
    with pytest.raises(ValueError, match=r"mergejax\.merge\('zipit'"):
        mj.merge_weights("zipit", eps[0]["params"], [e["params"] for e in eps])


def test_merge_weights_is_the_registered_method(endpoints):
    _, eps, _, _ = endpoints
    base, ft = eps[0]["params"], [e["params"] for e in eps]
    got = mj.merge_weights("ties", base, ft, density=0.5, lam=0.7)
    want = methods.get("ties").fn("weight_space")(base, ft, key=jax.random.key(0), density=0.5,
                                                    lam=0.7)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_evaluate_and_predict_agree_with_the_metrics(endpoints):
    model, eps, x, labels = endpoints
    m = mj.evaluate(model, eps, x, labels, TASKS)
    assert m == evaluation.evaluate(model, list(zip(eps, TASKS)), x, labels, TASKS)
    pred = mj.predict(model, eps, x, TASKS)
    assert np.mean(pred == labels) == pytest.approx(m["joint_acc"])
    single = mj.evaluate(model, eps[0], x[labels < 5], labels[labels < 5])
    assert single["joint_acc"] == pytest.approx(np.mean(mj.predict(model, eps[0],
                                                                  x[labels < 5]) == labels[
                                                                      labels < 5]))


def test_save_round_trips_every_format_and_never_overwrites_silently(endpoints, tmp_path):
    model, (va, _), x, _ = endpoints
    for name in ("m.pt", "m.safetensors", "m_orbax"):
        path = mj.save(va, tmp_path / name, arch=model)
        back = mj.load(path, model)
        jax.tree.map(np.testing.assert_array_equal, back, va)
        with pytest.raises(FileExistsError, match=name):
            mj.save(va, path, arch=model)
    mj.save(va, tmp_path / "m.pt", arch=model, overwrite=True)
