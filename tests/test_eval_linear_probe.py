"""Linear probe: the solver against scikit-learn's LogisticRegression on a fixed feature set, the
coarse-to-fine sweep, the validation split, and the pre-projection feature tap."""
import pytest
import torch

import mmrl
from mmrl.evaluation.features import capture_pooled, encode_images
from mmrl.evaluation.linear_probe import (
    LinearProbeOptions,
    coarse_to_fine,
    fit_logistic,
    linear_probe,
    stratified_split,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n, d=24, classes=6, seed=0, spread=2.2):
    """Overlapping Gaussian classes: a problem where the regularisation matters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(123)) * 0.6
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + spread * torch.randn(n, d, generator=g) / d ** 0.5 * 2
    return x, y


def test_solver_matches_sklearn_at_the_same_C():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(600)
    xt, yt = blobs(600, seed=1)
    for C in (0.01, 1.0):
        l2 = 1.0 / (C * len(y))
        w, b = fit_logistic(x.double(), y, 6, l2, tolerance=1e-9)
        ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(x.double().numpy(), y.numpy())
        assert torch.allclose(w, torch.from_numpy(ref.coef_), atol=2e-4), C
        assert torch.allclose(b, torch.from_numpy(ref.intercept_), atol=2e-4), C
        ours = (xt.double() @ w.T + b).argmax(1)
        assert (ours.numpy() == ref.predict(xt.double().numpy())).mean() > 0.99


def test_probe_within_one_point_of_sklearn_at_the_best_C():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(1500)
    xt, yt = blobs(1500, seed=1)
    metrics, details = linear_probe(x, y, xt, yt, 6, LinearProbeOptions(seed=0))
    # scikit-learn's best C on the test set itself (an upper bound for any C chosen on val)
    best = max((LogisticRegression(C=C, max_iter=2000).fit(x.numpy(), y.numpy()).score(xt.numpy(), yt.numpy()), C)
               for C in [10.0 ** e for e in range(-4, 3)] + [0.003, 0.03, 0.3])
    assert abs(metrics["lp_acc1"] - best[0]) <= 0.01, (metrics, best)
    # and at the C we chose, scikit-learn agrees with us
    ref = LogisticRegression(C=details["sklearn_C_equivalent"], max_iter=2000).fit(x.numpy(), y.numpy())
    assert abs(metrics["lp_acc1"] - ref.score(xt.numpy(), yt.numpy())) <= 0.01
    assert details["train"] + details["val"] == 1500 and metrics["C"] == details["sklearn_C_equivalent"]
    assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "l2_lambda"} <= set(metrics)


def test_coarse_to_fine_finds_the_peak_with_few_evaluations():
    for peak in (0, 5, 37, 60, 96):
        calls = []

        def score(i):
            calls.append(i)
            return -abs(i - peak)

        best, trace = coarse_to_fine(97, score)
        assert best == peak and len(calls) == len(set(calls)) <= 15
        assert {0, 16, 32, 48, 64, 80, 96} <= set(trace)
    # a plateau goes to the larger index (stronger regularisation)
    assert coarse_to_fine(97, lambda i: 1.0 if i >= 40 else 0.0)[0] == 96


def test_stratified_split_keeps_every_class_in_train():
    y = torch.tensor([0] * 10 + [1] * 3 + [2] * 1)
    tr, va = stratified_split(y, 0.2, seed=0)
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(14))
    assert (y[va] == 0).sum() == 2 and (y[va] == 1).sum() == 1 and (y[va] == 2).sum() == 0
    assert torch.equal(stratified_split(y, 0.2, seed=0)[1], va)


def test_pooled_tap_is_the_pool_output_before_the_projection():
    torch.manual_seed(0)
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", pool="ggem").eval()
    x = torch.randn(3, 3, 64, 64)
    emb, pooled = encode_images(model, x, torch.device("cpu"), amp=False)
    with torch.no_grad():
        proj = model.visual.proj
        model.visual.proj = None
        try:
            want = model.visual(x)
        finally:
            model.visual.proj = proj
        assert torch.allclose(pooled, want, atol=1e-6)
        assert torch.allclose(emb, pooled @ proj, atol=1e-5)
        assert torch.allclose(emb, model.encode_image(x), atol=1e-6)
    assert "_pool" not in vars(model.visual)  # the model is left as it was
    with capture_pooled(torch.nn.Linear(2, 2)) as store:
        assert store is None


def test_dataloader_evaluate_functions():
    """The CLIP_benchmark-style ``evaluate`` entry points of the probe and of image retrieval."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from mmrl.evaluation import image_retrieval
    from mmrl.evaluation import linear_probe as lp

    torch.manual_seed(0)
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", pool="gem").eval()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(24) % 4
    images = torch.randn(24, 3, 64, 64, generator=g) + labels[:, None, None, None].float()
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    m = lp.evaluate(model, loader, loader, "cpu", LinearProbeOptions(features="embedding", grid_points=13))
    assert {"lp_acc1", "lp_mean_per_class_recall", "l2_lambda", "C"} <= set(m) and "lp_acc5" not in m
    got = image_retrieval.evaluate(model, loader, "cpu", progress=False)
    with torch.no_grad():
        emb = F.normalize(model.encode_image(images), dim=-1)
    want, _ = image_retrieval.image_retrieval_metrics(emb, labels)
    assert got == pytest.approx(want, abs=1e-6)
