"""The MPAMatch training objective: supervised + UniMatch consistency + image/text prototype contrast (method.md 4).

``L = a L_x + b L_u + w(t) * (lambda_img L_img + lambda_txt L_txt + lambda_align L_align)`` with a linear warm-up
``w(t)``; ``(a, b) = loss_weights``, UniMatch's ``(0.5, 0.5)`` by default; without unlabelled data
``L = L_x + w(t) * (...)``. With SGD on a short schedule ``a = 0.5`` halves the supervised signal against the
supervised preset; ``(1, 1)`` gives L_x the same weight in every preset. A term whose weight is 0 is not computed at all
(no projection head, no text encoder, no bank update when nothing needs them). The trainer fills a
:class:`StepOutputs` and gets back every term, so each one can be logged every iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bundle.errors import BundleInputError

from .contrast import flatten_pixels, prototype_contrast_loss, sample_balanced_pixels
from .prototype_bank import ImagePrototypeBank
from .segmentation import ConsistencyLoss, SupervisedLoss, squeeze_target

__all__ = ["MPAMatchLoss", "StepOutputs"]


@dataclass
class StepOutputs:
    """What one training iteration produced. Targets are ``[B, H, W]``; embeddings ``[B, D, H/4, W/4]``.

    The unlabelled fields stay ``None`` in supervised iterations. ``pseudo_*``/``conf_*`` of the strong views are
    already CutMix-mixed (the box holds the CutMix source's pseudo-label and confidence).
    """

    logits_x: torch.Tensor
    label_x: torch.Tensor
    embedding_x: torch.Tensor | None = None
    logits_s1: torch.Tensor | None = None
    logits_s2: torch.Tensor | None = None
    logits_fp: torch.Tensor | None = None
    pseudo_w: torch.Tensor | None = None
    conf_w: torch.Tensor | None = None
    pseudo_s1: torch.Tensor | None = None
    conf_s1: torch.Tensor | None = None
    pseudo_s2: torch.Tensor | None = None
    conf_s2: torch.Tensor | None = None
    embedding_w: torch.Tensor | None = None
    embedding_s1: torch.Tensor | None = None
    embedding_s2: torch.Tensor | None = None

    @property
    def semi_supervised(self) -> bool:
        return self.logits_s1 is not None


class MPAMatchLoss(nn.Module):
    """MPAMatch's loss, holding the image prototype bank and the text prompt learner (both checkpointed with it).

    Args:
        num_classes: number of segmentation classes C.
        supervised_loss: ``L_x`` (default :class:`SupervisedLoss`: 0.5 CE + 0.5 Dice).
        consistency_loss: the per-view loss ``l`` of ``L_u`` (default :class:`ConsistencyLoss`: masked CE).
        consistency_weights: weights of the two strong views and the feature-perturbed view in ``L_u``.
        loss_weights: weights (a, b) of ``L_x`` and ``L_u`` in semi-supervised iterations.
        confidence_threshold: tau; pixels whose weak-view confidence reaches it are reliable.
        threshold_start: tau at iteration 0 when a threshold warm-up is wanted (None: no warm-up).
        threshold_warmup_iterations: iterations over which tau rises linearly from ``threshold_start``.
        image_prototypes: the image prototype bank, or a function that builds it (needed when ``image_weight`` or
            ``align_weight`` > 0; otherwise it is neither built nor kept).
        prompt_learner: module whose ``forward()`` returns text prototypes ``[C, D]``, or a function that builds it
            (needed when ``text_weight`` or ``align_weight`` > 0; otherwise neither built nor kept: the text encoder
            is not even loaded). The configs pass both as functions (``"_mode_": "callable"``), so this is the one
            place that decides which prototype modules exist.
        image_weight, text_weight, align_weight: lambda_img, lambda_txt, lambda_align.
        prototype_warmup_iterations: linear warm-up of the three prototype weights (0: none).
        temperature: T of the prototype contrast.
        max_sampled_pixels: at most this many class-balanced pixels enter the contrast terms per step.
        ignore_index: label value of pixels without a label.
    """

    def __init__(
        self,
        num_classes: int,
        supervised_loss: nn.Module | None = None,
        consistency_loss: nn.Module | None = None,
        consistency_weights: Sequence[float] = (0.25, 0.25, 0.5),
        loss_weights: Sequence[float] = (0.5, 0.5),
        confidence_threshold: float = 0.95,
        threshold_start: float | None = None,
        threshold_warmup_iterations: int = 0,
        image_prototypes: ImagePrototypeBank | Callable[[], ImagePrototypeBank] | None = None,
        prompt_learner: nn.Module | Callable[[], nn.Module] | None = None,
        image_weight: float = 0.1,
        text_weight: float = 0.1,
        align_weight: float = 0.0,
        prototype_warmup_iterations: int = 0,
        temperature: float = 0.1,
        max_sampled_pixels: int = 8192,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if len(consistency_weights) != 3:
            raise BundleInputError(
                f"consistency_weights needs 3 values (strong 1, strong 2, FP), got {consistency_weights}"
            )
        if (image_weight > 0 or align_weight > 0) and image_prototypes is None:
            raise BundleInputError("image_weight/align_weight > 0 needs an image prototype bank (image_prototypes)")
        if (text_weight > 0 or align_weight > 0) and prompt_learner is None:
            raise BundleInputError("text_weight/align_weight > 0 needs a text prompt learner (prompt_learner)")
        if not 0.0 <= confidence_threshold <= 1.0:
            raise BundleInputError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
        self.num_classes = int(num_classes)
        self.supervised_loss = (
            supervised_loss if supervised_loss is not None else SupervisedLoss(ignore_index=ignore_index)
        )
        self.consistency_loss = consistency_loss if consistency_loss is not None else ConsistencyLoss()
        self.consistency_weights = tuple(float(w) for w in consistency_weights)
        if len(loss_weights) != 2 or min(loss_weights) < 0:
            raise BundleInputError(f"loss_weights needs 2 values >= 0 (L_x, L_u), got {list(loss_weights)}")
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.threshold = float(confidence_threshold)
        self.threshold_start = self.threshold if threshold_start is None else float(threshold_start)
        self.threshold_warmup_iterations = int(threshold_warmup_iterations)
        self.image_weight = float(image_weight)
        self.text_weight = float(text_weight)
        self.align_weight = float(align_weight)
        # a module whose term has weight 0 is not kept: it costs nothing and is not checkpointed
        uses_bank = self.image_weight > 0 or self.align_weight > 0
        uses_text = self.text_weight > 0 or self.align_weight > 0
        self.image_prototypes = _built(image_prototypes) if uses_bank else None
        self.prompt_learner = _built(prompt_learner) if uses_text else None
        self.prototype_warmup_iterations = int(prototype_warmup_iterations)
        self.temperature = float(temperature)
        self.max_sampled_pixels = int(max_sampled_pixels)
        self.ignore_index = int(ignore_index)

    @property
    def needs_embedding(self) -> bool:
        """Whether the network must return pixel embeddings (any prototype term is on)."""
        return self.image_prototypes is not None or self.prompt_learner is not None

    def confidence_threshold(self, iteration: int) -> float:
        """tau at a (1-based) iteration: linear from ``threshold_start`` to ``confidence_threshold``."""
        if self.threshold_warmup_iterations <= 0:
            return self.threshold
        frac = min(max(iteration, 0) / self.threshold_warmup_iterations, 1.0)
        return self.threshold_start + frac * (self.threshold - self.threshold_start)

    def prototype_ramp(self, iteration: int) -> float:
        """Warm-up factor w(t) in [0, 1] of the prototype terms."""
        if self.prototype_warmup_iterations <= 0:
            return 1.0
        return min(max(iteration, 0) / self.prototype_warmup_iterations, 1.0)

    def forward(self, out: StepOutputs, iteration: int) -> dict[str, torch.Tensor]:
        """All loss terms of one iteration; ``"loss"`` is the total to back-propagate."""
        label_x = squeeze_target(out.label_x)
        terms: dict[str, torch.Tensor] = {"loss_x": self.supervised_loss(out.logits_x, label_x)}
        tau = self.confidence_threshold(iteration)
        if out.semi_supervised:
            reliable_w = out.conf_w >= tau
            w1, w2, wfp = self.consistency_weights
            terms["loss_u_s1"] = self.consistency_loss(out.logits_s1, out.pseudo_s1, out.conf_s1 >= tau)
            terms["loss_u_s2"] = self.consistency_loss(out.logits_s2, out.pseudo_s2, out.conf_s2 >= tau)
            terms["loss_u_fp"] = self.consistency_loss(out.logits_fp, out.pseudo_w, reliable_w)
            terms["loss_u"] = w1 * terms["loss_u_s1"] + w2 * terms["loss_u_s2"] + wfp * terms["loss_u_fp"]
            total = self.loss_weights[0] * terms["loss_x"] + self.loss_weights[1] * terms["loss_u"]
            terms["reliable_ratio"] = reliable_w.float().mean()
            terms["threshold"] = terms["loss_x"].new_tensor(tau)  # on the device: logged with the others
        else:
            total = terms["loss_x"]
        if self.needs_embedding and iteration > 0:  # iteration <= 0: the trainer's supervised warm-up, L_x alone
            prototype_total = self._prototype_terms(out, label_x, tau, terms)
            ramp = self.prototype_ramp(iteration)
            terms["prototype_ramp"] = terms["loss_x"].new_tensor(ramp)
            total = total + ramp * prototype_total
        terms["loss"] = total
        return terms

    def _prototype_terms(
        self, out: StepOutputs, label_x: torch.Tensor, tau: float, terms: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        if out.embedding_x is None:
            raise RuntimeError("prototype terms are on but the network returned no embedding")
        # contrast pixels: ground truth on labelled images, reliable pseudo-labels on the strong views
        pools = [flatten_pixels(out.embedding_x, label_x, label_x != self.ignore_index)]
        if out.semi_supervised and out.embedding_s1 is not None:
            for emb, pseudo, conf in (
                (out.embedding_s1, out.pseudo_s1, out.conf_s1),
                (out.embedding_s2, out.pseudo_s2, out.conf_s2),
            ):
                pools.append(flatten_pixels(emb, squeeze_target(pseudo), conf >= tau))
        z = torch.cat([p[0] for p in pools])
        y = torch.cat([p[1] for p in pools])
        idx = sample_balanced_pixels(y, self.num_classes, self.max_sampled_pixels)
        z, y = z[idx].float(), y[idx]
        total = z.new_zeros(())
        bank = self.image_prototypes
        if bank is not None and self.image_weight > 0:
            terms["loss_img"] = prototype_contrast_loss(bank.similarity(z), y, self.temperature, bank.initialized)
            total = total + self.image_weight * terms["loss_img"]
        text = None
        if self.prompt_learner is not None:
            text = self.prompt_learner().float()
            if self.text_weight > 0:
                terms["loss_txt"] = prototype_contrast_loss(z @ text.t(), y, self.temperature)
                total = total + self.text_weight * terms["loss_txt"]
        if bank is not None and text is not None and self.align_weight > 0:
            # mean over the classes that have an image prototype (zero, with a graph, while none has)
            ready = bank.initialized.to(text.dtype)
            distance = (bank.class_prototypes() - text).pow(2).sum(dim=1)
            terms["loss_align"] = (distance * ready).sum() / ready.sum().clamp_min(1)
            total = total + self.align_weight * terms["loss_align"]
        if bank is not None:
            self._update_bank(out, label_x, tau)
        return total

    @torch.no_grad()
    def _update_bank(self, out: StepOutputs, label_x: torch.Tensor, tau: float) -> None:
        """EMA update from labelled pixels (ground truth) and weak views (reliable pseudo-labels)."""
        pools = [flatten_pixels(out.embedding_x, label_x, label_x != self.ignore_index)]
        if out.semi_supervised and out.embedding_w is not None:
            pools.append(flatten_pixels(out.embedding_w, squeeze_target(out.pseudo_w), out.conf_w >= tau))
        self.image_prototypes.update(torch.cat([p[0] for p in pools]), torch.cat([p[1] for p in pools]))


def _built(module: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """A module as given, or built by calling the function given (a config component in ``callable`` mode)."""
    return module if isinstance(module, nn.Module) else module()
