"""Training lowers the loss deterministically; evaluation follows ZipIt!'s definitions."""

import numpy as np

from mergejax import data, evaluation, models, train


def _task_data():
    ds = data.load("digits")
    return data.select(*ds.splits["train"], (0, 1, 2))


def test_training_lowers_the_loss_and_is_deterministic():
    x, y = _task_data()
    model = models.create("mlp", num_classes=3, hidden=(32,))
    settings = train.TrainSettings(epochs=3, batch_size=64, lr=0.05)
    v1, losses = train.train(model, x, y, settings, seed=0)
    v2, _ = train.train(model, x, y, settings, seed=0)
    assert losses[-1] < 0.5 * losses[0]
    k1, k2 = v1["params"]["linear"]["kernel"], v2["params"]["linear"]["kernel"]
    np.testing.assert_array_equal(k1, k2)
    v3, _ = train.train(model, x, y, settings, seed=1)
    assert not np.allclose(v1["params"]["linear"]["kernel"], v3["params"]["linear"]["kernel"])


def test_accuracies_known_answer():
    labels = np.array([0, 1, 2, 3])
    tasks = [(0, 1), (2, 3)]
    # head a: classes (0, 1); head b: classes (2, 3)
    pa = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    pb = np.array([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9], [0.4, 0.6]])
    m = evaluation.accuracies([pa, pb], tasks, labels, tasks)
    # per task: a on its examples (0, 1) right twice; b on (2, 3): predicts 3, 3 -> one right
    assert m["per_task_acc"] == {"task_a": 1.0, "task_b": 0.5}
    assert m["task_avg_acc"] == 0.75
    # joint: ex0 argmax 0.9 -> 0 ok; ex1 0.8 -> 1 ok; ex2 0.9 -> 3 wrong; ex3 0.6 -> 3 ok
    assert m["joint_acc"] == 0.75
    # one head only: the task it does not cover scores 0
    single = evaluation.accuracies([pa], tasks[:1], labels, tasks)
    assert single["per_task_acc"]["task_b"] == 0.0
    assert single["joint_acc"] == 0.5


def test_evaluate_ignores_classes_outside_the_tasks():
    model = models.create("mlp", num_classes=2, hidden=(4,))
    x = np.zeros((6, 8, 8, 1), np.float32)
    v = model.init_shapes(x)
    v = {"params": {k: {n: np.zeros(a.shape, a.dtype) for n, a in d.items()}
                    for k, d in v["params"].items()}}
    v["params"]["linear"]["bias"] = np.array([1.0, 0.0], np.float32)  # always predicts class 7
    labels = np.array([7, 7, 8, 9, 9, 9])
    m = evaluation.evaluate(model, [(v, (7, 8))], x, labels, [(7, 8)])
    assert m["joint_acc"] == 2 / 3
