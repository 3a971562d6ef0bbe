"""``SemiSupervisedTrainer``: MPAMatch/UniMatch training on MONAI's Ignite engines.

Each iteration draws one labelled batch (the engine's data loader) and one unlabelled batch (its own, endlessly
cycled loader holding a weak view ``image`` and two strong views ``image_s1``/``image_s2``), then runs

1. one forward of ``[labelled, weak]`` that also decodes a feature-perturbed copy of the weak part (FP stream);
2. CutMix of each strong view with a source (default: the batch rolled by one, so no extra forward; or a second
   unlabelled batch predicted in eval mode, as in the UniMatch code), mixing images, pseudo-labels and confidences
   with the same boxes;
3. one forward of ``[strong 1, strong 2]``;
4. :class:`bundle.losses.MPAMatchLoss` on everything, backward and optimizer step.

A loss that is NaN or infinite stops training before the optimizer step, with one clear message naming the last
good checkpoint. With a ``seed`` every epoch's randomness (augmentations, shuffling, CutMix boxes, dropout) is drawn
from ``(seed, epoch)`` alone, so a run resumed from an epoch checkpoint repeats the uninterrupted run.

It fires MONAI's ``IterationEvents`` like ``SupervisedTrainer`` and stores ``image``, ``label``, ``pred``, ``loss``
and ``loss_terms`` (every term as a float) in ``engine.state.output``. Without an unlabelled loader (or with an
empty one) every iteration is a supervised one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.data.utils import set_rnd
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.engines.workflow import Workflow
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Transform
from monai.utils import set_determinism
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from bundle.engine.cutmix import CutMix, roll_source
from bundle.engine.distributed import rank
from bundle.errors import BundleInputError
from bundle.losses import MPAMatchLoss, StepOutputs
from bundle.options import check_supervised_warmup

__all__ = ["NonFiniteLossError", "SemiSupervisedTrainer"]

logger = logging.getLogger(__name__)

CUTMIX_SOURCES = ("rolled", "batch")
STRONG_KEYS = ("image_s1", "image_s2")  # the unlabelled batch's two strong views (configs/train.json)
# the unlabelled loader's sampler epoch at the start of epoch e is e * this (it advances within an epoch when the
# pool is exhausted), so that seeded epochs never share a shuffle
_UNLABELED_EPOCHS_PER_EPOCH = 1000


class NonFiniteLossError(BundleInputError):
    """The loss became NaN or infinite; printed as one line like input errors (learning rate, data or AMP)."""


@contextmanager
def frozen_norm_statistics(network: torch.nn.Module) -> Iterator[None]:
    """Batch norm layers normalise with the batch's statistics but leave their running statistics unchanged.

    Used for the strong views: heavy colour jitter and grayscale shift the batch statistics so far from those of
    real images that running averages fed by them break the evaluation-mode network.
    """
    layers = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers
    ]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` of a loader's sampler where it has one (``EpochSampler``, ``DistributedSampler``)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: MONAI's MetaTensor metadata is not needed inside an iteration and slows slicing."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class SemiSupervisedTrainer(Trainer):
    """Weak-to-strong consistency training with a labelled and an unlabelled loader (see module docstring).

    Args:
        device, max_epochs, train_data_loader, network, optimizer, epoch_length, non_blocking, prepare_batch,
        iteration_update, postprocessing, key_train_metric, additional_metrics, metric_cmp_fn, train_handlers,
        event_names, event_to_attr, decollate, optim_set_to_none, to_kwargs, amp_kwargs: as in
            ``monai.engines.SupervisedTrainer``. ``train_data_loader`` yields labelled ``image``/``label`` batches.
        loss_function: the :class:`bundle.losses.MPAMatchLoss`.
        unlabeled_data_loader: yields ``image`` (weak), ``image_s1``, ``image_s2``; None -> supervised training.
        inferer: runs the network (``SimpleInferer`` by default; keyword arguments are passed through).
        cutmix: the :class:`bundle.engine.cutmix.CutMix` applied to the strong views (None: no CutMix).
        cutmix_source: "rolled" (the unlabelled batch rolled by one) or "batch" (another unlabelled batch,
            predicted in eval mode).
        amp: mixed precision on CUDA (ignored, with a log line, on a CPU); ``amp_kwargs={"dtype": ...}`` chooses
            bfloat16 (no gradient scaler) or float16 (with one).
        seed: when given, at the start of every epoch the global random generators and the random state of every
            transform of both loaders' datasets are reset from ``(seed, epoch)``; both loaders restart every epoch.
        last_checkpoint: the resumable checkpoint the run writes, named in the error when the loss stops being
            finite.
        supervised_warmup_iterations: the first iterations are supervised preset iterations, ``L_x`` on labelled
            batches alone (about a fifth of the cost of a semi-supervised one on a CPU), so that the pseudo-labels
            start from a trained network; the loss is called with the iteration counted from the first
            semi-supervised one, so its warm-ups (threshold, prototype terms and bank) start there.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: MPAMatchLoss,
        unlabeled_data_loader: Iterable | DataLoader | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
        cutmix: CutMix | None = None,
        cutmix_source: str = "rolled",
        seed: int | None = None,
        last_checkpoint: str | None = None,
        supervised_warmup_iterations: int = 0,
    ) -> None:
        if cutmix_source not in CUTMIX_SOURCES:
            raise BundleInputError(f"cutmix_source must be one of {CUTMIX_SOURCES}, got {cutmix_source!r}")
        device = torch.device(device)
        if amp and device.type != "cuda":
            logger.info("AMP is only used on CUDA devices; training in float32 on %s", device)
            amp = False
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.optim_set_to_none = optim_set_to_none
        self.cutmix = cutmix
        self.cutmix_source = cutmix_source
        self.unlabeled_data_loader = unlabeled_data_loader
        self._unlabeled_iter: Any = None
        self.unlabeled_epoch = 0
        self.seed = None if seed is None else int(seed)
        self.last_checkpoint = last_checkpoint
        self.supervised_warmup_iterations = int(supervised_warmup_iterations)
        check_supervised_warmup(
            self.supervised_warmup_iterations, self.state.max_epochs, self.state.epoch_length, self.semi_supervised
        )
        self.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        if self.semi_supervised and self.supervised_warmup_iterations > 0:
            logger.info(
                "semi-supervised training: labelled batches alone for the first %d iterations, then labelled and "
                "unlabelled batches each iteration",
                self.supervised_warmup_iterations,
            )
        elif self.semi_supervised:
            logger.info("semi-supervised training: labelled and unlabelled batches each iteration")
        else:
            logger.info("no unlabelled data: supervised training")

    def run(self) -> None:  # type: ignore[override]
        """Train; a gradient scaler only where it is needed: float16 autocast (bfloat16 has float32's range)."""
        float16 = self.amp and self._amp_dtype() == torch.float16
        self.scaler = torch.amp.GradScaler(self.state.device.type) if float16 else None
        Workflow.run(self)

    def _amp_dtype(self) -> torch.dtype:
        return self.amp_kwargs.get("dtype", torch.get_autocast_dtype(self.state.device.type))

    @property
    def semi_supervised(self) -> bool:
        loader = self.unlabeled_data_loader
        if loader is None:
            return False
        try:
            return len(loader) > 0  # type: ignore[arg-type]
        except TypeError:  # an iterable without length
            return True

    # ---------------------------------------------------------------- data

    def _next_unlabeled(self) -> dict:
        """The next unlabelled batch; the loader restarts (with its sampler's epoch advanced) when exhausted."""
        if self._unlabeled_iter is None:
            self._set_unlabeled_epoch()
            self._unlabeled_iter = iter(self.unlabeled_data_loader)
        try:
            return next(self._unlabeled_iter)
        except StopIteration:
            self.unlabeled_epoch += 1
            self._set_unlabeled_epoch()
            self._unlabeled_iter = iter(self.unlabeled_data_loader)
            return next(self._unlabeled_iter)

    def _set_unlabeled_epoch(self) -> None:
        _set_sampler_epoch(self.unlabeled_data_loader, self.unlabeled_epoch)

    def _start_epoch(self, engine: SemiSupervisedTrainer) -> None:
        """Set both loaders' sampler epochs and restart them; with a ``seed``, first reset every source of randomness
        from ``(seed, epoch, rank)``.

        The epoch's seeds come from numpy's ``SeedSequence`` of that triple, so two seeds never share an epoch's
        stream (``seed + epoch`` would replay seed 0's epoch e + 1 as seed 1's epoch e), and each rank of a
        distributed run gets its own stream, so that ranks do not augment in lockstep.
        """
        epoch = engine.state.epoch
        if self.seed is not None:
            global_seed, transform_seed = np.random.SeedSequence([self.seed, epoch, rank()]).generate_state(2)
            set_determinism(seed=int(global_seed))
            next_seed = int(transform_seed)  # transform states: apart from the global generators'
            for loader in (engine.data_loader, self.unlabeled_data_loader):
                if loader is not None and hasattr(loader, "dataset"):
                    next_seed = set_rnd(loader.dataset, seed=next_seed)
        _set_sampler_epoch(engine.data_loader, epoch)
        engine.set_data(engine.data_loader)
        self.unlabeled_epoch = epoch * _UNLABELED_EPOCHS_PER_EPOCH
        self._unlabeled_iter = None

    def _logged_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Every term as a float (one device-to-host transfer); stops training if the loss is not finite."""
        names = list(terms)
        values = dict(zip(names, torch.stack([terms[n].detach().float() for n in names]).tolist(), strict=True))
        if math.isfinite(values["loss"]):
            return values
        details = ", ".join(f"{name}={value:.4g}" for name, value in values.items() if name != "loss")
        if self.last_checkpoint and os.path.isfile(self.last_checkpoint):
            kept = f"the last good checkpoint is kept: {self.last_checkpoint}"
        else:
            kept = "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"training stopped: the loss is {values['loss']} at epoch {self.state.epoch}, iteration "
            f"{self.state.iteration} ({details}); {kept}. Check the data or lower learning_rate and train again"
        )

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return _plain(tensor).to(self.state.device, non_blocking=self.non_blocking, **self.to_kwargs)

    # ---------------------------------------------------------------- iteration

    def _iteration(self, engine: SemiSupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images, labels = _plain(batch[0]), _plain(batch[1])
        warmup = engine.supervised_warmup_iterations if engine.semi_supervised else 0
        warming = engine.state.iteration <= warmup
        unlabeled = engine._next_unlabeled() if engine.semi_supervised and not warming else None
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: labels}

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        autocast = torch.autocast(engine.state.device.type, **engine.amp_kwargs) if engine.amp else nullcontext()
        with autocast:
            if unlabeled is None:  # no embedding in warm-up iterations: the loss's prototype terms start after it
                step = engine._supervised_forward(images, labels, embedding=not warming)
            else:
                step = engine._semi_supervised_forward(images, labels, unlabeled)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = engine.loss_function(step, engine.state.iteration - warmup)
        loss = terms["loss"]
        engine.state.output[Keys.PRED] = step.logits_x.detach()
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        scaler = engine.scaler if engine.amp else None
        (loss if scaler is None else scaler.scale(loss)).backward()
        # the one device-to-host transfer of the iteration, after the backward pass is queued and before the step
        engine.state.output["loss_terms"] = engine._logged_terms(terms)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is None:
            engine.optimizer.step()
        else:
            scaler.step(engine.optimizer)
            scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _forward(self, images: torch.Tensor, **kwargs: Any) -> Any:
        return self.inferer(images, self.network, **kwargs)

    def _forward_dict(self, images: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Network outputs as a dict (a plain call returns only the logits tensor)."""
        out = self._forward(images, **kwargs)
        return out if isinstance(out, dict) else {"logits": out}

    def _supervised_forward(self, images: torch.Tensor, labels: torch.Tensor, embedding: bool = True) -> StepOutputs:
        out = self._forward_dict(images, return_embedding=embedding and self.loss_function.needs_embedding)
        return StepOutputs(logits_x=out["logits"], label_x=labels, embedding_x=out.get("embedding"))

    def _semi_supervised_forward(self, images: torch.Tensor, labels: torch.Tensor, unlabeled: dict) -> StepOutputs:
        weak = self._to_device(unlabeled[Keys.IMAGE])
        strong1, strong2 = (self._to_device(unlabeled[key]) for key in STRONG_KEYS)
        n_x, n_u = images.shape[0], weak.shape[0]
        want_embedding = self.loss_function.needs_embedding

        # CutMix source prepared before the main forward (UniMatch predicts it in eval mode)
        source = self._cutmix_source_batch() if self.cutmix is not None and self.cutmix_source == "batch" else None

        out = self._forward(torch.cat([images, weak]), perturb_from=n_x, return_embedding=want_embedding)
        logits_x, logits_w = out["logits"][:n_x], out["logits"][n_x:]
        with torch.no_grad():
            conf_w, pseudo_w = logits_w.detach().float().softmax(dim=1).max(dim=1)

        pseudo_s, conf_s, strong = [pseudo_w, pseudo_w], [conf_w, conf_w], [strong1, strong2]
        if self.cutmix is not None:
            if source is None:  # rolled batch: sample i takes its box from sample i-1
                src_pseudo, src_conf = roll_source(pseudo_w), roll_source(conf_w)
                src_images = [roll_source(strong1), roll_source(strong2)]
            else:
                src_pseudo, src_conf, *src_images = self._match_batch([source[0], source[1], *source[2]], n_u)
            height, width = weak.shape[-2:]
            for view in range(2):
                boxes = self.cutmix.sample_boxes(n_u, height, width, device=weak.device)
                mixed = self.cutmix.mix_all(
                    boxes,
                    {"image": strong[view], "pseudo": pseudo_w, "conf": conf_w},
                    {"image": src_images[view], "pseudo": src_pseudo, "conf": src_conf},
                )
                strong[view], pseudo_s[view], conf_s[view] = mixed["image"], mixed["pseudo"], mixed["conf"]

        with frozen_norm_statistics(self.network):
            out_s = self._forward_dict(torch.cat(strong), return_embedding=want_embedding)
        logits_s1, logits_s2 = out_s["logits"][:n_u], out_s["logits"][n_u:]
        emb = out.get("embedding")
        emb_s = out_s.get("embedding")
        return StepOutputs(
            logits_x=logits_x,
            label_x=labels,
            embedding_x=None if emb is None else emb[:n_x],
            logits_s1=logits_s1,
            logits_s2=logits_s2,
            logits_fp=out["logits_fp"],
            pseudo_w=pseudo_w,
            conf_w=conf_w,
            pseudo_s1=pseudo_s[0],
            conf_s1=conf_s[0],
            pseudo_s2=pseudo_s[1],
            conf_s2=conf_s[1],
            embedding_w=None if emb is None else emb[n_x:],
            embedding_s1=None if emb_s is None else emb_s[:n_u],
            embedding_s2=None if emb_s is None else emb_s[n_u:],
        )

    def _cutmix_source_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """A second unlabelled batch: its weak view predicted in eval mode, its strong views as mixing sources."""
        mix = self._next_unlabeled()
        weak = self._to_device(mix[Keys.IMAGE])
        self.network.eval()
        with torch.no_grad():
            conf, pseudo = self._forward(weak).float().softmax(dim=1).max(dim=1)
        self.network.train()
        strong = [self._to_device(mix[key]) for key in STRONG_KEYS]
        return pseudo, conf, strong

    @staticmethod
    def _match_batch(tensors: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
        """Repeat or cut a source batch to ``size`` samples (the last unlabelled batch may be smaller)."""
        if tensors[0].shape[0] == size:
            return list(tensors)
        index = torch.arange(size, device=tensors[0].device) % tensors[0].shape[0]
        return [t[index] for t in tensors]
