"""``analysis.md``: the numbers of an analysis in words, claiming no more than they show."""
from __future__ import annotations

from typing import Any

__all__ = ["dependence_table", "exponent_sentences", "render_analysis", "own_row"]


def own_row(analysis: dict[str, Any]) -> str:
    """The dependence row of the model's own pooling (``cgem`` for a cgem model, ``ggem`` for a ggem one ...)."""
    own, dep = analysis["model"]["pool"], analysis["dependence"]
    return own if own in dep else next(k for k in dep if k.startswith(f"{own} "))


def dependence_table(dependence: dict[str, dict[str, Any]]) -> list[str]:
    """One row per pool kind: mean off-diagonal HSIC, linear CKA and debiased linear CKA."""
    lines = ["| pooling | HSIC (mean off-diagonal) | linear CKA | debiased linear CKA |", "|---|---|---|---|"]
    for kind, d in dependence.items():
        lines.append(f"| {kind} | {d['hsic_offdiag_mean']:.4f} | {d['cka_offdiag_mean']:.3f} "
                     f"| {d['cka_debiased_offdiag_mean']:.3f} |")
    return lines


def exponent_sentences(exponents: dict[str, Any]) -> list[str]:
    groups = exponents["per_group"]
    clamped = [g["clamped_share"] for g in groups]
    out = []
    if exponents["p"] is None:
        out.append(f"The model pools with `{exponents['kind']}`, which has no exponent; the GeM/GGeM rows below use "
                   f"p = {exponents['compared_with']['gem'][0]:g} on its tokens.")
    else:
        p = exponents["p"]
        out.append(f"`{exponents['kind']}` has {len(p)} exponent{'s' if len(p) > 1 else ''}: "
                   + (f"p = {p[0]:.3f}." if len(p) == 1 else
                      f"from {min(p):.3f} to {max(p):.3f} (mean {sum(p) / len(p):.3f}, spread {max(p) - min(p):.3f})."))
    out.append(f"Between {100 * min(clamped):.1f}% and {100 * max(clamped):.1f}% of a group's pooled activations are "
               f"negative or below eps = {exponents['eps']:g} and are clamped (they enter the generalized mean "
               "as eps).")
    return out


def _dependence_sentences(analysis: dict[str, Any]) -> list[str]:
    dep = analysis["dependence"]
    n = analysis["data"]["images"]
    out = []
    for key, label in (("hsic_offdiag_mean", "HSIC"), ("cka_offdiag_mean", "linear CKA")):
        ranked = sorted(dep, key=lambda k: dep[k][key])
        out.append(f"By {label} the least dependent groups are {ranked[0]}'s ({dep[ranked[0]][key]:.4g}), the most "
                   f"dependent {ranked[-1]}'s ({dep[ranked[-1]][key]:.4g}).")
    out.append(f"The model's own pooling is `{own_row(analysis)}`; the other rows pool its tokens otherwise.")
    ggem_p = analysis["exponents"]["compared_with"]["ggem"]
    if max(ggem_p) - min(ggem_p) < 1e-6:
        out.append("All group exponents are equal, so the `gem` and `ggem` rows pool alike.")
    out.append(f"These are estimates from {n} images of one model on its own tokens: they describe this model and "
               "these images, with no error bar; whether a pooling lowers dependence in general needs several "
               "trained models (the pooling study's seeds).")
    return out


def render_analysis(analysis: dict[str, Any], plots: dict[str, str]) -> str:
    """The markdown of ``analysis.md`` (``plots``: name -> path relative to it)."""
    data, model = analysis["data"], analysis["model"]
    amp = analysis["amplification"]
    skipped = f"; unreadable images skipped: {data['skipped']}" if data["skipped"] else ""
    lines = ["# Inside the pooling", "",
             f"{data['images']} images from `{data['spec']}` ({data['kind']}{skipped}); the tower has {model['heads']} "
             f"heads, so {model['heads']} groups of {model['group_channels']} channels; {model['tokens']} patch tokens "
             f"per image. Analysis took {analysis['seconds']['total']:.1f} s.", "",
             "## Exponents", ""] + exponent_sentences(analysis["exponents"]) + [
             "", f"![exponents]({plots['exponents']})", "",
             "## Dependence between head-aligned groups", "",
             "Mean off-diagonal value of the G x G matrix between the groups' pooled features, every pooling "
             "applied to the same tokens (unbiased HSIC with a Gaussian kernel at the median distance; linear CKA; "
             "lower means less dependent groups).", ""] + dependence_table(analysis["dependence"]) + [""]
    lines += _dependence_sentences(analysis) + ["", f"![dependence]({plots['dependence']})", "",
                                                 "## Activation maps", "",
                                                 "Per group, each token's share of the group's sum of x^p (GGeM with "
                                                 "the exponents above), beside average pooling's uniform weights and "
                                                 "the class token's last-block attention.", "",
                                                 f"![activation maps]({plots['maps']})", "",
                                                 "## Channel amplification", "",
                                                 f"Generalized mean over plain mean of the same clamped tokens, per "
                                                 f"channel (1 = not amplified): mean {amp['mean']:.3f}, from "
                                                 f"{amp['min']:.3f} to {amp['max']:.3f}; the most amplified channels "
                                                 f"are {', '.join(map(str, amp['order'][:5]))}.", "",
                                                 f"![amplification]({plots['amplification']})", ""]
    return "\n".join(lines)
