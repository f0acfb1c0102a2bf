"""``mmrl analyze`` and :mod:`mmrl.analysis`: the dependence estimators against their definitions and
identities, the token maps against autograd, the analysis of a tiny model (every pool kind on the same
tokens equals a model pooling that way), the CLI, and the study's dependence table and verdict."""
from __future__ import annotations

import io
import itertools
import json
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmrl.analysis import (
    CovarianceAccumulator,
    block_cka,
    gaussian_gram,
    hsic_permutation_pvalue,
    hsic_unbiased,
    hsic_unbiased_gram,
    linear_cka,
    linear_gram,
    off_diagonal_mean,
    token_shares,
    token_weights,
)
from mmrl.pooling import ggem_reference

REPO = Path(__file__).resolve().parents[1]


def _data(n=9, d1=3, d2=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :d2]) + 0.5 * torch.randn(n, d2, generator=g, dtype=torch.float64)
    return x, y


# --- HSIC -------------------------------------------------------------------------------------

def test_hsic_equals_its_u_statistic_definition():
    """Song et al.'s estimator is the U-statistic of h = k_ij l_ij + k_ij l_qr - 2 k_ij l_iq over
    distinct ordered (i, j, q, r): summed here tuple by tuple."""
    x, y = _data(n=7)
    k, l = gaussian_gram(x), gaussian_gram(y)  # noqa: E741
    n = 7
    total = 0.0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += float(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
    reference = total / (n * (n - 1) * (n - 2) * (n - 3))
    assert hsic_unbiased_gram(k, l) == pytest.approx(reference, rel=1e-10, abs=1e-14)
    assert hsic_unbiased(x, y) == pytest.approx(reference, rel=1e-10, abs=1e-14)


def test_hsic_direct_formula_with_a_non_constant_diagonal():
    """The closed form written out with loops (float64); linear kernels have a non-constant diagonal,
    which a column-wise "diagonal removal" would get wrong."""
    x, y = _data(n=12, seed=3)
    k, l = linear_gram(x), linear_gram(y)  # noqa: E741
    n = 12
    kt = [[0.0 if i == j else float(k[i, j]) for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else float(l[i, j]) for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sk, sl = sum(map(sum, kt)), sum(map(sum, lt))
    kl1 = sum(kt[i][j] * sum(lt[j]) for i in range(n) for j in range(n))
    reference = (trace + sk * sl / ((n - 1) * (n - 2)) - 2 / (n - 2) * kl1) / (n * (n - 3))
    assert hsic_unbiased_gram(k, l) == pytest.approx(reference, rel=1e-10)


def test_gaussian_kernel_at_the_median_distance():
    x, _ = _data(n=11, seed=1)
    sigma = torch.pdist(x).median()
    reference = torch.exp(-torch.cdist(x, x) ** 2 / (2 * sigma ** 2))
    assert torch.allclose(gaussian_gram(x), reference, atol=1e-12)
    # the bandwidth follows the scale: HSIC does not depend on the units of either input
    x, y = _data(n=30, seed=2)
    assert hsic_unbiased(7.5 * x, y) == pytest.approx(hsic_unbiased(x, y), rel=1e-9)
    with pytest.raises(ValueError, match="at least 4 samples"):
        hsic_unbiased(x[:3], y[:3])


def test_hsic_near_zero_for_independent_and_positive_for_dependent_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 2, generator=g, dtype=torch.float64)
    independent = torch.randn(80, 2, generator=g, dtype=torch.float64)
    # dependent but uncorrelated (y = x^2): linear measures miss it, the Gaussian-kernel HSIC does not
    dependent = x ** 2 + 0.1 * torch.randn(80, 2, generator=g, dtype=torch.float64)
    h_ind, h_dep = hsic_unbiased(x, independent), hsic_unbiased(x, dependent)
    assert abs(h_ind) < 0.003 and h_dep > 0.007 and h_dep > 8 * abs(h_ind)
    assert hsic_permutation_pvalue(x, dependent, permutations=100) <= 0.02
    assert hsic_permutation_pvalue(x, independent, permutations=100) > 0.05


# --- CKA --------------------------------------------------------------------------------------

def test_linear_cka_identities_and_invariances():
    x, y = _data(n=40, d1=6, d2=4, seed=4)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0 < base < 1
    for debiased in (False, True):
        ref = linear_cka(x, y, debiased=debiased)
        assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(ref, rel=1e-10)
        assert linear_cka(3.3 * x, 0.2 * y, debiased=debiased) == pytest.approx(ref, rel=1e-10)
    # ... but not to an arbitrary invertible linear map
    skew = torch.eye(6, dtype=torch.float64) + 3 * torch.triu(torch.ones(6, 6, dtype=torch.float64), 1)
    assert abs(linear_cka(x @ skew, y) - base) > 1e-3


def test_linear_cka_equals_kernel_cka_from_gram_matrices():
    """Feature-space formula == HSIC ratio of centred linear Gram matrices; debiased == unbiased HSIC ratio."""
    x, y = _data(n=25, d1=5, d2=3, seed=6)
    n = 25
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = linear_gram(x), linear_gram(y)  # noqa: E741
    biased = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    assert linear_cka(x, y) == pytest.approx(float(biased(k, l) / (biased(k, k) * biased(l, l)).sqrt()), rel=1e-10)
    unbiased = hsic_unbiased_gram(k, l) / math.sqrt(hsic_unbiased_gram(k, k) * hsic_unbiased_gram(l, l))
    assert linear_cka(x, y, debiased=True) == pytest.approx(unbiased, rel=1e-9)


def test_minibatch_accumulated_cka_equals_the_full_cka():
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(103, 12, generator=g) @ torch.randn(12, 12, generator=g) + 2.0  # float32, off-centre
    acc = CovarianceAccumulator()
    for lo, hi in ((0, 7), (7, 40), (40, 41), (41, 103)):
        acc.update(feats[lo:hi])
    matrix = block_cka(acc.centred(), groups=4)
    for a, b in itertools.product(range(4), repeat=2):
        full = linear_cka(feats[:, 3 * a:3 * a + 3], feats[:, 3 * b:3 * b + 3])
        assert float(matrix[a, b]) == pytest.approx(full, rel=1e-9, abs=1e-12)
    assert torch.allclose(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    assert off_diagonal_mean(matrix) == pytest.approx(float((matrix.sum() - 4) / 12))


# --- token maps -------------------------------------------------------------------------------

def _positive_tokens(b=2, n=10, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, c, generator=g, dtype=torch.float64) + 0.05


def test_token_shares_are_each_tokens_part_of_the_pooled_value():
    x = _positive_tokens().requires_grad_(True)
    p = torch.tensor([1.5, 3.0, 6.0], dtype=torch.float64)
    f = ggem_reference(x, p)
    (grad,) = torch.autograd.grad(f.sum(), x)  # channel c's output depends on channel c only
    per_channel, per_group = token_shares(x, p)
    assert torch.allclose(per_channel, x.detach() * grad / f.detach()[:, None, :], atol=1e-12)
    xp = x.detach() ** p.repeat_interleave(4)
    grouped = xp.reshape(2, 10, 3, 4).sum(-1)
    assert torch.allclose(per_group, grouped / grouped.sum(1, keepdim=True), atol=1e-12)
    for maps in (per_channel, per_group):
        assert torch.allclose(maps.sum(1), torch.ones_like(maps.sum(1)), atol=1e-12)


def test_token_weights_are_normalised_sensitivities_and_uniform_at_p_one():
    x = _positive_tokens(seed=1).requires_grad_(True)
    p = torch.tensor([1.0, 2.5, 8.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(ggem_reference(x, p).sum(), x)
    per_channel, per_group = token_weights(x, p)
    assert torch.allclose(per_channel, grad / grad.sum(1, keepdim=True), atol=1e-12)
    for maps in (per_channel, per_group):
        assert torch.allclose(maps.sum(1), torch.ones_like(maps.sum(1)), atol=1e-12)
    assert torch.allclose(per_group[..., 0], torch.full((2, 10), 0.1, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(per_group[..., 2], torch.full((2, 10), 0.1, dtype=torch.float64), atol=1e-3)
    # large exponents and large values: stable (no overflow to inf / nan)
    big = token_shares(1e3 * _positive_tokens(), torch.tensor([60.0, 80.0, 100.0]))[1]
    assert torch.isfinite(big).all() and torch.allclose(big.sum(1), torch.ones(2, 3, dtype=torch.float64))


# --- the analysis -----------------------------------------------------------------------------

def _images(folder: Path, n: int = 10, corrupt: bool = True) -> Path:
    import random

    rng = random.Random(0)
    for i in range(n):
        img = Image.new("RGB", (64, 64), "white")
        x, y = rng.randint(0, 40), rng.randint(0, 40)
        ImageDraw.Draw(img).ellipse([x, y, x + 20, y + 20], fill=(rng.randint(0, 255), 40, rng.randint(0, 255)))
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"{i}.png")
    if corrupt:
        (folder / "a" / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def tiny_models():
    """A GGeM tiny model with distinct exponents, and the same weights pooling with tok / avg."""
    import mmrl

    torch.manual_seed(0)
    model = mmrl.create_model("mmrl-vit-tiny-p8-64", pool="ggem").eval()
    with torch.no_grad():
        model.visual.pooler.p.copy_(torch.linspace(1.2, 5.0, model.visual.pooler.p.numel()))
    others = {}
    for kind in ("tok", "avg"):
        other = mmrl.create_model("mmrl-vit-tiny-p8-64", pool=kind).eval()
        missing = other.load_state_dict(model.state_dict(), strict=False)
        assert missing.unexpected_keys == ["visual.pooler.p"] and not missing.missing_keys
        others[kind] = other
    return model, others


def test_every_pool_kind_pools_the_models_own_tokens(tiny_models, tmp_path, one_thread):
    from mmrl.analysis.images import image_source
    from mmrl.analysis.runner import analyze_model
    from mmrl.evaluation.features import capture_pooled
    from mmrl.model.factory import create_transforms

    model, others = tiny_models
    preprocess = create_transforms(model)[1]
    source = image_source(str(_images(tmp_path / "imgs")), limit=100)
    analysis, arrays = analyze_model(model, preprocess, source, batch_size=4, maps=3, log=lambda m: None)
    assert analysis["data"]["images"] == 10 and analysis["data"]["skipped"] == 1
    assert "broken.png" in analysis["data"]["skipped_examples"][0]
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in source.paths if p.name != "broken.png"])
    for kind, m in {"ggem": model, **others}.items():
        with torch.no_grad(), capture_pooled(m) as store:
            m.encode_image(images)
        assert torch.allclose(arrays["features"][kind].float(), store[-1], atol=1e-5), kind
    # gem: one exponent, the mean of the model's, on the same tokens
    gem = arrays["features"]["gem"]
    assert not torch.allclose(gem, arrays["features"]["ggem"], atol=1e-3)
    ex = analysis["exponents"]
    assert ex["p"] == pytest.approx(torch.linspace(1.2, 5.0, 6).tolist(), rel=1e-6)
    assert ex["compared_with"]["gem"] == pytest.approx([3.1], rel=1e-6)
    assert all(0 <= g["clamped_share"] <= 1 for g in ex["per_group"])
    # dependence: HSIC and CKA matrices are what the estimators give on each group's features
    for kind, dep in analysis["dependence"].items():
        feats = arrays["features"][kind].reshape(10, 6, 32)
        assert dep["hsic"][1][4] == pytest.approx(hsic_unbiased(feats[:, 1], feats[:, 4]), rel=1e-9, abs=1e-12)
        assert dep["cka"][2][5] == pytest.approx(linear_cka(feats[:, 2], feats[:, 5]), rel=1e-8)
        assert dep["cka"][3][3] == pytest.approx(1.0)
        assert torch.allclose(torch.tensor(dep["hsic"]), torch.tensor(dep["hsic"]).T)
    # token maps: shares sum to one per group; amplification >= 1 (power-mean inequality), 1 where p = 1
    assert arrays["shares"].shape == (3, 64, 6)
    assert torch.allclose(arrays["shares"].sum(1), torch.ones(3, 6, dtype=torch.float64), atol=1e-9)
    assert arrays["cls_attention"].shape == (3, 64)
    attention = arrays["cls_attention"].sum(1)  # over the patches: 1 less the class token's attention to itself
    assert ((attention > 0) & (attention < 1 + 1e-6)).all()
    ratio = torch.tensor(analysis["amplification"]["ratio"])
    assert (ratio >= 1 - 1e-6).all() and ratio[-32:].mean() > ratio[:32].mean()


def test_analyze_reads_shards_and_counts_undecodable_images(tmp_path, one_thread):
    from mmrl.analysis import run_analysis

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (40 * i, 100, 200)).save(buf, format="PNG")
            data = buf.getvalue() if i != 2 else b"\x89PNG broken"
            for name, payload in ((f"{i:04d}.png", data), (f"{i:04d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    result = run_analysis("mmrl-vit-tiny-p8-64", str(shard), tmp_path / "out", pool="avg", log=lambda m: None)
    data = result["analysis"]["data"]
    assert (data["kind"], data["images"], data["skipped"]) == ("shards", 5, 1)
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved["exponents"]["p"] is None and saved["exponents"]["default_p_used"]
    assert set(saved["dependence"]) == {"tok", "avg", "gem", "ggem"}
    for name in ("exponents", "dependence", "activation_maps", "amplification"):
        assert (tmp_path / "out" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "out" / "analysis.md").read_text()
    assert "no exponent" in text and "| ggem |" in text and "no error bar" in text


@pytest.mark.slow
def test_mmrl_analyze_cli(tmp_path):
    images = _images(tmp_path / "imgs", n=8)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    cmd = [sys.executable, "-m", "mmrl", "analyze", "--model", "mmrl-vit-tiny-p8-64", "--data", str(images),
           "--out", str(tmp_path / "out"), "--max-images", "6", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert analysis["data"]["images"] == 6 and analysis["model"]["pool"] == "ggem"
    assert "wrote" in done.stderr
    bad = subprocess.run(cmd[:7] + [str(tmp_path / "nowhere")], capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"mmrl analyze: error: {tmp_path / 'nowhere'}: no such image folder "
                                               "or shard file"]


# --- the study's dependence table -------------------------------------------------------------

def _fake_analysis(pool: str, hsic: float, cka: float) -> dict:
    row = {"hsic_offdiag_mean": hsic, "cka_offdiag_mean": cka}
    own = pool if pool in ("tok", "avg", "gem", "ggem") else f"{pool}"
    return {"model": {"pool": pool}, "dependence": {"tok": {}, "avg": {}, "gem": {}, "ggem": {}, own: row}}


def test_study_dependence_table_and_verdict():
    from mmrl.demo.study import dependence_lines, dependence_values

    clear = {"ggem": [_fake_analysis("ggem", h, c) for h, c in ((0.010, 0.30), (0.012, 0.32), (0.011, 0.31))],
             "avg": [_fake_analysis("avg", h, c) for h, c in ((0.020, 0.50), (0.022, 0.52), (0.021, 0.55))],
             "cgem": [_fake_analysis("cgem", h, c) for h, c in ((0.030, 0.31), (0.031, 0.60), (0.032, 0.10))]}
    values = dependence_values(clear)
    assert values["hsic_offdiag_mean"]["ggem"] == [0.010, 0.012, 0.011]
    text = "\n".join(dependence_lines(values))
    assert "| ggem | 0.0110 ± 0.0010 | 0.3100 ± 0.0100 | 3 |" in text
    # HSIC: lower than both beyond the spread; CKA: cgem's spread overlaps
    assert re.search(r"- HSIC: ggem's .* is lower than every other pooling's \(avg, cgem\) beyond the seed "
                     r"spread", text)
    assert re.search(r"- linear CKA: ggem's .* is not lower than cgem's beyond the seed spread \(it is lower than "
                     r"avg's\): the paper's claim is not confirmed", text)
    one_seed = dependence_values({"ggem": [_fake_analysis("ggem", 0.01, 0.3)],
                                  "avg": [_fake_analysis("avg", 0.5, 0.9)]})
    assert "not lower than avg's" in "\n".join(dependence_lines(one_seed))  # one seed: no spread, no claim
    assert "No trained model was analysed" in dependence_lines({"hsic_offdiag_mean": {}, "cka_offdiag_mean": {}})[0]


# --- the demo report's section ----------------------------------------------------------------

def test_demo_report_section_from_a_saved_model(tiny_models, tmp_path, one_thread):
    import os

    import mmrl
    from mmrl.demo.report import analysis_lines
    from mmrl.demo.run import HELDOUT_IMAGES, analyze_for_report

    model, _ = tiny_models
    saved = mmrl.save_model(model, tmp_path / "model")
    logged = []
    assert analyze_for_report(saved, tmp_path / "data", tmp_path / "analysis", logged.append) is None
    assert "analysis skipped" in logged[-1] and "mmrl prepare emoji" in logged[-1]
    assert "Not analysed" in analysis_lines(None, str)[0]
    _images(tmp_path / "data" / HELDOUT_IMAGES, n=6, corrupt=False)
    analysis = analyze_for_report(saved, tmp_path / "data", tmp_path / "run" / "analysis", logged.append)
    assert analysis["data"]["images"] == 6 and analysis["model"]["pool"] == "ggem"
    assert analysis["exponents"]["p"] == pytest.approx(torch.linspace(1.2, 5.0, 6).tolist(), rel=1e-6)
    report = tmp_path / "run"
    lines = analysis_lines(analysis, lambda p: os.path.relpath(p, report))
    text = "\n".join(lines)
    for kind in ("tok", "avg", "gem", "ggem"):
        row = analysis["dependence"][kind]
        assert f"| {kind} | {row['hsic_offdiag_mean']:.4f} | {row['cka_offdiag_mean']:.3f} |" in text
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert len(links) == 5 and all((report / link).is_file() for link in links), links
    assert "(analysis/activation_maps.png)" in text and "from 1.200 to 5.000" in text
